"""Every official card carries its vmoe config's evaluation pipeline and its
label set; discovery (`E3ViT.presets`, `list_presets("vmoe_*")`)."""

import keras
import numpy as np
import pytest

import keras_e3
from keras_e3.presets import builtin as registry
from keras_e3.data.labels import class_names

# vmoe's evaluation process per input size of the released configs:
# resize_small(256)|central_crop(224) for ILSVRC2012 / ImageNet-21k at
# 224 px, resize(384) for the 384-px fine-tunes, resize(128) for the E³
# CIFAR-100 fine-tune.
EVAL_PROCESS = {
    224: "decode|resize_small(256)|central_crop(224)|value_range(-1,1)",
    384: "decode|resize(384)|value_range(-1,1)",
    128: "decode|resize(128)|value_range(-1,1)",
}
# No label list for ImageNet-21k here, nor for JFT-4B (29,593 classes, the
# Soft MoE cards: a proprietary dataset).
LABELS = {1000: "imagenet2012", 100: "cifar100", 21843: None, 29593: None}
OFFICIAL = [name for name, card in registry.builtin_presets().items()
            if card["kind"] in ("vmoe_checkpoint", "architecture")]
DENSE_VIT = [name for name, card in registry.builtin_presets().items()
             if card["kind"] == "vit_checkpoint"]


@pytest.mark.parametrize("name", OFFICIAL)
def test_official_card_pipeline_and_labels(name):
    card = registry.builtin_presets()[name]
    config = card["vmoe_config"]
    assert card["preprocessing"] == EVAL_PROCESS[card["image_size"]]
    converter = keras_e3.ImageConverter.from_vmoe_process(
        card["preprocessing"])
    assert converter.image_size == (card["image_size"],) * 2
    assert card["labels"] == LABELS[config["num_classes"]]
    if card["labels"]:
        assert len(class_names(card["labels"])) == config["num_classes"]
    if "ft_ilsvrc2012" in name or name.endswith("_ilsvrc2012"):
        assert card["labels"] == "imagenet2012"
    if "cifar100" in name:
        assert card["labels"] == "cifar100"
        assert card["preprocessing"] == EVAL_PROCESS[128]


@pytest.mark.parametrize("name", DENSE_VIT)
def test_dense_vit_cards_use_vit_jax_pipeline(name):
    """vit_jax's evaluation: tf.image.resize (bilinear) to the image size,
    (x - 127.5) / 127.5, no cast back to uint8 (vmoe's `resize` casts):
    the converter a converted .npz gets, and the one an architecture-only
    load gets."""
    card = registry.builtin_presets()[name]
    assert "preprocessing" not in card
    assert card.get("labels") == LABELS[card["vmoe_config"]["num_classes"]]
    with keras.StatelessScope(initialize_variables=False):
        model = keras_e3.E3ViT.abstract_from_preset(name)
    converter = model.preprocessor
    assert (converter.image_size, converter.smaller_side,
            converter.interpolation, converter.cast_to_input_dtype,
            converter.input_range, converter.value_range) == (
        (card["image_size"],) * 2, None, "bilinear", False, (0.0, 255.0),
        (-1.0, 1.0))


@pytest.mark.parametrize("name", [n for n, c in
                                  registry.builtin_presets().items()
                                  if c["kind"] == "embedded"])
def test_embedded_cards_name_the_digits(name):
    assert registry.builtin_presets()[name]["labels"] == "digits"


def test_from_preset_brings_the_cards_converter_and_names():
    with keras.StatelessScope(initialize_variables=False):
        model = keras_e3.E3ViT.abstract_from_preset(
            "eee_s32_last2_ilsvrc2012_ft_cifar100")
    converter = model.preprocessor
    assert (converter.image_size, converter.interpolation,
            converter.cast_to_input_dtype) == ((128, 128), "bilinear", True)
    assert model.class_names[:2] == ["apple", "aquarium_fish"]
    model = keras_e3.E3ViT.abstract_from_preset("vmoe_l16_every2")
    assert (model.preprocessor.smaller_side, model.preprocessor.image_size,
            model.preprocessor.interpolation) == (256, (224, 224), "area")
    assert model.class_names[0] == "tench"


def test_discovery():
    vmoe = keras_e3.list_presets("vmoe_*")
    assert vmoe and all(n.startswith("vmoe_") for n in vmoe)
    assert "vmoe_tiny_digits" in vmoe and "e3_tiny_digits" not in vmoe
    assert keras_e3.list_presets("*cifar100") == [
        "eee_s32_last2_ilsvrc2012_ft_cifar100"]
    assert keras_e3.list_presets() == sorted(registry.builtin_presets())
    presets = keras_e3.E3ViT.presets
    assert set(presets) == set(keras_e3.list_presets())
    meta = presets["eee_s32_last2_ilsvrc2012"]
    assert meta["labels"] == "imagenet2012" and "vmoe_config" not in meta
    assert keras_e3.E3ViTBackbone.presets.keys() == presets.keys()


def test_nonfinite_vmoe_parameters_are_named():
    from conftest import load_fixture

    from keras_e3.conversion.vmoe import VmoeConversionError

    fixture = load_fixture("vit_tiny")
    with np.load(fixture["params"]) as data:
        params = {k: data[k] for k in data.files}
    name = sorted(k for k in params if k.endswith("kernel"))[0]
    params[name] = params[name].copy()
    params[name].flat[0] = np.inf
    with pytest.raises(VmoeConversionError, match="non-finite.*" + name):
        keras_e3.E3ViT.from_vmoe(fixture["config"], params)
