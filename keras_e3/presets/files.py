"""Preset directories: keras-hub's layout, written atomically, checksummed.

A preset is a directory with
  config.json        the backbone (keras serialization: class_name, config)
  model.weights.h5   the backbone's weights, or, when saved with
                     `max_shard_size`, model.weights.json (Keras' shard
                     index) + model_0000N.weights.h5 shards
  task.json          the classifier (E3ViT) config, with its backbone nested
  task.weights.h5    the classifier head's weights (head/kernel, head/bias)
  preprocessor.json  the image converter (size, value range)
  metadata.json      versions, parameter count, and the sha256 of every file

Writes go to a temporary directory beside the target, renamed into place at
the end: an interrupted save leaves the previous preset (or nothing), never
a half-written one. Loads verify every checksum listed in metadata.json and
name the file that is missing, truncated or corrupt. Nothing executes code
from a preset: configs are JSON read into known classes, weights are HDF5.
"""

import datetime
import hashlib
import json
import os

import keras
import numpy as np

from keras_e3.io_utils import atomic_directory

CONFIG_FILE = "config.json"
MODEL_WEIGHTS_FILE = "model.weights.h5"
SHARDED_WEIGHTS_FILE = "model.weights.json"
TASK_CONFIG_FILE = "task.json"
TASK_WEIGHTS_FILE = "task.weights.h5"
PREPROCESSOR_FILE = "preprocessor.json"
METADATA_FILE = "metadata.json"


class PresetError(ValueError):
    """A preset that is missing, incomplete, corrupt or mismatched (a
    `ValueError`).

    Example:

    ```python
    import keras_e3
    from keras_e3.presets.files import PresetError

    try:
        keras_e3.E3ViT.from_preset("./no_such_preset")
    except PresetError as error:
        print(error)  # No preset directory at './no_such_preset'.
    ```
    """


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path, data):
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def read_json(preset_dir, name):
    path = os.path.join(preset_dir, name)
    if not os.path.isfile(path):
        raise PresetError(f"{path} is missing: not a complete preset.")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise PresetError(f"{path} is not valid JSON ({e}).") from e


def save_head_weights(path, head):
    import h5py

    with h5py.File(path, "w") as f:
        f.create_dataset("head/kernel", data=np.asarray(
            keras.ops.convert_to_numpy(head.kernel)))
        f.create_dataset("head/bias", data=np.asarray(
            keras.ops.convert_to_numpy(head.bias)))


def load_head_weights(path, head):
    import h5py

    try:
        with h5py.File(path, "r") as f:
            arrays = {k: np.asarray(f[f"head/{k}"]) for k in ("kernel", "bias")}
    except (OSError, KeyError) as e:
        raise PresetError(f"Could not read {path}: {e}") from e
    for name, variable in (("kernel", head.kernel), ("bias", head.bias)):
        if arrays[name].shape != tuple(variable.shape):
            raise PresetError(
                f"{path}: head/{name} has shape {arrays[name].shape}, the "
                f"model expects {tuple(variable.shape)}.")
        variable.assign(arrays[name])


def save_preset(preset_dir, backbone, task=None, preprocessor=None,
                extra_metadata=None, extra_files=None, max_shard_size=None):
    """Writes a preset directory atomically (see the module docstring).

    `extra_files` maps more JSON file names (e.g. a training summary) to
    their contents; they are written and checksummed with the rest.
    `max_shard_size` (GB): split the backbone's weights into shards of at
    most this size (Keras' sharded format), e.g. for a model sharded over
    devices; every shard is checksummed."""
    from keras_e3 import __version__

    with atomic_directory(preset_dir) as tmp:
        write_json(os.path.join(tmp, CONFIG_FILE),
                   keras.saving.serialize_keras_object(backbone))
        if max_shard_size is None:
            backbone.save_weights(os.path.join(tmp, MODEL_WEIGHTS_FILE))
        else:
            if not max_shard_size > 0:
                raise ValueError("max_shard_size must be a positive size in "
                                 f"GB; got {max_shard_size!r}.")
            backbone.save_weights(os.path.join(tmp, SHARDED_WEIGHTS_FILE),
                                  max_shard_size=max_shard_size)
        if task is not None:
            write_json(os.path.join(tmp, TASK_CONFIG_FILE),
                       keras.saving.serialize_keras_object(task))
            save_head_weights(os.path.join(tmp, TASK_WEIGHTS_FILE), task.head)
        if preprocessor is not None:
            write_json(os.path.join(tmp, PREPROCESSOR_FILE), preprocessor)
        for name, content in (extra_files or {}).items():
            if os.path.basename(name) != name or name == METADATA_FILE or \
                    os.path.exists(os.path.join(tmp, name)):
                raise PresetError(f"Cannot add {name!r} to a preset.")
            write_json(os.path.join(tmp, name), content)
        files = {name: sha256(os.path.join(tmp, name))
                 for name in sorted(os.listdir(tmp))}
        metadata = {
            "keras_version": keras.version(),
            "keras_e3_version": __version__,
            "parameter_count": backbone.count_params(),
            "date_saved": datetime.datetime.now(
                datetime.timezone.utc).strftime("%Y-%m-%d@%H:%M:%S"),
            "files": files,
        }
        metadata.update(extra_metadata or {})
        write_json(os.path.join(tmp, METADATA_FILE), metadata)
    return preset_dir


def verify_preset(preset_dir):
    """Checks every file against metadata.json; returns the metadata."""
    metadata = read_json(preset_dir, METADATA_FILE)
    for name, expected in (metadata.get("files") or {}).items():
        path = os.path.join(preset_dir, name)
        if not os.path.isfile(path):
            raise PresetError(f"{path} is missing (listed in "
                              f"{METADATA_FILE}).")
        if sha256(path) != expected:
            raise PresetError(
                f"{path} is corrupt or truncated: its sha256 does not match "
                f"{METADATA_FILE}.")
    return metadata


def load_backbone_weights(backbone, preset_dir):
    """Loads model.weights.h5, or the shards listed in model.weights.json;
    under a `keras.distribution`, each variable takes its own layout."""
    path = os.path.join(preset_dir, SHARDED_WEIGHTS_FILE)
    if not os.path.isfile(path):
        path = os.path.join(preset_dir, MODEL_WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise PresetError(f"{path} is missing.")
    try:
        backbone.load_weights(path)
    except (OSError, ValueError, KeyError) as e:
        raise PresetError(
            f"{path} does not match the model of {CONFIG_FILE}: {e}") from e
