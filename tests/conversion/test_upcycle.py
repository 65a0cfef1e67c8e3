"""Dense vit_jax checkpoints (.npz, both namings) and sparse upcycling,
against the official code's outputs (fixture upcycle_tiny: vit_jax's logits,
and vmoe's initialize_from_vit result)."""

import numpy as np
import pytest
from conftest import fixture_dir
from conftest import to_numpy

import keras_e3
from keras_e3.conversion.vit_jax import ViTCheckpointError
from keras_e3.conversion.vit_jax import model_from_vit_npz
from keras_e3.conversion.vit_jax import read_npz
from keras_e3.conversion.vmoe import vmoe_variable_map
from keras_e3.models.upcycle import upcycle

LINEN = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
         "LayerNorm_2": "LayerNorm_1", "MlpBlock_3": "MlpBlock_0"}


def to_linen(params):
    out = {}
    for name, value in params.items():
        for old, new in LINEN.items():
            name = name.replace(f"/{old}/", f"/{new}/")
        out[name] = value
    return out


@pytest.fixture(scope="module")
def fixture():
    path = fixture_dir("upcycle_tiny")
    dense = path / "dense"
    return {"checkpoint": read_npz(dense / "checkpoint.npz"),
            "dense_inputs": np.load(dense / "inputs.npy"),
            "dense_logits": np.load(dense / "logits.npy"),
            "params": read_npz(path / "params.npz"),
            "inputs": np.load(path / "inputs.npy"),
            "logits": np.load(path / "logits.npy")}


@pytest.fixture(scope="module")
def dense(fixture):
    return model_from_vit_npz(fixture["checkpoint"], keras_e3.E3ViT)


def test_npz_gives_vit_jax_logits_in_both_namings(fixture, dense):
    backbone = dense.backbone
    assert (backbone.hidden_dim, backbone.num_layers, backbone.num_heads,
            backbone.mlp_dim, tuple(backbone.moe_layers), dense.num_classes) == (
        32, 4, 2, 64, (), 10)
    logits = to_numpy(dense(fixture["dense_inputs"]))
    np.testing.assert_allclose(logits, fixture["dense_logits"], rtol=0,
                               atol=1e-5)
    linen = model_from_vit_npz(to_linen(fixture["checkpoint"]),
                               keras_e3.E3ViT)
    np.testing.assert_allclose(to_numpy(linen(fixture["dense_inputs"])),
                               fixture["dense_logits"], rtol=0, atol=1e-5)


