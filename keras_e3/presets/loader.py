"""`from_preset` / `save_to_preset`: resolve a handle, build the model from
its config, load and adapt its weights.

Handles: a built-in preset name (see `keras_e3.presets.builtin`; official
vmoe checkpoints are converted once and cached as a normal preset), a local
preset directory, or `hf://owner/repo[/revision]` (see
`keras_e3.presets.hub`).

The classifier is built with its `ImageConverter` (the preset's
preprocessor.json, or a built-in card's vmoe pipeline) and class names
(task.json or metadata.json, or a built-in card's label set) as
constructor arguments: `E3ViT(backbone, num_classes, preprocessor=...,
class_names=...)`.

Overrides: `num_classes` (a fresh, zero-initialised head; the rest loaded),
`image_size` (position embeddings resampled to the new patch grid, as vmoe's
`vit_zoom` and timm's `resample_abs_pos_embed`), `load_weights=False`
(architecture only), `dtype`, and any backbone setting that does not change
the weights (`capacity_factor`, `group_size`, `batch_priority`, dropout
rates, ...): vmoe itself evaluates with a larger capacity factor than it
trains with.

This module never imports a model class: it is handed the class to build
(`E3ViTBackbone`, or a task class whose `backbone_cls` names its backbone)
by the models' `from_preset`, and deserialises the preset's configs into it.
"""

import os

import keras
import numpy as np

from keras_e3.data.labels import class_names
from keras_e3.layers.embedding import as_pair
from keras_e3.layers.embedding import resample_position_embedding
from keras_e3.layers.moe import MoeSettings
from keras_e3.preprocessing.image_converter import ImageConverter
from keras_e3.presets import builtin
from keras_e3.presets import files
from keras_e3.presets.files import PresetError

# Backbone settings a preset may be loaded with, without changing weights:
# the dropout rates and the MoE settings `MoeSettings` marks as such.
RUNTIME_OVERRIDES = frozenset({
    "dropout_rate", "attention_dropout_rate",
    *MoeSettings.runtime_backbone_names()})
HEAD_SETTINGS = ("num_classes", "head_bias_init", "head_kernel_initializer")


def _is_task(cls):
    return hasattr(cls, "backbone_cls")


def from_preset(cls, handle, num_classes=None, image_size=None,
                load_weights=True, dtype=None, **overrides):
    """Builds `cls` (a backbone or a task class) from the preset at
    `handle`."""
    unknown = sorted(set(overrides) - RUNTIME_OVERRIDES)
    if unknown:
        raise TypeError(
            f"{cls.__name__}.from_preset() got unsupported override(s) "
            f"{unknown}; supported: num_classes, image_size, load_weights, "
            f"dtype, {', '.join(sorted(RUNTIME_OVERRIDES))}.")
    if not _is_task(cls) and num_classes is not None:
        raise TypeError(f"num_classes applies to a classifier's from_preset, "
                        f"not to {cls.__name__}.")
    handle = os.fspath(handle)
    card = builtin.builtin_presets().get(handle)
    if card is not None and (not load_weights
                             or card["kind"] == "architecture"):
        if load_weights:
            raise PresetError(
                f"{handle} is an architecture-only preset (no released "
                "weights): use from_preset(..., load_weights=False).")
        config, head = builtin.architecture(card)
        backbone = _backbone(cls, dict(config, **overrides), image_size,
                             dtype)
        return _attach(cls, backbone, head, num_classes, dtype, {},
                       card=card)
    preset_dir = resolve(handle)
    # An official checkpoint's cached preset was just verified (or written)
    # by `builtin.materialize`: do not hash its weights a second time.
    if load_weights and (card is None or card["kind"] not in (
            "vmoe_checkpoint", "vit_checkpoint")):
        files.verify_preset(preset_dir)
    config = _spec(preset_dir, files.CONFIG_FILE, _backbone_cls(cls))
    head = _stored_head(preset_dir) if _is_task(cls) else None
    if _is_task(cls) and head is None and num_classes is None:
        raise PresetError(
            f"{preset_dir} has no classifier ({files.TASK_CONFIG_FILE}):"
            " pass num_classes to attach a new head.")
    backbone = _backbone(cls, dict(config, **overrides),
                         None if load_weights else image_size, dtype,
                         source=preset_dir)
    if load_weights:
        files.load_backbone_weights(backbone, preset_dir)
        refuse_nonfinite(backbone.weights, preset_dir)
        if image_size is not None and (as_pair(image_size, "image_size")
                                       != backbone.embedding.image_size):
            backbone = resize_backbone(backbone, image_size)
    names = None
    if _is_task(cls) and head is not None:
        names = (_stored_class_names(preset_dir)
                 or files.read_json(preset_dir, files.METADATA_FILE).get(
                     "class_names"))
    model = _attach(cls, backbone, head, num_classes, dtype,
                    _stored_preprocessor(preset_dir), card=card,
                    names=names)
    if load_weights and _is_task(cls) and model.num_classes == (
            head or {}).get("num_classes"):
        files.load_head_weights(
            os.path.join(preset_dir, files.TASK_WEIGHTS_FILE), model.head)
        refuse_nonfinite(model.head.weights, preset_dir)
    return model


