"""Dense ViT checkpoints of google-research/vision_transformer (vit_jax) and
big_vision in their published `.npz` format.

An `.npz` of '/'-joined Flax parameter names. Two namings are in the wild
and both are read:

- the published (pre-linen) names: `Transformer/encoderblock_<i>/
  LayerNorm_0`, `MultiHeadDotProductAttention_1`, `LayerNorm_2`,
  `MlpBlock_3/Dense_{0,1}`;
- linen names (what `vit_jax.checkpoint.load` renames them to, and what
  newer files hold): `MultiHeadDotProductAttention_0`, `LayerNorm_1`,
  `MlpBlock_0`.

Everything else is shared: `embedding/{kernel,bias}` (the patch
convolution, [ph, pw, C, D]), `cls` (class token), `Transformer/
posembed_input/pos_embedding`, `Transformer/encoder_norm`, `pre_logits`
and `head`. The model's configuration is read off the arrays (the query
kernel is [D, heads, D/heads]; depth, MLP size, patch, channels, token
count, class token, pre-logits and head all show in the shapes), and the
parameters are renamed to vmoe's names (`Encoder/encoderblock_<i>/
SelfAttention`, `LayerNorm_1`, `Mlp`), which `keras_e3.conversion.vmoe`
loads: a dense ViT is vmoe's model without MoE blocks.
"""

import math
import re

import numpy as np

from keras_e3.conversion.vmoe import VmoeConversionError

_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/(.+)$")
# (published pre-linen name, linen name) -> vmoe's name, per block.
_BLOCK_MODULES = {
    "LayerNorm_0": "LayerNorm_0",
    "MultiHeadDotProductAttention_1": "SelfAttention",
    "LayerNorm_2": "LayerNorm_1",
    "MlpBlock_3": "Mlp",
}
_LINEN_MODULES = {
    "LayerNorm_0": "LayerNorm_0",
    "MultiHeadDotProductAttention_0": "SelfAttention",
    "LayerNorm_1": "LayerNorm_1",
    "MlpBlock_0": "Mlp",
}
_TOP_LEVEL = {
    "Transformer/posembed_input/pos_embedding":
        "Encoder/posembed_input/pos_embedding",
    "Transformer/encoder_norm/scale": "Encoder/encoder_norm/scale",
    "Transformer/encoder_norm/bias": "Encoder/encoder_norm/bias",
}
_KEPT = ("embedding/kernel", "embedding/bias", "cls", "pre_logits/kernel",
         "pre_logits/bias", "head/kernel", "head/bias")


class ViTCheckpointError(VmoeConversionError):
    """A dense ViT checkpoint that cannot be read as keras-e3's ViT."""


def read_npz(path):
    """{name: array} of an .npz file; a clear error for anything else."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: np.asarray(data[k]) for k in data.files}
    except (OSError, ValueError) as e:
        raise ViTCheckpointError(f"Cannot read {path} as an .npz of "
                                 f"parameters: {e}") from e


def naming(params):
    """"pre-linen" or "linen": which block naming `params` use."""
    modules = {m.group(2).split("/")[0] for m in map(_BLOCK.match, params)
               if m}
    if "MultiHeadDotProductAttention_1" in modules or "MlpBlock_3" in \
            modules:
        return "pre-linen"
    if "MultiHeadDotProductAttention_0" in modules or "MlpBlock_0" in \
            modules:
        return "linen"
    raise ViTCheckpointError(
        "No Transformer/encoderblock_<i>/MultiHeadDotProductAttention_* "
        "arrays: not a vit_jax / big_vision ViT checkpoint.")


def to_vmoe_names(params):
    """`params` renamed to vmoe's parameter names (module docstring)."""
    modules = (_BLOCK_MODULES if naming(params) == "pre-linen"
               else _LINEN_MODULES)
    out, unknown = {}, []
    for name, value in params.items():
        match = _BLOCK.match(name)
        if match:
            module, _, rest = match.group(2).partition("/")
            if module not in modules or not rest:
                unknown.append(name)
                continue
            out[f"Encoder/encoderblock_{match.group(1)}/{modules[module]}/"
                f"{rest}"] = value
        elif name in _TOP_LEVEL:
            out[_TOP_LEVEL[name]] = value
        elif name in _KEPT:
            out[name] = value
        else:
            unknown.append(name)
    if unknown:
        raise ViTCheckpointError(
            "Arrays this ViT reader does not know (another architecture, "
            "e.g. a ResNet-hybrid ViT, or a MAP head?): "
            + ", ".join(sorted(unknown)[:8])
            + (" ..." if len(unknown) > 8 else ""))
    return out


