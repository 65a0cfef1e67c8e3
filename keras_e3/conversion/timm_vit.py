"""Dense ViTs of timm (`timm.models.vision_transformer.VisionTransformer`)
as keras-e3 models, read without timm or torch where that is possible.

A timm checkpoint is a state dict (`model.safetensors`, or a PyTorch
`pytorch_model.bin` / `.pth`, read with `torch.load(weights_only=True)`
when torch is installed) and, on the Hugging Face Hub, a `config.json`
(`architecture`, `num_classes`, `global_pool`, `model_args`,
`pretrained_cfg` with the preprocessing, `label_names`).

The state dict's names are renamed to vmoe's (`keras_e3.conversion.vmoe`
loads them; a dense ViT is vmoe's model without MoE blocks):

- `patch_embed.proj.{weight,bias}` ([D, C, ph, pw]) -> `embedding/`;
  `cls_token` -> `cls`; `pos_embed` -> the position embedding;
- `blocks.<i>.norm1`, `attn.qkv` (fused, [3D, D], split into query, key
  and value [D, heads, D/heads]), `attn.proj`, `norm2`, `mlp.fc1`,
  `mlp.fc2` -> `Encoder/encoderblock_<i>/LayerNorm_0`, `SelfAttention`,
  `LayerNorm_1`, `Mlp/Dense_{0,1}` (PyTorch's [out, in] kernels
  transposed);
- `norm` -> the encoder norm; `fc_norm` (timm's GAP: the norm applied to
  the mean of the tokens) -> the same norm with `final_norm="pooled"`;
- `attn_pool` (timm's `AttentionPoolLatent`, one latent) -> the MAP head
  (`classifier="map"`), `head` -> the head.

timm's MLPs use the exact GELU (`gelu_approximate=False`). The number of
heads is not in the arrays (the query kernel is fused): it comes from
`model_args["num_heads"]`, else from the architecture's size name
(`vit_base_...` -> 12, as timm defines them), else it must be given.
ViTs this model cannot compute exactly are refused with the array or
setting named: register tokens, LayerScale, a pre-norm, qk-norm, an
average pool beside a class token, a position embedding without the class
token's row, non-GELU activations.
"""

import json
import os
import re

import numpy as np

from keras_e3.conversion.vit_jax import ViTCheckpointError

# timm's ViT sizes -> heads (timm.models.vision_transformer's vit_<size>_*).
HEADS_BY_SIZE = {"tiny": 3, "small": 6, "medium": 8, "base": 12,
                 "large": 16, "huge": 16, "giant": 16, "gigantic": 16}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_BLOCK_RENAMES = {
    "norm1.weight": "LayerNorm_0/scale", "norm1.bias": "LayerNorm_0/bias",
    "norm2.weight": "LayerNorm_1/scale", "norm2.bias": "LayerNorm_1/bias",
    "mlp.fc1.weight": "Mlp/Dense_0/kernel", "mlp.fc1.bias": "Mlp/Dense_0/bias",
    "mlp.fc2.weight": "Mlp/Dense_1/kernel", "mlp.fc2.bias": "Mlp/Dense_1/bias",
}
# Arrays of timm ViT variants this model does not compute.
_REFUSED = {
    "reg_token": "register tokens (reg_tokens > 0)",
    "norm_pre": "a pre-norm before the blocks (pre_norm=True)",
    ".ls1.": "LayerScale (init_values)",
    ".ls2.": "LayerScale (init_values)",
    "q_norm": "qk-norm in timm's form",
    "k_norm": "qk-norm in timm's form",
    "attn_pool.pos_embed": "a position embedding in the attention pool",
}


def is_timm_config(config):
    """Whether a parsed config.json is timm's (it names an architecture)."""
    return isinstance(config, dict) and isinstance(
        config.get("architecture"), str)


