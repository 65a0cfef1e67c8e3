"""keras_e3.data.corrupt against the imagecorruptions package itself:
the deterministic corruptions equal its output uint8-exactly, the random
ones reproduce with a seed; channels, small images and errors."""

import numpy as np
import pytest

from keras_e3.data import corruptions
from keras_e3.data.corruptions import corrupt
from keras_e3.data.corruptions import corruption_names

imagecorruptions = pytest.importorskip(
    "imagecorruptions", reason="pip install keras-e3[corruptions]")

pytestmark = pytest.mark.single_backend


def images(shape, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:shape[1], 0:shape[2]]
    base = (yy * 3 + xx * 2)[None, ..., None] % 256
    noise = rng.integers(0, 80, shape)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def test_names():
    # ImageNet-C's 15 and its 4 extras, the package's own lists
    assert corruption_names("benchmark") == \
        imagecorruptions.get_corruption_names("common")
    assert sorted(corruption_names("extra")) == sorted(
        imagecorruptions.get_corruption_names("validation"))
    assert len(corruption_names()) == 19
    with pytest.raises(ValueError, match="subset"):
        corruption_names("weather")


@pytest.mark.parametrize("shape", [(2, 32, 32, 3), (1, 45, 61, 3)])
@pytest.mark.parametrize("name", corruptions.DETERMINISTIC_CORRUPTIONS)
def test_deterministic_corruptions_equal_the_package(name, shape):
    x = images(shape)
    out = corrupt(x, name, 3)
    assert out.shape == x.shape and out.dtype == np.uint8
    for image, corrupted in zip(x, out):
        expected = imagecorruptions.corrupt(image, corruption_name=name,
                                            severity=3)
        np.testing.assert_array_equal(corrupted, expected)
    assert not np.array_equal(out, x)


RANDOM = [n for n in corruption_names()
          if n not in corruptions.DETERMINISTIC_CORRUPTIONS]


@pytest.mark.parametrize("name", RANDOM)
def test_random_corruptions_reproduce_with_a_seed(name):
    x = images((2, 36, 40, 3))
    state = np.random.get_state()
    first = corrupt(x, name, 2, seed=7)
    again = corrupt(x, name, 2, seed=7)
    np.testing.assert_array_equal(first, again)
    # the caller's global NumPy generator is left as it was
    np.testing.assert_array_equal(np.random.get_state()[1], state[1])
    other = corrupt(x, name, 2, seed=8)
    assert not np.array_equal(first, other)
    # image i's corruption does not depend on the other images
    np.testing.assert_array_equal(corrupt(x[:1], name, 2, seed=7),
                                  first[:1])
    # the protocol: the package under the documented per-image seed
    seed = corruptions.image_seed(7, name, 2, 1)
    np.random.seed(seed)
    kwargs = {"seed": seed} if name in ("impulse_noise", "glass_blur") \
        else {}
    expected = imagecorruptions.corrupt(x[1], corruption_name=name,
                                        severity=2, **kwargs)
    np.random.set_state(state)
    np.testing.assert_array_equal(first[1], expected)


def test_one_image_gray_rgba_and_small_images():
    rgb = images((1, 40, 34, 3))[0]
    np.testing.assert_array_equal(corrupt(rgb, "contrast", 2),
                                  corrupt(rgb[None], "contrast", 2)[0])
    # gray: corrupted as RGB, back to gray by the luma (hand computation)
    gray = rgb[..., :1]
    out = corrupt(gray, "saturate", 4)
    assert out.shape == gray.shape
    full = imagecorruptions.corrupt(np.repeat(gray, 3, -1),
                                    corruption_name="saturate", severity=4)
    luma = np.round(full.astype(np.float32) @ np.float32(
        [0.2989, 0.5870, 0.1140])).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 0], luma)
    assert corrupt(gray[..., 0], "saturate", 4).shape == gray.shape[:2]
    # RGBA: the alpha is kept
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 77,
                                        np.uint8)], -1)
    out = corrupt(rgba, "brightness", 1)
    np.testing.assert_array_equal(out[..., 3], 77)
    np.testing.assert_array_equal(out[..., :3],
                                  corrupt(rgb, "brightness", 1))
    # under 32 px: up to 32, corrupted, back down (Pillow)
    from PIL import Image

    small = images((1, 8, 12, 3))[0]
    up = np.asarray(Image.fromarray(small).resize(
        (48, 32), Image.Resampling.BILINEAR))
    down = Image.fromarray(imagecorruptions.corrupt(
        up, corruption_name="pixelate", severity=5))
    expected = np.asarray(down.resize((12, 8), Image.Resampling.BOX))
    np.testing.assert_array_equal(corrupt(small, "pixelate", 5), expected)


def test_errors():
    x = images((1, 32, 32, 3))
    with pytest.raises(ValueError, match="Unknown corruption 'fogg'"):
        corrupt(x, "fogg", 1)
    with pytest.raises(ValueError, match="severity must be an integer 1-5"):
        corrupt(x, "fog", 6)
    with pytest.raises(ValueError, match="uint8"):
        corrupt(x.astype(np.float32), "fog", 1)
    with pytest.raises(ValueError, match="C = 1, 3 or 4"):
        corrupt(np.zeros((1, 32, 32, 2), np.uint8), "fog", 1)