def test_upcycle_reproduces_vmoe_initialize_from_vit(fixture, dense):
    up = upcycle(dense, num_experts=4, moe_layers=(1, 3),
                 num_selected_experts=1, ensemble_size=2,
                 capacity_factor=2.0, group_size=68)
    variables = vmoe_variable_map(up)
    official = fixture["params"]
    assert sorted(variables) == sorted(official)
    fresh = {n for n in official if "/Moe/Router/" in n}
    assert fresh == {"Encoder/encoderblock_1/Moe/Router/dense/kernel",
                     "Encoder/encoderblock_3/Moe/Router/dense/kernel"}
    for name in sorted(set(official) - fresh):
        np.testing.assert_allclose(to_numpy(variables[name]),
                                   official[name], rtol=0, atol=1e-6,
                                   err_msg=name)
    # every expert an exact copy of the dense MLP (not only equal to the
    # fixture): kernels [E, D, H]
    kernel = to_numpy(variables["Encoder/encoderblock_1/Moe/Mlp/Dense_0/"
                                "kernel"])
    assert kernel.shape == (4, 32, 64)
    for e in range(4):
        np.testing.assert_array_equal(kernel[e], fixture["checkpoint"][
            "Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"])
    # the routers are the backbone's fresh initialisation, not zeros
    name = sorted(fresh)[0]
    router = to_numpy(variables[name])
    assert router.shape == official[name].shape
    assert np.abs(router).max() > 0
    # with the fixture's routers, vmoe's logits
    for name in fresh:
        variables[name].assign(official[name])
    logits = up.to_official_order(up(fixture["inputs"]))
    np.testing.assert_allclose(to_numpy(logits), fixture["logits"], rtol=0,
                               atol=1e-5)
    # the dense model is unchanged
    np.testing.assert_allclose(to_numpy(dense(fixture["dense_inputs"])),
                               fixture["dense_logits"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("router, extra", [
    ("top_k", {"num_selected_experts": 2}),
    ("experts_choice", {"capacity_factor": 1.0}),
    ("soft", {"num_slots": 1})])
def test_upcycle_other_routers_and_moe_settings(dense, router, extra):
    up = upcycle(dense, num_experts=4, moe_layers=(3,), router=router,
                 group_size=4, **extra)
    assert tuple(up.backbone.moe_layers) == (3,) and up.ensemble_size == 1
    kernel = to_numpy(up.backbone.encoder_blocks[3].mlp.experts.kernel_1)
    np.testing.assert_array_equal(
        kernel, np.broadcast_to(to_numpy(
            dense.backbone.encoder_blocks[3].mlp.dense_1.kernel),
            kernel.shape))
    with pytest.raises(ValueError, match="already has MoE blocks"):
        upcycle(up, num_experts=4, moe_layers=(1,))


def test_errors_name_the_array(fixture):
    params = dict(fixture["checkpoint"])
    missing = {k: v for k, v in params.items() if k != "head/bias"}
    with pytest.raises(ViTCheckpointError, match="missing parameters: "
                                                 "head/bias"):
        model_from_vit_npz(missing, keras_e3.E3ViT)
    wrong = dict(params)
    wrong["Transformer/encoderblock_2/LayerNorm_2/scale"] = np.ones(31)
    with pytest.raises(ViTCheckpointError,
                       match=r"encoderblock_2/LayerNorm_1/scale: got \(31,\)"):
        model_from_vit_npz(wrong, keras_e3.E3ViT)
    hybrid = dict(params)  # a ResNet-hybrid ViT's stem
    hybrid["conv_root/kernel"] = np.zeros((7, 7, 3, 64))
    hybrid["block1/unit1/conv1/kernel"] = np.zeros((1, 1, 64, 64))
    with pytest.raises(ViTCheckpointError, match="block1/unit1/conv1/kernel"
                                                 ", conv_root/kernel"):
        model_from_vit_npz(hybrid, keras_e3.E3ViT)
    with pytest.raises(ViTCheckpointError, match="not a vit_jax"):
        model_from_vit_npz({"embedding/kernel": np.zeros((8, 8, 3, 32))},
                           keras_e3.E3ViT)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_E3_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_from_preset_npz_converts_once_and_resizes_by_vit_zoom(fixture,
                                                                cache):
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    path = str(fixture_dir("upcycle_tiny") / "dense" / "checkpoint.npz")
    model = keras_e3.E3ViT.from_preset(path)
    np.testing.assert_allclose(to_numpy(model(fixture["dense_inputs"])),
                               fixture["dense_logits"], rtol=0, atol=1e-5)
    # vit_jax's evaluation converter: resize, 0..255 -> [-1, 1]
    assert model.preprocessor.image_size == (32, 32)
    assert model.preprocessor.value_range == (-1.0, 1.0)
    converted = sorted(p.name for p in (cache / "presets").iterdir())
    assert len(converted) == 1 and converted[0].startswith("vit-")
    keras_e3.E3ViT.from_preset(path)  # reused, not converted again
    assert sorted(p.name for p in (cache / "presets").iterdir()) == \
        converted
    # another resolution: vmoe's vit_zoom (scipy.ndimage.zoom, order 1) on
    # the 4x4 grid, the class token's embedding kept
    big = keras_e3.E3ViT.from_preset(path, image_size=48)
    pos = fixture["checkpoint"]["Transformer/posembed_input/pos_embedding"]
    grid = pos[:, 1:].reshape(1, 4, 4, 32)
    expected = scipy_ndimage.zoom(grid, (1, 1.5, 1.5, 1), order=1)
    got = to_numpy(big.backbone.embedding.position_embedding)
    np.testing.assert_allclose(got[:, 1:].reshape(expected.shape), expected,
                               rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got[:, :1], pos[:, :1])
    with pytest.raises(keras_e3.PresetError, match="No such .npz"):
        keras_e3.E3ViT.from_preset(str(cache / "missing.npz"))


def test_cli_upcycle_writes_a_preset(fixture, cache, tmp_path):
    from keras_e3.cli import main

    path = str(fixture_dir("upcycle_tiny") / "dense" / "checkpoint.npz")
    out = tmp_path / "e3"
    assert main(["upcycle", path, str(out), "--experts", "4",
                 "--moe-layers", "1,3", "--ensemble-size", "2", "--top-k",
                 "1", "--capacity-factor", "2", "--group-size", "68"]) == 0
    model = keras_e3.E3ViT.from_preset(str(out))
    assert tuple(model.backbone.moe_layers) == (1, 3)
    assert model.ensemble_size == 2
    variables = vmoe_variable_map(model)
    for name, value in fixture["params"].items():
        if "/Moe/Router/" not in name:
            np.testing.assert_allclose(to_numpy(variables[name]), value,
                                       rtol=0, atol=1e-6, err_msg=name)
    with pytest.raises(SystemExit):
        main(["upcycle", path, str(tmp_path / "x"), "--experts", "4",
              "--moe-layers", "one"])


def test_vit_checkpoint_cards(fixture, cache, monkeypatch):
    """A "vit_checkpoint" card (the AugReg cards' kind) whose checkpoint is
    the fixture's .npz: vit_jax's logits, converted once; the shipped
    AugReg cards' architectures build without weights, offline."""
    from keras_e3.presets import builtin

    path = str(fixture_dir("upcycle_tiny") / "dense" / "checkpoint.npz")
    card = {"name": "vit_tiny_fixture", "kind": "vit_checkpoint",
            "description": "fixture", "license": "-", "source": "-",
            "checkpoint": path, "image_size": 32,
            "vmoe_config": {"name": "VisionTransformerMoe", "num_classes": 10,
                            "patch_size": [8, 8], "hidden_size": 32,
                            "classifier": "token", "representation_size": 32,
                            "encoder": {"num_layers": 4, "num_heads": 2,
                                        "mlp_dim": 64}}}
    cards = dict(builtin.builtin_presets(), vit_tiny_fixture=card)
    monkeypatch.setattr(builtin, "builtin_presets", lambda: cards)
    model = keras_e3.E3ViT.from_preset("vit_tiny_fixture")
    np.testing.assert_allclose(to_numpy(model(fixture["dense_inputs"])),
                               fixture["dense_logits"], rtol=0, atol=1e-5)
    assert len(list((cache / "presets").iterdir())) == 1
    architecture = keras_e3.E3ViT.from_preset("vit_tiny_fixture",
                                              load_weights=False)
    assert architecture.count_params() == model.count_params()
    for name in ("augreg_s32_i21k_ft_ilsvrc2012", "augreg_b16_i21k"):
        shipped = builtin.builtin_presets()[name]
        assert shipped["checkpoint"].startswith("gs://vit_models/augreg/")
        built = keras_e3.E3ViT.from_preset(name, load_weights=False)
        assert built.count_params() == shipped["parameter_count"]
    assert keras_e3.E3ViT.from_preset(
        "augreg_s32_i21k_ft_ilsvrc2012",
        load_weights=False).class_names[0] == "tench"
