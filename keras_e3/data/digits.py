"""scikit-learn's handwritten digits as small ViT inputs.

`sklearn.datasets.load_digits` ships with scikit-learn (no download): 1,797
grayscale 8x8 images of the digits 0-9, integer pixel values 0..16. This
module turns them into the images the `*_tiny_digits` presets were trained
and evaluated on:

* upsampled to `image_size` with **bilinear** interpolation (half-pixel
  centres, edges clamped: the `align_corners=False` convention of
  `jax.image.resize` / `tf.image.resize` / `torch` without antialiasing),
  computed in NumPy so that every Keras backend sees bit-identical inputs;
* scaled from [0, 16] to [-1, 1] (vmoe's input range);
* channels last, `num_channels` copies of the gray channel, float32;
* split into train / test with a fixed-seed stratified split (per class,
  the same fraction goes to the test set), in NumPy: the split depends on
  `seed` and `test_fraction` only, never on the backend or library versions.

`digits_converter()` is the ImageConverter that makes these inputs from
8x8 uint8 images (value * 255 / 16); `digits_preprocessor()` is its
serialisation, a preset's `preprocessor.json`. `load_raw_digits_splits()`
gives those raw 8x8 uint8 images (what PNG files of the digits hold), the
input of a model's own converter (the "digits" dataset of the command
line).
"""

import numpy as np

SOURCE_RANGE = (0.0, 16.0)
VALUE_RANGE = (-1.0, 1.0)
NUM_CLASSES = 10
SOURCE_SIZE = 8

def digits_converter(image_size=32, num_channels=1):
    """The `keras_e3.ImageConverter` that turns 8x8 uint8 digit images
    (value * 255 / 16, what a PNG of them holds) into these inputs: bilinear
    upsampling to `image_size` (the same half-pixel resampling as
    `upsample`, which commutes with the linear rescaling) and 0..255 mapped
    onto [-1, 1]."""
    from keras_e3.preprocessing.image_converter import ImageConverter

    return ImageConverter(image_size=int(image_size),
                          num_channels=int(num_channels),
                          interpolation="bilinear", input_range=(0.0, 255.0),
                          value_range=VALUE_RANGE,
                          name="digits_image_converter")


def digits_preprocessor(image_size=32, num_channels=1):
    """The preset `preprocessor.json` for `load_digits_splits` inputs: the
    serialised `digits_converter`."""
    import keras

    return keras.saving.serialize_keras_object(
        digits_converter(image_size, num_channels))


def to_uint8(images):
    """0..16 digits -> uint8 0..255 (round(v * 255 / 16)), as image files
    of them hold."""
    images = np.asarray(images, dtype=np.float64)
    return np.round(images * 255.0 / SOURCE_RANGE[1]).astype(np.uint8)


def _bilinear_matrix(out_size, in_size):
    """[out, in] weights of 1-D bilinear resampling (half-pixel centres)."""
    scale = in_size / out_size
    centres = (np.arange(out_size) + 0.5) * scale - 0.5
    centres = np.clip(centres, 0.0, in_size - 1)
    low = np.floor(centres).astype(int)
    high = np.minimum(low + 1, in_size - 1)
    frac = centres - low
    weights = np.zeros((out_size, in_size))
    weights[np.arange(out_size), low] += 1.0 - frac
    weights[np.arange(out_size), high] += frac
    return weights


def upsample(images, image_size):
    """Bilinear resize of [N, h, w] images to [N, image_size, image_size]."""
    images = np.asarray(images, dtype=np.float64)
    rows = _bilinear_matrix(image_size, images.shape[1])
    cols = _bilinear_matrix(image_size, images.shape[2])
    return np.einsum("oh,nhw,pw->nop", rows, images, cols)


def preprocess(images, image_size=32, num_channels=1):
    """[N, 8, 8] digits with values 0..16 -> [N, S, S, C] float32 in [-1, 1]."""
    if image_size < 1 or num_channels < 1:
        raise ValueError("image_size and num_channels must be >= 1; got "
                         f"{image_size} and {num_channels}.")
    images = np.asarray(images, dtype=np.float64)
    if images.ndim == 2 and images.shape[1] == SOURCE_SIZE ** 2:
        images = images.reshape(-1, SOURCE_SIZE, SOURCE_SIZE)
    if images.ndim != 3 or images.shape[1:] != (SOURCE_SIZE, SOURCE_SIZE):
        raise ValueError("digits must be [N, 8, 8] (or flat [N, 64]); got "
                         f"shape {images.shape}.")
    low, high = SOURCE_RANGE
    out_low, out_high = VALUE_RANGE
    x = upsample(images, image_size)
    x = (x - low) / (high - low) * (out_high - out_low) + out_low
    x = np.repeat(x[..., None], num_channels, axis=-1)
    return x.astype(np.float32)


def stratified_split(labels, test_fraction=0.25, seed=0):
    """(train_indices, test_indices): per class, round(n_c * test_fraction)
    examples (drawn with `seed`) go to the test set. Both sorted."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError("test_fraction must be in (0, 1); got "
                         f"{test_fraction}.")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n_test = int(round(len(members) * test_fraction))
        test.append(rng.permutation(members)[:n_test])
    test = np.sort(np.concatenate(test))
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test


def load_digits_raw():
    """(images [1797, 8, 8] float64 in 0..16, labels [1797] int)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("The digits data set comes with scikit-learn: "
                          "pip install scikit-learn") from e
    digits = load_digits()
    return digits.images, digits.target


def split_indices(test_fraction=0.25, seed=0):
    """(train_indices, test_indices) into `load_digits_raw()`'s order."""
    _, labels = load_digits_raw()
    return stratified_split(labels, test_fraction, seed)


def split_fingerprint(test_fraction=0.25, seed=0):
    """sha256 of the test indices (int64, little endian): recorded in the
    presets' metadata to tie their metrics to one exact split."""
    import hashlib

    _, test = split_indices(test_fraction, seed)
    return hashlib.sha256(test.astype("<i8").tobytes()).hexdigest()


def load_raw_digits_splits(test_fraction=0.25, seed=0):
    """((x_train, y_train), (x_test, y_test)) of the raw digits: uint8
    [N, 8, 8, 1] images (`to_uint8`: round(v * 255 / 16), as image files
    of them hold) and int32 labels, split as `load_digits_splits`.

    These are raw images for a model's converter (`model.predict(x)`,
    `model.preprocessor(x)`): with the `*_tiny_digits` presets' converter
    they give the presets' inputs.

    Example:
    >>> (x_train, y_train), (x_test, y_test) = load_raw_digits_splits()
    >>> x_test.shape, x_test.dtype
    ((450, 8, 8, 1), dtype('uint8'))
    """
    images, labels = load_digits_raw()
    train, test = stratified_split(labels, test_fraction, seed)
    x = to_uint8(images)[..., None]
    y = np.asarray(labels, dtype=np.int32)
    return (x[train], y[train]), (x[test], y[test])


def load_digits_splits(image_size=32, num_channels=1, test_fraction=0.25,
                       seed=0):
    """((x_train, y_train), (x_test, y_test)) of scikit-learn's digits.

    Images are float32 [N, image_size, image_size, num_channels] in [-1, 1]
    (see the module docstring), labels int32 [N]. With the defaults:
    1,347 training and 450 test images.
    """
    images, labels = load_digits_raw()
    train, test = stratified_split(labels, test_fraction, seed)
    x = preprocess(images, image_size, num_channels)
    y = np.asarray(labels, dtype=np.int32)
    return (x[train], y[train]), (x[test], y[test])
