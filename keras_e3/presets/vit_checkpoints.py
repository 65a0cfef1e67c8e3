"""Dense ViT checkpoints as presets: `E3ViT.from_preset("path/or/url.npz")`.

A vit_jax / big_vision `.npz` (a local file, an http(s):// URL, or a
`gs://bucket/path` read through its public https address) is converted
once into a preset directory in the cache (`<cache>/presets/vit-<first 16
hex digits of the file's sha256>`; `<cache>` as for the official
checkpoints: $KERAS_E3_CACHE, else $KERAS_HOME/keras_e3), written
atomically and verified on reuse like every cached preset; remote files are
downloaded once under `<cache>/vit/<hash of the URL>/`. From there the
usual preset overrides apply (`image_size=` resamples the position
embedding by vmoe's vit_zoom, `num_classes=` attaches a fresh head).

The converted model is a dense `E3ViT` (see `keras_e3.conversion.vit_jax`)
with vit_jax's evaluation preprocessing as its converter: the image resized
to the model's size (bilinear) and 0..255 mapped to [-1, 1].
"""

import hashlib
import os

from keras_e3.presets import files as preset_io
from keras_e3.presets.files import PresetError


def is_vit_npz(handle):
    """Whether a preset handle names a dense ViT .npz."""
    return isinstance(handle, (str, os.PathLike)) and os.fspath(
        handle).lower().endswith(".npz")


def _local_file(handle, cache_dir=None):
    from keras_e3.conversion.vmoe_checkpoint import cache_root
    from keras_e3.conversion.vmoe_checkpoint import checkpoint_url
    from keras_e3.conversion.vmoe_checkpoint import download_file
    from keras_e3.conversion.vmoe_checkpoint import is_remote

    handle = os.fspath(handle)
    if not is_remote(handle):
        if not os.path.isfile(handle):
            raise PresetError(f"No such .npz checkpoint: {handle!r}.")
        return handle
    url = checkpoint_url(handle)
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
    directory = os.path.join(cache_root(cache_dir), "vit", digest)
    os.makedirs(directory, exist_ok=True)
    return download_file(url, directory, url.rstrip("/").rsplit("/", 1)[-1])


def materialize_vit_npz(handle, cache_dir=None):
    """A verified preset directory for the .npz `handle` (module
    docstring); converted on first use."""
    from keras_e3.conversion.vit_jax import dense_model
    from keras_e3.conversion.vit_jax import read_npz
    from keras_e3.conversion.vit_jax import to_vmoe_names
    from keras_e3.conversion.vit_jax import vmoe_config
    from keras_e3.preprocessing.image_converter import ImageConverter
    from keras_e3.presets.dense_checkpoints import cached_conversion
    from keras_e3.presets.dense_checkpoints import task_class

    local = _local_file(handle, cache_dir)

    def build():
        params = to_vmoe_names(read_npz(local))
        config = vmoe_config(params)
        converter = ImageConverter(
            image_size=tuple(config["image_size"]),
            num_channels=config["num_channels"], interpolation="bilinear",
            input_range=(0.0, 255.0), value_range=(-1.0, 1.0))
        return dense_model(config, params, task_class(),
                           preprocessor=converter)

    return cached_conversion(
        "vit-" + preset_io.sha256(local)[:16], build,
        {"source": os.fspath(handle), "format": "vit_jax npz"}, cache_dir)
