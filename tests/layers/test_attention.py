"""`keras_e3.layers.MultiHeadAttention` against Keras' own
`keras.layers.MultiHeadAttention` with the same weights (the oracle: the
layer it stands in for): outputs, and gradients with respect to the inputs
and to every weight, for self- and cross-attention at sizes away from any
model's; the projections on rows (`_rows_projection`) against Keras'
`EinsumDense`; and which calls take the rows path."""

import keras
import numpy as np
import pytest
from conftest import gradients
from conftest import to_numpy

from keras_e3.layers import attention as attention_module
from keras_e3.layers.attention import MultiHeadAttention

HEADS, KEY_DIM, WIDTH = 3, 5, 12


def pair(rng, use_bias=True, dtype=None):
    """Ours and Keras' layer, built alike (dtype: their dtype policy, the
    default one if None), with the same random weights."""
    ours = MultiHeadAttention(HEADS, KEY_DIM, use_bias=use_bias, dtype=dtype)
    keras_layer = keras.layers.MultiHeadAttention(HEADS, KEY_DIM,
                                                  use_bias=use_bias,
                                                  dtype=dtype)
    for layer in (ours, keras_layer):
        layer.build((None, None, WIDTH), (None, None, WIDTH))
    weights = [rng.normal(size=w.shape).astype("float32")
               for w in keras_layer.get_weights()]
    ours.set_weights(weights)
    keras_layer.set_weights(weights)
    return ours, keras_layer, weights


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("query_len,value_len", [(7, 7), (1, 9), (4, 6)])
def test_outputs_and_gradients_equal_keras(query_len, value_len, use_bias):
    rng = np.random.default_rng(query_len * 10 + value_len)
    ours, keras_layer, weights = pair(rng, use_bias)
    query = rng.normal(size=(2, query_len, WIDTH)).astype("float32")
    value = (query if query_len == value_len
             else rng.normal(size=(2, value_len, WIDTH)).astype("float32"))
    np.testing.assert_allclose(to_numpy(ours(query, value)),
                               to_numpy(keras_layer(query, value)),
                               rtol=1e-5, atol=1e-5)
    probe = rng.normal(size=(2, query_len, WIDTH)).astype("float32")

    def objective(layer):
        def fn(query, value, *trainable):
            out, _ = layer.stateless_call(list(trainable), [], query, value)
            return keras.ops.sum(keras.ops.multiply(
                out, keras.ops.convert_to_tensor(probe)))
        return fn

    args = [query, value] + weights
    for ours_grad, keras_grad in zip(
            gradients(objective(ours), args, jit=False),
            gradients(objective(keras_layer), args, jit=False)):
        np.testing.assert_allclose(ours_grad, keras_grad, rtol=1e-4,
                                   atol=1e-4)


def test_masked_call_equals_keras():
    """A mask takes Keras' path, with the same result."""
    rng = np.random.default_rng(3)
    ours, keras_layer, _ = pair(rng)
    x = rng.normal(size=(2, 6, WIDTH)).astype("float32")
    mask = np.tril(np.ones((2, 6, 6), "bool"))
    np.testing.assert_allclose(
        to_numpy(ours(x, x, attention_mask=mask)),
        to_numpy(keras_layer(x, x, attention_mask=mask)), rtol=1e-5,
        atol=1e-5)


@pytest.mark.parametrize("equation,x_shape,output_shape", [
    ("abc,cde->abde", (2, 5, 4), (None, 3, 2)),
    ("abcd,cde->abe", (2, 5, 3, 2), (None, 4)),
])
def test_rows_projection_equals_einsum_dense(equation, x_shape,
                                             output_shape):
    rng = np.random.default_rng(0)
    # The bias over the output's non-batch, non-token axes ("de" or "e").
    for bias_axes in (None, equation.split("->")[1][2:]):
        dense = keras.layers.EinsumDense(equation, output_shape,
                                         bias_axes=bias_axes)
        dense.build(x_shape)
        dense.set_weights([rng.normal(size=w.shape).astype("float32")
                           for w in dense.get_weights()])
        x = rng.normal(size=x_shape).astype("float32")
        np.testing.assert_allclose(
            to_numpy(attention_module._rows_projection(dense, x)),
            to_numpy(dense(x)), rtol=1e-5, atol=1e-5)


