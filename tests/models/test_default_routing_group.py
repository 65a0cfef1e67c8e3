"""The documented default routing group: the tokens of 8 images (counting
the M copies of E³), as in the paper's configurations. With capacity-bound
routing the grouping changes which tokens are dropped and the auxiliary
losses, so a default of 4 images gives other outputs."""

import keras
import numpy as np
import pytest

import keras_e3
from conftest import tiny_backbone_kwargs
from conftest import to_numpy

TOKENS = 5  # 16x16 images, patches of 8, plus the class token


def outputs(ensemble_size, group_size, weights, images):
    backbone = keras_e3.E3ViTBackbone(**tiny_backbone_kwargs(
        ensemble_size=ensemble_size, group_size=group_size,
        capacity_factor=0.5, seed=1))
    if weights is not None:
        backbone.set_weights(weights)
    out = to_numpy(backbone(images)["pooled_output"])
    aux = sum(float(to_numpy(v)) for v in backbone.losses)
    return backbone, out, aux


@pytest.mark.parametrize("ensemble_size", [1, 2])
def test_default_group_is_eight_images(rng, ensemble_size):
    # Fixed initial weights: an unlucky draw can route both groupings
    # alike enough that the auxiliary losses differ by less than 1e-6.
    keras.utils.set_random_seed(0)
    images = rng.normal(size=(8, 16, 16, 3)).astype("float32")
    per_image = TOKENS * ensemble_size
    backbone, default, default_aux = outputs(ensemble_size, None, None,
                                             images)
    weights = backbone.get_weights()
    _, eight, eight_aux = outputs(ensemble_size, 8 * per_image, weights,
                                  images)
    _, four, four_aux = outputs(ensemble_size, 4 * per_image, weights,
                                images)
    # The case discriminates: groups of 4 images route differently.
    assert np.abs(four - eight).max() > 1e-4
    assert abs(four_aux - eight_aux) > 1e-6
    np.testing.assert_allclose(default, eight, atol=1e-6)
    assert abs(default_aux - eight_aux) < 1e-7
