"""keras-hub ViT presets (`keras_hub>ViTBackbone`, and its
`ViTImageClassifier` task) as keras-e3 models, read without keras-hub.

A keras-hub preset directory holds `config.json` (the backbone's Keras
config), `model.weights.h5` (its weights, by Keras' attribute paths),
and for a classifier `task.json` and `task.weights.h5` (the head), and
`preprocessor.json` (the image converter: size, `scale`, `offset`).

keras-hub's ViT is vit_jax's (the same kernels: `query_dense` [D, heads,
D/heads], `output_dense` [heads, D/heads, D]) with the exact GELU; its
weights are renamed to vmoe's names and loaded by
`keras_e3.conversion.vmoe` (`gelu_approximate=False`). Settings this model
does not compute are refused with their name: average pooling beside a
class token (keras-hub averages the class token in), a `layer_norm_epsilon`
other than 1e-6, an output activation (keras-e3 heads give logits),
sharded weights.
"""

import json
import math
import os
import re

import numpy as np

from keras_e3.conversion.vit_jax import ViTCheckpointError

BACKBONE = "keras_hub>ViTBackbone"
TASK = "keras_hub>ViTImageClassifier"
_BLOCK = re.compile(r"^vi_t_encoder_block(?:_(\d+))?$")


def is_keras_hub_vit(directory):
    """Whether `directory` is a keras-hub ViT preset (False for an
    unreadable config.json: the preset loader names that problem)."""
    try:
        spec = _read_json(directory, "config.json")
    except ViTCheckpointError:
        return False
    return isinstance(spec, dict) and spec.get("registered_name") == BACKBONE


def _read_json(directory, name):
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ViTCheckpointError(f"Cannot read {path}: {e}") from e


def read_weights(path):
    """{'/'-joined h5 path: array} of a Keras .weights.h5 file."""
    import h5py

    if not os.path.isfile(path):
        sharded = path[:-len(".h5")] + ".json"
        if os.path.isfile(sharded):
            raise ViTCheckpointError(
                f"{sharded}: sharded keras-hub weights are not supported.")
        raise ViTCheckpointError(f"No weights file {path}.")
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(
            name, np.asarray(obj, np.float32))
            if isinstance(obj, h5py.Dataset) and obj.shape != () else None)
    return out


def _get(weights, name, source):
    if name not in weights:
        raise ViTCheckpointError(f"{source} has no {name!r} array.")
    return weights[name]


def _blocks(weights):
    """{block index: h5 prefix} of the encoder blocks, in order."""
    found = {}
    for name in weights:
        parts = name.split("/")
        if len(parts) > 4 and parts[:3] == ["layers", "vi_t_encoder",
                                            "encoder_layers"]:
            match = _BLOCK.match(parts[3])
            if match:
                found[int(match.group(1) or 0)] = "/".join(parts[:4]) + "/"
    if sorted(found) != list(range(len(found))) or not found:
        raise ViTCheckpointError(
            f"Encoder blocks {sorted(found)} in model.weights.h5: expected "
            "vi_t_encoder_block, vi_t_encoder_block_1, ...")
    return [found[i] for i in range(len(found))]


