"""Presets: save_to_preset / from_preset, overrides, integrity, built-ins,
and official checkpoints converted on the fly."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import BACKEND
from conftest import ROOT
from conftest import fixture_dir
from conftest import load_fixture
from conftest import official_logits
from conftest import tiny_backbone_kwargs
from conftest import to_numpy

import keras_e3
from keras_e3.presets import files as preset_io
from keras_e3.presets import loader as preset_loader
from keras_e3.presets import builtin as registry
from keras_e3.presets.files import PresetError

PRESET_FILES = {"config.json", "model.weights.h5", "task.json",
                "task.weights.h5", "preprocessor.json", "metadata.json"}


def tiny_model(seed=0, **overrides):
    keras.utils.set_random_seed(seed)
    backbone = keras_e3.E3ViTBackbone(**tiny_backbone_kwargs(**overrides))
    return keras_e3.E3ViT(backbone, num_classes=5, head_bias_init=0.1,
                          head_kernel_initializer="glorot_uniform")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(model, preset_dir, images, outputs) of a tiny E³ saved as a preset."""
    model = tiny_model()
    preset = tmp_path_factory.mktemp("presets") / "tiny"
    model.save_to_preset(preset)
    images = np.random.default_rng(1).normal(size=(3, 16, 16, 3)).astype(
        "float32")
    return model, preset, images, to_numpy(model(images))


def leftovers(parent):
    return [p for p in os.listdir(parent) if p.startswith(".")]


def test_round_trip_is_identical(saved):
    model, preset, images, expected = saved
    assert set(os.listdir(preset)) == PRESET_FILES
    assert leftovers(preset.parent) == []
    loaded = keras_e3.E3ViT.from_preset(str(preset))
    np.testing.assert_array_equal(to_numpy(loaded(images)), expected)
    assert loaded.get_config()["backbone"]["config"] == (
        model.get_config()["backbone"]["config"])
    backbone = keras_e3.E3ViTBackbone.from_preset(preset)
    np.testing.assert_array_equal(
        to_numpy(backbone(images)["pooled_output"]),
        to_numpy(model.backbone(images)["pooled_output"]))


def test_metadata_lists_every_file_with_its_sha256(saved):
    _, preset, _, _ = saved
    metadata = json.loads((preset / "metadata.json").read_text())
    assert set(metadata["files"]) == PRESET_FILES - {"metadata.json"}
    for name, digest in metadata["files"].items():
        assert preset_io.sha256(preset / name) == digest
    assert metadata["parameter_count"] > 0
    assert metadata["keras_version"] == keras.version()


def test_resaving_a_loaded_preset_keeps_its_files(saved, tmp_path):
    _, preset, images, expected = saved
    loaded = keras_e3.E3ViT.from_preset(preset)
    loaded.save_to_preset(tmp_path / "again")
    again = keras_e3.E3ViT.from_preset(tmp_path / "again")
    np.testing.assert_array_equal(to_numpy(again(images)), expected)


def test_num_classes_override_gives_a_fresh_head(saved):
    model, preset, images, _ = saved
    loaded = keras_e3.E3ViT.from_preset(preset, num_classes=7)
    assert loaded(images).shape == (3, 2, 7)
    np.testing.assert_array_equal(to_numpy(loaded.head.kernel), 0.0)
    for a, b in zip(model.backbone.weights, loaded.backbone.weights):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    # The same class count keeps the trained head.
    same = keras_e3.E3ViT.from_preset(preset, num_classes=5)
    np.testing.assert_array_equal(to_numpy(same.head.kernel),
                                  to_numpy(model.head.kernel))


