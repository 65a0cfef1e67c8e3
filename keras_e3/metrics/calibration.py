"""Accuracy, NLL, Brier score and calibration error on numpy arrays.

Convention: every function takes **probabilities** `probs` [N, C] (rows sum
to one; use `softmax` on logits first) and integer labels [N]. Lists, numpy
arrays and anything `np.asarray` accepts work; keras is not needed. The
predicted class is `argmax` (the first index on ties).

Calibration binning (top-label ECE). An example's confidence is its maximum
probability. Bin b covers confidences in (lo_b, hi_b]: a confidence exactly
on an edge goes into the bin below it; confidence 0 goes into the first bin
and confidence 1 (or anything above the last inner edge) into the last one.

* "equal_width": edges b / num_bins (b = 0..num_bins), computed in the
  dtype of `probs`, so the float `0.6` is exactly on the edge 3/5.
* "equal_mass": inner edge k (k = 1..num_bins-1) is the confidence of the
  ceil(k N / num_bins)-th smallest example. Without ties bin sizes differ by
  at most one (first bins largest); tied confidences always share a bin (the
  lowest one their value allows), which may leave some bins empty.

ECE = sum_b (n_b / N) |accuracy_b - confidence_b|; empty bins contribute 0.
"""

import numpy as np

BINNINGS = ("equal_width", "equal_mass")


def softmax(logits, axis=-1):
    """Numerically stable softmax of `logits` along `axis`, as float64.

    Args:
        logits: array-like of logits.
        axis: the class axis.

    Returns:
        float64 NumPy probabilities of the same shape (summing to 1 along
        `axis`).

    Example:
    ```python
    import numpy as np
    from keras_e3 import metrics
    metrics.softmax(np.array([[0.0, np.log(3.0)]]))  # [[0.25, 0.75]]
    ```
    """
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - np.max(logits, axis=axis, keepdims=True)
    exp = np.exp(shifted)
    return exp / np.sum(exp, axis=axis, keepdims=True)


def _check(probs, labels):
    probs = np.asarray(probs)
    if not np.issubdtype(probs.dtype, np.floating):
        probs = probs.astype(np.float64)
    labels = np.asarray(labels).reshape(-1)
    if probs.ndim != 2:
        raise ValueError(f"probs must be [N, C], got shape {probs.shape}")
    if labels.shape[0] != probs.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {probs.shape[0]} "
                         "predictions")
    if probs.shape[0] == 0:
        raise ValueError("no predictions")
    if not np.all(np.isfinite(probs)):
        raise ValueError("probs contains NaN or inf")
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.all(labels == np.round(labels)):
            raise ValueError("labels must be integer class indices")
        labels = labels.astype(np.int64)
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise ValueError(f"labels must lie in [0, {probs.shape[1]})")
    return probs, labels


def accuracy(probs, labels):
    """Fraction of examples whose argmax class is the label.

    Args:
        probs: probabilities [N, C].
        labels: integer labels [N].

    Returns:
        The accuracy, a float in [0, 1].

    Example:
    ```python
    import numpy as np
    from keras_e3 import metrics

    probs = np.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]])
    labels = np.array([0, 1, 1])
    metrics.accuracy(probs, labels)  # 2/3
    ```
    """
    probs, labels = _check(probs, labels)
    return float(np.mean(np.argmax(probs, axis=-1) == labels))


def nll(probs, labels, eps=1e-12):
    """Mean of -log p[label]; p is clipped to [eps, 1] to avoid log 0.

    Args:
        probs: probabilities [N, C].
        labels: integer labels [N].
        eps: the smallest probability taken.

    Returns:
        The mean negative log-likelihood, a float.

    Example:
    ```python
    import numpy as np
    from keras_e3 import metrics

    probs = np.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]])
    labels = np.array([0, 1, 1])
    metrics.nll(probs, labels)  # -(log 0.9 + log 0.7 + log 0.4) / 3
    ```
    """
    probs, labels = _check(probs, labels)
    p = probs[np.arange(len(labels)), labels].astype(np.float64)
    return float(-np.mean(np.log(np.clip(p, eps, 1.0))))


