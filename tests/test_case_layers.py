"""Every exported layer of `keras_e3.layers` (and the `ImageConverter`
layer) through `test_case.run_layer_test`, on tiny shapes."""

import numpy as np
import pytest
from test_case import run_layer_test
from test_case import to_numpy

from keras_e3 import layers
from keras_e3.preprocessing import ImageConverter


def normal(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def test_patch_and_position_embedding(tmp_path):
    run_layer_test(layers.PatchAndPositionEmbedding,
                   dict(image_size=8, patch_size=4, hidden_dim=8,
                        num_channels=3),
                   normal(2, 8, 8, 3), (2, 5, 8), tmp_path,
                   expected_num_trainable_weights=4)


def test_encoder_block_dense(tmp_path):
    run_layer_test(layers.EncoderBlock, dict(num_heads=2, mlp_dim=16),
                   normal(2, 5, 8), (2, 5, 8), tmp_path)


def test_encoder_block_moe(tmp_path):
    moe = dict(num_experts=4, group_size=5, num_selected_experts=1,
               capacity_factor=2.0)
    run_layer_test(layers.EncoderBlock,
                   dict(num_heads=2, mlp_dim=16, moe=moe),
                   normal(2, 5, 8), (2, 5, 8), tmp_path,
                   mixed_precision_atol=None)


def test_ensemble_tile(tmp_path):
    x = normal(2, 5, 8)
    y = run_layer_test(layers.EnsembleTile, dict(ensemble_size=2), x,
                       (4, 5, 8), tmp_path)
    np.testing.assert_array_equal(to_numpy(y), np.repeat(x, 2, axis=0))


def test_ensemble_split(tmp_path):
    x = normal(4, 5, 8)
    y = run_layer_test(layers.EnsembleSplit, dict(ensemble_size=2), x,
                       (2, 2, 5, 8), tmp_path)
    np.testing.assert_array_equal(to_numpy(y), x.reshape(2, 2, 5, 8))


def test_mlp(tmp_path):
    run_layer_test(layers.Mlp, dict(mlp_dim=16), normal(2, 5, 8),
                   (2, 5, 8), tmp_path, expected_num_trainable_weights=4)


def test_experts_mlp(tmp_path):
    run_layer_test(layers.ExpertsMlp, dict(num_experts=4, mlp_dim=16),
                   normal(4, 3, 8), (4, 3, 8), tmp_path,
                   expected_num_trainable_weights=4)


@pytest.mark.parametrize("ensemble_size", [1, 2])
def test_moe_mlp(tmp_path, ensemble_size):
    # [B*M, T, H]; groups of 5 tokens per member copy.
    run_layer_test(layers.MoeMlp,
                   dict(num_experts=4, mlp_dim=16, group_size=5 * ensemble_size,
                        num_selected_experts=1, capacity_factor=2.0,
                        ensemble_size=ensemble_size),
                   normal(2 * ensemble_size, 5, 8), (2 * ensemble_size, 5, 8),
                   tmp_path, mixed_precision_atol=None)


@pytest.mark.parametrize("ensemble_size", [1, 2])
def test_router(tmp_path, ensemble_size):
    # Documented: call(x [G, S, H]) -> (gates [G, S, E], metrics of [G, M]).
    metric = (2, ensemble_size)
    gates, _ = run_layer_test(
        layers.Router, dict(num_experts=4, ensemble_size=ensemble_size),
        normal(2, 4, 8),
        ((2, 4, 4), {"importance_loss": metric, "gshard_loss": metric,
                     "auxiliary_loss": metric}),
        tmp_path, mixed_precision_atol=None)
    gates = to_numpy(gates)
    np.testing.assert_allclose(gates.sum(-1), 1.0, atol=1e-5)
    if ensemble_size == 2:  # token s*M + m is gated in partition m only
        assert np.all(gates[:, 0::2, 2:] == 0)
        assert np.all(gates[:, 1::2, :2] == 0)


def test_image_converter(tmp_path):
    # A host-side layer (NumPy in, any image size): no symbolic call, so no
    # functional model to save; its dtype is float32 by design.
    raw = np.random.default_rng(0).integers(0, 256, (2, 10, 12, 1),
                                            dtype=np.uint8)
    y = run_layer_test(ImageConverter, dict(image_size=8, num_channels=3),
                       raw, (2, 8, 8, 3), tmp_path,
                       run_mixed_precision_check=False,
                       run_saving_check=False)
    assert np.all(np.abs(to_numpy(y)) <= 1.0)
