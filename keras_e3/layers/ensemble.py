"""E³ ensemble plumbing: tiling the batch and combining member predictions."""

import math

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_e3")
class EnsembleTile(keras.layers.Layer):
    """Repeats every sequence M times: [B, ...] -> [B*M, ...].

    Row b*M + m is the copy for ensemble member m (vmoe's
    `jnp.repeat(x, M, axis=0)` before the first MoE layer).

    Args:
        ensemble_size: the number of members M.
        **kwargs: Keras' `Layer` arguments (`name`, `dtype`, ...).

    Example:
    ```python
    import numpy as np
    from keras_e3.layers import EnsembleTile
    EnsembleTile(2)(np.zeros((3, 5, 8), "float32")).shape  # (6, 5, 8)
    ```
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
    """[B*M, ...] -> [B, M, ...]: member m of image b at [b, m].

    Args:
        ensemble_size: the number of members M.
        **kwargs: Keras' `Layer` arguments (`name`, `dtype`, ...).

    Example:
    ```python
    import numpy as np
    from keras_e3.layers import EnsembleSplit
    EnsembleSplit(2)(np.zeros((6, 10), "float32")).shape  # (3, 2, 10)
    ```
    """

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

    Args:
        member_logits: member logits, members on `axis`.
        axis: the member axis.

    Returns:
        The ensemble's log-probabilities (a backend tensor), `axis`
        removed.

    Example:
    ```python
    import numpy as np
    import keras_e3
    logits = np.log(np.array([[[0.5, 0.5], [0.9, 0.1]]]))  # [1, 2, 2]
    np.exp(keras_e3.ensemble_log_probs(logits))  # [[0.7, 0.3]]
    ```
    """
    member_logits = ops.convert_to_tensor(member_logits)
    num_members = member_logits.shape[axis]
    log_probs = ops.log_softmax(member_logits, axis=-1)
    return ops.logsumexp(log_probs, axis=axis) - math.log(num_members)