def _require(params, name):
    if name not in params:
        raise ViTCheckpointError(f"The checkpoint has no {name!r} array.")
    return params[name]


def vmoe_config(params):
    """The vmoe-style model config of vmoe-named dense ViT `params`, read
    off the arrays' shapes, with the convenience fields `image_size` and
    `num_channels` (see `backbone_kwargs_from_vmoe`)."""
    kernel = _require(params, "embedding/kernel")
    if kernel.ndim != 4:
        raise ViTCheckpointError(
            f"embedding/kernel has shape {kernel.shape}; a ViT's patch "
            "embedding is [patch_h, patch_w, channels, hidden].")
    patch_h, patch_w, channels, hidden = kernel.shape
    blocks = sorted({int(m.group(1)) for m in map(
        re.compile(r"^Encoder/encoderblock_(\d+)/").match, params) if m})
    if not blocks or blocks != list(range(len(blocks))):
        raise ViTCheckpointError(
            f"Encoder blocks {blocks}: expected encoderblock_0 ... "
            "encoderblock_<depth-1>.")
    query = _require(params, "Encoder/encoderblock_0/SelfAttention/query/"
                             "kernel")
    if query.ndim != 3 or query.shape[0] != hidden:
        raise ViTCheckpointError(
            f"Encoder/encoderblock_0/SelfAttention/query/kernel has shape "
            f"{query.shape}; expected [{hidden}, heads, {hidden}/heads].")
    mlp = _require(params, "Encoder/encoderblock_0/Mlp/Dense_0/kernel")
    head = _require(params, "head/kernel")
    has_cls = "cls" in params
    representation = params.get("pre_logits/kernel")
    config = {
        "name": "VisionTransformerMoe",
        "num_classes": int(head.shape[-1]),
        "patch_size": [int(patch_h), int(patch_w)],
        "hidden_size": int(hidden),
        "classifier": "token" if has_cls else "gap",
        "representation_size": (None if representation is None
                                else int(representation.shape[-1])),
        "encoder": {"num_layers": len(blocks),
                    "num_heads": int(query.shape[1]),
                    "mlp_dim": int(mlp.shape[-1]),
                    "dropout_rate": 0.0, "attention_dropout_rate": 0.0},
        "head_kernel_zero_init": True,
        "num_channels": int(channels),
    }
    pos = _require(params, "Encoder/posembed_input/pos_embedding")
    tokens = pos.shape[1] - int(has_cls)
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ViTCheckpointError(
            f"The position embedding holds {tokens} patch tokens, not a "
            "square grid: pass image_size.")
    config["image_size"] = [side * int(patch_h), side * int(patch_w)]
    return config


def dense_model(config, params, task_cls, image_size=None, **task_kwargs):
    """`model_from_vmoe` for a dense ViT read off another library's
    checkpoint (vit_jax, timm, keras-hub): a mismatch is that checkpoint's
    error (`ViTCheckpointError`), worded for it.

    Args:
        config: the vmoe-style config read off the checkpoint.
        params: its parameters, renamed to vmoe's names.
        task_cls: the classifier class (`keras_e3.E3ViT`).
        image_size: the image size, when the config lacks it.
        **task_kwargs: constructor arguments of the task (`preprocessor`,
            `class_names`).

    Returns:
        The model, its weights loaded.
    """
    from keras_e3.conversion.vmoe import model_from_vmoe

    try:
        return model_from_vmoe(config, params, task_cls,
                               image_size=image_size, **task_kwargs)
    except ViTCheckpointError:
        raise
    except VmoeConversionError as e:
        raise ViTCheckpointError(str(e).replace(
            "The parameters do not match the model",
            "The checkpoint's arrays do not match the ViT read off it"))\
            from e


def model_from_vit_npz(params_or_path, task_cls, image_size=None,
                       **task_kwargs):
    """A dense `task_cls` (E3ViT) with a vit_jax / big_vision .npz's
    parameters (module docstring).

    Args:
        params_or_path: a path to the .npz, or its {name: array} dict.
        task_cls: the classifier class (`keras_e3.E3ViT`).
        image_size: the checkpoint's own image size (default: read off the
            position embedding, square grids only). To run at another
            resolution, resize afterwards (`from_preset(..., image_size=)`).
        **task_kwargs: constructor arguments of the task (`preprocessor`,
            `class_names`).

    Returns:
        The model, its weights loaded.
    """
    params = params_or_path
    if not isinstance(params, dict):
        params = read_npz(params)
    params = to_vmoe_names(params)
    return dense_model(vmoe_config(params), params, task_cls,
                       image_size=image_size, **task_kwargs)
