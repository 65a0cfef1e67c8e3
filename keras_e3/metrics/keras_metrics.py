"""Streaming Keras metrics for ensemble outputs (keras.ops only).

`y_pred` is member logits [B, M, C] (E³ models) or logits [B, C]; `y_true`
is integer labels [B] (or [B, 1]), or one-hot / soft labels [B, C] (scored
by their argmax). The ensemble prediction is
log(mean_m softmax(logits_m)) (`keras_e3.ensemble_log_probs`). Accuracy,
NLL, Brier and ECE score the ensemble by default, or member m with
`member=m`; `ensemble_metrics(M)` lists them all (plus disagreement) for
`compile(metrics=...)`. All metrics accept `sample_weight` [B] and work on
JAX, TensorFlow and PyTorch, also inside `jit_compile=True` steps, and match
the numpy functions of `keras_e3.metrics` (`evaluate_predictions`).
"""

import keras
import numpy as np
from keras import ops

from keras_e3.layers.ensemble import ensemble_log_probs


def _labels(y_true, num_classes):
    """Integer labels [B] from integer labels [B] / [B, 1], or from one-hot
    or soft labels [B, C] (their argmax: MixUp / CutMix targets)."""
    y_true = ops.convert_to_tensor(y_true)
    shape = y_true.shape
    if len(shape) >= 2 and shape[-1] == num_classes and num_classes > 1:
        return ops.cast(ops.argmax(y_true, axis=-1), "int32")
    return ops.cast(ops.reshape(y_true, (-1,)), "int32")


def _log_probs(y_pred, dtype, member=None):
    """Log-probabilities [B, C] of the ensemble (`member=None`) or of one
    member, from logits [B, C] or member logits [B, M, C]."""
    y_pred = ops.cast(y_pred, dtype)
    rank = len(y_pred.shape)
    if rank not in (2, 3):
        raise ValueError(f"y_pred must be [B, C] or [B, M, C], got "
                         f"{y_pred.shape}")
    if member is not None:
        if rank == 3:
            if not 0 <= member < y_pred.shape[1]:
                raise ValueError(f"member={member} but y_pred has "
                                 f"{y_pred.shape[1]} members")
            y_pred = y_pred[:, member, :]
        elif member != 0:
            raise ValueError(f"member={member} but y_pred has no members "
                             f"axis: {y_pred.shape}")
        return ops.log_softmax(y_pred, axis=-1)
    if rank == 3:
        return ensemble_log_probs(y_pred, axis=1)
    return ops.log_softmax(y_pred, axis=-1)


def _correct(log_probs, y_true, dtype):
    pred = ops.cast(ops.argmax(log_probs, axis=-1), "int32")
    return ops.cast(ops.equal(pred, _labels(y_true, log_probs.shape[-1])),
                    dtype)


def _member_or_none(member):
    return None if member is None else int(member)


def _default_name(member, what):
    return (f"ensemble_{what}" if member is None
            else f"member_{int(member)}_{what}")


class _PerExampleMean(keras.metrics.Mean):
    """Weighted mean of a per-example value computed by `_values` on the
    ensemble prediction (`member=None`) or on member `member`."""

    what = None

    def __init__(self, member=None, name=None, dtype=None):
        super().__init__(name=name or _default_name(member, self.what),
                         dtype=dtype)
        self.member = _member_or_none(member)

    def update_state(self, y_true, y_pred, sample_weight=None):
        values = self._values(y_true, y_pred)
        if sample_weight is not None:
            sample_weight = ops.reshape(
                ops.cast(sample_weight, self.dtype), (-1,))
        return super().update_state(values, sample_weight=sample_weight)

    def get_config(self):
        config = super().get_config()
        config.update(member=self.member)
        return config


@keras.saving.register_keras_serializable(package="keras_e3")
class EnsembleAccuracy(_PerExampleMean):
    """Top-1 accuracy of the ensemble prediction (or of member `member`).

    `update_state(y_true, y_pred)` takes integer labels [B] and logits
    [B, M, C] (or [B, C]); `result()` is the running mean.

    Args:
        member: None for the ensemble, or a member's index (0 for
            [B, C] outputs).
        name: the metric's name (default: derived from the member).
        dtype: the metric's dtype.

    Example:
    ```python
    import numpy as np
    from keras_e3 import metrics

    # Member logits [B, M, C] of 2 images, 2 members, 3 classes.
    logits = np.array([[[2.0, 0.0, 0.0], [1.0, 2.0, 0.0]],
                       [[0.0, 0.0, 3.0], [0.0, 1.0, 2.0]]])
    labels = np.array([0, 2])
    metric = metrics.EnsembleAccuracy()
    metric.update_state(labels, logits)
    float(metric.result())  # 1.0
    ```
    """

    what = "accuracy"

    def _values(self, y_true, y_pred):
        log_probs = _log_probs(y_pred, self.dtype, self.member)
        return _correct(log_probs, y_true, self.dtype)


