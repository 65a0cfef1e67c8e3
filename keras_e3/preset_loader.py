"""`from_preset`: resolve a handle, build the model, load and adapt weights.

Handles: a built-in preset name (see `keras_e3.registry`; official vmoe
checkpoints are converted once and cached as a normal preset), a local
preset directory, or `hf://owner/repo[/revision]` (see `keras_e3.hub`).

Overrides: `num_classes` (a fresh, zero-initialised head; the rest loaded),
`image_size` (position embeddings resampled to the new patch grid, as vmoe's
`vit_zoom` and timm's `resample_abs_pos_embed`), `load_weights=False`
(architecture only), `dtype`, and any backbone setting that does not change
the weights (`capacity_factor`, `group_size`, `batch_priority`, dropout
rates, ...): vmoe itself evaluates with a larger capacity factor than it
trains with.
"""

import os

from keras_e3 import preset_io
from keras_e3.layers.embedding import as_pair
from keras_e3.layers.embedding import resample_position_embedding
from keras_e3.preset_io import PresetError

BACKBONE_CLASS = "E3ViTBackbone"
TASK_CLASS = "E3ViT"
# Backbone settings a preset may be loaded with, without changing weights.
RUNTIME_OVERRIDES = frozenset({
    "capacity_factor", "group_size", "batch_priority", "dropout_rate",
    "attention_dropout_rate", "moe_dropout_rate", "router_noise_std",
    "dispatcher", "dispatch_dtype", "importance_loss_weight",
    "load_loss_weight", "gshard_loss_weight", "seed"})


def from_preset(cls, handle, num_classes=None, image_size=None,
                load_weights=True, dtype=None, **overrides):
    """Builds `cls` (E3ViTBackbone or E3ViT) from the preset at `handle`."""
    from keras_e3 import registry
    from keras_e3.models.backbone import E3ViTBackbone

    unknown = sorted(set(overrides) - RUNTIME_OVERRIDES)
    if unknown:
        raise TypeError(
            f"{cls.__name__}.from_preset() got unsupported override(s) "
            f"{unknown}; supported: num_classes, image_size, load_weights, "
            f"dtype, {', '.join(sorted(RUNTIME_OVERRIDES))}.")
    is_backbone = issubclass(cls, E3ViTBackbone)
    if is_backbone and num_classes is not None:
        raise TypeError("num_classes applies to E3ViT.from_preset, not to "
                        "the backbone.")
    handle = os.fspath(handle)
    card = registry.builtin_presets().get(handle)
    if card is not None and (not load_weights
                             or card["kind"] == "architecture"):
        if load_weights:
            raise PresetError(
                f"{handle} is an architecture-only preset (no released "
                "weights): use from_preset(..., load_weights=False).")
        backbone_config, head = registry.architecture(card)
        backbone_config.update(overrides)
        if image_size is not None:
            backbone_config["image_size"] = image_size
        if dtype is not None:
            backbone_config["dtype"] = dtype
        backbone = E3ViTBackbone(**backbone_config)
        if is_backbone:
            return backbone
        if num_classes is not None:
            head = {"num_classes": num_classes}
        task = cls(backbone, dtype=dtype, **head)
        task.preprocessor = converter_for(backbone, {})
        return apply_card(task, card)
    preset_dir = resolve(handle)
    # An official checkpoint's cached preset was just verified (or written)
    # by `registry.materialize`: do not hash its weights a second time.
    verify = card is None or card["kind"] != "vmoe_checkpoint"
    if is_backbone:
        return load_backbone(preset_dir, image_size, load_weights, dtype,
                             overrides, verify)
    task = load_task(cls, preset_dir, num_classes, image_size, load_weights,
                     dtype, overrides, verify)
    return apply_card(task, card) if card is not None else task


def apply_card(task, card):
    """A built-in card's evaluation pipeline (`preprocessing`, a vmoe
    process string) and label set (`labels`) on a classifier."""
    from keras_e3.data.labels import class_names
    from keras_e3.layers.image_converter import ImageConverter

    if card.get("preprocessing"):
        converter = ImageConverter.from_vmoe_process(
            card["preprocessing"], num_channels=task.backbone.num_channels)
        task.preprocessor = converter_for(task.backbone, converter)
        task.preprocessor_config = task.preprocessor.preprocessor_config()
    label_set = card.get("labels")
    if label_set and not getattr(task, "class_names", None):
        names = class_names(label_set)
        if len(names) == task.num_classes:
            task.class_names = names
    return task