def to_vmoe(directory):
    """(vmoe-style config, vmoe-named params, preprocessing) of the
    keras-hub ViT preset in `directory`; `preprocessing` is {"image_size",
    "scale", "offset", "interpolation"} from its preprocessor.json, or
    None."""
    spec = _read_json(directory, "config.json")
    if not isinstance(spec, dict) or spec.get("registered_name") != BACKBONE:
        raise ViTCheckpointError(f"{directory} is not a keras-hub ViT preset "
                                 f"(config.json must be a {BACKBONE}).")
    cfg = spec.get("config", {})
    eps = float(cfg.get("layer_norm_epsilon", 1e-6))
    if abs(eps - 1e-6) > 1e-12:
        raise ViTCheckpointError(
            f"layer_norm_epsilon={eps}: keras-e3's ViT uses 1e-6.")
    use_cls = bool(cfg.get("use_class_token", True))
    mha_bias = bool(cfg.get("use_mha_bias", True))
    mlp_bias = bool(cfg.get("use_mlp_bias", True))
    source = os.path.join(directory, "model.weights.h5")
    weights = read_weights(source)
    params = {}
    emb = "layers/vi_t_patching_and_embedding/"
    kernel = _get(weights, emb + "patch_embedding/vars/0", source)
    params["embedding/kernel"] = kernel
    params["embedding/bias"] = (
        _get(weights, emb + "patch_embedding/vars/1", source)
        if cfg.get("use_patch_bias", True)
        else np.zeros(kernel.shape[-1], np.float32))
    if use_cls:
        params["cls"] = _get(weights, emb + "vars/0", source)
    params["Encoder/posembed_input/pos_embedding"] = _get(
        weights, emb + "position_embedding/vars/0", source)[None]
    heads = int(cfg["num_heads"])
    blocks = _blocks(weights)
    for i, p in enumerate(blocks):
        q = f"Encoder/encoderblock_{i}/"
        for j in (1, 2):
            params[f"{q}LayerNorm_{j - 1}/scale"] = _get(
                weights, f"{p}layer_norm_{j}/vars/0", source)
            params[f"{q}LayerNorm_{j - 1}/bias"] = _get(
                weights, f"{p}layer_norm_{j}/vars/1", source)
        for ours, theirs in (("query", "query_dense"), ("key", "key_dense"),
                             ("value", "value_dense"),
                             ("out", "output_dense")):
            k = _get(weights, f"{p}mha/{theirs}/vars/0", source)
            params[f"{q}SelfAttention/{ours}/kernel"] = k
            params[f"{q}SelfAttention/{ours}/bias"] = (
                _get(weights, f"{p}mha/{theirs}/vars/1", source) if mha_bias
                else np.zeros(k.shape[-1:] if ours == "out" else k.shape[1:],
                              np.float32))
        for j in (0, 1):
            k = _get(weights, f"{p}mlp/dense_{j + 1}/vars/0", source)
            params[f"{q}Mlp/Dense_{j}/kernel"] = k
            params[f"{q}Mlp/Dense_{j}/bias"] = (
                _get(weights, f"{p}mlp/dense_{j + 1}/vars/1", source)
                if mlp_bias else np.zeros(k.shape[-1], np.float32))
    params["Encoder/encoder_norm/scale"] = _get(
        weights, "layers/vi_t_encoder/layer_norm/vars/0", source)
    params["Encoder/encoder_norm/bias"] = _get(
        weights, "layers/vi_t_encoder/layer_norm/vars/1", source)
    classifier, representation, num_classes = _head(directory, params,
                                                    use_cls)
    patch_h, patch_w = kernel.shape[:2]
    image_h, image_w = (cfg["image_shape"][:2] if cfg.get("image_shape")
                        else (None, None))
    config = {
        "name": "VisionTransformerMoe",
        "num_classes": num_classes,
        "patch_size": [int(patch_h), int(patch_w)],
        "hidden_size": int(kernel.shape[-1]),
        "classifier": classifier,
        "representation_size": representation,
        "encoder": {"num_layers": len(blocks), "num_heads": heads,
                    "mlp_dim": int(cfg["mlp_dim"]), "dropout_rate": 0.0,
                    "attention_dropout_rate": 0.0},
        "head_kernel_zero_init": True,
        "num_channels": int(kernel.shape[2]),
        "gelu_approximate": False,
    }
    if not image_h:  # a square grid of patches, read off the positions
        tokens = params["Encoder/posembed_input/pos_embedding"].shape[1]
        side = math.isqrt(tokens - int(use_cls))
        if side * side != tokens - int(use_cls):
            raise ViTCheckpointError(
                "config.json has no image_shape and the position embedding "
                f"({tokens} rows) is not a square grid of patches.")
        image_h, image_w = side * int(patch_h), side * int(patch_w)
    config["image_size"] = [int(image_h), int(image_w)]
    return config, params, _preprocessing(directory)


def _head(directory, params, use_cls):
    """The classifier's pooling, pre-logits width and classes, its head
    weights added to `params`; a backbone-only preset gets a zero head of
    one class (replace it with `from_preset(..., num_classes=)`)."""
    task = _read_json(directory, "task.json")
    if task is None:
        hidden = params["embedding/kernel"].shape[-1]
        params["head/kernel"] = np.zeros((hidden, 1), np.float32)
        params["head/bias"] = np.zeros(1, np.float32)
        return ("token" if use_cls else "gap"), None, 1
    if task.get("registered_name") != TASK:
        raise ViTCheckpointError(
            f"task.json is a {task.get('registered_name')!r}, not a {TASK}.")
    cfg = task.get("config", {})
    pooling = cfg.get("pooling", "token")
    if pooling not in ("token", "gap"):
        raise ViTCheckpointError(f"pooling={pooling!r} is not supported.")
    if pooling == "gap" and use_cls:
        raise ViTCheckpointError(
            "pooling='gap' with use_class_token=True: keras-hub averages the "
            "class token in, which keras-e3's GAP (patch tokens only) does "
            "not compute.")
    if pooling == "token" and not use_cls:
        raise ViTCheckpointError("pooling='token' without a class token.")
    if cfg.get("activation") not in (None, "linear"):
        raise ViTCheckpointError(
            f"activation={cfg['activation']!r} on the head: keras-e3's "
            "classifier outputs logits.")
    source = os.path.join(directory, "task.weights.h5")
    weights = read_weights(source)
    denses = sorted({n.split("/")[1] for n in weights
                     if n.startswith("layers/dense")},
                    key=lambda n: int(n.rsplit("_", 1)[1]) if "_" in n else 0)
    representation = cfg.get("intermediate_dim")
    expected = 2 if representation else 1
    if len(denses) != expected:
        raise ViTCheckpointError(
            f"{source}: {len(denses)} dense layers; expected {expected} "
            f"(intermediate_dim={representation}).")
    names = (["pre_logits"] if representation else []) + ["head"]
    for dense, name in zip(denses, names):
        params[f"{name}/kernel"] = _get(weights, f"layers/{dense}/vars/0",
                                        source)
        params[f"{name}/bias"] = _get(weights, f"layers/{dense}/vars/1",
                                      source)
    return pooling, (int(representation) if representation else None), int(
        cfg["num_classes"])


def _preprocessing(directory):
    spec = _read_json(directory, "preprocessor.json")
    if not isinstance(spec, dict):
        return None
    converter = (spec.get("config", {}).get("image_converter") or {}).get(
        "config", {})
    if not converter:
        return None
    return {"image_size": converter.get("image_size"),
            "scale": converter.get("scale", 1.0),
            "offset": converter.get("offset", 0.0),
            "interpolation": converter.get("interpolation", "bilinear"),
            "crop_to_aspect_ratio": converter.get("crop_to_aspect_ratio",
                                                  True)}
