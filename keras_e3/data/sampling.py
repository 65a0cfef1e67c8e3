"""k-shot sampling: exactly k examples of every class, fixed per seed."""

import numpy as np


def sample_k_shot(labels, k, seed=0, classes=None):
    """Indices of exactly `k` examples per class, deterministic per `seed`.

    Follows vmoe's / big_vision's few-shot sampler: with
    `rng = np.random.default_rng(seed)`, each class's indices (classes in
    increasing order) are permuted by `rng` and the first `k` kept, so the
    k-shot set of a seed contains its (k-1)-shot set. The result is
    grouped by class: `k` indices of the first class, then the next.

    Args:
        labels: integer labels, shape [N].
        k: examples per class (>= 1).
        seed: the sampling seed.
        classes: the classes to sample (default: those present in
            `labels`). A listed class with fewer than `k` examples is an
            error.

    Raises:
        ValueError: if `k` exceeds the size of a class (named, with its
            count), or `labels` is not a 1-D integer array.

    Returns:
        int indices [k * number of classes], grouped by class.

    Example:
    ```python
    import numpy as np

    from keras_e3 import data

    labels = np.array([0, 1, 0, 1, 0, 2, 2])
    data.sample_k_shot(labels, k=2, seed=0)  # 2 indices of class 0, 1, 2
    ```
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D integer labels; got shape "
                         f"{labels.shape}.")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers; got dtype {labels.dtype}.")
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer; got {k}.")
    k = int(k)
    classes = np.unique(labels) if classes is None else np.asarray(classes)
    members = [np.flatnonzero(labels == c) for c in classes]
    counts = [len(m) for m in members]
    if counts and min(counts) < k:
        small = int(np.argmin(counts))
        raise ValueError(
            f"k={k} exceeds the smallest class: class {classes[small]} has "
            f"only {counts[small]} examples.")
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(m)[:k] for m in members]
    if not chosen:
        return np.zeros((0,), np.int64)
    return np.concatenate(chosen).astype(np.int64)