def test_image_size_override_resamples_position_embeddings(saved):
    model, preset, _, _ = saved
    loaded = keras_e3.E3ViT.from_preset(preset, image_size=32)
    old = to_numpy(model.backbone.embedding.position_embedding)
    new = to_numpy(loaded.backbone.embedding.position_embedding)
    # vmoe's vit_zoom: scipy.ndimage.zoom (order 1) of the 2x2 grid
    from scipy.ndimage import zoom

    grid = zoom(old[:, 1:].reshape(1, 2, 2, -1), (1, 2, 2, 1), order=1)
    np.testing.assert_allclose(new[:, 1:], grid.reshape(1, 16, -1),
                               atol=1e-6)
    assert new.shape == (1, 17, 16)
    np.testing.assert_array_equal(new[:, :1], old[:, :1])  # class token
    out = loaded(np.zeros((2, 32, 32, 3), "float32"))
    assert out.shape == (2, 2, 5)
    assert loaded.preprocessor.image_size == (32, 32)
    for a, b in zip(model.backbone.weights, loaded.backbone.weights):
        if "position" not in a.path:
            np.testing.assert_array_equal(to_numpy(a), to_numpy(b))


def test_architecture_only_and_runtime_overrides(saved):
    model, preset, images, _ = saved
    fresh = keras_e3.E3ViT.from_preset(preset, load_weights=False)
    assert fresh.count_params() == model.count_params()
    assert not all(np.array_equal(to_numpy(a), to_numpy(b)) for a, b in
                   zip(fresh.backbone.weights, model.backbone.weights))
    evaluation = keras_e3.E3ViTBackbone.from_preset(preset,
                                                    capacity_factor=4.0)
    assert evaluation.capacity_factor == 4.0
    with pytest.raises(TypeError, match="hidden_dim"):
        keras_e3.E3ViT.from_preset(preset, hidden_dim=32)
    with pytest.raises(TypeError, match="num_classes"):
        keras_e3.E3ViTBackbone.from_preset(preset, num_classes=3)


def test_dtype_override(saved):
    _, preset, images, expected = saved
    loaded = keras_e3.E3ViT.from_preset(preset, dtype="bfloat16")
    assert loaded.backbone.embedding.dtype_policy.compute_dtype == "bfloat16"
    assert loaded.head.dtype_policy.compute_dtype == "bfloat16"
    config = loaded.backbone.get_config()
    assert config["dtype"]["config"]["name"] == "bfloat16"
    out = to_numpy(keras.ops.cast(loaded(images), "float32"))
    np.testing.assert_allclose(out, expected, atol=0.1)


def copy_preset(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def damage(path, how):
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flip":
        mid = len(data) // 2
        path.write_bytes(data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 8])
                         + data[mid + 8:])
    else:
        path.unlink()


@pytest.mark.parametrize("name", ["model.weights.h5", "task.weights.h5",
                                  "config.json"])
@pytest.mark.parametrize("how", ["truncate", "flip", "delete"])
def test_damaged_files_are_named(saved, tmp_path, name, how):
    preset = copy_preset(saved[1], tmp_path / "p")
    damage(preset / name, how)
    with pytest.raises(PresetError, match=name.replace(".", r"\.")):
        keras_e3.E3ViT.from_preset(preset)


def test_missing_metadata_and_not_a_preset(saved, tmp_path):
    preset = copy_preset(saved[1], tmp_path / "p")
    (preset / "metadata.json").unlink()
    with pytest.raises(PresetError, match="metadata.json"):
        keras_e3.E3ViT.from_preset(preset)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PresetError, match="metadata.json"):
        keras_e3.E3ViT.from_preset(tmp_path / "empty")


def resign(preset):
    """Recomputes metadata.json's checksums after a deliberate edit."""
    metadata = json.loads((preset / "metadata.json").read_text())
    metadata["files"] = {n: preset_io.sha256(preset / n)
                         for n in metadata["files"]}
    (preset / "metadata.json").write_text(json.dumps(metadata))


def edit_config(file_name, key, value):
    def edit(spec):
        if key == "class_name":
            spec["class_name"] = value
        else:
            spec["config"][key] = value
    return file_name, edit


