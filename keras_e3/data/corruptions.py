"""ImageNet-C's corruptions on any images (Hendrycks & Dietterich, ICLR 2019).

`corrupt(images, name, severity, seed=None)` applies one of ImageNet-C's
15 benchmark corruptions, or one of its 4 extra ones (`gaussian_blur`,
`saturate`, `spatter`, `speckle_noise`), at severity 1-5, to uint8 images
of any size. The definitions are the `imagecorruptions` package's
(`pip install keras-e3[corruptions]`, which installs its maintained
release, imagecorruptions-imaug: ImageNet-C's code for images of any size,
frost pictures included, no ImageMagick). Nothing is re-implemented here:
each image goes through `imagecorruptions.corrupt` as it is.

Images: uint8 [N, H, W, C] or one image [H, W, C] / [H, W]; the output has
the input's shape and dtype. Channels:
- RGB images are corrupted as they are;
- gray images ([H, W] or C = 1) are corrupted as RGB (the gray channel
  repeated, as `imagecorruptions` does itself) and turned back to gray by
  keras-e3's one channel rule (the ITU-R 601 luma of `ImageConverter`);
  colour corruptions (frost, snow, spatter, saturate) are therefore seen
  through that luma;
- RGBA images: the RGB part is corrupted and the alpha kept.
Images whose smaller side is under 32 pixels (the package's minimum; e.g.
CIFAR's 32 px pass, 8x8 digits do not) are scaled up so that the smaller
side is 32 (Pillow's bilinear resampling), corrupted, and scaled back to
their size (Pillow's box filter, the area average). To corrupt at a model's
input size instead, resize first (the README's digits study does).

Randomness. Eleven corruptions draw random numbers (the noises, glass and
motion blur, snow, frost, fog, spatter, elastic transform), from NumPy's
global generator and from seeds passed to `impulse_noise` and `glass_blur`.
With `seed` (an int), image i of the call is corrupted under the seed
`numpy.random.SeedSequence([seed, k, severity, i]).generate_state(1)[0]`
(k: the corruption's position in `corruption_names("all")`): NumPy's global
generator is seeded with it for that image (and restored afterwards), and
it is the `seed` of impulse_noise and glass_blur. So a call's output is a
function of (images, name, severity, seed) alone, the same in any process,
and image i's corruption does not depend on the other images of the call
(only on its position). `seed=None` draws fresh randomness from NumPy's
global generator (not reproducible). The eight others (defocus_blur,
zoom_blur, brightness, contrast, pixelate, jpeg_compression, gaussian_blur,
saturate) are deterministic: exactly the package's output.
"""

import numpy as np

# ImageNet-C's benchmark corruptions, in the paper's order (noise, blur,
# weather, digital), and its four held-out extras.
BENCHMARK_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur",
    "glass_blur", "motion_blur", "zoom_blur", "snow", "frost", "fog",
    "brightness", "contrast", "elastic_transform", "pixelate",
    "jpeg_compression")
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
DETERMINISTIC_CORRUPTIONS = (
    "defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate",
    "jpeg_compression", "gaussian_blur", "saturate")
SEVERITIES = (1, 2, 3, 4, 5)
MIN_SIZE = 32
SUBSETS = ("all", "benchmark", "extra")
# Corruptions of the package that take a `seed` argument themselves.
_SEEDED = ("impulse_noise", "glass_blur")


def corruption_names(subset="all"):
    """The corruption names.

    Args:
        subset: "all" (ImageNet-C's 15 benchmark corruptions, then its 4
            extras), "benchmark" (the 15 that mCE averages over) or
            "extra".

    Returns:
        A list of names, in that order.

    Example:
    ```python
    from keras_e3 import data

    len(data.corruption_names()), data.corruption_names("benchmark")[0]
    # (19, "gaussian_noise")
    ```
    """
    if subset == "all":
        return list(BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS)
    if subset == "benchmark":
        return list(BENCHMARK_CORRUPTIONS)
    if subset == "extra":
        return list(EXTRA_CORRUPTIONS)
    raise ValueError(f"Unknown corruption subset {subset!r}; expected one of "
                     f"{SUBSETS}.")


def check_corruption(name, severity=None):
    """A ValueError naming the problem if `name` (or `severity`) is not a
    corruption (a severity 1-5)."""
    if name not in BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS:
        raise ValueError(f"Unknown corruption {name!r}; known: "
                         f"{', '.join(corruption_names())}.")
    if severity is not None and (isinstance(severity, bool) or
                                 severity not in SEVERITIES):
        raise ValueError(f"severity must be an integer 1-5; got "
                         f"{severity!r}.")


