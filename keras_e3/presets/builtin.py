"""Built-in presets, described by the cards in the top-level `presets/`
folder (installed as the `keras_e3.presets.builtin_cards` package data).

A card is a JSON file with at least `name`, `description` and `kind`:
  - "embedded": a preset directory shipped beside the cards, at
    `presets/<path>` (the small digits models).
  - "vmoe_checkpoint": official weights at `checkpoint` (a gs:// or https://
    prefix of vmoe's native format) for the official model config
    `vmoe_config`; converted on first use and cached as a normal preset
    under `$KERAS_E3_CACHE/presets` (default $KERAS_HOME/keras_e3/presets).
  - "vit_checkpoint": a dense ViT's published `.npz` at `checkpoint`
    (vit_jax / big_vision; e.g. the AugReg checkpoints), converted on first
    use by `keras_e3.presets.vit_checkpoints` (vit_jax's evaluation
    converter); `vmoe_config` is its architecture as a dense vmoe config.
  - "architecture": `vmoe_config` only (the paper's large E³ models, with no
    released weights): load with `load_weights=False`.
Every card's architecture is also available without weights, offline:
`from_preset(name, load_weights=False)`.
"""

import functools
import json
import os
from importlib import resources
from pathlib import Path

import keras

from keras_e3.io_utils import cache_root
from keras_e3.presets import files as preset_io
from keras_e3.presets.files import PresetError

KINDS = ("embedded", "vmoe_checkpoint", "vit_checkpoint", "architecture")
_REQUIRED = {"embedded": ("path",),
             "vmoe_checkpoint": ("vmoe_config", "checkpoint"),
             "vit_checkpoint": ("vmoe_config", "checkpoint", "image_size"),
             "architecture": ("vmoe_config",)}


# The registered name of the classifier that official checkpoints convert
# into (this module builds models from configs, never imports them).
TASK_CLASS = "keras_e3>E3ViT"


def cards_dir():
    """The folder of built-in cards and the shipped presets beside them."""
    try:
        return resources.files("keras_e3.presets.builtin_cards")
    except ModuleNotFoundError:  # a source checkout without installation
        return Path(__file__).resolve().parents[2] / "presets"


@functools.lru_cache(maxsize=None)
def builtin_presets():
    """{name: card} for every card shipped with the package.

    Returns:
        A dict of preset name -> its card (description, kind, license,
        source, expected accuracy, parameter count, FLOPs, ...).

    Example:

    ```python
    from keras_e3.presets.builtin import builtin_presets

    card = builtin_presets()["vit_tiny_digits"]
    assert card["kind"] == "embedded"
    ```
    """
    cards = {}
    for entry in sorted(cards_dir().iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".json"):
            continue
        card = json.loads(entry.read_text())
        kind = card.get("kind")
        if kind not in KINDS:
            raise PresetError(f"Preset card {entry.name}: unknown kind "
                              f"{kind!r} (expected one of {KINDS}).")
        missing = [k for k in ("name", "description", *_REQUIRED[kind])
                   if k not in card]
        if missing:
            raise PresetError(f"Preset card {entry.name} lacks {missing}.")
        cards[card["name"]] = card
    return cards


def list_presets(pattern=None):
    """Names of the built-in presets, sorted.

    Args:
        pattern: shell-style wildcards that filter the names (None: all).

    Returns:
        A sorted list of names.

    Example:

    ```python
    import keras_e3

    assert "vmoe_tiny_digits" in keras_e3.list_presets("*_digits")
    ```
    """
    import fnmatch

    names = sorted(builtin_presets())
    return names if pattern is None else fnmatch.filter(names, pattern)


def preset_metadata(name):
    """A card's description without its model config: description, kind,
    image size, evaluation pipeline, label set, parameters, FLOPs, ..."""
    card = builtin_presets()[name]
    return {k: v for k, v in card.items() if k != "vmoe_config"}


def cache_dir():
    """The cache folder (`keras_e3.io_utils.cache_root`: $KERAS_E3_CACHE,
    else $KERAS_HOME/keras_e3) as a `Path`."""
    return Path(cache_root())


def architecture(card):
    """(backbone kwargs, head kwargs) of a card, without any weights."""
    if card["kind"] == "embedded":
        path = cards_dir() / card["path"]
        config = preset_io.read_json(path, preset_io.CONFIG_FILE)["config"]
        task = preset_io.read_json(path, preset_io.TASK_CONFIG_FILE)["config"]
        head = {k: task[k] for k in ("num_classes", "head_bias_init")}
        return dict(config), head
    from keras_e3.conversion.vmoe import backbone_kwargs_from_vmoe

    kwargs, num_classes, head = backbone_kwargs_from_vmoe(
        card["vmoe_config"], card.get("image_size"))
    return kwargs, dict(head, num_classes=num_classes)


def materialize(name):
    """A local, verified preset directory for built-in preset `name`."""
    card = builtin_presets()[name]
    if card["kind"] == "architecture":
        raise PresetError(
            f"{name} is an architecture-only preset (no released weights): "
            "use from_preset(..., load_weights=False).")
    if card["kind"] == "embedded":
        return str(cards_dir() / card["path"])
    target = cache_dir() / "presets" / name
    if (target / preset_io.METADATA_FILE).is_file():
        try:
            preset_io.verify_preset(target)
            return str(target)
        except PresetError:
            pass  # damaged cache: convert again (written atomically)
    convert_checkpoint(card["vmoe_config"], card["checkpoint"], target,
                       image_size=card.get("image_size"),
                       extra_metadata={"preset": name},
                       preprocessing=card.get("preprocessing"))
    return str(target)


def convert_checkpoint(vmoe_config, checkpoint, preset_dir, image_size=None,
                       extra_metadata=None, preprocessing=None):
    """Official config + checkpoint (prefix, URL or .npz) -> preset dir.
    `preprocessing`: the vmoe evaluation process string, saved as the
    preset's ImageConverter."""
    from keras_e3.conversion.vmoe import model_from_vmoe
    from keras_e3.conversion.vmoe import read_config
    from keras_e3.preprocessing.image_converter import ImageConverter

    task_cls = keras.saving.get_registered_object(TASK_CLASS)
    if task_cls is None:  # registered when keras_e3.models is imported
        raise RuntimeError(f"{TASK_CLASS} is not registered: import "
                           "keras_e3 first.")
    preprocessor = None
    if preprocessing:  # a constructor argument, as every model's
        vmoe_config = read_config(vmoe_config)
        num_channels = int(vmoe_config.get("num_channels", 3))
        preprocessor = ImageConverter.from_vmoe_process(
            preprocessing, num_channels=num_channels)
    model = model_from_vmoe(vmoe_config, checkpoint, task_cls,
                            image_size=image_size, preprocessor=preprocessor)
    metadata = {"source": os.fspath(checkpoint), **(extra_metadata or {})}
    model.save_to_preset(preset_dir, extra_metadata=metadata)
    return model
