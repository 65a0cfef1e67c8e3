"""ImageConverter: vmoe's evaluation pipelines exactly, every input kind,
channels, value ranges, errors and serialisation."""

import io
import json

import keras
import numpy as np
import pytest
from conftest import FIXTURES
from sklearn.datasets import load_digits

from keras_e3.preprocessing.image_converter import ImageConverter
from keras_e3.preprocessing.image_converter import parse_process

PRE = FIXTURES / "preprocessing"


def _pipelines():
    if not (PRE / "pipelines.json").is_file():
        pytest.skip(f"preprocessing fixtures not found at {PRE}")
    return json.loads((PRE / "pipelines.json").read_text())


def _png_bytes(array):
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("pipeline", ["resize_small_256_central_crop_224",
                                      "resize_384", "resize_128"])
def test_vmoe_pipelines_match_fixtures(pipeline):
    converter = ImageConverter.from_vmoe_process(
        _pipelines()[pipeline]["process"])
    images = sorted((PRE / "images").glob("*.png"))
    assert len(images) >= 4
    with np.load(PRE / "outputs.npz") as outputs:
        for path in images:
            expected = outputs[f"{pipeline}/{path.stem}"]
            # a path, the encoded bytes and the decoded array agree
            from_path = converter(str(path))
            from_bytes = converter(path.read_bytes())
            assert from_path.shape == (1, *expected.shape)
            assert from_path.dtype == np.float32
            np.testing.assert_array_equal(from_path, from_bytes)
            diff = np.abs(from_path[0] - expected)
            assert (diff <= 1e-5).mean() >= 0.999, (path.name, diff.max())
            assert diff.max() <= 0.008, (path.name, diff.max())


def _tf_reference(image, converter):
    """vmoe's ops written with TensorFlow (the held-out check)."""
    tf = pytest.importorskip("tensorflow")
    x = tf.constant(image)
    if converter.smaller_side:
        h, w = x.shape[0], x.shape[1]
        ratio = (tf.cast(converter.smaller_side, tf.float32)
                 / tf.cast(min(h, w), tf.float32))
        size = [tf.cast(tf.round(tf.cast(s, tf.float32) * ratio), tf.int32)
                for s in (h, w)]
        x = tf.compat.v1.image.resize_area(x[None], size)[0]
        ch, cw = converter.image_size
        top, left = (size[0] - ch) // 2, (size[1] - cw) // 2
        x = x[top:top + ch, left:left + cw]
    else:
        x = tf.cast(tf.image.resize(x, converter.image_size,
                                    antialias=False), tf.uint8)
    lo, hi = converter.value_range
    return (lo + tf.cast(x, tf.float32) / 255.0 * (hi - lo)).numpy()


@pytest.mark.parametrize("shape,process", [
    ((37, 61, 3), "decode|resize_small(29)|central_crop(23)|value_range(-1,1)"),
    ((90, 45, 3), "decode|resize_small(20)|central_crop((20,17))|"
                  "value_range(0,1)"),
    ((13, 7, 3), "decode|resize(19)|value_range(-1,1)"),
    ((50, 71, 3), "decode|resize((23,31))|value_range(-1,1)"),
])
def test_general_sizes_match_tensorflow(shape, process):
    """Sizes and ratios the fixtures do not have, against TensorFlow."""
    image = np.random.default_rng(0).integers(0, 256, shape, np.uint8)
    converter = ImageConverter.from_vmoe_process(process)
    expected = _tf_reference(image, converter)
    diff = np.abs(converter(image)[0] - expected)
    assert (diff <= 1e-5).mean() >= 0.999 and diff.max() <= 0.008


def test_inside_tf_data_equals_host():
    tf = pytest.importorskip("tensorflow")
    converter = ImageConverter.from_vmoe_process(
        "decode|resize_small(24)|central_crop(20)|value_range(-1,1)")
    images = [np.random.default_rng(i).integers(0, 256, (30 + i, 26, 3),
                                                  np.uint8)
              for i in range(2)]
    host = converter(images)
    ds = tf.data.Dataset.from_generator(
        lambda: iter(images),
        output_signature=tf.TensorSpec([None, None, 3], tf.uint8))
    mapped = np.stack([x.numpy() for x in ds.map(converter)])
    np.testing.assert_allclose(mapped, host, atol=1e-5)
    # encoded bytes inside tf.data
    encoded = tf.data.Dataset.from_tensor_slices(
        [_png_bytes(images[0])]).map(converter)
    np.testing.assert_allclose(next(iter(encoded)).numpy(), host[0],
                               atol=1e-5)