@pytest.mark.parametrize("edit,message", [
    (edit_config("config.json", "hidden_dim", 24), "model.weights.h5"),
    (edit_config("task.json", "num_classes", 9),
     "task.weights.h5.*head/kernel"),
    (edit_config("config.json", "class_name", "Functional"),
     "not an E3ViTBackbone"),
], ids=["weights_vs_config", "head_vs_task", "other_class"])
def test_files_that_do_not_match_each_other(saved, tmp_path, edit, message):
    """Consistent checksums, inconsistent contents: still a clear error."""
    preset = copy_preset(saved[1], tmp_path / "p")
    file_name, change = edit
    spec = json.loads((preset / file_name).read_text())
    change(spec)
    (preset / file_name).write_text(json.dumps(spec))
    resign(preset)
    with pytest.raises(PresetError, match=message):
        keras_e3.E3ViT.from_preset(preset)


def test_interrupted_save_keeps_the_previous_preset(saved, tmp_path,
                                                    monkeypatch):
    model, _, images, expected = saved
    target = tmp_path / "p"
    model.save_to_preset(target)
    before = {n: preset_io.sha256(target / n) for n in os.listdir(target)}
    other = tiny_model(seed=1)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("simulated crash while writing weights")

    monkeypatch.setattr(preset_io, "save_head_weights", crash)
    with pytest.raises(KeyboardInterrupt):
        other.save_to_preset(target)
    assert {n: preset_io.sha256(target / n)
            for n in os.listdir(target)} == before
    assert leftovers(tmp_path) == []
    np.testing.assert_array_equal(
        to_numpy(keras_e3.E3ViT.from_preset(target)(images)), expected)
    monkeypatch.undo()
    other.save_to_preset(target)  # a complete save replaces it
    np.testing.assert_array_equal(
        to_numpy(keras_e3.E3ViT.from_preset(target)(images)),
        to_numpy(other(images)))
    assert leftovers(tmp_path) == []


def test_backbone_only_preset_needs_num_classes(saved, tmp_path):
    model = saved[0]
    model.backbone.save_to_preset(tmp_path / "b")
    assert not (tmp_path / "b" / "task.json").exists()
    with pytest.raises(PresetError, match="num_classes"):
        keras_e3.E3ViT.from_preset(tmp_path / "b")
    task = keras_e3.E3ViT.from_preset(tmp_path / "b", num_classes=3)
    assert task(saved[2]).shape == (3, 2, 3)


@pytest.mark.single_backend
def test_unknown_presets_are_clear_errors(tmp_path):
    with pytest.raises(PresetError, match="Unknown preset 'no_such_model'.*"
                                          "eee_s32_last2_ilsvrc2012"):
        keras_e3.E3ViT.from_preset("no_such_model")
    with pytest.raises(PresetError, match="No preset directory"):
        keras_e3.E3ViT.from_preset(str(tmp_path / "missing" / "dir"))


@pytest.mark.single_backend
def test_builtin_cards_are_complete():
    names = keras_e3.list_presets()
    for required in ("vmoe_s32_last2_ilsvrc2012_randaug_light1",
                     "vmoe_s32_last2_ilsvrc2012_randaug_light1_ft_ilsvrc2012",
                     "vmoe_s32_last2_ilsvrc2012_randaug_medium",
                     "vmoe_b16_imagenet21k_randaug_strong",
                     "vmoe_b16_imagenet21k_randaug_strong_ft_ilsvrc2012",
                     "eee_s32_last2_ilsvrc2012",
                     "eee_s32_last2_ilsvrc2012_ft_cifar100",
                     "eee_b16_last5", "eee_l16_last5"):
        assert required in names
    from keras_e3.evaluation.flops import count_flops_from_config

    for name, card in registry.builtin_presets().items():
        assert {"description", "kind", "license", "source",
                "parameter_count", "gflops_per_image"} <= set(card), name
        kwargs, head = registry.architecture(card)
        if card["kind"] != "embedded":
            assert head["num_classes"] == card["vmoe_config"]["num_classes"]
            assert kwargs["image_size"] == card["image_size"]
        kwargs = {k: v for k, v in kwargs.items()
                  if k not in ("name", "trainable")}
        counts = count_flops_from_config(num_classes=head["num_classes"],
                                         **kwargs)
        assert counts["params"] == card["parameter_count"], name
        assert round(counts["flops"] / 1e9, 3) == card["gflops_per_image"]


