"""Ensemble helpers and diversity on member probabilities [N, M, C] (numpy).

The ensemble prediction is the mean of the members' probabilities (the
numpy counterpart of `keras_e3.ensemble_log_probs`). Diversity follows the
Google uncertainty benchmarks (robustness_metrics'
`average_pairwise_diversity`, after Fort et al., 2019, "Deep ensembles: a
loss landscape perspective"):

* disagreement: fraction of member pairs (m < m') whose argmax differ,
  averaged over examples;
* normalized disagreement: disagreement / ensemble error rate, so that
  inaccurate ensembles, whose wrong predictions disagree more easily, are
  not credited for it (NaN when the ensemble makes no error);
* average KL: mean over examples and ordered pairs m != m' of
  KL(p_m || p_m') (probabilities clipped to [eps, 1]).
"""

import itertools
import math

import numpy as np

from keras_e3.metrics import calibration


def _members(member_probs):
    member_probs = np.asarray(member_probs, dtype=np.float64)
    if member_probs.ndim != 3:
        raise ValueError("member_probs must be [N, M, C], got shape "
                         f"{member_probs.shape}")
    return member_probs


def ensemble_probs(member_probs):
    """Mean over members: [N, M, C] -> [N, C].

    Args:
        member_probs: member probabilities [N, M, C].

    Returns:
        The ensemble's probabilities [N, C].

    Example:
    ```python
    import numpy as np
    from keras_e3 import metrics

    # 2 images, 2 members, 3 classes.
    member_probs = np.array([[[0.8, 0.1, 0.1], [0.6, 0.3, 0.1]],
                             [[0.2, 0.7, 0.1], [0.1, 0.2, 0.7]]])
    metrics.ensemble_probs(member_probs)  # [[0.7, 0.2, 0.1], ...]
    ```
    """
    return np.mean(_members(member_probs), axis=1)


def member_disagreement(member_probs):
    """Fraction of member pairs with different argmax, averaged over N.

    0.0 for a single member.

    Args:
        member_probs: member probabilities [N, M, C].

    Returns:
        The disagreement, a float in [0, 1].

    Example:
    ```python
    import numpy as np
    from keras_e3 import metrics

    # 2 images, 2 members, 3 classes.
    member_probs = np.array([[[0.8, 0.1, 0.1], [0.6, 0.3, 0.1]],
                             [[0.2, 0.7, 0.1], [0.1, 0.2, 0.7]]])
    metrics.member_disagreement(member_probs)  # 0.5
    ```
    """
    member_probs = _members(member_probs)
    preds = np.argmax(member_probs, axis=-1)  # [N, M]
    pairs = list(itertools.combinations(range(preds.shape[1]), 2))
    if not pairs:
        return 0.0
    differ = sum(np.mean(preds[:, i] != preds[:, j]) for i, j in pairs)
    return float(differ / len(pairs))


def normalized_disagreement(member_probs, labels):
    """member_disagreement / (1 - accuracy of the ensemble); NaN if 0/0.

    Args:
        member_probs: member probabilities [N, M, C].
        labels: integer labels [N].

    Returns:
        The normalised disagreement, a float.

    Example:
    ```python
    import numpy as np
    from keras_e3 import metrics

    # 2 images, 2 members, 3 classes.
    member_probs = np.array([[[0.8, 0.1, 0.1], [0.6, 0.3, 0.1]],
                             [[0.2, 0.7, 0.1], [0.1, 0.2, 0.7]]])
    metrics.normalized_disagreement(member_probs, np.array([0, 2]))
    ```
    """
    error = 1.0 - calibration.accuracy(ensemble_probs(member_probs), labels)
    disagreement = member_disagreement(member_probs)
    if error == 0.0:
        return math.nan
    return disagreement / error