@keras.saving.register_keras_serializable(package="keras_e3")
class MemberAccuracy(EnsembleAccuracy):
    """Top-1 accuracy of ensemble member `member` (0 for [B, C] outputs).

    `update_state(y_true, y_pred)` takes integer labels [B] and logits
    [B, M, C] (or [B, C]).

    Args:
        member: the member's index.
        name: the metric's name (default: derived from the member).
        dtype: the metric's dtype.

    Example:
    ```python
    import numpy as np
    from keras_e3 import metrics

    # Member logits [B, M, C] of 2 images, 2 members, 3 classes.
    logits = np.array([[[2.0, 0.0, 0.0], [1.0, 2.0, 0.0]],
                       [[0.0, 0.0, 3.0], [0.0, 1.0, 2.0]]])
    labels = np.array([0, 2])
    metric = metrics.MemberAccuracy(member=1)
    metric.update_state(labels, logits)
    float(metric.result())  # 0.5
    ```
    """

    def __init__(self, member=0, name=None, dtype=None):
        super().__init__(member=member, name=name, dtype=dtype)


@keras.saving.register_keras_serializable(package="keras_e3")
class EnsembleNLL(_PerExampleMean):
    """Mean -log p(label) of the ensemble (or of member `member`).

    `update_state(y_true, y_pred)` takes integer labels [B] and logits
    [B, M, C] (or [B, C]).

    Args:
        member: None for the ensemble, or a member's index (0 for
            [B, C] outputs).
        name: the metric's name (default: derived from the member).
        dtype: the metric's dtype.

    Example:
    ```python
    import numpy as np
    from keras_e3 import metrics

    # Member logits [B, M, C] of 2 images, 2 members, 3 classes.
    logits = np.array([[[2.0, 0.0, 0.0], [1.0, 2.0, 0.0]],
                       [[0.0, 0.0, 3.0], [0.0, 1.0, 2.0]]])
    labels = np.array([0, 2])
    metric = metrics.EnsembleNLL()
    metric.update_state(labels, logits)
    float(metric.result())
    ```
    """

    what = "nll"

    def _values(self, y_true, y_pred):
        log_probs = _log_probs(y_pred, self.dtype, self.member)
        onehot = ops.one_hot(_labels(y_true, log_probs.shape[-1]),
                             log_probs.shape[-1],
                             dtype=self.dtype)
        return -ops.sum(onehot * log_probs, axis=-1)


@keras.saving.register_keras_serializable(package="keras_e3")
class EnsembleBrier(_PerExampleMean):
    """Mean sum_c (p_c - onehot_c)^2 of the ensemble (or of a member).

    `update_state(y_true, y_pred)` takes integer labels [B] and logits
    [B, M, C] (or [B, C]).

    Args:
        member: None for the ensemble, or a member's index (0 for
            [B, C] outputs).
        name: the metric's name (default: derived from the member).
        dtype: the metric's dtype.

    Example:
    ```python
    import numpy as np
    from keras_e3 import metrics

    # Member logits [B, M, C] of 2 images, 2 members, 3 classes.
    logits = np.array([[[2.0, 0.0, 0.0], [1.0, 2.0, 0.0]],
                       [[0.0, 0.0, 3.0], [0.0, 1.0, 2.0]]])
    labels = np.array([0, 2])
    metric = metrics.EnsembleBrier(member=0)
    metric.update_state(labels, logits)
    float(metric.result())
    ```
    """

    what = "brier"

    def _values(self, y_true, y_pred):
        probs = ops.exp(_log_probs(y_pred, self.dtype, self.member))
        onehot = ops.one_hot(_labels(y_true, probs.shape[-1]),
                             probs.shape[-1],
                             dtype=self.dtype)
        return ops.sum(ops.square(probs - onehot), axis=-1)


@keras.saving.register_keras_serializable(package="keras_e3")
class MemberDisagreement(keras.metrics.Mean):
    """Fraction of member pairs whose argmax differ, averaged over examples
    (`keras_e3.metrics.member_disagreement`); 0 for [B, C] outputs.

    Args:
        name: the metric's name.
        dtype: the metric's dtype.

    Example:
    ```python
    import numpy as np
    from keras_e3 import metrics

    # Member logits [B, M, C] of 2 images, 2 members, 3 classes.
    logits = np.array([[[2.0, 0.0, 0.0], [1.0, 2.0, 0.0]],
                       [[0.0, 0.0, 3.0], [0.0, 1.0, 2.0]]])
    labels = np.array([0, 2])
    metric = metrics.MemberDisagreement()
    metric.update_state(labels, logits)
    float(metric.result())  # 0.5
    ```
    """

    def __init__(self, name="disagreement", dtype=None):
        super().__init__(name=name, dtype=dtype)

    def update_state(self, y_true, y_pred, sample_weight=None):
        if len(y_pred.shape) == 2 or y_pred.shape[1] == 1:
            values = ops.zeros((ops.shape(y_pred)[0],), dtype=self.dtype)
        else:
            m, c = y_pred.shape[1], y_pred.shape[2]
            votes = ops.sum(ops.one_hot(ops.argmax(y_pred, axis=-1), c,
                                        dtype=self.dtype), axis=1)
            # Differing ordered pairs: M^2 - sum_c n_c^2, over M (M - 1).
            values = (m * m - ops.sum(ops.square(votes), axis=-1)) / (
                m * (m - 1))
        if sample_weight is not None:
            sample_weight = ops.reshape(
                ops.cast(sample_weight, self.dtype), (-1,))
        return super().update_state(values, sample_weight=sample_weight)