def image_seed(seed, name, severity, index):
    """The seed image `index` of a `corrupt(..., seed=seed)` call is
    corrupted under (module docstring)."""
    k = corruption_names().index(name)
    sequence = np.random.SeedSequence([int(seed), k, int(severity),
                                       int(index)])
    return int(sequence.generate_state(1)[0])


def corrupt(images, name, severity, seed=None):
    """ImageNet-C corruption `name` at `severity` on uint8 images.

    Args:
        images: uint8 [N, H, W, C] (C = 1, 3 or 4), [N, H, W] gray, or one
            image [H, W, C] / [H, W].
        name: one of `corruption_names()`.
        severity: 1 to 5.
        seed: an int for reproducible random corruptions (the protocol is in
            the module docstring), or None for fresh randomness.

    Returns:
        uint8 images of the input's shape.

    Example:
    ```python
    import numpy as np

    from keras_e3 import data

    images = np.full((2, 40, 40, 3), 128, np.uint8)
    data.corrupt(images, "brightness", 3, seed=0).shape  # (2, 40, 40, 3)
    ```
    """
    check_corruption(name, severity)
    corrupt_one = _package_corrupt()
    x = np.asarray(images)
    if x.dtype != np.uint8:
        raise ValueError(f"corrupt takes uint8 images (0..255); got dtype "
                         f"{x.dtype}. Convert them first (e.g. "
                         "keras_e3.data.digits.to_uint8 for 0..16 digits).")
    single = x.ndim == 2 or (x.ndim == 3 and x.shape[-1] in (1, 3, 4))
    batch = x[None] if single else x
    if batch.ndim == 3:  # [N, H, W] gray
        batch = batch[..., None]
    if batch.ndim != 4 or batch.shape[-1] not in (1, 3, 4):
        raise ValueError("corrupt takes images [N, H, W, C] (C = 1, 3 or 4),"
                         f" [N, H, W] or one image; got shape {x.shape}.")
    out = np.empty_like(batch)
    for i, image in enumerate(batch):
        image_seed_i = None if seed is None else image_seed(
            seed, name, severity, i)
        out[i] = _corrupt_image(image, name, severity, image_seed_i,
                                corrupt_one)
    return out.reshape(x.shape)


def _corrupt_image(image, name, severity, seed, corrupt_one):
    """One [H, W, C] uint8 image (module docstring's channel and size
    rules)."""
    channels = image.shape[-1]
    rgb = image[..., :3] if channels >= 3 else np.repeat(image, 3, axis=-1)
    height, width = rgb.shape[:2]
    small = min(height, width) < MIN_SIZE
    if small:
        rgb = _resize(rgb, _upscaled_size(height, width), "bilinear")
    kwargs = {"seed": seed} if (seed is not None and name in _SEEDED) else {}
    if seed is None:
        result = corrupt_one(rgb, corruption_name=name, severity=severity,
                             **kwargs)
    else:
        state = np.random.get_state()
        np.random.seed(seed)
        try:
            result = corrupt_one(rgb, corruption_name=name,
                                 severity=severity, **kwargs)
        finally:
            np.random.set_state(state)
    result = np.asarray(result, np.uint8)
    if small:
        result = _resize(result, (height, width), "box")
    if channels == 1:
        return _gray(result)
    if channels == 4:
        return np.concatenate([result, image[..., 3:]], axis=-1)
    return result


def _upscaled_size(height, width):
    """(height, width) scaled so that the smaller side is 32 (rounded)."""
    scale = MIN_SIZE / min(height, width)
    return (max(MIN_SIZE, int(round(height * scale))),
            max(MIN_SIZE, int(round(width * scale))))


def _resize(image, size, method):
    from PIL import Image

    resample = {"bilinear": Image.Resampling.BILINEAR,
                "box": Image.Resampling.BOX}[method]
    resized = Image.fromarray(image).resize((size[1], size[0]), resample)
    return np.asarray(resized, np.uint8)


def _gray(rgb):
    """keras-e3's channel rule (ImageConverter's luma) on one RGB image."""
    from keras_e3.preprocessing.image_converter import ImageConverter

    converter = ImageConverter(image_size=None, num_channels=1,
                               value_range=(0.0, 255.0))
    gray = converter(rgb)[0]  # float32 of the rounded uint8 luma
    return gray.astype(np.uint8)


def _package_corrupt():
    try:
        from imagecorruptions import corrupt as package_corrupt
    except ImportError as e:
        raise ImportError(
            "keras_e3.data.corrupt needs the imagecorruptions package: pip "
            "install keras-e3[corruptions] (imagecorruptions-imaug)") from e
    return package_corrupt
