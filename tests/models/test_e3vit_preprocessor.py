"""E3ViT owns its ImageConverter: predict / fit / evaluate take raw images,
model(x) takes model-ready ones; saved and loaded with the preset."""

import io
import json

import keras
import numpy as np
import pytest
from conftest import tiny_backbone_kwargs
from conftest import to_numpy

import keras_e3
from keras_e3.presets import files as preset_io
from keras_e3.data.digits import load_digits_raw
from keras_e3.data.digits import to_uint8
from keras_e3.presets.files import PresetError


def tiny(preprocessor=None, **overrides):
    keras.utils.set_random_seed(0)
    backbone = keras_e3.E3ViTBackbone(**tiny_backbone_kwargs(**overrides))
    return keras_e3.E3ViT(backbone, num_classes=3,
                          head_kernel_initializer="glorot_uniform",
                          preprocessor=preprocessor)


@pytest.fixture(scope="module")
def model():
    return tiny(keras_e3.ImageConverter(image_size=16, num_channels=3))


def test_predict_applies_the_converter_to_raw_images(model):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (3, 21, 27, 3), np.uint8)
    ready = model.preprocessor(raw)
    expected = to_numpy(model(ready))
    np.testing.assert_allclose(model.predict(raw, verbose=0), expected,
                               atol=1e-5)
    # one image without a batch axis, a gray image, a list of sizes
    np.testing.assert_allclose(model.predict(raw[0], verbose=0),
                               expected[:1], atol=1e-5)
    gray = raw[..., :1]
    np.testing.assert_allclose(
        model.predict(gray, verbose=0),
        to_numpy(model(model.preprocessor(np.repeat(gray, 3, -1)))),
        atol=1e-5)
    mixed = [raw[0], raw[1, :10, :13]]
    assert model.predict(mixed, verbose=0).shape == (2, 2, 3)
    # model-ready float batches pass unchanged
    np.testing.assert_allclose(model.predict(ready, verbose=0), expected,
                               atol=1e-5)
    members = model.predict_members(raw)
    np.testing.assert_allclose(members, expected, atol=1e-5)
    ensemble = model.predict_ensemble(raw)
    np.testing.assert_allclose(
        ensemble, to_numpy(keras_e3.ensemble_log_probs(expected)), atol=1e-5)