def test_input_kinds(tmp_path):
    converter = ImageConverter(image_size=8, num_channels=3)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (12, 10, 3), np.uint8)
    b = rng.integers(0, 256, (20, 16, 3), np.uint8)
    single = converter(a)
    assert single.shape == (1, 8, 8, 3) and single.dtype == np.float32
    assert -1.0 <= single.min() and single.max() <= 1.0
    np.testing.assert_allclose(converter(a[None]), single)
    mixed = converter([a, b])  # different sizes
    assert mixed.shape == (2, 8, 8, 3)
    np.testing.assert_allclose(mixed[0], single[0])
    path = tmp_path / "b.png"
    path.write_bytes(_png_bytes(b))
    np.testing.assert_allclose(converter(path), mixed[1:])
    np.testing.assert_allclose(converter([str(path), a]), mixed[::-1])
    np.testing.assert_allclose(converter(_png_bytes(b)), mixed[1:])
    from PIL import Image

    np.testing.assert_allclose(converter(Image.fromarray(b)), mixed[1:])
    # a backend tensor, and float pixels in 0..255 like uint8 ones
    np.testing.assert_allclose(
        converter(keras.ops.convert_to_tensor(a.astype("float32"))), single,
        atol=1e-6)


def test_gray_batches_and_value_range():
    converter = ImageConverter(image_size=4, num_channels=1,
                               value_range=(0.0, 1.0))
    batch = np.full((5, 6, 6), 255, np.uint8)  # [B, H, W] gray
    out = converter(batch)
    assert out.shape == (5, 4, 4, 1)  # [H, W, C<=4] would be one image
    np.testing.assert_allclose(out, 1.0)
    np.testing.assert_allclose(converter(np.zeros((4, 4), np.uint8)), 0.0)


def test_channels():
    rgb = ImageConverter(image_size=None, num_channels=3)
    gray = np.arange(6, dtype=np.uint8).reshape(2, 3, 1)
    out = rgb(gray)
    assert out.shape == (1, 2, 3, 3)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    rgba = np.random.default_rng(0).integers(0, 256, (2, 3, 4), np.uint8)
    np.testing.assert_array_equal(rgb(rgba), rgb(rgba[..., :3]))
    # gray + alpha: the alpha is dropped
    np.testing.assert_array_equal(rgb(np.concatenate([gray, gray * 0 + 7],
                                                     -1)), out)
    with pytest.raises(ValueError, match="5 channels"):
        rgb(np.zeros((1, 4, 4, 5), np.uint8))


def test_rgb_to_gray_is_the_luma_rounded():
    """RGB -> gray: 0.2989 R + 0.5870 G + 0.1140 B, rounded half to even
    for uint8 (hand computation), unrounded for floats (TensorFlow's
    rgb_to_grayscale on floats)."""
    tf = pytest.importorskip("tensorflow")
    gray = ImageConverter(image_size=None, num_channels=1,
                          value_range=(0.0, 255.0))
    pixel = np.array([[[200, 100, 50]]], np.uint8)
    # 0.2989 * 200 + 0.5870 * 100 + 0.1140 * 50 = 124.18
    np.testing.assert_array_equal(gray(pixel), [[[[124.0]]]])
    rgba = np.concatenate([pixel, [[[9]]]], -1).astype(np.uint8)
    np.testing.assert_array_equal(gray(rgba), [[[[124.0]]]])
    floats = np.random.default_rng(0).uniform(2, 255, (5, 7, 3))
    floats = floats.astype(np.float32)
    np.testing.assert_allclose(
        gray(floats)[0], tf.image.rgb_to_grayscale(floats).numpy(),
        rtol=1e-6)


def _pil_bytes(array, mode=None, fmt="PNG"):
    from PIL import Image

    image = Image.fromarray(array)
    if mode is not None:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("num_channels", [1, 3])
