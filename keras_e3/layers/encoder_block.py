"""Pre-LayerNorm transformer encoder block with a dense or MoE MLP."""

import keras
from keras import ops

from keras_e3.layers.attention import make_attention
from keras_e3.layers.layer_norm import LayerNorm
from keras_e3.layers.mlp import Mlp
from keras_e3.layers.moe import MoeMlp
from keras_e3.layers.moe import MoeSettings

LAYER_NORM_EPSILON = 1e-6  # Flax's LayerNorm default.


@ops.custom_gradient
def materialize_gradient(x):
    """Identity whose gradient XLA computes once instead of re-deriving it
    in every consumer.

    The gradient of a residual stream is a chain of adds, one per later
    block. XLA on CPU fuses that whole chain into each consumer that needs
    the gradient transposed (the kernel gradients of the attention output
    and of the MLP's second dense), so every block re-adds the gradients of
    all the blocks above it: a third of a JAX training step of ViT S/32 on
    a 2-core CPU (2634 -> 1836 ms; PERFORMANCE.md). Passing the gradient
    through `ops.cond` materialises it: XLA does not fuse across a
    conditional. The predicate, `g == g or isnan(g)` on one element, is
    always true (the other branch is never taken), but XLA cannot fold it;
    an optimization barrier would not do, as XLA's CPU pipeline removes
    barriers before fusion. On a GPU the conditional may cost a read of its
    predicate by the host per block and step; not measured.
    """
    def grad(*args, upstream=None):
        if upstream is None:
            (upstream,) = args
        first = ops.reshape(upstream, (-1,))[0]
        always = ops.logical_or(ops.equal(first, first), ops.isnan(first))
        return ops.cond(always, lambda: upstream,
                        lambda: ops.zeros_like(upstream))

    return x, grad


@keras.saving.register_keras_serializable(package="keras_e3")
class EncoderBlock(keras.layers.Layer):
    """x = x + Dropout(Attn(LN(x))); x = x + MLP(LN(x)).

    `moe` is None for a dense MLP, or a `MoeSettings` (or its `get_config()`
    dict) to make this block's MLP a sparse mixture of experts.
    Attention kernels are [H, heads, H/heads] / [heads, H/heads, H], as
    Flax's DenseGeneral in vmoe. `attention_qk_norm`: LayerNorm (no bias)
    on each head's queries and keys (vmoe's `attention_qk_norm`).
    `gelu_approximate=False`: the MLP's (or the experts') GELU in its exact
    erf form (timm and keras-hub ViTs) instead of Flax's tanh approximation.

    Args:
        num_heads: attention heads (H must be a multiple).
        mlp_dim: the MLP's (each expert's) hidden width.
        dropout_rate: dropout after attention and in the MLP.
        attention_dropout_rate: dropout on the attention weights.
        moe: None, or the `MoeSettings` (or dict) of a MoE MLP.
        attention_qk_norm: LayerNorm on the queries and keys.
        gelu_approximate: tanh GELU (True) or the exact erf form.
        **kwargs: Keras' `Layer` arguments (`name`, `dtype`, ...).

    Example:
    ```python
    import numpy as np
    from keras_e3.layers import EncoderBlock
    block = EncoderBlock(num_heads=2, mlp_dim=32)
    block(np.zeros((2, 5, 16), "float32")).shape  # (2, 5, 16)
    ```
    """

    def __init__(self, num_heads, mlp_dim, dropout_rate=0.0,
                 attention_dropout_rate=0.0, moe=None,
                 attention_qk_norm=False, gelu_approximate=True, **kwargs):
        super().__init__(**kwargs)
        self.gelu_approximate = bool(gelu_approximate)
        self.num_heads = num_heads
        self.attention_qk_norm = bool(attention_qk_norm)
        self.mlp_dim = mlp_dim
        self.dropout_rate = dropout_rate
        self.attention_dropout_rate = attention_dropout_rate
        self.moe = MoeSettings.from_config(moe) if moe else None
        self.norm_0 = LayerNorm(
            epsilon=LAYER_NORM_EPSILON, dtype=self.dtype_policy, name="norm_0")
        self.norm_1 = LayerNorm(
            epsilon=LAYER_NORM_EPSILON, dtype=self.dtype_policy, name="norm_1")
        self.dropout = keras.layers.Dropout(dropout_rate,
                                            dtype=self.dtype_policy)
        self.attention = None
        if self.moe:
            self.mlp = MoeMlp(mlp_dim=mlp_dim,
                              gelu_approximate=self.gelu_approximate,
                              dtype=self.dtype_policy, name="moe",
                              **self.moe.get_config())
        else:
            self.mlp = Mlp(mlp_dim, dropout_rate,
                           gelu_approximate=self.gelu_approximate,
                           dtype=self.dtype_policy, name="mlp")

    @property
    def is_moe(self):
        return self.moe is not None

    def build(self, input_shape):
        hidden = input_shape[-1]
        if hidden % self.num_heads:
            raise ValueError(f"hidden_dim={hidden} is not divisible by "
                             f"num_heads={self.num_heads}.")
        self.attention = make_attention(
            self.num_heads, hidden // self.num_heads,
            qk_norm=self.attention_qk_norm,
            dropout=self.attention_dropout_rate,
            kernel_initializer="glorot_uniform", dtype=self.dtype_policy,
            name="attention")
        self.norm_0.build(input_shape)
        self.norm_1.build(input_shape)
        self.attention.build(input_shape, input_shape)
        self.mlp.build(input_shape)

    def call(self, x, training=None, return_routing=False,
             return_metrics=False):
        """x [B, T, H] -> [B, T, H]; with `return_routing` or
        `return_metrics`, (output, the MoE layer's routing or router
        metrics, `MoeMlp.call`), the second None for a dense block."""
        x = materialize_gradient(x)
        y = self.norm_0(x)
        y = self.attention(y, y, training=training)
        x = x + self.dropout(y, training=training)
        # The gradient at the attention residual too: else XLA recomputes
        # that sum (norm_1's input gradient plus the residual's) in each of
        # its four consumers (PERFORMANCE.md, "Side by side with the
        # official code").
        x = materialize_gradient(x)
        y = self.norm_1(x)
        if not (return_routing or return_metrics):
            return x + self.mlp(y, training=training)
        if not self.is_moe:
            return x + self.mlp(y, training=training), None
        y, routing = self.mlp(y, training=training,
                              return_routing=return_routing,
                              return_metrics=return_metrics)
        return x + y, routing

    def compute_output_spec(self, x, training=None, return_routing=False,
                            return_metrics=False):
        return keras.KerasTensor(x.shape, dtype=self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config.update(num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                      dropout_rate=self.dropout_rate,
                      attention_dropout_rate=self.attention_dropout_rate,
                      moe=self.moe.get_config() if self.moe else None)
        if self.attention_qk_norm:
            config["attention_qk_norm"] = True
        if not self.gelu_approximate:
            config["gelu_approximate"] = False
        return config
