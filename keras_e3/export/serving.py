"""The served function of an export with preprocessing: raw images in,
member logits and ensemble probabilities out.

`preprocess_raw_images` is the one place that turns raw uint8 images into
model inputs inside an exported graph (the preset's `preprocessor.json`:
channels, `image_size`, `source_range` -> `value_range`, as
`keras_e3.data.preprocessing.ImagePreprocessor` does on NumPy arrays). It
is written with `keras.ops` only, so that it traces on every backend and
into every format.
"""

import keras
import numpy as np
from keras import ops

from keras_e3.data.preprocessing import LUMA
from keras_e3.data.preprocessing import ImagePreprocessor

MEMBER_LOGITS = "member_logits"
ENSEMBLE_PROBABILITIES = "ensemble_probabilities"


def raw_image_shape(config):
    """(height, width, channels) of the raw images the served function
    takes: the preset's `source_size` (the raw data's size, e.g. 8x8 for
    the digits) if it has one, else its `image_size`."""
    size = config.get("source_size") or config["image_size"]
    if isinstance(size, int):
        size = (size, size)
    return (int(size[0]), int(size[1]), int(config.get("num_channels", 3)))


def preprocess_raw_images(images, config):
    """Raw images [B, H, W, C] (any dtype, e.g. uint8) -> model inputs
    [B, *image_size, num_channels] float32, following the preprocessor
    config `config` (see the module docstring)."""
    pre = ImagePreprocessor.from_config(config)
    x = ops.cast(images, "float32")
    channels, wanted = x.shape[-1], pre.num_channels
    if wanted is not None and channels != wanted:
        if channels == 1:
            x = ops.repeat(x, wanted, axis=-1)
        elif channels == 4 and wanted == 3:
            x = x[..., :3]
        elif channels in (3, 4) and wanted == 1:
            luma = x[..., :3] * np.asarray(LUMA, np.float32)
            x = luma[..., :1] + luma[..., 1:2] + luma[..., 2:3]
        else:
            raise ValueError(f"Cannot convert images with {channels} "
                             f"channels to {wanted} channels.")
    if pre.image_size is not None and tuple(x.shape[1:3]) != pre.image_size:
        x = ops.image.resize(x, pre.image_size,
                             interpolation=pre.interpolation,
                             data_format="channels_last")
    return pre._scale(x)


class RawImagePreprocessing(keras.layers.Layer):
    """`preprocess_raw_images` as a layer of the served model."""

    def __init__(self, config, **kwargs):
        super().__init__(**kwargs)
        self.config = dict(config)

    def call(self, images):
        return preprocess_raw_images(images, self.config)

    def compute_output_spec(self, images):
        pre = ImagePreprocessor.from_config(self.config)
        size = pre.image_size or tuple(images.shape[1:3])
        channels = pre.num_channels or images.shape[-1]
        return keras.KerasTensor((images.shape[0], *size, channels),
                                 dtype="float32")


class ServingOutputs(keras.layers.Layer):
    """Logits [B, C] or [B, M, C] -> {member logits [B, M, C], ensemble
    probabilities mean_m softmax(logits_m) [B, C]}."""

    def call(self, logits):
        if len(logits.shape) == 2:
            logits = ops.expand_dims(logits, 1)
        probs = ops.mean(ops.softmax(logits, axis=-1), axis=1)
        return {MEMBER_LOGITS: logits, ENSEMBLE_PROBABILITIES: probs}

    def compute_output_spec(self, logits):
        shape = tuple(logits.shape)
        if len(shape) == 2:
            shape = (shape[0], 1, shape[1])
        return {MEMBER_LOGITS: keras.KerasTensor(shape, dtype="float32"),
                ENSEMBLE_PROBABILITIES: keras.KerasTensor(
                    (shape[0], shape[-1]), dtype="float32")}


def serving_model(model, config):
    """A functional model: raw images (uint8, `raw_image_shape(config)`) ->
    `preprocess_raw_images` -> `model` -> {"member_logits",
    "ensemble_probabilities"}."""
    images = keras.Input(raw_image_shape(config), dtype="uint8",
                         name="images")
    x = RawImagePreprocessing(config, name="preprocessing")(images)
    outputs = ServingOutputs(name="outputs")(model(x))
    return keras.Model(images, outputs, name=f"{model.name}_serving")