def card_converter(card, backbone):
    """The ImageConverter of a built-in card's evaluation pipeline
    (`preprocessing`, a vmoe process string) for `backbone`, or None."""
    if not (card or {}).get("preprocessing"):
        return None
    converter = ImageConverter.from_vmoe_process(
        card["preprocessing"], num_channels=backbone.num_channels)
    return converter_for(backbone, converter)


def _class_names_for(num_classes, names, card):
    """The stored class names `names` if they fit `num_classes`, else the
    card's label set's, else None."""
    if names and len(names) == num_classes:
        return [str(n) for n in names]
    label_set = (card or {}).get("labels")
    if label_set:
        names = class_names(label_set)
        if len(names) == num_classes:
            return names
    return None


def converter_for(backbone, config):
    """An ImageConverter from a preprocessor.json (a serialised converter,
    an `ImageConverter`, or the older flat dict {image_size, num_channels,
    value_range[, source_range, interpolation]}, converted on read) for
    `backbone`'s input shape (its image size wins over the file's). An
    empty dict gives the default converter: the backbone's size and
    channels, 0..255 pixels, bilinear resize, values in [-1, 1]."""
    size = tuple(backbone.embedding.image_size)
    try:
        converter = ImageConverter.from_preset_config(
            config, image_size=size, num_channels=backbone.num_channels)
    except (TypeError, ValueError) as e:
        raise PresetError(f"Invalid preprocessor config: {e}") from e
    if converter.image_size != size:
        converter = converter.with_image_size(size)
    return converter


def refuse_nonfinite(variables, preset_dir):
    """A PresetError naming every weight with NaN or inf values."""
    bad = [v.path for v in variables
           if not np.isfinite(np.asarray(keras.ops.convert_to_numpy(
               keras.ops.cast(v.value, "float32")))).all()]
    if bad:
        raise PresetError(f"{preset_dir}: non-finite (NaN or inf) weights in "
                          + ", ".join(bad) + ".")


def _backbone_cls(cls):
    return cls.backbone_cls if _is_task(cls) else cls


def _backbone(cls, config, image_size, dtype, source=None):
    """The backbone of `cls` built from `config` (a backbone config)."""
    if image_size is not None:
        config["image_size"] = image_size
    if dtype is not None:
        config["dtype"] = dtype
    backbone_cls = _backbone_cls(cls)
    try:
        return backbone_cls.from_config(config)
    except (TypeError, ValueError) as e:
        where = (os.path.join(source, files.CONFIG_FILE) if source
                 else "The preset's config")
        raise PresetError(f"{where} is not a valid {backbone_cls.__name__} "
                          f"config: {e}") from e


def _attach(cls, backbone, head, num_classes, dtype, preprocessor,
            card=None, names=None):
    """`backbone` itself, or a `cls` task on it: with the stored head
    settings `head`, or a fresh head where `num_classes` differs. The task
    is built with its ImageConverter (a built-in card's pipeline, else the
    preset's preprocessor.json `preprocessor`, else the default converter
    for the backbone's input shape) and class names (the stored `names`
    when the stored head is kept, else the card's label set when it fits)
    as constructor arguments."""
    if not _is_task(cls):
        return backbone
    head = head or {}
    if num_classes is not None and num_classes != head.get("num_classes"):
        head, names = {"num_classes": num_classes}, None
    converter = (card_converter(card, backbone)
                 or converter_for(backbone, preprocessor or {}))
    return cls(backbone, dtype=dtype, preprocessor=converter,
               class_names=_class_names_for(head["num_classes"], names,
                                            card), **head)


def abstract_model(cls, handle, **kwargs):
    """`cls.from_preset(handle, load_weights=False, **kwargs)` with its
    variables left uninitialised: shapes only, no memory for weights.

    For models too big for this machine (e.g. `eee_h14_last5`, 2.7B
    parameters): `count_params()`, `keras_e3.count_flops(model)` and
    `model.summary()` work; calling the model does not (build it under
    `keras_e3.distribution.expert_parallel(...)` for that)."""
    if kwargs.get("load_weights"):
        raise ValueError("An abstract model has no weights to load.")
    kwargs["load_weights"] = False
    with keras.StatelessScope(initialize_variables=False):
        return from_preset(cls, handle, **kwargs)


def resolve(handle):
    """A local preset directory for `handle`."""
    if handle.startswith("hf://"):
        from keras_e3.presets.hub import download_preset

        return _converted_if_dense(download_preset(handle), handle)
    card = builtin.builtin_presets().get(handle)
    if card is not None and card["kind"] == "vit_checkpoint":
        from keras_e3.presets.vit_checkpoints import materialize_vit_npz

        return materialize_vit_npz(card["checkpoint"])
    if card is not None:
        return builtin.materialize(handle)
    from keras_e3.presets.vit_checkpoints import is_vit_npz

    if is_vit_npz(handle):  # a dense vit_jax / big_vision checkpoint
        from keras_e3.presets.vit_checkpoints import materialize_vit_npz

        return materialize_vit_npz(handle)
    if os.path.isdir(handle):
        return _converted_if_dense(handle, None)
    if os.sep in handle or handle.startswith(".") or os.path.exists(handle):
        raise PresetError(f"No preset directory at {handle!r}.")
    raise PresetError(
        f"Unknown preset {handle!r}. Use a built-in name "
        f"({', '.join(builtin.list_presets()) or 'none'}), a local preset "
        "directory, hf://owner/repo[/revision] (keras-e3, timm or keras-hub "
        "ViT), a timm or keras-hub ViT folder, or a dense ViT .npz (path or "
        "URL).")