def converter_for(backbone, config):
    """An ImageConverter from a preprocessor.json (either form) for
    `backbone`'s input shape (its image size wins over the file's)."""
    from keras_e3.layers.image_converter import ImageConverter

    size = tuple(backbone.embedding.image_size)
    try:
        converter = ImageConverter.from_preset_config(
            config, image_size=size, num_channels=backbone.num_channels)
    except (TypeError, ValueError) as e:
        raise PresetError(f"Invalid preprocessor config: {e}") from e
    if converter.image_size != size:
        converter = converter.with_image_size(size)
    return converter


def abstract_model(cls, handle, **kwargs):
    """`cls.from_preset(handle, load_weights=False, **kwargs)` with its
    variables left uninitialised: shapes only, no memory for weights.

    For models too big for this machine (e.g. `eee_h14_last5`, 2.7B
    parameters): `count_params()`, `keras_e3.count_flops(model)` and
    `model.summary()` work; calling the model does not (build it under
    `keras_e3.distribution.expert_parallel(...)` for that)."""
    import keras

    if kwargs.get("load_weights"):
        raise ValueError("An abstract model has no weights to load.")
    kwargs["load_weights"] = False
    with keras.StatelessScope(initialize_variables=False):
        return from_preset(cls, handle, **kwargs)


def resolve(handle):
    """A local preset directory for `handle`."""
    from keras_e3 import registry

    if handle.startswith("hf://"):
        from keras_e3.hub import download_preset

        return download_preset(handle)
    if handle in registry.builtin_presets():
        return registry.materialize(handle)
    if os.path.isdir(handle):
        return handle
    if os.sep in handle or handle.startswith(".") or os.path.exists(handle):
        raise PresetError(f"No preset directory at {handle!r}.")
    raise PresetError(
        f"Unknown preset {handle!r}. Use a built-in name "
        f"({', '.join(registry.list_presets()) or 'none'}), a local preset "
        "directory, or hf://owner/repo[/revision].")


def _spec(preset_dir, file_name, class_name):
    spec = preset_io.read_json(preset_dir, file_name)
    if not isinstance(spec, dict) or spec.get("class_name") != class_name:
        found = spec.get("class_name") if isinstance(spec, dict) else spec
        raise PresetError(
            f"{os.path.join(preset_dir, file_name)} describes {found!r}, "
            f"not an {class_name}.")
    return dict(spec["config"])


def load_backbone(preset_dir, image_size=None, load_weights=True,
                  dtype=None, overrides=None, verify=True):
    from keras_e3.models.backbone import E3ViTBackbone

    if load_weights and verify:
        preset_io.verify_preset(preset_dir)
    config = _spec(preset_dir, preset_io.CONFIG_FILE, BACKBONE_CLASS)
    config.update(overrides or {})
    if dtype is not None:
        config["dtype"] = dtype
    if not load_weights and image_size is not None:
        config["image_size"] = image_size
    try:
        backbone = E3ViTBackbone.from_config(config)
    except (TypeError, ValueError) as e:
        raise PresetError(
            f"{os.path.join(preset_dir, preset_io.CONFIG_FILE)} is not a "
            f"valid {BACKBONE_CLASS} config: {e}") from e
    if load_weights:
        preset_io.load_backbone_weights(backbone, preset_dir)
        refuse_nonfinite(backbone.weights, preset_dir)
        if image_size is not None and (as_pair(image_size, "image_size")
                                       != backbone.embedding.image_size):
            backbone = resize_backbone(backbone, image_size)
    backbone.preprocessor_config = _preprocessor(preset_dir, backbone)
    return backbone


def _preprocessor_file(preset_dir):
    """The preset's preprocessor.json, or {} if it has none."""
    if os.path.isfile(os.path.join(preset_dir, preset_io.PREPROCESSOR_FILE)):
        return preset_io.read_json(preset_dir, preset_io.PREPROCESSOR_FILE)
    return {}


def _preprocessor(preset_dir, backbone):
    """The preset's preprocessor config, for the (possibly resized) model:
    the flat dict (image_size, num_channels, value_range, ...), also when
    the file holds a serialised ImageConverter."""
    config = _preprocessor_file(preset_dir)
    if "class_name" in config:
        config = converter_for(backbone, config).preprocessor_config()
    return {**preprocessor_config(backbone), **config,
            "image_size": list(backbone.embedding.image_size)}


def resize_backbone(backbone, image_size, method="bilinear"):
    """A copy of `backbone` for `image_size`, its position embedding
    resampled to the new patch grid (vmoe's vit_zoom / timm's resample)."""
    config = dict(backbone.get_config(), image_size=image_size)
    resized = type(backbone).from_config(config)
    old_emb, new_emb = backbone.embedding, resized.embedding
    position = old_emb.position_embedding.path
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


