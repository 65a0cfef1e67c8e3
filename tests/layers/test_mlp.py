"""`keras_e3.layers.Mlp` (run on rows [..., D] -> [rows, D]) against NumPy in
float64 with the layer's own weights: Dense -> GELU (tanh form, Flax's
default, or exact erf) -> Dense, for inputs of rank 2, 3 and 4."""

import math

import numpy as np
import pytest
from conftest import to_numpy

from keras_e3.layers import Mlp

_erf = np.vectorize(math.erf)


def numpy_mlp(x, kernel_0, bias_0, kernel_1, bias_1, approximate):
    h = x @ kernel_0 + bias_0
    if approximate:
        c = math.sqrt(2.0 / math.pi)
        h = 0.5 * h * (1.0 + np.tanh(c * (h + 0.044715 * h ** 3)))
    else:
        h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))
    return h @ kernel_1 + bias_1


@pytest.mark.parametrize("approximate", [True, False])
@pytest.mark.parametrize("shape", [(3, 6), (2, 5, 6), (2, 3, 4, 6)])
def test_outputs_match_numpy(shape, approximate):
    rng = np.random.default_rng(len(shape))
    # The tanh form is the default: exercised by omitting the argument.
    layer = Mlp(11) if approximate else Mlp(11, gelu_approximate=False)
    layer.build(shape)
    weights = [rng.normal(size=w.shape) for w in layer.get_weights()]
    layer.set_weights([w.astype("float32") for w in weights])
    x = rng.normal(size=shape)
    out = to_numpy(layer(x.astype("float32")))
    assert out.shape == shape
    np.testing.assert_allclose(out, numpy_mlp(x, *weights, approximate),
                               rtol=1e-4, atol=1e-4)