def test_files_of_every_mode_give_the_same_inputs_in_a_graph(num_channels):
    """Gray, gray + alpha, RGB, RGBA and palette PNGs: the host (Pillow)
    and tf.data (TensorFlow's decoder) give the same model inputs, by the
    same channel rule."""
    tf = pytest.importorskip("tensorflow")
    converter = ImageConverter.from_vmoe_process(
        "decode|resize_small(12)|central_crop(10)|value_range(-1,1)",
        num_channels=num_channels)
    rgb = np.random.default_rng(1).integers(0, 256, (13, 17, 3), np.uint8)
    for mode in ("L", "LA", "RGB", "RGBA", "P"):
        data = _pil_bytes(rgb, mode)
        host = converter(data)
        graph = tf.data.Dataset.from_tensor_slices([data]).map(converter)
        # (float32 resampling sums in another order: 1 ulp)
        np.testing.assert_allclose(next(iter(graph)).numpy(), host[0],
                                   rtol=0, atol=1e-6, err_msg=mode)
    # JPEGs decode as Pillow decodes them (the accurate integer DCT)
    for mode in ("L", "RGB"):
        data = _pil_bytes(rgb, mode, fmt="JPEG")
        graph = tf.data.Dataset.from_tensor_slices([data]).map(converter)
        np.testing.assert_allclose(next(iter(graph)).numpy(),
                                   converter(data)[0], rtol=0, atol=1e-6,
                                   err_msg=f"JPEG {mode}")
    # and the RGB file given to a gray model is the luma of its pixels
    if num_channels == 1:
        luma = np.round(rgb.astype(np.float32) @ np.float32(
            [0.2989, 0.5870, 0.1140])).astype(np.uint8)
        np.testing.assert_allclose(converter(_pil_bytes(rgb)),
                                   converter(luma[..., None]), atol=1e-6)


def test_float_range():
    converter = ImageConverter(image_size=4)
    with pytest.raises(ValueError, match="far outside"):
        converter(np.full((4, 4, 3), -1.0, np.float32))  # already scaled
    with pytest.raises(ValueError, match="far outside"):
        converter(np.full((4, 4, 3), 4000.0, np.float32))  # 12-bit
    with pytest.raises(ValueError, match="far outside"):
        converter(np.full((4, 4, 3), 4000, np.uint16))  # integers too
    with pytest.raises(ValueError, match="NaN"):
        converter(np.full((4, 4, 3), np.nan, np.float32))
    with pytest.raises(ValueError, match=r"\[0, 1\].*Multiply them by 255"):
        converter(np.full((4, 4, 3), 0.5, np.float32))
    digits = load_digits().images[:2]  # float64, 0..16
    with pytest.raises(ValueError, match=r"\[0, 16\].*digits"):
        converter(digits)
    with pytest.raises(ValueError, match=r"\[0, 16\]"):
        converter(digits.astype(np.int64))
    # what the messages tell to do works
    converter(np.round(digits * 255 / 16).astype(np.uint8))
    converter(digits.astype(np.uint8))  # uint8 is never checked
    converter(np.full((4, 4, 3), 200.0, np.float32))
    converter(np.zeros((4, 4, 3), np.float32))  # black is black
    ImageConverter(image_size=4, input_range=(0, 1))(
        np.full((4, 4, 3), 0.5, np.float32))
    ImageConverter(image_size=4, input_range=(0, 16))(digits)
    # uint8 pixels given to a converter of a narrower range
    with pytest.raises(ValueError, match=r"far outside.*\[0, 16\]"):
        ImageConverter(image_size=4, input_range=(0, 16))(
            np.full((4, 4, 3), 200, np.uint8))


def test_float_range_inside_tf_data():
    tf = pytest.importorskip("tensorflow")
    converter = ImageConverter(image_size=4)
    for bad, match in [(np.full((1, 4, 4, 3), 0.5, np.float32), "0, 1"),
                       (np.full((1, 4, 4, 3), 16.0, np.float32), "0, 16"),
                       (np.full((1, 4, 4, 3), -1.0, np.float32), "far"),
                       (np.full((1, 4, 4, 3), np.inf, np.float32), "NaN")]:
        ds = tf.data.Dataset.from_tensor_slices(bad).map(converter)
        with pytest.raises(tf.errors.InvalidArgumentError, match=match):
            next(iter(ds))
    good = np.full((1, 4, 4, 3), 200.0, np.float32)
    ds = tf.data.Dataset.from_tensor_slices(good).map(converter)
    np.testing.assert_allclose(next(iter(ds)).numpy(), converter(good)[0])


