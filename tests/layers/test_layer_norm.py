"""`keras_e3.layers.LayerNorm`: outputs and gradients (input, scale and
offset) against NumPy in float64, the gradients by central finite
differences of NumPy's own LayerNorm (an oracle independent of the
layer's written-out gradient on JAX and of autodiff elsewhere). The layer
runs in float32 (JAX's default has no float64)."""

import keras
import numpy as np
import pytest
from conftest import gradients
from conftest import to_numpy

from keras_e3.layers.layer_norm import LayerNorm

EPS = 1e-6


def numpy_layer_norm(x, gamma, beta):
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + EPS) * gamma + beta


def finite_differences(f, args, h=1e-6):
    grads = []
    for i, a in enumerate(args):
        g = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            up = [b.copy() for b in args]
            down = [b.copy() for b in args]
            up[i][idx] += h
            down[i][idx] -= h
            g[idx] = (f(*up) - f(*down)) / (2 * h)
        grads.append(g)
    return grads


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 5), (4, 7)])
def test_outputs_and_gradients_match_numpy(shape, jit):
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape) * 2 + 0.5
    gamma = rng.normal(size=shape[-1:])
    beta = rng.normal(size=shape[-1:])
    weights = rng.normal(size=shape)  # loss = sum(y * weights)
    f32 = [a.astype("float32") for a in (x, gamma, beta, weights)]
    layer = LayerNorm(epsilon=EPS)
    layer.build(shape)
    assert [v.path.split("/")[-1] for v in layer.trainable_variables] == [
        "gamma", "beta"]

    def loss(x, gamma, beta):
        y, _ = layer.stateless_call([gamma, beta], [], x)
        return keras.ops.sum(y * keras.ops.convert_to_tensor(f32[3]))

    layer.gamma.assign(f32[1])
    layer.beta.assign(f32[2])
    np.testing.assert_allclose(to_numpy(layer(f32[0])),
                               numpy_layer_norm(x, gamma, beta), atol=2e-6)
    expected = finite_differences(
        lambda *a: np.sum(numpy_layer_norm(*a) * weights), [x, gamma, beta])
    got = gradients(loss, f32[:3], jit=jit)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, atol=2e-5, rtol=1e-5)


def test_bfloat16_inputs_get_bfloat16_gradients():
    """Mixed precision: the statistics in float32, the input's gradient in
    the input's dtype."""
    layer = LayerNorm(epsilon=EPS, dtype="mixed_bfloat16")
    x = np.random.default_rng(1).normal(size=(2, 4, 8)).astype("float32")
    layer.build(x.shape)

    def loss(x, gamma, beta):
        y, _ = layer.stateless_call(
            [gamma, beta], [], keras.ops.cast(x, "bfloat16"))
        assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
        return keras.ops.sum(keras.ops.cast(y, "float32") ** 2)

    got = gradients(loss, [x, np.ones(8, "float32"), np.zeros(8, "float32")],
                    jit=False)
    assert all(np.all(np.isfinite(g)) for g in got)
    # With gamma 1 and beta 0, sum(y²) over a normalised row of 8 is 8 at
    # any x: d/dx = 0; d/dgamma_j = 2 Σ_rows x̂_j², which sums over j to
    # 2 · 8 rows · 8; d/dbeta_j = 2 Σ_rows x̂_j, summing to 0 (bfloat16
    # accuracy).
    np.testing.assert_allclose(got[0], 0, atol=0.1)
    np.testing.assert_allclose(np.sum(got[1]), 2 * 8 * 8, rtol=0.03)
    np.testing.assert_allclose(np.sum(got[2]), 0, atol=0.5)
