"""Position-embedding resampling equals vmoe's vit_zoom rule:
scipy.ndimage.zoom(grid, order=1) on the patch grid, the class token's
embedding kept; non-square grids included (a transposed grid fails)."""

import numpy as np
import pytest

from keras_e3.layers.embedding import resample_position_embedding

scipy_ndimage = pytest.importorskip("scipy.ndimage")

pytestmark = pytest.mark.single_backend


@pytest.mark.parametrize("old, new", [((4, 4), (6, 6)), ((2, 3), (3, 5)),
                                      ((6, 4), (3, 9)), ((7, 7), (5, 5))])
@pytest.mark.parametrize("prefix", [0, 1])
def test_default_is_vit_zoom(old, new, prefix):
    rng = np.random.default_rng(sum(old) + sum(new))
    pos = rng.normal(size=(1, prefix + old[0] * old[1], 5)).astype(
        np.float32)
    out = resample_position_embedding(pos, old, new, prefix)
    grid = pos[:, prefix:].reshape(1, *old, 5)
    expected = scipy_ndimage.zoom(grid, (1, new[0] / old[0],
                                         new[1] / old[1], 1), order=1)
    assert out.shape == (1, prefix + new[0] * new[1], 5)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[:, prefix:].reshape(expected.shape),
                               expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(out[:, :prefix], pos[:, :prefix])


def test_other_methods_and_errors():
    pos = np.random.default_rng(0).normal(size=(1, 1 + 9, 2))
    assert resample_position_embedding(pos, (3, 3), (4, 4), 1,
                                       method="bicubic").shape == (1, 17, 2)
    with pytest.raises(ValueError, match="method must be one of"):
        resample_position_embedding(pos, (3, 3), (4, 4), 1, method="area")
    with pytest.raises(ValueError, match="expected 2x3"):
        resample_position_embedding(pos, (2, 3), (4, 4), 1)