def load_task(task_cls, preset_dir, num_classes=None, image_size=None,
              load_weights=True, dtype=None, overrides=None, verify=True):
    backbone = load_backbone(preset_dir, image_size, load_weights, dtype,
                             overrides, verify)
    head = {}
    if os.path.isfile(os.path.join(preset_dir, preset_io.TASK_CONFIG_FILE)):
        config = _spec(preset_dir, preset_io.TASK_CONFIG_FILE, TASK_CLASS)
        head = {k: config[k] for k in ("num_classes", "head_bias_init",
                                       "head_kernel_initializer")
                if k in config}
    elif num_classes is None:
        raise PresetError(
            f"{preset_dir} has no classifier ({preset_io.TASK_CONFIG_FILE}):"
            " pass num_classes to attach a new head.")
    fresh_head = num_classes is not None and num_classes != head.get(
        "num_classes")
    if fresh_head:
        head = {"num_classes": num_classes}
    task = task_cls(backbone, dtype=dtype, **head)
    task.preprocessor_config = backbone.preprocessor_config
    task.preprocessor = converter_for(backbone,
                                      _preprocessor_file(preset_dir) or {})
    names = preset_io.read_json(preset_dir, preset_io.METADATA_FILE).get(
        "class_names") if load_weights else None
    if not fresh_head and names and len(names) == task.num_classes:
        task.class_names = list(names)
    if load_weights and not fresh_head:
        preset_io.load_head_weights(
            os.path.join(preset_dir, preset_io.TASK_WEIGHTS_FILE), task.head)
        refuse_nonfinite(task.head.weights, preset_dir)
    return task


def refuse_nonfinite(variables, preset_dir):
    """A PresetError naming every weight with NaN or inf values."""
    import keras
    import numpy as np

    bad = [v.path for v in variables
           if not np.isfinite(np.asarray(keras.ops.convert_to_numpy(
               keras.ops.cast(v.value, "float32")))).all()]
    if bad:
        raise PresetError(f"{preset_dir}: non-finite (NaN or inf) weights in "
                          + ", ".join(bad) + ".")


def default_preprocessor(image_size, num_channels=3,
                         value_range=(-1.0, 1.0)):
    """How to feed a model of this input shape (vmoe's images are RGB
    scaled to [-1, 1])."""
    return {"image_size": list(as_pair(image_size, "image_size")),
            "num_channels": num_channels,
            "value_range": [float(v) for v in value_range]}


def preprocessor_config(backbone, value_range=(-1.0, 1.0)):
    """`default_preprocessor` for `backbone`'s input shape."""
    return default_preprocessor(backbone.embedding.image_size,
                                backbone.num_channels, value_range)


def save_to_preset(model, preset_dir, preprocessor=None,
                   extra_metadata=None, extra_files=None, max_shard_size=None):
    """Writes a backbone or a classifier as a preset directory."""
    from keras_e3.models.backbone import E3ViTBackbone

    import keras

    from keras_e3.layers.image_converter import ImageConverter

    backbone = model if isinstance(model, E3ViTBackbone) else model.backbone
    task = None if model is backbone else model
    if preprocessor is None and isinstance(
            getattr(model, "preprocessor", None), ImageConverter):
        preprocessor = model.preprocessor
    if isinstance(preprocessor, ImageConverter):
        # preprocessor.json: the converter's Keras serialisation.
        preprocessor = keras.saving.serialize_keras_object(
            converter_for(backbone, preprocessor))
    else:
        preprocessor = {**preprocessor_config(backbone),
                        **(preprocessor or getattr(
                            model, "preprocessor_config", None) or {}),
                        "image_size": list(backbone.embedding.image_size)}
    metadata = dict(extra_metadata or {})
    class_names = getattr(model, "class_names", None)
    if task is not None and class_names and "class_names" not in metadata:
        metadata["class_names"] = list(class_names)
    return preset_io.save_preset(preset_dir, backbone, task=task,
                                 preprocessor=preprocessor,
                                 extra_metadata=metadata,
                                 extra_files=extra_files,
                                 max_shard_size=max_shard_size)


def load_preprocessor(handle):
    """The preprocessor config of the preset at `handle` (a dict)."""
    from keras_e3 import registry

    handle = os.fspath(handle)
    card = registry.builtin_presets().get(handle)
    if card is not None and card["kind"] == "architecture":
        kwargs, _ = registry.architecture(card)
        return default_preprocessor(kwargs["image_size"],
                                    kwargs.get("num_channels", 3))
    preset_dir = resolve(handle)
    config = _spec(preset_dir, preset_io.CONFIG_FILE, BACKBONE_CLASS)
    file_config = _preprocessor_file(preset_dir)
    if "class_name" in file_config:
        from keras_e3.layers.image_converter import ImageConverter

        file_config = ImageConverter.from_preset_config(
            file_config).preprocessor_config()
    return {**default_preprocessor(config["image_size"],
                                   config.get("num_channels", 3)),
            **file_config}
