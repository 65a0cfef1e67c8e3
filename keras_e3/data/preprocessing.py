"""Turning raw images into a preset's inputs.

A preset's `preprocessor.json` says what the model expects, e.g.
`{"image_size": [32, 32], "num_channels": 3, "value_range": [-1.0, 1.0]}`
(vmoe's convention: RGB in [-1, 1]); an optional `"source_range"` gives the
range of the raw pixels (default [0, 255]). `ImagePreprocessor` applies it:

1. cast to float32;
2. channel conversion: gray -> RGB repeats the channel, RGB -> gray is the
   ITU-R 601 luma (as `tf.image.rgb_to_grayscale`), RGBA drops alpha;
3. resize to `image_size` (bilinear, half-pixel centres, no antialiasing);
4. map `source_range` linearly onto `value_range`.

It works on NumPy arrays (returns NumPy, through `keras.ops` for the
resize, so any backend) and on `tf.Tensor`s inside a `tf.data` map
(TensorFlow ops), for single images [H, W, C] or batches [B, H, W, C].
"""

import numpy as np

from keras_e3.layers.embedding import as_pair

LUMA = (0.2989, 0.5870, 0.1140)
DEFAULT_SOURCE_RANGE = (0.0, 255.0)
DEFAULT_VALUE_RANGE = (-1.0, 1.0)


class ImagePreprocessor:
    """Resize, convert channels and rescale images (see the module doc).

    Args:
        image_size: int or (height, width); None keeps the input size.
        num_channels: 1, 3 or 4; None keeps the input channels.
        value_range: (low, high) of the model's inputs.
        source_range: (low, high) of the raw pixels.
        interpolation: resize method ("bilinear", "nearest", "bicubic").
    """

    def __init__(self, image_size=None, num_channels=None,
                 value_range=DEFAULT_VALUE_RANGE,
                 source_range=DEFAULT_SOURCE_RANGE, interpolation="bilinear"):
        if image_size is not None:
            image_size = as_pair(image_size, "image_size")
        if num_channels is not None and num_channels not in (1, 3, 4):
            raise ValueError(f"num_channels must be 1, 3 or 4; got "
                             f"{num_channels}.")
        self.image_size = image_size
        self.num_channels = num_channels
        self.value_range = _range(value_range, "value_range")
        self.source_range = _range(source_range, "source_range")
        self.interpolation = interpolation

    @classmethod
    def from_config(cls, config, **overrides):
        """From a preset's preprocessor config dict (unknown keys ignored)."""
        if isinstance(config, ImagePreprocessor):
            return config
        keys = ("image_size", "num_channels", "value_range", "source_range",
                "interpolation")
        kwargs = {k: config[k] for k in keys if k in config}
        kwargs.update(overrides)
        return cls(**kwargs)

    def get_config(self):
        return {"image_size": None if self.image_size is None
                else list(self.image_size),
                "num_channels": self.num_channels,
                "value_range": list(self.value_range),
                "source_range": list(self.source_range),
                "interpolation": self.interpolation}

    def __call__(self, images):
        if _is_tf_tensor(images):
            return self._call_tf(images)
        return self._call_numpy(images)

    def _scale(self, x):
        lo, hi = self.source_range
        new_lo, new_hi = self.value_range
        scale = (new_hi - new_lo) / (hi - lo)
        return x * scale + (new_lo - lo * scale)

    def _call_numpy(self, images):
        x = np.asarray(images, dtype=np.float32)
        _check_rank(x.ndim, x.shape)
        x = _convert_channels(x, self.num_channels, np)
        if self.image_size is not None and tuple(x.shape[-3:-1]) != \
                self.image_size:
            import keras

            x = keras.ops.convert_to_numpy(keras.ops.image.resize(
                x, self.image_size, interpolation=self.interpolation,
                data_format="channels_last"))
            x = np.asarray(x, dtype=np.float32)
        return self._scale(x).astype(np.float32)

    def _call_tf(self, images):
        import tensorflow as tf

        x = tf.cast(images, tf.float32)
        _check_rank(x.shape.rank, x.shape)
        x = _convert_channels(x, self.num_channels, tf)
        if self.image_size is not None:
            x = tf.image.resize(x, self.image_size, method=self.interpolation)
        return self._scale(x)


def preprocess_images(images, image_size=None, num_channels=None,
                      value_range=DEFAULT_VALUE_RANGE,
                      source_range=DEFAULT_SOURCE_RANGE,
                      interpolation="bilinear"):
    """`ImagePreprocessor(...)(images)` in one call."""
    return ImagePreprocessor(image_size, num_channels, value_range,
                             source_range, interpolation)(images)


def _convert_channels(x, num_channels, lib):
    """`lib` is numpy or tensorflow (both have `repeat`)."""
    channels = x.shape[-1]
    if num_channels is None or channels == num_channels:
        return x
    if channels == 1:
        return lib.repeat(x, num_channels, axis=-1)
    if channels == 4 and num_channels == 3:
        return x[..., :3]
    if channels in (3, 4) and num_channels == 1:
        luma = x[..., :3] * np.asarray(LUMA, np.float32)
        return luma[..., :1] + luma[..., 1:2] + luma[..., 2:3]
    raise ValueError(f"Cannot convert images with {channels} channels to "
                     f"{num_channels} channels.")


def _is_tf_tensor(x):
    return type(x).__module__.startswith("tensorflow")


def _check_rank(rank, shape):
    if rank not in (3, 4):
        raise ValueError("images must be [H, W, C] or [B, H, W, C] "
                         f"(channels last); got shape {tuple(shape)}.")


def _range(value, name):
    lo, hi = (float(v) for v in value)
    if not hi > lo:
        raise ValueError(f"{name} must be (low, high) with high > low; got "
                         f"{tuple(value)}.")
    return (lo, hi)
