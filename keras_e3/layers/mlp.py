"""The transformer MLP: a dense one, and E stacked experts for MoE layers."""

import math

import keras
from keras import ops

from keras_e3.layers.expert_tiles import expert_segments
from keras_e3.layers.expert_tiles import expert_tiles
from keras_e3.layers.expert_tiles import gelu

# vit_jax's MlpBlock initialisers.
KERNEL_INIT = "glorot_uniform"
BIAS_INIT = {"class_name": "RandomNormal", "config": {"stddev": 1e-6}}


@keras.saving.register_keras_serializable(package="keras_e3")
class Mlp(keras.layers.Layer):
    """Dense -> GELU -> Dropout -> Dense -> Dropout (vit_jax's MlpBlock).

    Args:
        mlp_dim: int, the hidden width.
        dropout_rate: float, dropout after the GELU and after the output.
        gelu_approximate: bool, True (default) for the tanh approximation
            of GELU (Flax's `nn.gelu`, vit_jax and vmoe), False for the exact
            erf form (PyTorch's `nn.GELU`, timm and keras-hub ViTs).

    Example:
    ```python
    import numpy as np
    from keras_e3.layers import Mlp
    y = Mlp(32)(np.zeros((2, 5, 16), "float32"))  # [2, 5, 16]
    ```
    """

    def __init__(self, mlp_dim, dropout_rate=0.0, gelu_approximate=True,
                 **kwargs):
        super().__init__(**kwargs)
        self.mlp_dim = mlp_dim
        self.dropout_rate = dropout_rate
        self.gelu_approximate = bool(gelu_approximate)
        self.dense_0 = keras.layers.Dense(
            mlp_dim, kernel_initializer=KERNEL_INIT, bias_initializer=BIAS_INIT,
            dtype=self.dtype_policy, name="dense_0")
        self.dense_1 = None
        self.dropout = keras.layers.Dropout(dropout_rate,
                                            dtype=self.dtype_policy)

    def build(self, input_shape):
        self.dense_1 = keras.layers.Dense(
            input_shape[-1], kernel_initializer=KERNEL_INIT,
            bias_initializer=BIAS_INIT, dtype=self.dtype_policy,
            name="dense_1")
        self.dense_0.build(input_shape)
        self.dense_1.build(tuple(input_shape[:-1]) + (self.mlp_dim,))

    def call(self, x, training=None):
        # On rows [B*T, D]: the kernels' gradients are then products of two
        # [rows, ...] matrices, which XLA's CPU backend runs without first
        # transposing the [B, T, F] gradient (PERFORMANCE.md, "Fifth round").
        shape = ops.shape(x)
        x = self.dense_0(ops.reshape(x, (-1, shape[-1])))
        x = gelu(x) if self.gelu_approximate else keras.activations.gelu(
            x, approximate=False)
        x = self.dropout(x, training=training)
        return ops.reshape(self.dropout(self.dense_1(x), training=training),
                           shape)

    def get_config(self):
        config = super().get_config()
        config.update(mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate)
        if not self.gelu_approximate:
            config["gelu_approximate"] = False
        return config


@keras.saving.register_keras_serializable(package="keras_e3")
class ExpertsMlp(keras.layers.Layer):
    """E independent MLPs with stacked kernels [E, H, mlp] and [E, mlp, H].

    `call(x)` maps expert buffers [E, N, H] to [E, N, H]; each expert is
    initialised like a separate vit_jax MlpBlock.

    Args:
        num_experts: the number of experts E.
        mlp_dim: each expert's hidden width.
        dropout_rate: dropout after each dense layer.
        gelu_approximate: True (default) for Flax's tanh GELU, False for
            the exact one (experts upcycled from timm or keras-hub ViTs).
        **kwargs: Keras' `Layer` arguments (`name`, `dtype`, ...).

    Example:
    ```python
    import numpy as np
    from keras_e3.layers import ExpertsMlp
    ExpertsMlp(4, 32)(np.zeros((4, 6, 16), "float32")).shape  # (4, 6, 16)
    ```
    """

    def __init__(self, num_experts, mlp_dim, dropout_rate=0.0,
                 gelu_approximate=True, **kwargs):
        super().__init__(**kwargs)
        self.num_experts = num_experts
        self.mlp_dim = mlp_dim
        self.dropout_rate = dropout_rate
        self.gelu_approximate = bool(gelu_approximate)
        self.dropout = keras.layers.Dropout(dropout_rate,
                                            dtype=self.dtype_policy)

    def build(self, input_shape):
        hidden, e, mlp = input_shape[-1], self.num_experts, self.mlp_dim
        limit = math.sqrt(6.0 / (hidden + mlp))  # Glorot per expert.
        uniform = keras.initializers.RandomUniform(-limit, limit)
        self.kernel_0 = self.add_weight(name="kernel_0", shape=(e, hidden, mlp),
                                        initializer=uniform)
        self.bias_0 = self.add_weight(name="bias_0", shape=(e, mlp),
                                      initializer=BIAS_INIT)
        self.kernel_1 = self.add_weight(name="kernel_1", shape=(e, mlp, hidden),
                                        initializer=uniform)
        self.bias_1 = self.add_weight(name="bias_1", shape=(e, hidden),
                                      initializer=BIAS_INIT)

    def call(self, x, training=None):
        h = gelu(ops.matmul(x, self.kernel_0) + self.bias_0[:, None, :],
                 self.gelu_approximate)
        h = self.dropout(h, training=training)
        y = ops.matmul(h, self.kernel_1) + self.bias_1[:, None, :]
        return self.dropout(y, training=training)

    def call_tiles(self, x, tile_expert, num_used_tiles, tile_size,
                   training=None):
        """The experts on rows sorted by expert ([num_tiles * tile_size, H],
        `TiledDispatcher`): tile i runs expert tile_expert[i], tiles from
        `num_used_tiles` on are skipped (zeros). No dropout: the tiled path
        is not used for training with dropout_rate > 0."""
        return expert_tiles(
            x, (self.kernel_0, self.bias_0, self.kernel_1, self.bias_1),
            tile_expert, num_used_tiles, tile_size,
            differentiable=bool(training),
            approximate=self.gelu_approximate)

    def call_buckets(self, x, rows_per_expert, buckets, training=None):
        """The experts on rows [E * bound, H], expert e's at [e * bound, ...)
        (`BucketDispatcher`), rows_per_expert[e] of them: expert e runs on
        its first B_e rows, B_e the smallest of `buckets` (static,
        ascending, the last `bound`) that holds them (`expert_segments`,
        with its own backward pass for training); the other rows are
        zeros. No dropout: not used for training with dropout_rate > 0."""
        hidden = x.shape[-1]
        rows = ops.reshape(x, (self.num_experts, -1, hidden))
        y = expert_segments(
            rows, (self.kernel_0, self.bias_0, self.kernel_1, self.bias_1),
            rows_per_expert, buckets, differentiable=bool(training),
            approximate=self.gelu_approximate)
        return ops.reshape(y, (-1, hidden))

    def get_config(self):
        config = super().get_config()
        config.update(num_experts=self.num_experts, mlp_dim=self.mlp_dim,
                      dropout_rate=self.dropout_rate)
        if not self.gelu_approximate:
            config["gelu_approximate"] = False
        return config