def brier(probs, labels):
    """Mean over examples of sum_c (p_c - onehot_c)^2 (range [0, 2]).

    Args:
        probs: probabilities [N, C].
        labels: integer labels [N].

    Returns:
        The Brier score, a float.

    Example:
    ```python
    import numpy as np
    from keras_e3 import metrics

    probs = np.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]])
    labels = np.array([0, 1, 1])
    metrics.brier(probs, labels)
    ```
    """
    probs, labels = _check(probs, labels)
    onehot = np.eye(probs.shape[1])[labels]
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=-1)))


def _inner_edges(confidence, num_bins, binning):
    """The num_bins - 1 inner bin edges, nondecreasing."""
    if binning == "equal_width":
        return (np.arange(1, num_bins) / num_bins).astype(confidence.dtype)
    if binning == "equal_mass":
        n = confidence.shape[0]
        k = np.arange(1, num_bins)
        ranks = -(-k * n // num_bins)  # ceil(k n / num_bins), exact.
        return np.sort(confidence)[np.maximum(ranks, 1) - 1]
    raise ValueError(f"binning must be one of {BINNINGS}, got {binning!r}")


def reliability(probs, labels, num_bins=15, binning="equal_width"):
    """Per-bin statistics for reliability diagrams.

    Args:
        probs: probabilities [N, C].
        labels: integer labels [N].
        num_bins: number of confidence bins.
        binning: "equal_width" or "equal_mass" (as `ece`).

    Returns:
        A dict of NumPy arrays: "confidence" and "accuracy" (mean confidence
        and accuracy per bin, NaN for empty bins), "count" (examples per
        bin, int) and "edges" [num_bins + 1] (the bin edges, first 0 and
        last 1; see the module docstring for the (lo, hi] convention).

    Example:
    ```python
    import numpy as np
    from keras_e3 import metrics

    probs = np.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]])
    labels = np.array([0, 1, 1])
    bins = metrics.reliability(probs, labels, num_bins=5)
    bins["count"]  # [0, 0, 1, 1, 1]
    ```
    """
    probs, labels = _check(probs, labels)
    num_bins = int(num_bins)
    if num_bins < 1:
        raise ValueError("num_bins must be >= 1")
    confidence = np.max(probs, axis=-1)
    correct = (np.argmax(probs, axis=-1) == labels).astype(np.float64)
    inner = _inner_edges(confidence, num_bins, binning)
    # Number of inner edges strictly below the confidence: (lo, hi] bins.
    bins = np.searchsorted(inner, confidence, side="left")
    count = np.bincount(bins, minlength=num_bins)
    conf_sum = np.bincount(bins, weights=confidence.astype(np.float64),
                           minlength=num_bins)
    correct_sum = np.bincount(bins, weights=correct, minlength=num_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, conf_sum / count, np.nan)
        mean_acc = np.where(count > 0, correct_sum / count, np.nan)
    edges = np.concatenate([[0.0], inner.astype(np.float64), [1.0]])
    return {"confidence": mean_conf, "accuracy": mean_acc, "count": count,
            "edges": edges}


def ece(probs, labels, num_bins=15, binning="equal_width"):
    """Top-label expected calibration error (see the module docstring).

    Args:
        probs: probabilities [N, C].
        labels: integer labels [N].
        num_bins: number of confidence bins.
        binning: "equal_width" or "equal_mass".

    Returns:
        The ECE, a float in [0, 1].

    Example:
    ```python
    import numpy as np
    from keras_e3 import metrics

    probs = np.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]])
    labels = np.array([0, 1, 1])
    metrics.ece(probs, labels, num_bins=2)
    metrics.ece(probs, labels, num_bins=2, binning="equal_mass")
    ```
    """
    stats = reliability(probs, labels, num_bins, binning)
    count = stats["count"]
    full = count > 0
    gaps = np.abs(stats["accuracy"][full] - stats["confidence"][full])
    return float(np.sum(count[full] * gaps) / np.sum(count))