@keras.saving.register_keras_serializable(package="keras_e3")
class ECE(keras.metrics.Metric):
    """Streaming top-label expected calibration error of the ensemble (or
    of member `member`).

    Equal-width bins (lo, hi] with edges b / num_bins; confidence 0 falls in
    the first bin, 1 in the last (as `keras_e3.metrics.ece`). Accumulates
    per-bin (weighted) counts, confidence sums and correct sums; the result
    is sum_b |correct_b - confidence_b| / sum_b count_b. Equal-mass bins
    need every confidence at once: use `keras_e3.metrics.ece` for them.

    Args:
        num_bins: number of equal-width bins.
        member: None for the ensemble, or a member's index (0 for
            [B, C] outputs).
        name: the metric's name (default: derived from the member).
        dtype: the metric's dtype.

    Example:
    ```python
    import numpy as np
    from keras_e3 import metrics

    # Member logits [B, M, C] of 2 images, 2 members, 3 classes.
    logits = np.array([[[2.0, 0.0, 0.0], [1.0, 2.0, 0.0]],
                       [[0.0, 0.0, 3.0], [0.0, 1.0, 2.0]]])
    labels = np.array([0, 2])
    metric = metrics.ECE(num_bins=10)
    metric.update_state(labels, logits)
    float(metric.result())
    ```
    """

    def __init__(self, num_bins=15, member=None, name=None, dtype=None):
        member = _member_or_none(member)
        super().__init__(name=name or ("ece" if member is None
                                       else f"member_{member}_ece"),
                         dtype=dtype)
        self.member = member
        self.num_bins = int(num_bins)
        if self.num_bins < 1:
            raise ValueError("num_bins must be >= 1")
        shape = (self.num_bins,)
        self.bin_count = self.add_variable(
            shape=shape, initializer="zeros", dtype=self.dtype,
            name="bin_count")
        self.bin_confidence = self.add_variable(
            shape=shape, initializer="zeros", dtype=self.dtype,
            name="bin_confidence")
        self.bin_correct = self.add_variable(
            shape=shape, initializer="zeros", dtype=self.dtype,
            name="bin_correct")

    def update_state(self, y_true, y_pred, sample_weight=None):
        log_probs = _log_probs(y_pred, self.dtype, self.member)
        confidence = ops.exp(ops.max(log_probs, axis=-1))
        correct = _correct(log_probs, y_true, self.dtype)
        inner = np.arange(1, self.num_bins) / self.num_bins
        inner = ops.convert_to_tensor(inner.astype(self.dtype))
        # Number of inner edges strictly below the confidence.
        above = ops.cast(ops.greater(confidence[:, None], inner[None, :]),
                         "int32")
        bins = ops.sum(above, axis=-1)
        weights = ops.one_hot(bins, self.num_bins, dtype=self.dtype)
        if sample_weight is not None:
            sample_weight = ops.reshape(
                ops.cast(sample_weight, self.dtype), (-1, 1))
            weights = weights * sample_weight
        self.bin_count.assign_add(ops.sum(weights, axis=0))
        self.bin_confidence.assign_add(
            ops.sum(weights * confidence[:, None], axis=0))
        self.bin_correct.assign_add(
            ops.sum(weights * correct[:, None], axis=0))

    def result(self):
        gap = ops.sum(ops.abs(self.bin_correct - self.bin_confidence))
        return ops.divide_no_nan(gap, ops.sum(self.bin_count))

    def get_config(self):
        config = super().get_config()
        config.update(num_bins=self.num_bins, member=self.member)
        return config


def ensemble_metrics(ensemble_size, num_bins=15):
    """Every Keras metric for `compile(metrics=...)`: accuracy, NLL, Brier
    and ECE of the ensemble and of each of the `ensemble_size` members,
    plus member disagreement when `ensemble_size` > 1. Logged as
    `ensemble_accuracy`, `ece`, `member_0_nll`, ..., `disagreement`.

    Args:
        ensemble_size: the number of members M.
        num_bins: ECE bins.

    Returns:
        A list of Keras metrics.

    Example:
    ```python
    from keras_e3 import metrics
    [m.name for m in metrics.ensemble_metrics(2)]
    ```
    """
    ensemble_size = int(ensemble_size)
    if ensemble_size < 1:
        raise ValueError(f"ensemble_size must be >= 1; got {ensemble_size}")
    out = []
    for member in [None, *range(ensemble_size)]:
        out += [EnsembleAccuracy(member), EnsembleNLL(member),
                EnsembleBrier(member), ECE(num_bins, member=member)]
    if ensemble_size > 1:
        out.append(MemberDisagreement())
    return out
