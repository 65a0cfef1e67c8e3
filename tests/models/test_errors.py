"""Bad input gets a clear error naming the problem."""

import numpy as np
import pytest

import keras_e3
from conftest import load_fixture
from conftest import tiny_backbone_kwargs
from keras_e3.conversion.vmoe import VmoeConversionError


def backbone(**overrides):
    return keras_e3.E3ViTBackbone(**tiny_backbone_kwargs(**overrides))


@pytest.mark.parametrize("overrides,match", [
    ({"image_size": 20}, "not divisible by the patch size"),
    ({"image_size": (16, 12)}, "width 12 is not divisible"),
    ({"ensemble_size": 3, "group_size": 21}, "must divide num_experts=4"),
    ({"num_selected_experts": 3}, r"between 1 and the experts per ensemble "
                                  r"member \(4 / 2 = 2\)"),
    ({"moe_layers": (2,)}, r"moe_layers \[2\] out of range"),
    ({"moe_layers": (-1,)}, r"out of range"),
    ({"classifier": "gmp"}, "classifier must be one of"),
    ({"num_experts": 0}, "needs num_experts >= 1"),
    ({"moe_layers": ()}, "needs MoE layers"),
    ({"group_size": 15}, "multiple of ensemble_size"),
    ({"hidden_dim": 15, "representation_size": None},
     "not divisible by num_heads"),
    ({"capacity_factor": 0.0}, "capacity"),
    ({"dispatcher": "magic"}, "Unknown dispatcher"),
])
def test_bad_config(overrides, match):
    with pytest.raises(ValueError, match=match):
        backbone(**overrides)


@pytest.mark.parametrize("shape,match", [
    ((16, 16, 3), "rank 3"),
    ((2, 16, 16), "rank 3"),
    ((2, 16, 16, 1), "3 channels"),
    ((2, 3, 16, 16), "3 channels"),
    ((2, 32, 32, 3), "Expected images of 16x16 pixels; got height 32"),
])
def test_bad_images(shape, match):
    model = keras_e3.E3ViT(backbone(), 3)
    with pytest.raises(ValueError, match=match):
        model(np.zeros(shape, "float32"))


def _fixture_params():
    fx = load_fixture("eee_tiny_nodrop")
    with np.load(fx["params"]) as data:
        return fx["config"], {k: data[k] for k in data.files}


def test_missing_unexpected_and_misshaped_params_are_named():
    config, params = _fixture_params()
    del params["Encoder/encoderblock_1/Moe/Router/dense/kernel"]
    params["Encoder/encoderblock_9/extra"] = np.zeros(3)
    params["head/kernel"] = np.zeros((32, 11), "float32")
    with pytest.raises(VmoeConversionError) as info:
        keras_e3.E3ViT.from_vmoe(config, params)
    message = str(info.value)
    assert "missing parameters: Encoder/encoderblock_1/Moe/Router/dense/kernel" \
        in message
    assert "unexpected parameters: Encoder/encoderblock_9/extra" in message
    assert "head/kernel: got (32, 11), expected (32, 10)" in message


def test_nested_params_are_accepted():
    config, params = _fixture_params()
    nested = {}
    for name, value in params.items():
        node = nested
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    model = keras_e3.E3ViT.from_vmoe(config, nested)
    assert model.ensemble_size == 2


def test_config_without_image_size_is_inferred():
    config, params = _fixture_params()
    config = dict(config)
    del config["image_size"]
    model = keras_e3.E3ViT.from_vmoe(config, params)
    assert model.backbone.embedding.image_size == (32, 32)


@pytest.mark.parametrize("change,match", [
    ({"name": "VisionTransformerMoeSoft"}, "model 'VisionTransformerMoeSoft'"),
    ({"classifier": "gmp"}, "classifier 'gmp'"),
])
def test_unsupported_vmoe_configs(change, match):
    config, params = _fixture_params()
    with pytest.raises(VmoeConversionError, match=match):
        keras_e3.E3ViT.from_vmoe(dict(config, **change), params)


def test_unreadable_params_file(tmp_path):
    config, _ = _fixture_params()
    bad = tmp_path / "params.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(VmoeConversionError, match="params.npz"):
        keras_e3.E3ViT.from_vmoe(config, bad)
