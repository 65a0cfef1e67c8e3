"""Out-of-distribution scores and detection metrics (numpy only).

Scores: higher means more likely OOD. `msp_score` and `entropy_score` take
probabilities [N, C] or member probabilities [N, M, C] (scored on the
ensemble mean); `max_logit_score` takes logits [N, C];
`mutual_information_score` takes member probabilities [N, M, C].

Detection metrics treat OOD as the positive class and take the scores of
in-distribution and OOD examples; ties are handled like scikit-learn.
"""

import numpy as np


def _probs(probs):
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim == 3:
        probs = np.mean(probs, axis=1)
    if probs.ndim != 2:
        raise ValueError(f"expected [N, C] or [N, M, C], got {probs.shape}")
    return probs


def _entropy(probs):
    """Shannon entropy (nats) over the last axis, with 0 log 0 = 0."""
    logp = np.log(np.where(probs > 0, probs, 1.0))
    return -np.sum(probs * logp, axis=-1)


def msp_score(probs):
    """Negative maximum softmax probability (higher: more likely OOD).

    Args:
        probs: (ensemble) probabilities [N, C].

    Returns:
        Scores [N].

    Example:
    ```python
    import numpy as np
    from keras_e3 import metrics
    metrics.msp_score(np.array([[0.9, 0.1], [0.5, 0.5]]))  # [-0.9, -0.5]
    ```
    """
    return -np.max(_probs(probs), axis=-1)


def entropy_score(probs):
    """Predictive entropy of the (ensemble) prediction (higher: more likely
    OOD).

    Args:
        probs: (ensemble) probabilities [N, C].

    Returns:
        Entropies [N] in nats.

    Example:
    ```python
    import numpy as np
    from keras_e3 import metrics
    metrics.entropy_score(np.array([[1.0, 0.0], [0.5, 0.5]]))  # [0, log 2]
    ```
    """
    return _entropy(_probs(probs))


def max_logit_score(logits):
    """Negative maximum logit (higher: more likely OOD).

    Args:
        logits: logits [N, C].

    Returns:
        Scores [N].

    Example:
    ```python
    import numpy as np
    from keras_e3 import metrics
    metrics.max_logit_score(np.array([[3.0, 1.0], [0.5, 0.2]]))  # [-3.0, -0.5]
    ```
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2:
        raise ValueError(f"logits must be [N, C], got shape {logits.shape}")
    return -np.max(logits, axis=-1)


def mutual_information_score(member_probs):
    """Entropy of the mean prediction minus the members' mean entropy (the
    members' disagreement; higher: more likely OOD).

    Args:
        member_probs: member probabilities [N, M, C].

    Returns:
        Scores [N] in nats (0 where all members agree exactly).

    Example:
    ```python
    import numpy as np
    from keras_e3 import metrics

    # 2 images, 2 members, 3 classes.
    member_probs = np.array([[[0.8, 0.1, 0.1], [0.6, 0.3, 0.1]],
                             [[0.2, 0.7, 0.1], [0.1, 0.2, 0.7]]])
    metrics.mutual_information_score(member_probs)
    ```
    """
    member_probs = np.asarray(member_probs, dtype=np.float64)
    if member_probs.ndim != 3:
        raise ValueError("member_probs must be [N, M, C], got shape "
                         f"{member_probs.shape}")
    return (_entropy(np.mean(member_probs, axis=1))
            - np.mean(_entropy(member_probs), axis=1))


def _scores(in_scores, out_scores):
    in_scores = np.asarray(in_scores, dtype=np.float64).reshape(-1)
    out_scores = np.asarray(out_scores, dtype=np.float64).reshape(-1)
    if in_scores.size == 0 or out_scores.size == 0:
        raise ValueError("need at least one in-distribution and one OOD score")
    if not np.all(np.isfinite(np.r_[in_scores, out_scores])):
        raise ValueError("scores contain NaN or inf")
    return in_scores, out_scores


def auroc(in_scores, out_scores):
    """Area under the ROC curve = P(out > in) + P(out == in) / 2, with OOD
    examples positive.

    Args:
        in_scores: scores [N_in] of in-distribution examples.
        out_scores: scores [N_out] of OOD examples.

    Returns:
        The AUROC, a float in [0, 1].

    Example:
    ```python
    import numpy as np
    from keras_e3 import metrics
    metrics.auroc(np.array([0.1, 0.2, 0.6]), np.array([0.5, 0.9]))  # 5/6
    ```
    """
    in_scores, out_scores = _scores(in_scores, out_scores)
    scores = np.concatenate([in_scores, out_scores])
    # Mann-Whitney U with average ranks for ties.
    _, inverse, counts = np.unique(scores, return_inverse=True,
                                   return_counts=True)
    first_rank = np.cumsum(counts) - counts + 1
    avg_rank = first_rank + (counts - 1) / 2.0
    ranks = avg_rank[inverse]
    n_in, n_out = in_scores.size, out_scores.size
    u = np.sum(ranks[n_in:]) - n_out * (n_out + 1) / 2.0
    return float(u / (n_in * n_out))


def _curve(in_scores, out_scores):
    """True / false positive counts at each distinct threshold, descending."""
    scores = np.concatenate([in_scores, out_scores])
    is_out = np.concatenate([np.zeros(in_scores.size),
                             np.ones(out_scores.size)])
    order = np.argsort(-scores, kind="mergesort")
    scores, is_out = scores[order], is_out[order]
    last = np.r_[np.nonzero(np.diff(scores))[0], scores.size - 1]
    tps = np.cumsum(is_out)[last]
    fps = (last + 1) - tps
    return tps, fps


def aupr(in_scores, out_scores):
    """Average precision with OOD positive (sklearn's
    `average_precision_score`): sum_k (R_k - R_{k-1}) P_k over the distinct
    thresholds, without interpolation.

    Args:
        in_scores: scores [N_in] of in-distribution examples.
        out_scores: scores [N_out] of OOD examples.

    Returns:
        The AUPR, a float in [0, 1].

    Example:
    ```python
    import numpy as np
    from keras_e3 import metrics
    metrics.aupr(np.array([0.1, 0.2, 0.6]), np.array([0.5, 0.9]))
    ```
    """
    in_scores, out_scores = _scores(in_scores, out_scores)
    tps, fps = _curve(in_scores, out_scores)
    precision = tps / (tps + fps)
    recall = tps / out_scores.size
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def fpr_at_95_tpr(in_scores, out_scores, tpr=0.95):
    """False-positive rate at the highest threshold detecting >= `tpr` OOD.

    Examples with score >= t are flagged OOD; t is the largest threshold at
    which at least a fraction `tpr` of OOD examples is flagged, and the
    result is the fraction of in-distribution examples flagged at t (the
    first point of sklearn's `roc_curve` with TPR >= `tpr`).

    Args:
        in_scores: scores [N_in] of in-distribution examples.
        out_scores: scores [N_out] of OOD examples.
        tpr: the true-positive rate to reach.

    Returns:
        The false-positive rate, a float in [0, 1].

    Example:
    ```python
    import numpy as np
    from keras_e3 import metrics
    metrics.fpr_at_95_tpr(np.array([0.1, 0.2, 0.6]), np.array([0.5, 0.9]))  # 1/3
    ```
    """
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    in_scores, out_scores = _scores(in_scores, out_scores)
    tps, fps = _curve(in_scores, out_scores)
    index = np.searchsorted(tps / out_scores.size, tpr, side="left")
    return float(fps[index] / in_scores.size)
