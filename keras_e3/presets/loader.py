"""`from_preset` / `save_to_preset`: resolve a handle, build the model from
its config, load and adapt its weights.

Handles: a built-in preset name (see `keras_e3.presets.builtin`; official
vmoe checkpoints are converted once and cached as a normal preset), a local
preset directory, or `hf://owner/repo[/revision]` (see
`keras_e3.presets.hub`).

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
from keras_e3.preprocessing.image_converter import ImageConverter
from keras_e3.presets import builtin
from keras_e3.presets import files
from keras_e3.presets.files import PresetError

# Backbone settings a preset may be loaded with, without changing weights.
RUNTIME_OVERRIDES = frozenset({
    "capacity_factor", "group_size", "batch_priority", "dropout_rate",
    "attention_dropout_rate", "moe_dropout_rate", "router_noise_std",
    "dispatcher", "dispatch_dtype", "importance_loss_weight",
    "load_loss_weight", "gshard_loss_weight", "seed"})
HEAD_SETTINGS = ("num_classes", "head_bias_init", "head_kernel_initializer")
DEFAULT_VALUE_RANGE = (-1.0, 1.0)  # vmoe's images are RGB scaled to [-1, 1]


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
        model = _attach(cls, backbone, head, num_classes, dtype, {})
        return apply_card(model, card)
    preset_dir = resolve(handle)
    # An official checkpoint's cached preset was just verified (or written)
    # by `builtin.materialize`: do not hash its weights a second time.
    if load_weights and (card is None or card["kind"] != "vmoe_checkpoint"):
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
    model = _attach(cls, backbone, head, num_classes, dtype,
                    _stored_preprocessor(preset_dir))
    if load_weights and _is_task(cls) and model.num_classes == (
            head or {}).get("num_classes"):
        files.load_head_weights(
            os.path.join(preset_dir, files.TASK_WEIGHTS_FILE), model.head)
        refuse_nonfinite(model.head.weights, preset_dir)
        names = files.read_json(preset_dir, files.METADATA_FILE).get(
            "class_names")
        if names and len(names) == model.num_classes:
            model.class_names = list(names)
    return apply_card(model, card) if card is not None else model


def apply_card(model, card):
    """A built-in card's evaluation pipeline (`preprocessing`, a vmoe
    process string) and label set (`labels`) on a classifier."""
    if not _is_task(type(model)):
        return model
    if card.get("preprocessing"):
        converter = ImageConverter.from_vmoe_process(
            card["preprocessing"], num_channels=model.backbone.num_channels)
        model.preprocessor = converter_for(model.backbone, converter)
        model.preprocessor_config = model.preprocessor.preprocessor_config()
    label_set = card.get("labels")
    if label_set and not getattr(model, "class_names", None):
        names = class_names(label_set)
        if len(names) == model.num_classes:
            model.class_names = names
    return model


def converter_for(backbone, config):
    """An ImageConverter from a preprocessor.json (a serialised converter
    or the older flat dict) for `backbone`'s input shape (its image size
    wins over the file's)."""
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


def _attach(cls, backbone, head, num_classes, dtype, preprocessor):
    """`backbone` itself, or a `cls` task on it: with the stored head
    settings `head`, or a fresh head where `num_classes` differs. Both
    carry the preset's preprocessor settings (`preprocessor`, the
    preprocessor.json); the task owns the ImageConverter made of them."""
    backbone.preprocessor_config = preprocessor_config(backbone, preprocessor)
    if not _is_task(cls):
        return backbone
    head = head or {}
    if num_classes is not None and num_classes != head.get("num_classes"):
        head = {"num_classes": num_classes}
    task = cls(backbone, dtype=dtype, **head)
    task.preprocessor_config = backbone.preprocessor_config
    task.preprocessor = converter_for(backbone, preprocessor or {})
    return task


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

        return download_preset(handle)
    if handle in builtin.builtin_presets():
        return builtin.materialize(handle)
    if os.path.isdir(handle):
        return handle
    if os.sep in handle or handle.startswith(".") or os.path.exists(handle):
        raise PresetError(f"No preset directory at {handle!r}.")
    raise PresetError(
        f"Unknown preset {handle!r}. Use a built-in name "
        f"({', '.join(builtin.list_presets()) or 'none'}), a local preset "
        "directory, or hf://owner/repo[/revision].")


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


def _stored_preprocessor(preset_dir):
    """The preset's preprocessor.json, or {} if it has none."""
    if os.path.isfile(os.path.join(preset_dir, files.PREPROCESSOR_FILE)):
        return files.read_json(preset_dir, files.PREPROCESSOR_FILE)
    return {}


def preprocessor_config(backbone, stored=None):
    """How to feed `backbone`: the stored settings `stored` (a preset's
    preprocessor.json), completed with the model's channels and vmoe's
    [-1, 1] value range. The image size is always the model's (it may have
    been resized)."""
    if stored and "class_name" in stored:  # a serialised ImageConverter
        stored = converter_for(backbone, stored).preprocessor_config()
    return {"num_channels": backbone.num_channels,
            "value_range": [float(v) for v in DEFAULT_VALUE_RANGE],
            **(stored or {}),
            "image_size": list(backbone.embedding.image_size)}


def resize_backbone(backbone, image_size, method="bilinear"):
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
    """Writes a backbone or a classifier as a preset directory."""
    task = model if hasattr(model, "backbone") else None
    backbone = model.backbone if task is not None else model
    if preprocessor is None and isinstance(
            getattr(model, "preprocessor", None), ImageConverter):
        preprocessor = model.preprocessor
    if isinstance(preprocessor, ImageConverter):
        # preprocessor.json: the converter's Keras serialisation.
        preprocessor = keras.saving.serialize_keras_object(
            converter_for(backbone, preprocessor))
    else:
        preprocessor = preprocessor_config(
            backbone,
            preprocessor or getattr(model, "preprocessor_config", None))
    metadata = dict(extra_metadata or {})
    class_names = getattr(model, "class_names", None)
    if task is not None and class_names and "class_names" not in metadata:
        metadata["class_names"] = list(class_names)
    return files.save_preset(preset_dir, backbone, task=task,
                             preprocessor=preprocessor,
                             extra_metadata=metadata,
                             extra_files=extra_files,
                             max_shard_size=max_shard_size)
