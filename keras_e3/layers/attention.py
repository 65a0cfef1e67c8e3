"""Multi-head attention with optional qk-normalisation (Flax's
`MultiHeadDotProductAttention(normalize_qk=True)`, vmoe's
`attention_qk_norm`)."""

import math

import keras
from keras import ops

from keras_e3.layers.layer_norm import LayerNorm

LAYER_NORM_EPSILON = 1e-6  # Flax's LayerNorm default.


@keras.saving.register_keras_serializable(package="keras_e3")
class MultiHeadAttention(keras.layers.MultiHeadAttention):
    """`keras.layers.MultiHeadAttention` (same weights, names, config and
    outputs) whose unmasked attention without dropout is Flax's
    `dot_product_attention`: queries divided by sqrt(head_dim), one einsum
    to [B, heads, T, S] logits, softmax, one einsum back to [B, T, heads,
    head_dim].

    Keras' own goes through `ops.dot_product_attention`, on JAX
    `jax.nn.dot_product_attention`, which adds a group axis to the heads:
    XLA then copies the probabilities and the heads' gradients once more
    per block in a training step than Flax's einsums do (PERFORMANCE.md,
    "Side by side with the official code"). Masks, dropout in training,
    returned scores and flash attention, and PyTorch (its fused
    `scaled_dot_product_attention`), keep Keras' path.
    """

    def _compute_attention(self, query, key, value, attention_mask=None,
                           training=None, return_attention_scores=False,
                           use_causal_mask=False):
        if (attention_mask is not None or return_attention_scores
                or use_causal_mask or self._flash_attention
                or (self._dropout > 0.0 and training)
                or len(query.shape) != 4
                or keras.backend.backend() == "torch"):
            return super()._compute_attention(
                query, key, value, attention_mask=attention_mask,
                training=training,
                return_attention_scores=return_attention_scores,
                use_causal_mask=use_causal_mask)
        query = query / ops.cast(math.sqrt(query.shape[-1]), query.dtype)
        weights = ops.softmax(ops.einsum("btnh,bsnh->bnts", query, key),
                              axis=-1)
        return ops.einsum("bnts,bsnh->btnh", weights, value), None


@keras.saving.register_keras_serializable(package="keras_e3")
class QkNormMultiHeadAttention(MultiHeadAttention):
    """`MultiHeadAttention` whose projected queries and keys
    go through a LayerNorm without bias over each head's features (one
    `[head_dim]` scale shared by the heads: Flax's `query_ln` / `key_ln`)
    before the scaled dot product, as Flax's `normalize_qk=True`.

    Same projections, weights and outputs as the Keras layer otherwise.
    """

    def build(self, query_shape, value_shape, key_shape=None):
        super().build(query_shape, value_shape, key_shape)
        self.query_ln = LayerNorm(
            epsilon=LAYER_NORM_EPSILON, center=False,
            dtype=self.dtype_policy, name="query_ln")
        self.key_ln = LayerNorm(
            epsilon=LAYER_NORM_EPSILON, center=False,
            dtype=self.dtype_policy, name="key_ln")
        self.query_ln.build((None, None, self._num_heads, self._key_dim))
        self.key_ln.build((None, None, self._num_heads, self._key_dim))

    def _compute_attention(self, query, key, value, *args, **kwargs):
        return super()._compute_attention(
            self.query_ln(query), self.key_ln(key), value, *args, **kwargs)


def make_attention(num_heads, key_dim, qk_norm=False, **kwargs):
    """The attention layer of an encoder block or MAP head: Keras' own, or
    the qk-normalised subclass."""
    cls = QkNormMultiHeadAttention if qk_norm else MultiHeadAttention
    return cls(num_heads, key_dim, **kwargs)
