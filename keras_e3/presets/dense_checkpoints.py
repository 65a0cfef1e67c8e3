"""timm and keras-hub ViTs as presets: `E3ViT.from_preset(...)` of a timm
folder or `hf://timm/<name>` repository (config.json + model.safetensors),
or of a keras-hub ViT preset (a folder or `hf://` repository whose
config.json is a `keras_hub>ViTBackbone`).

Like the vit_jax `.npz` files (`keras_e3.presets.vit_checkpoints`), the
checkpoint is converted once into a preset directory in the cache
(`<cache>/presets/<timm|keras_hub>-<16 hex digits of the sha256 of its
files>`), written atomically and verified on reuse; from there the usual
overrides apply (`image_size=`, `num_classes=`).

The converter is the one the checkpoint's library describes, as exactly as
keras-e3's `ImageConverter` can write it:

- timm (`pretrained_cfg`): the input size; `crop_pct` < 1 resizes the
  smaller side to floor(size / crop_pct) and crops the centre (timm's
  eval transform); `mean` / `std`. timm resizes with PIL's bicubic
  filter, keras-e3's converter bilinearly (the one difference).
- keras-hub (`preprocessor.json`): the image size, `scale` and `offset`;
  keras-hub crops to the aspect ratio before resizing, keras-e3 resizes
  the smaller side then crops (the same for square inputs).

A per-channel normalisation (timm's ImageNet mean/std, or per-channel
`scale`/`offset`) is folded into the patch embedding, which is linear:
the converter then gives [0, 1] values and the first layer computes
exactly what the checkpoint's did on normalised ones. A uniform one is
the converter's `value_range`.

Class names: timm's `label_names`, else ImageNet-1k's for a 1000-class
head (keras-e3's `imagenet2012` label set).
"""

import hashlib
import math
import os

import keras
import numpy as np

from keras_e3.presets import files as preset_io
from keras_e3.presets.builtin import TASK_CLASS
from keras_e3.presets.files import PresetError


def kind(directory):
    """"timm", "keras_hub" or None: which converter reads `directory`."""
    from keras_e3.conversion.keras_hub_vit import is_keras_hub_vit
    from keras_e3.conversion.timm_vit import read_timm_config

    if not os.path.isdir(directory):
        return None
    if read_timm_config(directory) is not None:
        return "timm"
    if is_keras_hub_vit(directory):
        return "keras_hub"
    return None


def fold_input_affine(params, scale, offset):
    """The input normalisation `value = scale · pixel + offset` (pixels in
    0..255, scale and offset per channel or scalars) folded into the patch
    embedding of vmoe-named `params`, in place where it is per-channel.

    Returns the converter's `value_range`: (offset, 255·scale + offset) for
    a uniform normalisation (params unchanged), else (0, 1) with the patch
    kernel multiplied by 255·scale_c per input channel c and the bias
    increased by the kernel's response to the offsets.
    """
    kernel = params["embedding/kernel"]  # [ph, pw, C, D]
    channels = kernel.shape[2]
    scale = np.broadcast_to(np.asarray(scale, np.float64), (channels,))
    offset = np.broadcast_to(np.asarray(offset, np.float64), (channels,))
    if np.all(scale == scale[0]) and np.all(offset == offset[0]):
        return (float(offset[0]), float(255.0 * scale[0] + offset[0]))
    k64 = kernel.astype(np.float64)
    params["embedding/bias"] = (params["embedding/bias"].astype(np.float64)
                                + np.einsum("hwcd,c->d", k64, offset)
                                ).astype(np.float32)
    params["embedding/kernel"] = (k64 * (255.0 * scale)[None, None, :, None]
                                  ).astype(np.float32)
    return (0.0, 1.0)


def _digest(paths):
    digest = hashlib.sha256()
    for path in paths:
        digest.update(os.path.basename(path).encode() + b"\0")
        digest.update(preset_io.sha256(path).encode())
    return digest.hexdigest()[:16]


def task_class():
    """The registered classifier class (`E3ViT`), which preset code never
    imports."""
    task_cls = keras.saving.get_registered_object(TASK_CLASS)
    if task_cls is None:  # registered when keras_e3.models is imported
        raise RuntimeError(f"{TASK_CLASS} is not registered: import "
                           "keras_e3 first.")
    return task_cls