def read_timm_config(directory):
    """The parsed config.json of a timm folder, or None."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    return config if is_timm_config(config) else None


def read_state_dict(path):
    """{name: float32 array} of a timm checkpoint: a folder (its
    model.safetensors, else pytorch_model.bin), a `.safetensors` file, or a
    PyTorch `.bin`/`.pth`/`.pt` state dict (needs torch)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in WEIGHT_FILES:
            if os.path.isfile(os.path.join(path, name)):
                return read_state_dict(os.path.join(path, name))
        raise ViTCheckpointError(
            f"{path} has no {' or '.join(WEIGHT_FILES)}: not a timm "
            "checkpoint folder.")
    if not os.path.isfile(path):
        raise ViTCheckpointError(f"No such timm checkpoint: {path!r}.")
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    if path.endswith((".bin", ".pth", ".pt")):
        return _read_torch(path)
    raise ViTCheckpointError(
        f"Unsupported timm checkpoint {path!r}: expected .safetensors, "
        ".bin, .pth or .pt.")


def _read_safetensors(path):
    try:
        from safetensors import safe_open
    except ImportError as e:  # pragma: no cover - a core dependency
        raise ImportError("Reading .safetensors needs the safetensors "
                          "package: pip install safetensors") from e
    try:
        with safe_open(path, framework="numpy") as f:
            return {k: np.asarray(f.get_tensor(k), np.float32)
                    for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - bfloat16 is not numpy's
        if "bf16" in str(e).lower() or "bfloat16" in str(e).lower():
            try:
                import ml_dtypes
            except ImportError:
                raise ViTCheckpointError(
                    f"{path} holds bfloat16 tensors; reading them needs "
                    "ml_dtypes (installed with JAX or TensorFlow).") from e
            return _read_safetensors_raw(path, ml_dtypes.bfloat16)
        raise ViTCheckpointError(f"Cannot read {path} as safetensors: "
                                 f"{e}") from e


def _read_safetensors_raw(path, bfloat16):
    """The safetensors format by hand (an 8-byte header length, a JSON
    header, the raw data), for the dtypes NumPy lacks."""
    dtypes = {"F32": np.float32, "F16": np.float16, "F64": np.float64,
              "BF16": bfloat16}
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in dtypes:
            raise ViTCheckpointError(f"{name}: unsupported dtype "
                                     f"{info['dtype']}.")
        begin, end = info["data_offsets"]
        out[name] = np.frombuffer(
            data[begin:end], dtypes[info["dtype"]]).reshape(
                info["shape"]).astype(np.float32)
    return out


def _read_torch(path):
    try:
        import torch
    except ImportError as e:
        raise ViTCheckpointError(
            f"{path} is a PyTorch pickle; reading it needs torch (or use "
            "the checkpoint's model.safetensors).") from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ViTCheckpointError(f"{path} does not hold a state dict.")
    return {k[len("module."):] if k.startswith("module.") else k:
            v.detach().float().cpu().numpy() for k, v in state.items()
            if hasattr(v, "detach")}


def _get(state, name):
    if name not in state:
        raise ViTCheckpointError(f"The checkpoint has no {name!r} array.")
    return state[name]


def _num_heads(config, hidden, num_heads):
    if num_heads is None:
        num_heads = (config.get("model_args") or {}).get("num_heads")
    if num_heads is None:
        match = re.match(r"^vit_([a-z]+)_", config.get("architecture", ""))
        if match and match.group(1) in HEADS_BY_SIZE:
            num_heads = HEADS_BY_SIZE[match.group(1)]
    if num_heads is None:
        raise ViTCheckpointError(
            "The number of attention heads is not in a timm state dict (the "
            "qkv kernel is fused) nor in its config (model_args.num_heads, "
            "or an architecture named vit_<tiny|small|base|...>_...): pass "
            "num_heads.")
    num_heads = int(num_heads)
    if num_heads < 1 or hidden % num_heads:
        raise ViTCheckpointError(f"num_heads={num_heads} does not divide "
                                 f"the width {hidden}.")
    return num_heads


def _check_supported(state, config):
    found = sorted({why for name in state for key, why in _REFUSED.items()
                    if key in name})
    args = config.get("model_args") or {}
    act = args.get("act_layer")
    if act not in (None, "gelu", "GELU"):
        found.append(f"act_layer={act!r}")
    if args.get("no_embed_class"):
        found.append("no_embed_class=True")
    if found:
        raise ViTCheckpointError(
            "This timm ViT uses what keras-e3's ViT does not compute: "
            + "; ".join(found) + ".")


def _global_pool(state, config):
    pool = config.get("global_pool",
                      (config.get("model_args") or {}).get("global_pool"))
    if pool is None:
        pool = ("map" if any(k.startswith("attn_pool.") for k in state)
                else "avg" if "fc_norm.weight" in state
                else "token" if "cls_token" in state else "avg")
    if pool not in ("token", "avg", "map"):
        raise ViTCheckpointError(
            f"timm global_pool={pool!r}: keras-e3 pools by class token, "
            "average (GAP) or MAP head only.")
    has_cls = "cls_token" in state
    if pool == "token" and not has_cls:
        raise ViTCheckpointError("global_pool='token' without a cls_token "
                                 "array.")
    if pool != "token" and has_cls:
        raise ViTCheckpointError(
            f"global_pool={pool!r} beside a class token (cls_token): timm "
            "keeps the class token in attention but pools without it, which "
            "keras-e3's ViT does not compute.")
    return pool


def _linear(state, name, prefix, out):
    """A PyTorch Linear ([out, in] weight) as Flax Dense [in, out]."""
    out[prefix + "kernel"] = _get(state, name + ".weight").T
    if name + ".bias" in state:
        out[prefix + "bias"] = state[name + ".bias"]
    else:  # qkv_bias=False etc.: a zero bias computes the same
        out[prefix + "bias"] = np.zeros(out[prefix + "kernel"].shape[-1],
                                        np.float32)


def _attention(q, k, v, proj_w, proj_b, num_heads, prefix, out):
    """Query/key/value [out, in] weights and biases and the output
    projection as Flax MultiHeadDotProductAttention parameters."""
    hidden = proj_w.shape[0]
    head_dim = hidden // num_heads
    for name, (w, b) in zip(("query", "key", "value"), (q, k, v)):
        if w.shape[1] != hidden or w.shape[0] != hidden:
            raise ViTCheckpointError(
                f"{prefix}{name}: a {w.shape} projection in a width-{hidden} "
                "ViT.")
        out[f"{prefix}{name}/kernel"] = w.T.reshape(hidden, num_heads,
                                                    head_dim)
        out[f"{prefix}{name}/bias"] = b.reshape(num_heads, head_dim)
    out[f"{prefix}out/kernel"] = proj_w.T.reshape(num_heads, head_dim, hidden)
    out[f"{prefix}out/bias"] = proj_b


def _split(weight, bias, parts, name):
    if weight.shape[0] % parts:
        raise ViTCheckpointError(f"{name}.weight has shape {weight.shape}; "
                                 f"expected [{parts}·D, D].")
    if bias is None:
        bias = np.zeros(weight.shape[0], np.float32)
    return list(zip(np.split(weight, parts), np.split(bias, parts)))


def _image_size(config, image_size):
    """The training image size: the argument, else timm's config
    (pretrained_cfg.input_size [C, H, W], model_args.img_size), else None."""
    if image_size is None:
        size = (config.get("pretrained_cfg") or {}).get("input_size")
        if size:
            image_size = size[1:]
        else:
            image_size = (config.get("model_args") or {}).get("img_size")
    if image_size is None:
        return None
    if isinstance(image_size, int):
        return (image_size, image_size)
    return tuple(int(s) for s in image_size)


def to_vmoe(state, config=None, num_heads=None, image_size=None):
    """(vmoe-style config, vmoe-named params) of a timm ViT state dict.

    Args:
        state: {name: array}, the state dict.
        config: timm's config.json dict (optional; `global_pool`,
            `model_args`, `architecture` are read).
        num_heads: the number of heads, when neither the config nor the
            architecture's name gives it.
        image_size: the training image size, when the config does not give
            it and the position embedding is not a square grid.

    Returns:
        (config, params) for `keras_e3.conversion.vmoe.model_from_vmoe`.
    """
    config = dict(config or {})
    _check_supported(state, config)
    pool = _global_pool(state, config)
    patch = _get(state, "patch_embed.proj.weight")
    if patch.ndim != 4:
        raise ViTCheckpointError(
            f"patch_embed.proj.weight has shape {patch.shape}; a ViT's patch "
            "embedding is [hidden, channels, patch_h, patch_w] (a hybrid "
            "ViT's backbone is not supported).")
    hidden, channels, patch_h, patch_w = patch.shape
    heads = _num_heads(config, hidden, num_heads)
    params = {"embedding/kernel": patch.transpose(2, 3, 1, 0)}
    params["embedding/bias"] = state.get("patch_embed.proj.bias",
                                         np.zeros(hidden, np.float32))
    if "cls_token" in state:
        params["cls"] = state["cls_token"]
    pos = _get(state, "pos_embed")
    params["Encoder/posembed_input/pos_embedding"] = pos
    blocks = sorted({int(m.group(1)) for m in map(_BLOCK.match, state) if m})
    if not blocks or blocks != list(range(len(blocks))):
        raise ViTCheckpointError(f"Blocks {blocks}: expected blocks.0 ... "
                                 "blocks.<depth-1>.")
    unknown = []
    for name in state:
        match = _BLOCK.match(name)
        if not match:
            continue
        rest = match.group(2)
        if rest not in _BLOCK_RENAMES and rest not in (
                "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                "attn.proj.bias"):
            unknown.append(name)
    for i in blocks:
        p, prefix = f"blocks.{i}.", f"Encoder/encoderblock_{i}/"
        for key in ("norm1", "norm2"):
            j = "0" if key == "norm1" else "1"
            params[f"{prefix}LayerNorm_{j}/scale"] = _get(state,
                                                          p + key + ".weight")
            params[f"{prefix}LayerNorm_{j}/bias"] = _get(state,
                                                         p + key + ".bias")
        for j, fc in enumerate(("fc1", "fc2")):
            _linear(state, f"{p}mlp.{fc}", f"{prefix}Mlp/Dense_{j}/", params)
        qkv = _split(_get(state, p + "attn.qkv.weight"),
                     state.get(p + "attn.qkv.bias"), 3, p + "attn.qkv")
        proj_w = _get(state, p + "attn.proj.weight")
        proj_b = state.get(p + "attn.proj.bias",
                           np.zeros(hidden, np.float32))
        _attention(*qkv, proj_w, proj_b, heads, f"{prefix}SelfAttention/",
                   params)
    norm = "fc_norm" if "fc_norm.weight" in state else "norm"
    if "fc_norm.weight" in state and "norm.weight" in state:
        raise ViTCheckpointError("Both norm and fc_norm arrays: a ViT with "
                                 "two final norms is not supported.")
    params["Encoder/encoder_norm/scale"] = _get(state, norm + ".weight")
    params["Encoder/encoder_norm/bias"] = _get(state, norm + ".bias")
    mlp_dim = int(params["Encoder/encoderblock_0/Mlp/Dense_0/kernel"]
                  .shape[-1])
    if pool == "map":
        _map_head(state, heads, mlp_dim, params)
    _linear(state, "head", "head/", params)
    unknown += [k for k in state if not _BLOCK.match(k) and k not in {
        "patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token",
        "pos_embed", "norm.weight", "norm.bias", "fc_norm.weight",
        "fc_norm.bias", "head.weight", "head.bias"}
        and not k.startswith("attn_pool.")]
    if unknown:
        raise ViTCheckpointError(
            "Arrays this timm ViT reader does not know: "
            + ", ".join(sorted(unknown)[:8])
            + (" ..." if len(unknown) > 8 else ""))
    tokens = pos.shape[1] - ("cls_token" in state)
    size = _image_size(config, image_size)
    if size is None:
        side = int(round(tokens ** 0.5))
        if side * side != tokens:
            raise ViTCheckpointError(
                f"pos_embed holds {pos.shape[1]} rows: not a square grid of "
                "patches (plus the class token's row): pass image_size (or "
                "a config with pretrained_cfg.input_size).")
        size = (side * int(patch_h), side * int(patch_w))
    grid = (size[0] // int(patch_h)) * (size[1] // int(patch_w))
    if grid != tokens:
        raise ViTCheckpointError(
            f"pos_embed holds {pos.shape[1]} rows; {size[0]}x{size[1]} images "
            f"in {patch_h}x{patch_w} patches make {grid} patch tokens "
            "(a position embedding without the class token's row, "
            "no_embed_class, is not supported).")
    vmoe_config = {
        "name": "VisionTransformerMoe",
        "num_classes": int(params["head/kernel"].shape[-1]),
        "patch_size": [int(patch_h), int(patch_w)],
        "hidden_size": int(hidden),
        "classifier": {"token": "token", "avg": "gap", "map": "map"}[pool],
        "representation_size": None,
        "encoder": {"num_layers": len(blocks), "num_heads": heads,
                    "mlp_dim": mlp_dim, "dropout_rate": 0.0,
                    "attention_dropout_rate": 0.0},
        "head_kernel_zero_init": True,
        "num_channels": int(channels),
        "image_size": [int(size[0]), int(size[1])],
        "gelu_approximate": False,
    }
    if norm == "fc_norm":
        vmoe_config["final_norm"] = "pooled"
    return vmoe_config, params


def _map_head(state, heads, mlp_dim, params):
    latent = _get(state, "attn_pool.latent")
    if latent.shape[1] != 1:
        raise ViTCheckpointError(
            f"attn_pool.latent has shape {latent.shape}: keras-e3's MAP head "
            "has one probe (latent_len=1).")
    p = "MapHead/"
    params[p + "probe"] = latent
    q_w = _get(state, "attn_pool.q.weight")
    q_b = state.get("attn_pool.q.bias", np.zeros(q_w.shape[0], np.float32))
    k, v = _split(_get(state, "attn_pool.kv.weight"),
                  state.get("attn_pool.kv.bias"), 2, "attn_pool.kv")
    _attention((q_w, q_b), k, v, _get(state, "attn_pool.proj.weight"),
               _get(state, "attn_pool.proj.bias"), heads,
               p + "MultiHeadDotProductAttention/", params)
    params[p + "LayerNorm/scale"] = _get(state, "attn_pool.norm.weight")
    params[p + "LayerNorm/bias"] = _get(state, "attn_pool.norm.bias")
    for j, fc in enumerate(("fc1", "fc2")):
        _linear(state, f"attn_pool.mlp.{fc}", f"{p}Mlp/Dense_{j}/", params)
    if params[p + "Mlp/Dense_0/kernel"].shape[-1] != mlp_dim:
        raise ViTCheckpointError(
            "attn_pool.mlp.fc1 is "
            f"{params[p + 'Mlp/Dense_0/kernel'].shape[-1]} wide; keras-e3's "
            f"MAP head's MLP is as wide as the blocks' ({mlp_dim}).")
    known = {"latent", "q.weight", "q.bias", "kv.weight", "kv.bias",
             "proj.weight", "proj.bias", "norm.weight", "norm.bias",
             "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
             "mlp.fc2.bias"}
    extra = sorted(k for k in state if k.startswith("attn_pool.")
                   and k[len("attn_pool."):] not in known)
    if extra:
        raise ViTCheckpointError("Arrays of timm's attention pool that "
                                 "keras-e3's MAP head lacks: "
                                 + ", ".join(extra))


def class_names(config):
    """timm's `label_names` (a list, or a {index: name} dict without gaps)
    as a list, or None."""
    names = (config or {}).get("label_names")
    if isinstance(names, dict):
        try:
            names = [names[k] for k in sorted(names, key=int)]
        except (TypeError, ValueError):
            return None
    return [str(n) for n in names] if isinstance(names, list) else None


def model_from_timm(source, task_cls, config=None, num_heads=None,
                    image_size=None):
    """A dense `task_cls` (E3ViT) with a timm ViT's weights.

    Args:
        source: a timm folder (config.json + model.safetensors or
            pytorch_model.bin, as timm writes them to the Hub), a weights
            file, or a state dict {name: array}.
        task_cls: the classifier class (`keras_e3.E3ViT`).
        config: timm's config.json dict (read from the folder when
            `source` is one).
        num_heads, image_size: see `to_vmoe`.

    Returns:
        The model, its weights loaded (no converter attached; see
        `keras_e3.presets.timm_checkpoints` for the one timm's config
        describes).
    """
    from keras_e3.conversion.vit_jax import dense_model

    if isinstance(source, dict):
        state = {k: np.asarray(v, np.float32) for k, v in source.items()}
    else:
        if config is None and os.path.isdir(os.fspath(source)):
            config = read_timm_config(os.fspath(source))
        state = read_state_dict(source)
    vmoe_config, params = to_vmoe(state, config, num_heads=num_heads,
                                  image_size=image_size)
    return dense_model(vmoe_config, params, task_cls)