def test_model_ready_detection():
    converter = ImageConverter(image_size=8, num_channels=3)
    ready = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 3))
    assert converter.is_model_ready(ready.astype("float32"))
    assert not converter.is_model_ready(ready.astype("float32")[0])
    assert not converter.is_model_ready(np.zeros((2, 8, 8, 3), np.uint8))
    assert not converter.is_model_ready(np.full((2, 8, 8, 3), 9.0))
    assert not converter.is_model_ready(np.zeros((2, 9, 8, 3)))
    assert converter.is_model_ready(np.zeros((2, 8, 8, 3), np.float32))
    # [0, 1] floats of the model's size: pixels scaled to [0, 1], or
    # model inputs? Neither is assumed.
    with pytest.raises(ValueError, match=r"look like pixels scaled to "
                                         r"\[0, 1\].*model\(x\)"):
        converter.is_model_ready(np.abs(ready).astype("float32"))
    assert ImageConverter(image_size=8, value_range=(0, 1)).is_model_ready(
        np.abs(ready).astype("float32"))


def test_bad_inputs(tmp_path):
    converter = ImageConverter(image_size=8)
    with pytest.raises(ValueError, match="No such image file"):
        converter(str(tmp_path / "missing.png"))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="Cannot decode"):
        converter(str(tmp_path / "bad.png"))
    with pytest.raises(ValueError, match="different sizes"):
        ImageConverter()([np.zeros((4, 4, 3)), np.zeros((5, 4, 3))])
    with pytest.raises(ValueError, match="interpolation"):
        ImageConverter(interpolation="lanczos")
    with pytest.raises(ValueError, match="crop"):
        ImageConverter(image_size=10, smaller_side=8)


def test_process_parsing():
    assert parse_process("decode|resize(384, method='area')") == [
        ("decode", [], {}), ("resize", [384], {"method": "area"})]
    c = ImageConverter.from_vmoe_process(
        "decode|resize_small(256)|central_crop(224)|value_range(-1,1)")
    assert (c.smaller_side, c.image_size, c.interpolation,
            c.cast_to_input_dtype, c.num_channels) == (
        256, (224, 224), "area", False, 3)
    # the model's channels win over a bare decode; decode(channels=N) must
    # agree with them
    assert ImageConverter.from_vmoe_process(
        "decode|resize(8)", num_channels=1).num_channels == 1
    assert ImageConverter.from_vmoe_process(
        "decode(channels=1)|resize(8)").num_channels == 1
    with pytest.raises(ValueError, match="decodes 1 channels but the model "
                                         "takes 3"):
        ImageConverter.from_vmoe_process("decode(1)|resize(8)",
                                         num_channels=3)
    c = ImageConverter.from_vmoe_process("decode|resize(128)|value_range(0,1)")
    assert (c.smaller_side, c.image_size, c.interpolation,
            c.cast_to_input_dtype, c.value_range) == (
        None, (128, 128), "bilinear", True, (0.0, 1.0))
    for bad, match in [("decode|flip_lr", "Unsupported op"),
                       ("decode|resize(", "Cannot parse"),
                       ("value_range(-1,1)|resize(3)", "last"),
                       ("decode|central_crop(3)", "after resize_small"),
                       ("resize(3, antialias=True)", "antialias"),
                       ("value_range(-1,1,clip_values=True)", "clip")]:
        with pytest.raises(ValueError, match=match):
            ImageConverter.from_vmoe_process(bad)


def test_serialisation_round_trip():
    converter = ImageConverter.from_vmoe_process(
        "decode|resize_small(40)|central_crop(32)|value_range(-1,1)")
    config = converter.get_config()
    json.dumps(config)
    again = ImageConverter.from_config(config)
    assert again.get_config() == config
    restored = keras.saving.deserialize_keras_object(
        json.loads(json.dumps(keras.saving.serialize_keras_object(converter))))
    assert isinstance(restored, ImageConverter)
    assert restored.get_config() == config
    image = np.random.default_rng(0).integers(0, 256, (50, 45, 3), np.uint8)
    np.testing.assert_array_equal(restored(image), converter(image))
    # the older flat preprocessor.json dicts
    legacy = ImageConverter.from_preset_config(
        {"image_size": [32, 32], "num_channels": 1,
         "value_range": [-1.0, 1.0], "source_range": [0.0, 16.0],
         "dataset": "sklearn"})
    assert (legacy.image_size, legacy.num_channels, legacy.input_range) == (
        (32, 32), 1, (0.0, 16.0))
    assert ImageConverter.from_preset_config(
        keras.saving.serialize_keras_object(converter)).get_config() == config
