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

    def call(self, query, value, key=None, query_mask=None, value_mask=None,
             key_mask=None, attention_mask=None,
             return_attention_scores=False, training=None,
             use_causal_mask=False):
        """Keras' `call`; without masks, gate or returned scores, the four
        projections are products on rows (`_rows_projection`)."""
        key = value if key is None else key
        plain = (query_mask is None and value_mask is None
                 and key_mask is None and attention_mask is None
                 and not return_attention_scores and not use_causal_mask
                 and not getattr(self, "_use_gate", False)
                 and getattr(self, "_sliding_window", None) is None
                 and all(_keras_mask(t) is None for t in (query, value, key))
                 and all(_rows_contracted(d) for d in (
                     self._query_dense, self._key_dense, self._value_dense,
                     self._output_dense)))
        if not plain:
            return super().call(
                query, value, key=key, query_mask=query_mask,
                value_mask=value_mask, key_mask=key_mask,
                attention_mask=attention_mask,
                return_attention_scores=return_attention_scores,
                training=training, use_causal_mask=use_causal_mask)
        output, _ = self._compute_attention(
            _rows_projection(self._query_dense, query),
            _rows_projection(self._key_dense, key),
            _rows_projection(self._value_dense, value), training=training)
        return _rows_projection(self._output_dense, output)

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


# Keras' projection equations (rank-3 inputs) and how many of the kernel's
# leading axes each contracts with the input's trailing ones.
_ROWS_EQUATIONS = {"abc,cde->abde": 1, "abcd,cde->abe": 2}


def _rows_contracted(dense):
    """How many input axes `_rows_projection` contracts for this
    `EinsumDense`, or 0 where it keeps Keras' einsum (another equation, an
    activation, LoRA, quantized kernels)."""
    if (getattr(dense, "quantization_mode", None) is not None
            or getattr(dense, "lora_enabled", False)
            or dense.activation not in (None, keras.activations.linear)):
        return 0
    return _ROWS_EQUATIONS.get(dense.equation, 0)


def _rows_projection(dense, x):
    """`dense(x)` (an `EinsumDense` of `_ROWS_EQUATIONS`, same weights and
    sums) as one matmul on rows: x [..., in] -> [rows, in] @ kernel
    [in, out] -> [..., out], the kernel's axes merged (a reshape). The
    einsum's backward pass contracts the [B, T, ...] gradients over two
    axes, and XLA's CPU backend then copied each projection's gradient
    into two more layouts (bias and kernel gradients) per block; on rows
    the kernel gradient is one product of two [rows, ...] matrices and the
    bias gradient reads the same one (ViT S/32 training step at batch 32:
    the compiled step's bytes accessed 6.25 -> 5.81 GB, 5.55 GB with `Mlp`
    on rows too; PERFORMANCE.md, "Fifth round")."""
    contracted = _rows_contracted(dense)
    # Under the projection's own name, as its call would be (profiles).
    with keras.name_scope(dense.name):
        kernel = dense.kernel
        size = math.prod(kernel.shape[:contracted])
        y = ops.matmul(ops.reshape(x, (-1, size)),
                       ops.reshape(kernel, (size, -1)))
        if dense.bias is not None:
            y = y + ops.reshape(dense.bias, (-1,))
        lead = tuple(ops.shape(x)[:len(x.shape) - contracted])
        return ops.reshape(y, lead + tuple(kernel.shape[contracted:]))


def _keras_mask(x):
    """The Keras mask attached to a tensor, or None."""
    try:
        from keras.src.backend import get_keras_mask
    except ImportError:  # pragma: no cover - older Keras
        return getattr(x, "_keras_mask", None)
    return get_keras_mask(x)


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
    weights = _softmax(ops.einsum("ath,ash->ats", query, key))
    out = ops.reshape(ops.einsum("ats,ash->ath", weights, value),
                      (-1, num_heads, query.shape[1], head_dim))
    return ops.transpose(out, (0, 2, 1, 3))


@ops.custom_gradient
def _softmax(x):
    """Softmax over the last axis with its gradient written out:
    dx = p · (g - Σ g · p), keeping only the probabilities p for the
    backward pass (JAX's own `softmax` does so only under its
    `jax_softmax_custom_jvp` flag, off by default).

    Autodiff of `jax.nn.softmax` keeps exp(x - max), the probabilities and
    two [..., 1] sums per attention: in the ViT S/32 training step at batch
    32 the compiled step's temp memory 555.5 -> 516.0 MiB, bytes accessed
    5.55 -> 5.44 GB, page faults 142k -> 132k a step (PERFORMANCE.md,
    "Sixth round")."""
    probs = ops.softmax(x, axis=-1)

    def grad(*args, upstream=None):
        if upstream is None:
            (upstream,) = args
        return probs * (upstream - ops.sum(upstream * probs, axis=-1,
                                           keepdims=True))

    return probs, grad


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