def cached_conversion(name, build, metadata, cache_dir=None):
    """The verified preset `<cache>/presets/<name>`, written (atomically)
    from `build()`, a model, when it is missing or damaged.

    Args:
        name: the preset's folder name in the cache (a content hash).
        build: a function returning the converted model.
        metadata: extra metadata.json entries (`source`, `format`).
        cache_dir: the cache root (default: `keras_e3.io_utils.
            cache_root()`).

    Returns:
        The preset directory.
    """
    from keras_e3.io_utils import cache_root

    target = os.path.join(cache_root(cache_dir), "presets", name)
    if os.path.isfile(os.path.join(target, preset_io.METADATA_FILE)):
        try:
            preset_io.verify_preset(target)
            return target
        except PresetError:
            pass  # damaged cache: convert again (written atomically)
    build().save_to_preset(target, extra_metadata=metadata)
    return target


def materialize(directory, source=None, cache_dir=None):
    """A verified keras-e3 preset directory for the timm or keras-hub ViT
    in `directory` (module docstring); converted on first use."""
    which = kind(directory)
    if which is None:
        raise PresetError(f"{directory} is neither a timm nor a keras-hub "
                          "ViT checkpoint.")
    files = sorted(os.path.join(directory, n) for n in os.listdir(directory)
                   if n.endswith((".json", ".h5", ".safetensors")))
    build = _timm_model if which == "timm" else _keras_hub_model
    return cached_conversion(
        f"{which}-{_digest(files)}", lambda: build(directory),
        {"source": source or os.path.abspath(directory),
         "format": "timm" if which == "timm" else "keras-hub ViTBackbone"},
        cache_dir)


def _model(config, params, value_range, converter_kwargs, class_names=None):
    from keras_e3.conversion.vit_jax import dense_model
    from keras_e3.data.labels import class_names as known_class_names
    from keras_e3.preprocessing.image_converter import ImageConverter

    converter = ImageConverter(
        image_size=tuple(config["image_size"]),
        num_channels=config["num_channels"], value_range=value_range,
        input_range=(0.0, 255.0), **converter_kwargs)
    if class_names is None and config["num_classes"] == 1000:
        class_names = known_class_names("imagenet2012")
    if not class_names or len(class_names) != config["num_classes"]:
        class_names = None
    return dense_model(config, params, task_class(), preprocessor=converter,
                       class_names=class_names)


def _timm_model(directory):
    from keras_e3.conversion.timm_vit import class_names
    from keras_e3.conversion.timm_vit import read_state_dict
    from keras_e3.conversion.timm_vit import read_timm_config
    from keras_e3.conversion.timm_vit import to_vmoe

    timm_config = read_timm_config(directory)
    config, params = to_vmoe(read_state_dict(directory), timm_config)
    cfg = timm_config.get("pretrained_cfg") or {}
    mean = np.asarray(cfg.get("mean", (0.5, 0.5, 0.5)), np.float64)
    std = np.asarray(cfg.get("std", (0.5, 0.5, 0.5)), np.float64)
    value_range = fold_input_affine(params, 1.0 / (255.0 * std), -mean / std)
    crop_pct = float(cfg.get("crop_pct", 1.0) or 1.0)
    converter = {"interpolation": "bilinear"}
    if crop_pct < 1.0 and cfg.get("crop_mode", "center") == "center":
        converter["smaller_side"] = int(math.floor(
            min(config["image_size"]) / crop_pct))
    return _model(config, params, value_range, converter,
                  class_names(timm_config))


def _keras_hub_model(directory):
    from keras_e3.conversion.keras_hub_vit import to_vmoe

    config, params, pre = to_vmoe(directory)
    if pre is None:  # no preprocessor.json: keras-hub ViTs' [-1, 1] pixels
        pre = {"scale": 1 / 127.5, "offset": -1.0}
    scale = 1.0 if pre.get("scale") is None else pre["scale"]
    offset = 0.0 if pre.get("offset") is None else pre["offset"]
    value_range = fold_input_affine(params, scale, offset)
    converter = {"interpolation": "bilinear"}
    if pre.get("crop_to_aspect_ratio", True):
        converter["smaller_side"] = min(config["image_size"])
    return _model(config, params, value_range, converter)
