"""Multi-head attention with optional qk-normalisation (Flax's
`MultiHeadDotProductAttention(normalize_qk=True)`, vmoe's
`attention_qk_norm`)."""

import keras

LAYER_NORM_EPSILON = 1e-6  # Flax's LayerNorm default.


@keras.saving.register_keras_serializable(package="keras_e3")
class QkNormMultiHeadAttention(keras.layers.MultiHeadAttention):
    """`keras.layers.MultiHeadAttention` whose projected queries and keys
    go through a LayerNorm without bias over each head's features (one
    `[head_dim]` scale shared by the heads: Flax's `query_ln` / `key_ln`)
    before the scaled dot product, as Flax's `normalize_qk=True`.

    Same projections, weights and outputs as the Keras layer otherwise.
    """

    def build(self, query_shape, value_shape, key_shape=None):
        super().build(query_shape, value_shape, key_shape)
        self.query_ln = keras.layers.LayerNormalization(
            epsilon=LAYER_NORM_EPSILON, center=False,
            dtype=self.dtype_policy, name="query_ln")
        self.key_ln = keras.layers.LayerNormalization(
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
    cls = QkNormMultiHeadAttention if qk_norm else \
        keras.layers.MultiHeadAttention
    return cls(num_heads, key_dim, **kwargs)