def _converted_if_dense(directory, source):
    """`directory` itself, or, for a timm or keras-hub ViT checkpoint, the
    keras-e3 preset converted from it (`keras_e3.presets.
    dense_checkpoints`)."""
    from keras_e3.presets import dense_checkpoints

    if dense_checkpoints.kind(directory) is None:
        return directory
    return dense_checkpoints.materialize(directory, source)


def _spec(preset_dir, file_name, cls):
    spec = files.read_json(preset_dir, file_name)
    if not isinstance(spec, dict) or spec.get("class_name") != cls.__name__:
        found = spec.get("class_name") if isinstance(spec, dict) else spec
        raise PresetError(
            f"{os.path.join(preset_dir, file_name)} describes {found!r}, "
            f"not an {cls.__name__}.")
    return dict(spec["config"])


def _stored_head(preset_dir):
    """The head settings of the preset's task.json, or None."""
    if not os.path.isfile(os.path.join(preset_dir, files.TASK_CONFIG_FILE)):
        return None
    config = files.read_json(preset_dir, files.TASK_CONFIG_FILE)
    config = config.get("config", {}) if isinstance(config, dict) else {}
    if "num_classes" not in config:
        raise PresetError(f"{os.path.join(preset_dir, files.TASK_CONFIG_FILE)}"
                          " does not describe a classifier (no num_classes).")
    return {k: config[k] for k in HEAD_SETTINGS if k in config}


def _stored_class_names(preset_dir):
    """The class names in the preset's task.json, or None."""
    if not os.path.isfile(os.path.join(preset_dir, files.TASK_CONFIG_FILE)):
        return None
    config = files.read_json(preset_dir, files.TASK_CONFIG_FILE)
    config = config.get("config", {}) if isinstance(config, dict) else {}
    return config.get("class_names")


def _stored_preprocessor(preset_dir):
    """The preset's preprocessor.json, or {} if it has none."""
    if os.path.isfile(os.path.join(preset_dir, files.PREPROCESSOR_FILE)):
        return files.read_json(preset_dir, files.PREPROCESSOR_FILE)
    return {}


def resize_backbone(backbone, image_size, method="vit_zoom"):
    """A copy of `backbone` for `image_size`, its position embedding
    resampled to the new patch grid (vmoe's vit_zoom / timm's resample)."""
    config = dict(backbone.get_config(), image_size=image_size)
    resized = type(backbone).from_config(config)
    old_emb, new_emb = backbone.embedding, resized.embedding
    # None for sincos2d / no position embedding (nothing to resample).
    position = getattr(old_emb.position_embedding, "path", None)
    for old, new in zip(backbone.weights, resized.weights):
        value = old.numpy()
        if old.path == position:
            value = resample_position_embedding(
                value, old_emb.grid_size, new_emb.grid_size,
                old_emb.num_prefix_tokens, method)
        if tuple(value.shape) != tuple(new.shape):
            raise PresetError(f"Cannot carry {old.path} {value.shape} over "
                              f"to image_size={image_size} ({new.shape}).")
        new.assign(value)
    return resized


def save_to_preset(model, preset_dir, preprocessor=None,
                   extra_metadata=None, extra_files=None, max_shard_size=None):
    """Writes a backbone or a classifier as a preset directory.

    preprocessor.json is always the serialised `ImageConverter`:
    `preprocessor` (a converter, or an older flat dict, converted), else
    the model's `preprocessor`, else the default converter for the
    backbone's input shape (`ImageConverter(image_size, num_channels)`:
    0..255 pixels, bilinear resize, values scaled to [-1, 1]); its image
    size is always the backbone's. A classifier's `class_names` go into
    task.json (its config) and metadata.json."""
    task = model if hasattr(model, "backbone") else None
    backbone = model.backbone if task is not None else model
    if preprocessor is None:
        preprocessor = getattr(model, "preprocessor", None)
    # preprocessor.json: always the converter's Keras serialisation (an
    # older flat dict given here is converted; no converter at all: the
    # default one for the backbone's input shape).
    preprocessor = keras.saving.serialize_keras_object(
        converter_for(backbone, preprocessor or {}))
    metadata = dict(extra_metadata or {})
    class_names = getattr(model, "class_names", None)
    if task is not None and class_names and "class_names" not in metadata:
        metadata["class_names"] = list(class_names)
    return files.save_preset(preset_dir, backbone, task=task,
                             preprocessor=preprocessor,
                             extra_metadata=metadata,
                             extra_files=extra_files,
                             max_shard_size=max_shard_size)