def test_which_calls_project_rows(monkeypatch):
    """Plain self- and cross-attention project on rows (4 products); a mask,
    returned scores or a LoRA-enabled projection keep Keras' einsums."""
    calls = []
    real = attention_module._rows_projection
    monkeypatch.setattr(attention_module, "_rows_projection",
                        lambda dense, x: calls.append(dense.name) or real(
                            dense, x))
    rng = np.random.default_rng(1)
    ours, keras_layer, _ = pair(rng)
    x = rng.normal(size=(2, 4, WIDTH)).astype("float32")
    ours(x, x)
    assert calls == ["query", "key", "value", "attention_output"]
    del calls[:]
    ours(x[:, :1], x)
    assert len(calls) == 4
    del calls[:]
    ours(x, x, attention_mask=np.ones((2, 4, 4), "bool"))
    out, scores = ours(x, x, return_attention_scores=True)
    assert calls == [] and tuple(scores.shape) == (2, HEADS, 4, 4)
    ours._query_dense.enable_lora(2)
    keras_layer._query_dense.enable_lora(2)
    keras_layer._query_dense.lora_kernel_b.assign(
        rng.normal(size=keras_layer._query_dense.lora_kernel_b.shape))
    ours._query_dense.lora_kernel_a.assign(
        keras_layer._query_dense.lora_kernel_a)
    ours._query_dense.lora_kernel_b.assign(
        keras_layer._query_dense.lora_kernel_b)
    np.testing.assert_allclose(to_numpy(ours(x, x)),
                               to_numpy(keras_layer(x, x)), rtol=1e-5,
                               atol=1e-5)
    assert calls == []


def test_mixed_precision_computes_in_bfloat16_like_keras():
    """Under `mixed_bfloat16` the rows projections read the kernels cast to
    the compute dtype, as Keras' `EinsumDense` does: bfloat16 outputs, equal
    to Keras' up to bfloat16's precision."""
    rng = np.random.default_rng(4)
    ours_layer, keras_layer, _ = pair(rng, dtype="mixed_bfloat16")
    x = rng.normal(size=(2, 5, WIDTH)).astype("float32")
    ours, theirs = ours_layer(x, x), keras_layer(x, x)
    assert keras.backend.standardize_dtype(ours.dtype) == "bfloat16"
    ours, theirs = (to_numpy(keras.ops.cast(t, "float32"))
                    for t in (ours, theirs))
    np.testing.assert_allclose(ours, theirs, rtol=0,
                               atol=0.02 * np.abs(theirs).max())


@pytest.mark.parametrize("shape,scale", [((3, 4, 7), 1.0), ((2, 9), 40.0)])
def test_softmax_gradient_equals_autodiff(shape, scale):
    """`_softmax` (its gradient written out) against the backend's own
    autodiff of `keras.ops.softmax`: values and gradients, for logits of
    ordinary size and large ones (scale 40: exp would overflow without the
    max subtracted)."""
    rng = np.random.default_rng(len(shape))
    logits = (scale * rng.normal(size=shape)).astype("float32")
    probe = rng.normal(size=shape).astype("float32")

    def objective(softmax):
        def fn(x):
            return keras.ops.sum(keras.ops.multiply(
                softmax(x), keras.ops.convert_to_tensor(probe)))
        return fn

    np.testing.assert_allclose(
        to_numpy(attention_module._softmax(logits)),
        to_numpy(keras.ops.softmax(logits, axis=-1)), rtol=1e-6, atol=1e-7)
    (ours,) = gradients(objective(attention_module._softmax), [logits],
                        jit=False)
    (autodiff,) = gradients(
        objective(lambda x: keras.ops.softmax(x, axis=-1)), [logits],
        jit=False)
    assert np.all(np.isfinite(ours))
    np.testing.assert_allclose(ours, autodiff, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="JAX's vjp")
def test_softmax_keeps_only_the_probabilities():
    """The backward pass of `_softmax` holds one array, the probabilities
    (autodiff of `keras.ops.softmax` holds three on JAX)."""
    import jax

    logits = np.random.default_rng(0).normal(size=(2, 5, 6)).astype(
        "float32")
    probs, vjp = jax.vjp(attention_module._softmax, logits)
    residuals = jax.tree.leaves(vjp)
    assert len(residuals) == 1
    np.testing.assert_array_equal(np.asarray(residuals[0]),
                                  np.asarray(probs))


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="JAX's vjp")
def test_attention_core_keeps_no_softmax_sums():
    """The attention core's backward pass holds the heads-first queries,
    keys and values and the probabilities, and none of the [..., 1] sums
    autodiff of `keras.ops.softmax` would add."""
    import jax

    rng = np.random.default_rng(1)
    query, key, value = (rng.normal(size=(2, n, HEADS, KEY_DIM)).astype(
        "float32") for n in (4, 6, 6))
    _, vjp = jax.vjp(attention_module._heads_in_batch, query, key, value)
    shapes = sorted(leaf.shape for leaf in jax.tree.leaves(vjp))
    assert shapes == sorted([(2 * HEADS, 4, KEY_DIM), (2 * HEADS, 6, KEY_DIM),
                             (2 * HEADS, 6, KEY_DIM), (2 * HEADS, 4, 6)])
