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
    "Side by side with the official code"). On JAX the heads join the
    batch axis for the two products (`_heads_in_batch`). Masks, dropout in
    training, returned scores and flash attention, and PyTorch (its fused
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
        if keras.backend.backend() == "jax":
            return _heads_in_batch(query, key, value), None
        weights = ops.softmax(ops.einsum("btnh,bsnh->bnts", query, key),
                              axis=-1)
        return ops.einsum("bnts,bsnh->btnh", weights, value), None


def _heads_in_batch(query, key, value):
    """softmax(q k^T) v per head with the heads moved into the batch
    axis: [B, T, N, H] -> [B·N, T, H], two products with one batch axis,
    back to [B, T, N, H]. The same sums as the einsums over (b, n); XLA's
    CPU backend runs these [T, S] products at about twice the speed of the
    two-batch-axis einsums (ViT S/32's attention core at batch 32, one
    block: forward 4.6 -> 2.1 ms, forward and backward 10.9 -> 7.4 ms;
    PERFORMANCE.md, "Fourth round")."""
    num_heads, head_dim = query.shape[2], query.shape[3]

    def heads_first(x):
        x = ops.transpose(x, (0, 2, 1, 3))
        return ops.reshape(x, (-1, x.shape[2], head_dim))

    query, key, value = heads_first(query), heads_first(key), heads_first(
        value)
    weights = ops.softmax(ops.einsum("ath,ash->ats", query, key), axis=-1)
    out = ops.reshape(ops.einsum("ats,ash->ath", weights, value),
                      (-1, num_heads, query.shape[1], head_dim))
    return ops.transpose(out, (0, 2, 1, 3))


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
