"""E³ ensemble plumbing: tiling the batch and combining member predictions."""

import math

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_e3")
class EnsembleTile(keras.layers.Layer):
    """Repeats every sequence M times: [B, ...] -> [B*M, ...].

    Row b*M + m is the copy for ensemble member m (vmoe's
    `jnp.repeat(x, M, axis=0)` before the first MoE layer).
    """

    def __init__(self, ensemble_size, **kwargs):
        super().__init__(**kwargs)
        self.ensemble_size = ensemble_size

    def call(self, x):
        return ops.repeat(x, self.ensemble_size, axis=0)

    def compute_output_shape(self, input_shape):
        batch = input_shape[0]
        batch = None if batch is None else batch * self.ensemble_size
        return (batch, *input_shape[1:])

    def get_config(self):
        config = super().get_config()
        config.update(ensemble_size=self.ensemble_size)
        return config


@keras.saving.register_keras_serializable(package="keras_e3")
class EnsembleSplit(keras.layers.Layer):
    """[B*M, ...] -> [B, M, ...]: member m of image b at [b, m]."""

    def __init__(self, ensemble_size, **kwargs):
        super().__init__(**kwargs)
        self.ensemble_size = ensemble_size

    def call(self, x):
        return ops.reshape(x, (-1, self.ensemble_size, *x.shape[1:]))

    def compute_output_shape(self, input_shape):
        return (None, self.ensemble_size, *input_shape[1:])

    def get_config(self):
        config = super().get_config()
        config.update(ensemble_size=self.ensemble_size)
        return config


def ensemble_log_probs(member_logits, axis=1):
    """log(mean_m softmax(logits_m)): the E³ ensemble prediction.

    `member_logits` is [B, M, C] (members on `axis`); returns [B, C]
    log-probabilities, computed stably as logsumexp(log_softmax) - log(M).
    Works on any backend tensor or numpy array.
    """
    member_logits = ops.convert_to_tensor(member_logits)
    num_members = member_logits.shape[axis]
    log_probs = ops.log_softmax(member_logits, axis=-1)
    return ops.logsumexp(log_probs, axis=axis) - math.log(num_members)
