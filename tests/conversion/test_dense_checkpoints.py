"""timm and keras-hub ViTs in keras-e3: the reference is each library's own
forward pass on random weights (timm: `timm.create_model`, keras-hub:
`ViTImageClassifier`), never our conversion's.
"""

import sys

import numpy as np
import pytest

from conftest import ROOT
from conftest import to_numpy

import keras_e3
from keras_e3.conversion.keras_hub_vit import to_vmoe as keras_hub_to_vmoe
from keras_e3.conversion.timm_vit import ViTCheckpointError
from keras_e3.conversion.timm_vit import model_from_timm
from keras_e3.presets.dense_checkpoints import fold_input_affine

sys.path.insert(0, str(ROOT / "tests"))
from timm_reference import import_timm  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # timm.data.IMAGENET_DEFAULT_MEAN
IMAGENET_STD = (0.229, 0.224, 0.225)


def _timm_vit(timm, seed=0, **kwargs):
    """A small timm ViT with random (not initial) weights, in eval mode."""
    import torch

    torch.manual_seed(seed)
    args = dict(img_size=32, patch_size=8, num_classes=5, depth=2,
                embed_dim=24, num_heads=3)
    args.update(kwargs)
    model = timm.create_model("vit_small_patch16_224", pretrained=False,
                              **args).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def _timm_logits(model, images_nchw):
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(images_nchw)).numpy()


def _state(model):
    return {k: v.numpy() for k, v in model.state_dict().items()}


TIMM_CASES = {
    # class token, depth 2, width 24, 3 heads
    "token": dict(global_pool="token"),
    # timm's GAP: no class token, fc_norm (the norm after pooling); another
    # depth, width and head count, and non-square patches
    "gap_fc_norm": dict(global_pool="avg", class_token=False, depth=3,
                        embed_dim=32, num_heads=4, patch_size=(8, 4)),
    # GAP with the norm before pooling (vit_jax's GAP)
    "gap_norm": dict(global_pool="avg", class_token=False, fc_norm=False),
    # MAP head (timm's AttentionPoolLatent)
    "map": dict(global_pool="map", class_token=False),
    # no qkv bias, wider MLP
    "no_qkv_bias": dict(qkv_bias=False, mlp_ratio=3.0),
}


@pytest.mark.parametrize("case", sorted(TIMM_CASES))
def test_timm_state_dict_gives_timms_logits(case):
    timm = import_timm()
    kwargs = TIMM_CASES[case]
    reference = _timm_vit(timm, **kwargs)
    images = np.random.default_rng(1).normal(
        size=(2, 3, 32, 32)).astype("float32")
    expected = _timm_logits(reference, images)
    model = model_from_timm(_state(reference), keras_e3.E3ViT,
                            num_heads=kwargs.get("num_heads", 3),
                            image_size=32)
    assert model.backbone.gelu_approximate is False
    actual = to_numpy(model.predict(images.transpose(0, 2, 3, 1),
                                    verbose=0))
    np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=0)