def average_pairwise_kl(member_probs, eps=1e-12):
    """Mean of KL(p_m || p_m') over ordered member pairs m != m' and N.

    Args:
        member_probs: member probabilities [N, M, C].
        eps: probabilities are clipped to [eps, 1] before the logs.

    Returns:
        The mean KL divergence, a float (0 for identical members).

    Example:
    ```python
    import numpy as np
    from keras_e3 import metrics

    # 2 images, 2 members, 3 classes.
    member_probs = np.array([[[0.8, 0.1, 0.1], [0.6, 0.3, 0.1]],
                             [[0.2, 0.7, 0.1], [0.1, 0.2, 0.7]]])
    metrics.average_pairwise_kl(member_probs)
    ```
    """
    p = np.clip(_members(member_probs), eps, 1.0)
    num_members = p.shape[1]
    if num_members < 2:
        return 0.0
    logp = np.log(p)
    # sum_{m, m'} KL(p_m || p_m') = sum_{m, m'} sum_c p_m (log p_m - log p_m')
    self_term = num_members * np.sum(p * logp, axis=(1, 2))
    cross = np.einsum("nmc,nkc->n", p, logp)
    total = self_term - cross  # diagonal terms are zero
    return float(np.mean(total) / (num_members * (num_members - 1)))


def diversity(member_probs, labels=None):
    """The members' diversity: disagreement and average pairwise KL.

    Args:
        member_probs: member probabilities [N, M, C].
        labels: integer labels [N], for "normalized_disagreement" (None:
            left out).

    Returns:
        A dict with "disagreement", "average_kl" and, given labels,
        "normalized_disagreement".

    Example:
    ```python
    import numpy as np
    from keras_e3 import metrics

    # 2 images, 2 members, 3 classes.
    member_probs = np.array([[[0.8, 0.1, 0.1], [0.6, 0.3, 0.1]],
                             [[0.2, 0.7, 0.1], [0.1, 0.2, 0.7]]])
    metrics.diversity(member_probs, labels=np.array([0, 1]))
    ```
    """
    out = {"disagreement": member_disagreement(member_probs),
           "average_kl": average_pairwise_kl(member_probs)}
    if labels is not None:
        out["normalized_disagreement"] = normalized_disagreement(
            member_probs, labels)
    return out


def evaluate_predictions(logits, labels, num_bins=15, binning="equal_width"):
    """Accuracy, NLL, ECE and Brier of the ensemble and of every member.

    NLLs are computed in log space (exact even for probabilities that
    underflow), the ensemble's NLL from log(mean_m softmax(logits_m)).

    Args:
        logits: member logits [N, M, C], or single-model logits [N, C]
            (treated as M = 1).
        labels: integer labels [N].
        num_bins: ECE bins.
        binning: "equal_width" or "equal_mass" (as `ece`).

    Returns:
        A flat dict of floats: "ensemble/{accuracy,nll,ece,brier}",
        "member_{m}/{...}" for every member m, and, when M > 1,
        "disagreement", "normalized_disagreement" and "average_kl" (see
        `diversity`).

    Example:
    ```python
    import numpy as np
    from keras_e3 import metrics
    logits = np.random.default_rng(0).normal(size=(8, 2, 3))
    report = metrics.evaluate_predictions(logits, np.arange(8) % 3)
    report["ensemble/accuracy"], report["member_1/nll"], report["disagreement"]
    ```
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim == 2:
        logits = logits[:, None, :]
    if logits.ndim != 3:
        raise ValueError(f"logits must be [N, C] or [N, M, C], got shape "
                         f"{logits.shape}")
    member_probs = calibration.softmax(logits)
    shifted = logits - np.max(logits, axis=-1, keepdims=True)
    member_logp = shifted - np.log(np.sum(np.exp(shifted), axis=-1,
                                          keepdims=True))
    top = np.max(member_logp, axis=1, keepdims=True)
    ens_logp = (np.log(np.mean(np.exp(member_logp - top), axis=1))
                + top[:, 0, :])
    _, labels = calibration._check(member_probs[:, 0], labels)
    rows = np.arange(len(labels))

    def scores(probs, logp, prefix):
        return {f"{prefix}/accuracy": calibration.accuracy(probs, labels),
                f"{prefix}/nll": float(-np.mean(logp[rows, labels])),
                f"{prefix}/ece": calibration.ece(probs, labels, num_bins,
                                                 binning),
                f"{prefix}/brier": calibration.brier(probs, labels)}

    out = scores(np.mean(member_probs, axis=1), ens_logp, "ensemble")
    for m in range(logits.shape[1]):
        out.update(scores(member_probs[:, m], member_logp[:, m],
                          f"member_{m}"))
    if logits.shape[1] > 1:
        out.update(diversity(member_probs, labels))
    return out