def test_files_and_bytes(model, tmp_path):
    from PIL import Image

    image = np.random.default_rng(1).integers(0, 256, (30, 20, 3), np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(image).save(path)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    expected = model.predict(image, verbose=0)
    np.testing.assert_allclose(model.predict(str(path), verbose=0), expected,
                               atol=1e-6)
    np.testing.assert_allclose(model.predict([buffer.getvalue()], verbose=0),
                               expected, atol=1e-6)


def test_fit_and_evaluate_take_raw_images():
    net = tiny(keras_e3.ImageConverter(image_size=16))
    net.compile(optimizer="sgd")
    raw = np.random.default_rng(2).integers(0, 256, (4, 20, 20, 3), np.uint8)
    labels = np.array([0, 1, 2, 0])
    history = net.fit(raw, labels, epochs=1, batch_size=4, verbose=0,
                      validation_data=(raw, labels))
    assert np.isfinite(history.history["val_loss"][0])
    ready = net.preprocessor(raw)
    np.testing.assert_allclose(net.evaluate(raw, labels, verbose=0),
                               net.evaluate(ready, labels, verbose=0),
                               rtol=1e-5)


def test_tf_data_images_are_mapped(model):
    tf = pytest.importorskip("tensorflow")
    raw = np.random.default_rng(3).integers(0, 256, (4, 24, 20, 3), np.uint8)
    ds = tf.data.Dataset.from_tensor_slices(raw).batch(2)
    np.testing.assert_allclose(model.predict(ds, verbose=0),
                               model.predict(raw, verbose=0), atol=1e-5)


def test_clear_errors_name_the_expected_shape():
    net = tiny()  # no preprocessor: model-ready inputs only
    with pytest.raises(ValueError, match=r"\[batch, 16, 16, 3\].*\(16, 16, 3\)"):
        net.predict(np.zeros((16, 16, 3), "float32"), verbose=0)
    with pytest.raises(ValueError, match=r"3 channels \[batch, 16, 16, 3\]"):
        net.predict(np.zeros((2, 16, 16, 1), "float32"), verbose=0)
    with pytest.raises(ValueError, match=r"\[batch, 16, 16, 3\]"):
        net(np.zeros((16, 16, 3), "float32"))
    # without a converter, raw images are refused with the same message
    with pytest.raises(ValueError, match=r"\[batch, 16, 16, 3\]"):
        net.predict(np.zeros((2, 20, 20, 3), np.uint8), verbose=0)
    with pytest.raises(TypeError, match="ImageConverter"):
        net.preprocessor = "resize"


def test_config_round_trip_keeps_the_converter(model):
    config = json.loads(json.dumps(model.get_config()))
    again = keras_e3.E3ViT.from_config(config)
    assert again.preprocessor.get_config() == model.preprocessor.get_config()
    assert "preprocessor" not in tiny().get_config()


def test_preset_saves_and_loads_the_converter(tmp_path):
    converter = keras_e3.ImageConverter.from_vmoe_process(
        "decode|resize_small(20)|central_crop(16)|value_range(-1,1)")
    net = tiny(converter)
    net.save_to_preset(tmp_path / "p")
    saved = json.loads((tmp_path / "p" / "preprocessor.json").read_text())
    assert saved["class_name"] == "ImageConverter"
    loaded = keras_e3.E3ViT.from_preset(str(tmp_path / "p"))
    assert loaded.preprocessor.get_config() == converter.get_config()
    assert loaded.preprocessor.image_size == (16, 16)
    raw = np.random.default_rng(4).integers(0, 256, (2, 30, 25, 3), np.uint8)
    np.testing.assert_allclose(loaded.predict(raw, verbose=0),
                               net.predict(raw, verbose=0), atol=1e-5)
    # a larger image size scales the resize_small side with it
    bigger = keras_e3.E3ViT.from_preset(str(tmp_path / "p"), image_size=32)
    assert bigger.preprocessor.image_size == (32, 32)
    assert bigger.preprocessor.smaller_side == 40


def test_old_flat_preprocessor_json_still_loads(tmp_path):
    net = tiny()
    net.save_to_preset(tmp_path / "old", preprocessor={
        "image_size": [16, 16], "num_channels": 3,
        "value_range": [0.0, 1.0]})
    loaded = keras_e3.E3ViT.from_preset(str(tmp_path / "old"))
    converter = loaded.preprocessor
    assert (converter.image_size, converter.value_range,
            converter.input_range) == ((16, 16), (0.0, 1.0), (0.0, 255.0))
    out = converter(np.full((8, 8, 3), 255, np.uint8))
    np.testing.assert_allclose(out, 1.0)


def test_nonfinite_preset_weights_are_refused(tmp_path):
    net = tiny()
    kernel = net.head.kernel
    value = to_numpy(kernel)
    value[0, 0] = np.nan
    kernel.assign(value)
    net.save_to_preset(tmp_path / "nan")
    with pytest.raises(PresetError, match="non-finite.*head/kernel"):
        keras_e3.E3ViT.from_preset(str(tmp_path / "nan"))


def test_shipped_digits_preset_classifies_uint8_digits():
    """Done-when of issue 17: all 1,797 digits as uint8 8x8 images."""
    images, labels = load_digits_raw()
    raw = to_uint8(images)
    assert raw.dtype == np.uint8 and raw.shape == (1797, 8, 8)
    model = keras_e3.E3ViT.from_preset("e3_tiny_digits")
    assert model.class_names == [str(i) for i in range(10)]
    log_probs = model.predict_ensemble(raw, batch_size=1797)
    assert np.mean(np.argmax(log_probs, -1) == labels) >= 0.95
    # as the shipped preset's metadata still verifies
    preset_io.verify_preset(keras_e3.presets.builtin.cards_dir()
                            / "e3_tiny_digits")


def test_decode_predictions_uses_the_models_class_names(model):
    probs = np.array([[0.2, 0.7, 0.1]])
    assert model.decode_predictions(probs, top=1) == [[("1", 0.7)]]
    named = tiny()
    named.class_names = ["cat", "dog", "fish"]
    decoded = named.decode_predictions(np.log(probs), top=2)
    assert [n for n, _ in decoded[0]] == ["dog", "cat"]
    assert keras_e3.decode_predictions(probs, ["a", "b", "c"], 1) == [
        [("b", 0.7)]]