@pytest.mark.single_backend
def test_builtin_architecture_without_weights():
    model = keras_e3.E3ViT.from_preset("eee_s32_last2_ilsvrc2012_ft_cifar100",
                                       load_weights=False)
    backbone = model.backbone
    assert (backbone.num_experts, backbone.ensemble_size,
            backbone.num_selected_experts) == (8, 2, 1)
    assert backbone.moe_layers == (5, 7) or list(backbone.moe_layers) == [5, 7]
    assert model.num_classes == 100
    card = registry.builtin_presets()["eee_s32_last2_ilsvrc2012_ft_cifar100"]
    assert model.count_params() == card["parameter_count"]
    assert model(np.zeros((1, 128, 128, 3), "float32")).shape == (1, 2, 100)
    with pytest.raises(PresetError, match="architecture-only"):
        keras_e3.E3ViT.from_preset("eee_l16_last5")


@pytest.fixture
def fixture_card(monkeypatch, tmp_path):
    """A built-in vmoe_checkpoint card whose checkpoint is the fixture's."""
    fixture = load_fixture("eee_tiny_nodrop")
    path = fixture_dir("eee_tiny_nodrop")
    card = {"name": "eee_tiny_fixture", "kind": "vmoe_checkpoint",
            "description": "fixture", "license": "-", "source": "-",
            "vmoe_config": fixture["config"],
            "checkpoint": str(path / "checkpoint" / "ckpt")}
    cards = dict(registry.builtin_presets(), eee_tiny_fixture=card)
    monkeypatch.setattr(registry, "builtin_presets", lambda: cards)
    monkeypatch.setenv("KERAS_E3_CACHE", str(tmp_path / "cache"))
    return fixture


@pytest.mark.single_backend
def test_official_checkpoint_is_converted_once_and_cached(fixture_card,
                                                          monkeypatch,
                                                          tmp_path):
    model = keras_e3.E3ViT.from_preset("eee_tiny_fixture")
    np.testing.assert_allclose(official_logits(model, fixture_card["inputs"]),
                               fixture_card["logits"], atol=1e-5)
    cached = tmp_path / "cache" / "presets" / "eee_tiny_fixture"
    metadata = json.loads((cached / "metadata.json").read_text())
    assert metadata["source"].endswith("ckpt")

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(registry, "convert_checkpoint", no_conversion)
    again = keras_e3.E3ViT.from_preset("eee_tiny_fixture")
    np.testing.assert_allclose(official_logits(again, fixture_card["inputs"]),
                               fixture_card["logits"], atol=1e-5)


@pytest.mark.single_backend
def test_convert_cli_writes_a_preset_that_loads(tmp_path):
    fixture = load_fixture("eee_tiny_nodrop")
    path = fixture_dir("eee_tiny_nodrop")
    out = tmp_path / "converted"
    env = dict(os.environ, KERAS_BACKEND=BACKEND,
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get(
                   "PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-m", "keras_e3.cli", "convert", "--config",
         str(path / "config.json"), "--checkpoint",
         str(path / "checkpoint" / "ckpt_expert_sharded"), "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout
    model = keras_e3.E3ViT.from_preset(out)
    np.testing.assert_allclose(official_logits(model, fixture["inputs"]),
                               fixture["logits"], atol=1e-5)
    bad = subprocess.run(
        [sys.executable, "-m", "keras_e3.cli", "convert", "--config",
         str(path / "config.json"), "--checkpoint", str(tmp_path / "nope"),
         "--out", str(tmp_path / "never")],
        capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 1
    assert "nope.index" in bad.stderr
    assert not (tmp_path / "never").exists()


def test_preset_loader_handles_str_and_pathlike(saved):
    _, preset, images, expected = saved
    for handle in (str(preset), preset):
        out = preset_loader.from_preset(keras_e3.E3ViT, handle)(images)
        np.testing.assert_array_equal(to_numpy(out), expected)