def test_timm_folder_preset_uses_timms_preprocessing(tmp_path, monkeypatch):
    """A folder as timm writes it for the Hub (config.json with the
    pretrained_cfg, model.safetensors): from_preset converts it, folds
    ImageNet's per-channel mean/std into the patch embedding, and takes the
    class names; on uint8 images at the model's size it gives timm's
    logits on timm's normalised images."""
    timm = import_timm()
    from timm.models._hub import save_for_hf

    monkeypatch.setenv("KERAS_E3_CACHE", str(tmp_path / "cache"))
    reference = _timm_vit(timm, seed=2)
    names = [f"class_{i}" for i in range(5)]
    folder = tmp_path / "timm_vit"
    save_for_hf(reference, str(folder), safe_serialization=True,
                model_config={"label_names": names},
                data_config={"mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                             "crop_pct": 1.0, "input_size": (3, 32, 32)})
    pixels = np.random.default_rng(3).integers(
        0, 256, (2, 32, 32, 3)).astype("uint8")
    normalised = ((pixels / 255.0 - np.array(IMAGENET_MEAN))
                  / np.array(IMAGENET_STD)).astype("float32")
    expected = _timm_logits(reference, normalised.transpose(0, 3, 1, 2))
    model = keras_e3.E3ViT.from_preset(str(folder))
    assert model.class_names == names
    actual = to_numpy(model.predict(pixels, verbose=0))
    np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=0)
    # The converted preset is cached: a second load reads it back.
    again = keras_e3.E3ViT.from_preset(str(folder))
    np.testing.assert_allclose(to_numpy(again.predict(pixels, verbose=0)),
                               expected, atol=1e-5, rtol=0)


@pytest.mark.single_backend
def test_timm_eval_crop_settings(tmp_path, monkeypatch):
    """timm's eval transform: resize the smaller side to
    floor(size / crop_pct), crop the centre. For 32 px and crop_pct 0.875:
    floor(36.571...) = 36 (hand computation)."""
    timm = import_timm()
    from timm.models._hub import save_for_hf

    monkeypatch.setenv("KERAS_E3_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "timm_vit"
    save_for_hf(_timm_vit(timm), str(folder), safe_serialization=True,
                data_config={"crop_pct": 0.875, "input_size": (3, 32, 32),
                             "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)})
    converter = keras_e3.E3ViT.from_preset(str(folder)).preprocessor
    assert converter.smaller_side == 36
    assert tuple(converter.image_size) == (32, 32)
    # mean = std = 0.5 is the uniform [-1, 1] mapping: no folding.
    assert tuple(converter.value_range) == (-1.0, 1.0)


@pytest.mark.single_backend
def test_fold_input_affine_by_hand():
    """A 1x1 patch, 2 channels, 1 output: kernel [w0, w1] = [2, 3], bias 1;
    normalisation v_c = s_c p + o_c with s = (1/255, 2/255), o = (-1, 0.5).
    Folded for [0, 1] inputs u = p / 255: kernel_c = w_c · 255 s_c =
    (2, 6), bias = 1 + 2·(-1) + 3·0.5 = 0.5."""
    params = {"embedding/kernel": np.array([2.0, 3.0], np.float32).reshape(
        1, 1, 2, 1), "embedding/bias": np.array([1.0], np.float32)}
    value_range = fold_input_affine(params, (1 / 255, 2 / 255), (-1.0, 0.5))
    assert value_range == (0.0, 1.0)
    np.testing.assert_allclose(params["embedding/kernel"].ravel(), [2, 6],
                               rtol=1e-6)
    np.testing.assert_allclose(params["embedding/bias"], [0.5], rtol=1e-6)
    uniform = {"embedding/kernel": np.ones((1, 1, 3, 1), np.float32),
               "embedding/bias": np.zeros(1, np.float32)}
    assert fold_input_affine(uniform, 1 / 127.5, -1.0) == (-1.0, 1.0)
    np.testing.assert_array_equal(uniform["embedding/kernel"], 1.0)


REFUSED = {
    "reg_tokens": (dict(reg_tokens=2), "register tokens"),
    "layer_scale": (dict(init_values=0.1), "LayerScale"),
    "pre_norm": (dict(pre_norm=True), "pre-norm"),
    "avg_with_class_token": (dict(global_pool="avg"),
                             "beside a class token"),
}


@pytest.mark.single_backend
@pytest.mark.parametrize("case", sorted(REFUSED))
def test_timm_variants_we_do_not_compute_are_refused(case):
    timm = import_timm()
    kwargs, message = REFUSED[case]
    state = _state(_timm_vit(timm, **kwargs))
    with pytest.raises(ViTCheckpointError, match=message):
        model_from_timm(state, keras_e3.E3ViT, num_heads=3)


@pytest.mark.single_backend
def test_timm_missing_or_misshapen_arrays_are_named():
    timm = import_timm()
    state = _state(_timm_vit(timm))
    missing = dict(state)
    del missing["blocks.1.mlp.fc2.weight"]
    with pytest.raises(ViTCheckpointError, match="blocks.1.mlp.fc2.weight"):
        model_from_timm(missing, keras_e3.E3ViT, num_heads=3)
    bad = dict(state)
    bad["blocks.0.norm2.weight"] = np.zeros(7, np.float32)
    with pytest.raises(ViTCheckpointError, match="encoderblock_0"):
        model_from_timm(bad, keras_e3.E3ViT, num_heads=3)
    hybrid = dict(state)
    hybrid["patch_embed.backbone.stem.conv.weight"] = np.zeros(
        (4, 3, 7, 7), np.float32)
    with pytest.raises(ViTCheckpointError,
                       match="patch_embed.backbone.stem.conv.weight"):
        model_from_timm(hybrid, keras_e3.E3ViT, num_heads=3)
    with pytest.raises(ViTCheckpointError, match="num_heads"):
        model_from_timm(state, keras_e3.E3ViT)  # not in the arrays


@pytest.mark.single_backend
def test_timm_heads_from_the_architecture_name():
    """vit_small_* has 6 heads in timm (timm.models.vision_transformer)."""
    timm = import_timm()
    reference = _timm_vit(timm, embed_dim=48, num_heads=6)
    model = model_from_timm(_state(reference), keras_e3.E3ViT, config={
        "architecture": "vit_small_patch16_224"})
    assert model.backbone.num_heads == 6
    images = np.random.default_rng(4).normal(
        size=(1, 3, 32, 32)).astype("float32")
    np.testing.assert_allclose(
        to_numpy(model.predict(images.transpose(0, 2, 3, 1), verbose=0)),
        _timm_logits(reference, images), atol=1e-5, rtol=0)


def _keras_hub_classifier(tmp_path, backbone_kwargs, task_kwargs, seed=0):
    """A small keras-hub ViT classifier with random weights, saved as a
    preset; returns (classifier, preset folder)."""
    keras_hub = pytest.importorskip("keras_hub")
    import keras

    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.ViTBackbone(
        image_shape=(32, 32, 3), patch_size=8, num_layers=3, num_heads=2,
        hidden_dim=16, mlp_dim=32, **backbone_kwargs)
    converter = keras_hub.layers.ViTImageConverter(
        image_size=(32, 32), scale=1 / 127.5, offset=-1.0)
    preprocessor = keras_hub.models.ViTImageClassifierPreprocessor(
        image_converter=converter)
    classifier = keras_hub.models.ViTImageClassifier(
        backbone=backbone, num_classes=5, preprocessor=preprocessor,
        **task_kwargs)
    rng = np.random.default_rng(seed)
    for w in classifier.weights:
        w.assign(rng.normal(0, 0.3, w.shape).astype("float32"))
    folder = tmp_path / "keras_hub_vit"
    classifier.save_to_preset(str(folder))
    return classifier, folder


KERAS_HUB_CASES = {
    "token_pre_logits": (dict(), dict(pooling="token", intermediate_dim=12)),
    "gap": (dict(use_class_token=False), dict(pooling="gap")),
    "no_biases": (dict(use_mha_bias=False, use_mlp_bias=False), dict()),
}


@pytest.mark.parametrize("case", sorted(KERAS_HUB_CASES))
def test_keras_hub_preset_gives_keras_hubs_predictions(case, tmp_path,
                                                       monkeypatch):
    """keras-hub's classifier with its own preprocessor on uint8 images at
    the model's size, against ours from the converted preset."""
    monkeypatch.setenv("KERAS_E3_CACHE", str(tmp_path / "cache"))
    backbone_kwargs, task_kwargs = KERAS_HUB_CASES[case]
    classifier, folder = _keras_hub_classifier(tmp_path, backbone_kwargs,
                                               task_kwargs)
    pixels = np.random.default_rng(5).integers(
        0, 256, (2, 32, 32, 3)).astype("uint8")
    expected = to_numpy(classifier.predict(pixels.astype("float32"),
                                           verbose=0))
    model = keras_e3.E3ViT.from_preset(str(folder))
    actual = to_numpy(model.predict(pixels, verbose=0))
    np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=0)


@pytest.mark.single_backend
def test_keras_hub_gap_beside_class_token_is_refused(tmp_path):
    _, folder = _keras_hub_classifier(tmp_path, dict(), dict(pooling="gap"))
    with pytest.raises(ViTCheckpointError, match="class token"):
        keras_hub_to_vmoe(str(folder))


@pytest.mark.single_backend
def test_keras_hub_missing_array_is_named(tmp_path):
    import h5py

    _, folder = _keras_hub_classifier(tmp_path, dict(), dict())
    with h5py.File(folder / "model.weights.h5", "r+") as f:
        del f["layers/vi_t_encoder/encoder_layers/vi_t_encoder_block_1/"
              "mlp/dense_2/vars/0"]
    with pytest.raises(ViTCheckpointError, match="vi_t_encoder_block_1/mlp"):
        keras_hub_to_vmoe(str(folder))


@pytest.mark.single_backend
def test_bfloat16_safetensors_are_read(tmp_path):
    """A bfloat16 .safetensors (NumPy has no bfloat16) is read by hand:
    the values are the bfloat16 roundings of the originals."""
    import torch
    from safetensors.torch import save_file

    from keras_e3.conversion.timm_vit import read_state_dict

    values = torch.tensor([[1.0, -2.5], [3.140625, 1e-3]])
    path = tmp_path / "model.safetensors"
    save_file({"w": values.to(torch.bfloat16)}, str(path))
    read = read_state_dict(str(path))["w"]
    np.testing.assert_array_equal(read, values.to(torch.bfloat16).float()
                                  .numpy())
    assert read.dtype == np.float32


@pytest.mark.parametrize("ensemble_size", [1, 2])
def test_upcycled_timm_vit_with_uniform_routers_is_the_dense_vit(
        ensemble_size):
    """Upcycled from timm (exact GELU, fc_norm after pooling), its experts
    copies of the dense MLPs: with zero router kernels (uniform gates), all
    of a member's experts selected and room for every token, each MoE block
    computes the mean of E identical MLPs, i.e. the dense MLP. So every
    member gives timm's logits; the tanh GELU in the experts would not."""
    timm = import_timm()
    reference = _timm_vit(timm, global_pool="avg", class_token=False,
                          depth=3)
    images = np.random.default_rng(6).normal(
        size=(2, 3, 32, 32)).astype("float32")
    expected = _timm_logits(reference, images)
    dense = model_from_timm(_state(reference), keras_e3.E3ViT, num_heads=3)
    upcycled = keras_e3.upcycle(
        dense, num_experts=4, moe_layers=(0, 2),
        num_selected_experts=4 // ensemble_size,
        ensemble_size=ensemble_size, capacity_factor=1.0)
    assert upcycled.backbone.gelu_approximate is False
    assert upcycled.backbone.final_norm == "pooled"
    for block in upcycled.backbone.moe_blocks:
        kernel = block.mlp.router.kernel
        kernel.assign(np.zeros(kernel.shape, "float32"))
    members = to_numpy(upcycled.predict_members(
        images.transpose(0, 2, 3, 1), verbose=0))  # [B, M, C]
    assert members.shape == (2, ensemble_size, 5)
    for m in range(ensemble_size):
        np.testing.assert_allclose(members[:, m], expected, atol=1e-5,
                                   rtol=0)


@pytest.mark.single_backend
def test_dense_variant_settings_round_trip_and_checks():
    backbone = keras_e3.E3ViTBackbone(
        image_size=16, patch_size=8, hidden_dim=16, num_layers=1,
        num_heads=2, mlp_dim=32, classifier="gap", final_norm="pooled",
        gelu_approximate=False)
    again = keras_e3.E3ViTBackbone.from_config(backbone.get_config())
    assert (again.final_norm, again.gelu_approximate) == ("pooled", False)
    default = keras_e3.E3ViTBackbone(
        image_size=16, patch_size=8, hidden_dim=16, num_layers=1,
        num_heads=2, mlp_dim=32)
    assert (default.final_norm, default.gelu_approximate) == ("sequence",
                                                              True)
    with pytest.raises(ValueError, match="classifier='gap'"):
        keras_e3.E3ViTBackbone(image_size=16, patch_size=8, hidden_dim=16,
                               num_layers=1, num_heads=2, mlp_dim=32,
                               final_norm="pooled")
    with pytest.raises(ValueError, match="final_norm must be one of"):
        keras_e3.E3ViTBackbone(image_size=16, patch_size=8, hidden_dim=16,
                               num_layers=1, num_heads=2, mlp_dim=32,
                               classifier="gap", final_norm="tokens")
