"""Multihead attention pooling (vmoe's `MapHead`, `classifier="map"`)."""

import keras
from keras import ops

from keras_e3.layers.attention import LAYER_NORM_EPSILON
from keras_e3.layers.attention import make_attention
from keras_e3.layers.layer_norm import LayerNorm
from keras_e3.layers.mlp import Mlp


@keras.saving.register_keras_serializable(package="keras_e3")
class MapHead(keras.layers.Layer):
    """Pools tokens [B, T, H] into [B, H] with a learned probe.

    A learned `probe` [1, 1, H] attends to all tokens (multi-head attention
    with `num_heads` heads, qk-normalised with `qk_norm`), then
    x = x + MLP(LN(x)) with an MLP of `mlp_dim` (vit_jax's MlpBlock); the
    pooled vector is the probe's row. As vmoe's `MapHead` (attention and
    MLP without dropout). `gelu_approximate=False`: the MLP's GELU in its
    exact erf form (timm's `AttentionPoolLatent`).
    """

    def __init__(self, num_heads, mlp_dim, qk_norm=False,
                 gelu_approximate=True, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.qk_norm = bool(qk_norm)
        self.gelu_approximate = bool(gelu_approximate)
        self.norm = LayerNorm(
            epsilon=LAYER_NORM_EPSILON, dtype=self.dtype_policy, name="norm")
        self.mlp = Mlp(mlp_dim, gelu_approximate=self.gelu_approximate,
                       dtype=self.dtype_policy, name="mlp")
        self.attention = None

    def build(self, input_shape):
        hidden = input_shape[-1]
        if hidden % self.num_heads:
            raise ValueError(f"hidden_dim={hidden} is not divisible by "
                             f"num_heads={self.num_heads}.")
        self.probe = self.add_weight(name="probe", shape=(1, 1, hidden),
                                     initializer="glorot_uniform")
        self.attention = make_attention(
            self.num_heads, hidden // self.num_heads, qk_norm=self.qk_norm,
            kernel_initializer="glorot_uniform", dtype=self.dtype_policy,
            name="attention")
        self.attention.build((None, 1, hidden), input_shape)
        self.norm.build((None, 1, hidden))
        self.mlp.build((None, 1, hidden))

    def call(self, x):
        probe = ops.broadcast_to(ops.cast(self.probe, x.dtype),
                                 (ops.shape(x)[0], 1, x.shape[-1]))
        x = self.attention(probe, x)
        x = x + self.mlp(self.norm(x))
        return x[:, 0]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update(num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                      qk_norm=self.qk_norm)
        if not self.gelu_approximate:
            config["gelu_approximate"] = False
        return config
