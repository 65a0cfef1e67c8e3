"""The exact GELU (timm's and keras-hub's MLPs) in the dense MLP and in the
experts. Oracle: x Φ(x) with SciPy's erf, in float64 NumPy, and its
central finite differences."""

import numpy as np
import pytest
from scipy.special import erf

from conftest import gradients
from conftest import to_numpy

from keras import ops

from keras_e3.layers import ExpertsMlp
from keras_e3.layers import Mlp
from keras_e3.layers.expert_tiles import expert_tiles
from keras_e3.layers.expert_tiles import gelu_grad


def exact_gelu(x):
    return x * 0.5 * (1.0 + erf(x / np.sqrt(2.0)))


def test_exact_gelu_derivative_against_finite_differences():
    x = np.linspace(-6.0, 6.0, 241)
    h = 1e-6
    expected = (exact_gelu(x + h) - exact_gelu(x - h)) / (2 * h)
    actual = to_numpy(gelu_grad(ops.convert_to_tensor(x, "float32"),
                                approximate=False))
    np.testing.assert_allclose(actual, expected, atol=2e-6)
    # the tanh form's derivative differs from it by up to ~9e-4: the two
    # are not interchangeable
    tanh_form = to_numpy(gelu_grad(ops.convert_to_tensor(x, "float32")))
    assert np.abs(tanh_form - expected).max() > 5e-4


def _numpy_experts(x, k0, b0, k1, b1):
    return exact_gelu(x @ k0 + b0[:, None]) @ k1 + b1[:, None]


def test_dense_mlp_exact_gelu():
    mlp = Mlp(12, gelu_approximate=False)
    x = np.random.default_rng(0).normal(0, 2, (2, 5, 6)).astype("float32")
    y = to_numpy(mlp(x))
    d0, d1 = mlp.dense_0, mlp.dense_1
    expected = exact_gelu(x.astype(np.float64) @ to_numpy(d0.kernel)
                          + to_numpy(d0.bias)) @ to_numpy(d1.kernel) \
        + to_numpy(d1.bias)
    np.testing.assert_allclose(y, expected, atol=1e-5)
    assert Mlp.from_config(mlp.get_config()).gelu_approximate is False
    assert "gelu_approximate" not in Mlp(12).get_config()  # the default


@pytest.mark.parametrize("path", ["stacked", "tiles", "tiles_training"])
def test_experts_exact_gelu(path):
    rng = np.random.default_rng(1)
    layer = ExpertsMlp(3, 8, gelu_approximate=False)
    x = rng.normal(0, 2, (3, 4, 6)).astype("float32")
    layer.build(x.shape)
    weights = [to_numpy(w) for w in (layer.kernel_0, layer.bias_0,
                                      layer.kernel_1, layer.bias_1)]
    expected = _numpy_experts(x.astype(np.float64), *weights)
    if path == "stacked":
        y = to_numpy(layer(x))
    else:  # rows sorted by expert, one tile of 4 rows per expert
        y = to_numpy(layer.call_tiles(
            ops.convert_to_tensor(x.reshape(12, 6)),
            ops.convert_to_tensor(np.arange(3, dtype="int32")),
            ops.convert_to_tensor(3, "int32"), 4,
            training=path == "tiles_training")).reshape(3, 4, 6)
    np.testing.assert_allclose(y, expected, atol=1e-5)
    assert ExpertsMlp.from_config(layer.get_config()).gelu_approximate is \
        False


def test_tiles_backward_exact_gelu_against_finite_differences():
    """The tiles' hand-written backward with the exact GELU: the gradient of
    sum(y * g) with respect to kernel_0, against float64 central
    differences of the NumPy experts."""
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1.5, (8, 4)).astype("float32")  # 2 tiles of 4 rows
    k0 = rng.normal(0, 0.7, (2, 4, 5)).astype("float32")
    b0 = rng.normal(0, 0.3, (2, 5)).astype("float32")
    k1 = rng.normal(0, 0.7, (2, 5, 4)).astype("float32")
    b1 = rng.normal(0, 0.3, (2, 4)).astype("float32")
    g = rng.normal(size=(8, 4))
    tile_expert = np.array([1, 0], "int32")

    def loss(x, k0, b0, k1, b1):
        y = expert_tiles(x, (k0, b0, k1, b1),
                         ops.convert_to_tensor(tile_expert), 2, 4,
                         differentiable=True, approximate=False)
        return ops.sum(y * ops.convert_to_tensor(g, "float32"))

    grads = gradients(loss, [x, k0, b0, k1, b1], jit=False)

    def numpy_loss(k0_64):
        rows = x.astype(np.float64).reshape(2, 4, 4)
        y = np.stack([_numpy_experts(rows[i][None], k0_64[e][None],
                                     b0[e][None], k1[e][None], b1[e][None])[0]
                      for i, e in enumerate(tile_expert)])
        return float(np.sum(y.reshape(8, 4) * g))

    h = 1e-6
    expected = np.zeros_like(k0, np.float64)
    for idx in np.ndindex(k0.shape):
        plus, minus = k0.astype(np.float64), k0.astype(np.float64)
        plus[idx] += h
        minus[idx] -= h
        expected[idx] = (numpy_loss(plus) - numpy_loss(minus)) / (2 * h)
    np.testing.assert_allclose(grads[1], expected, atol=1e-4, rtol=1e-4)


def tanh_gelu(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi)
                                    * (x + 0.044715 * x ** 3)))


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("approximate, reference",
                         [(True, tanh_gelu), (False, exact_gelu)])
def test_gelu_gradient_against_finite_differences(approximate, reference,
                                                  jit):
    """`gelu` as the MLPs call it (on JAX with its gradient written out,
    keeping only the pre-activation): d/dx of sum(w · gelu(x)) against
    float64 central differences of the NumPy forms."""
    from keras_e3.layers.expert_tiles import gelu

    x = np.linspace(-6.0, 6.0, 97).reshape(1, 97)
    w = np.random.default_rng(0).normal(size=x.shape)
    h = 1e-6
    expected = w * (reference(x + h) - reference(x - h)) / (2 * h)
    (actual,) = gradients(
        lambda x: ops.sum(ops.convert_to_tensor(w.astype("float32"))
                          * gelu(x, approximate)),
        [x.astype("float32")], jit=jit)
    np.testing.assert_allclose(actual, expected, atol=1e-5)
    np.testing.assert_allclose(
        to_numpy(gelu(ops.convert_to_tensor(x, "float32"), approximate)),
        reference(x), atol=2e-6)
