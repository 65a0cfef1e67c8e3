"""Official google-research/vmoe models: configs and parameters.

`backbone_kwargs_from_vmoe` turns a vmoe model config (the keyword
arguments of `VisionTransformerMoe` / `VisionTransformerMoeEnsemble`) into
`E3ViTBackbone` arguments; `vmoe_variable_map` names every variable of our
model with its official Flax path; `load_vmoe_params` assigns official
parameters, refusing any missing, unexpected or wrongly shaped one.
"""

import json
import math
import os

import numpy as np

MODEL_NAMES = ("VisionTransformerMoe", "VisionTransformerMoeEnsemble")
# Keys of a vmoe config that do not change the computation here.
_IGNORED_KEYS = {"name", "deterministic", "split_rngs", "encoder_cls",
                 "dtype", "head_kernel_zero_init"}


class VmoeConversionError(ValueError):
    """A vmoe config or parameter set that cannot be mapped to keras-e3."""


def read_config(config):
    if isinstance(config, (str, os.PathLike)):
        with open(config) as f:
            config = json.load(f)
    if not isinstance(config, dict):
        raise VmoeConversionError(
            f"config must be a dict or a JSON file path; got "
            f"{type(config).__name__}.")
    return config


def read_params(params):
    """A flat {official name: array} mapping.

    `params` is a mapping (nested or flat), an .npz of official names, a
    native vmoe checkpoint prefix: a local path whose `<prefix>.index`
    exists, or an http(s):// / gs:// prefix (downloaded and cached), read
    by `keras_e3.conversion.vmoe_checkpoint.read_vmoe_checkpoint`, or a
    directory written by vmoe's trainer (workdir, ckpt/, ckpt/<step> or its
    state/; orbax/OCDBT), read by
    `keras_e3.conversion.orbax_checkpoint.read_orbax_checkpoint`.
    """
    if isinstance(params, (str, os.PathLike)):
        path = os.fspath(params)
        if os.path.isdir(path):
            from keras_e3.conversion import orbax_checkpoint

            return orbax_checkpoint.read_orbax_checkpoint(path)
        if not path.endswith(".npz"):
            from keras_e3.conversion import vmoe_checkpoint

            if vmoe_checkpoint.is_remote(path):
                return vmoe_checkpoint.read_vmoe_checkpoint(path)
            prefix = path[:-len(".index")] if path.endswith(".index") else path
            if os.path.isfile(prefix + ".index"):
                return vmoe_checkpoint.read_vmoe_checkpoint(prefix)
            raise VmoeConversionError(
                f"Unsupported parameter file {path!r}: expected an .npz of "
                "official parameter names or a vmoe checkpoint prefix, but "
                f"the checkpoint index {prefix + '.index'!r} does not exist.")
        try:
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError) as e:
            raise VmoeConversionError(
                f"Could not read parameters from {path!r}: {e}") from e
    if not hasattr(params, "items"):
        raise VmoeConversionError(
            "params must be a mapping of official parameter names to arrays "
            f"or an .npz path; got {type(params).__name__}.")
    flat = {}
    _flatten(params, "", flat)
    return flat


def _flatten(tree, prefix, out):
    """Nested {"Encoder": {...}} or flat {"Encoder/...": array} -> flat."""
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if hasattr(value, "items"):
            _flatten(value, name + "/", out)
        else:
            out[name] = np.asarray(value)


def _unsupported(what):
    raise VmoeConversionError(f"Unsupported vmoe config: {what}.")


def backbone_kwargs_from_vmoe(config, image_size=None):
    """E3ViTBackbone kwargs and the head settings of a vmoe model config.

    Returns (backbone_kwargs, num_classes, head_kwargs). `image_size`
    defaults to the config's `image_size` (a convenience field, not a vmoe
    model argument); pass it when the config lacks one. `num_channels`
    (another convenience field; vmoe's models take RGB) sets the input
    channels; `gelu_approximate` and `final_norm` (convenience fields for
    timm and keras-hub ViTs) pass through to the backbone.
    """
    config = read_config(config)
    name = config.get("name", "VisionTransformerMoe")
    if name not in MODEL_NAMES:
        _unsupported(f"model {name!r} (supported: {MODEL_NAMES})")
    encoder = dict(config.get("encoder") or {})
    moe = dict(encoder.pop("moe", None) or {})
    router = dict(moe.pop("router", None) or {})
    dispatcher = dict(router.pop("dispatcher", None) or {})
    if config.get("classifier", "token") not in ("token", "gap", "map"):
        _unsupported(f"classifier {config['classifier']!r}")
    position_emb = dict(encoder.get("position_emb") or {})
    position_name = position_emb.get("name", "learned")
    if position_name not in ("learned", "sincos2d", "none"):
        _unsupported(f"position embedding {position_name!r}")
    router_name = router.pop("name", "NoisyTopExpertsPerItemRouter")
    router_type = _router_type(router_name)
    if router_type != "soft":
        if dispatcher.get("name", "einsum") not in ("einsum", "indices"):
            _unsupported(f"dispatcher {dispatcher.get('name')!r}")
        if dispatcher.get("capacity") is not None:
            _unsupported("a fixed dispatcher capacity (use capacity_factor)")
        if dispatcher.get("capacity_ceil_or_round", "ceil") not in (
                "ceil", "round"):
            _unsupported(f"dispatcher capacity_ceil_or_round="
                         f"{dispatcher['capacity_ceil_or_round']!r}")
    if config.get("num_classes") in (None, 0):
        _unsupported("num_classes=None (no classification head)")
    image_size = image_size or config.get("image_size")
    layers = list(moe.get("layers", ()))
    ensemble_size = moe.get("ensemble_size") or (
        config.get("ensemble_size") if name.endswith("Ensemble") else 1) or 1
    kwargs = dict(
        image_size=image_size,
        patch_size=tuple(config["patch_size"]),
        hidden_dim=config["hidden_size"],
        num_layers=encoder["num_layers"],
        num_heads=encoder["num_heads"],
        mlp_dim=encoder["mlp_dim"],
        dropout_rate=encoder.get("dropout_rate", 0.0),
        attention_dropout_rate=encoder.get("attention_dropout_rate", 0.0),
        classifier=config.get("classifier", "token"),
        representation_size=config.get("representation_size"),
    )
    if config.get("num_channels", 3) != 3:
        kwargs["num_channels"] = int(config["num_channels"])
    # Convenience fields of dense checkpoints from other libraries (timm,
    # keras-hub): exact GELU and timm's fc_norm (see E3ViTBackbone).
    if config.get("gelu_approximate", True) is False:
        kwargs["gelu_approximate"] = False
    if config.get("final_norm", "sequence") != "sequence":
        kwargs["final_norm"] = config["final_norm"]
    if position_name != "learned":
        kwargs["position_embedding"] = position_name
    if "temperature" in position_emb:
        kwargs["sincos2d_temperature"] = float(position_emb["temperature"])
    if encoder.get("attention_qk_norm"):
        kwargs["attention_qk_norm"] = True
    if layers:
        kwargs.update(
            num_experts=moe["num_experts"],
            moe_layers=layers,
            group_size=moe["group_size"],
            ensemble_size=ensemble_size,
            moe_dropout_rate=moe.get("dropout_rate",
                                     encoder.get("dropout_rate", 0.0)),
        )
        kwargs.update(_router_kwargs(router_type, router, dispatcher))
    head_kwargs = dict(head_bias_init=config.get("head_bias_init", 0.0))
    if not config.get("head_kernel_zero_init", True):
        head_kwargs["head_kernel_initializer"] = "lecun_normal"
    return kwargs, config["num_classes"], head_kwargs


def _router_type(name):
    """vmoe's router class name (as `parse_call` takes it) -> ours."""
    short = name.split("(")[0].rsplit(".", 1)[-1]
    types = {"NoisyTopExpertsPerItemRouter": "top_k",
             "NoisyTopExpertsPerItemEnsembleRouter": "top_k",
             "NoisyTopItemsPerExpertRouter": "experts_choice",
             "SoftRouter": "soft"}
    if short not in types and "TopExpertsPerItem" not in short:
        _unsupported(f"router {name!r}")
    return types.get(short, "top_k")


def _router_kwargs(router_type, router, dispatcher):
    """E3ViTBackbone router arguments of a vmoe router config."""
    if router_type == "soft":
        num_slots = router.get("num_slots")
        kwargs = dict(router="soft", num_slots=num_slots,
                      router_noise_std=router.get("noise_std", 0.0))
        if num_slots is None:  # vmoe ignores capacity_factor given slots
            kwargs["capacity_factor"] = router.get("capacity_factor", 1.0)
        return kwargs
    multiple_of = dispatcher.get("capacity_multiple_of", 4)
    kwargs = dict(
        router_noise_std=router.get("noise_std", 1.0),
        capacity_factor=dispatcher.get("capacity_factor", 1.0),
        capacity_ceil_or_round=dispatcher.get("capacity_ceil_or_round",
                                              "ceil"),
        capacity_multiple_of=multiple_of if multiple_of else 1,
        dispatch_dtype="bfloat16" if dispatcher.get("bfloat16") else None,
    )
    if router_type == "experts_choice":
        return dict(kwargs, router="experts_choice")
    return dict(
        kwargs,
        num_selected_experts=router.get("num_selected_experts", 1),
        importance_loss_weight=router.get("importance_loss_weight", 1.0),
        load_loss_weight=router.get("load_loss_weight", 1.0),
        gshard_loss_weight=router.get("gshard_loss_weight", 0.0),
        batch_priority=dispatcher.get("batch_priority", False),
    )


def infer_image_size(params, patch_size, classifier):
    """Image side from the position embedding, for square images."""
    pos = params.get("Encoder/posembed_input/pos_embedding")
    if pos is None:
        raise VmoeConversionError(
            "The config has no image_size and the parameters have no "
            "Encoder/posembed_input/pos_embedding to infer it from.")
    grid_tokens = pos.shape[1] - (classifier == "token")
    side = math.isqrt(grid_tokens)
    if side * side != grid_tokens:
        raise VmoeConversionError(
            f"Cannot infer a square image size from {grid_tokens} patches; "
            "pass image_size.")
    return (side * patch_size[0], side * patch_size[1])


# Flax's SelfAttention sub-layers -> Keras MultiHeadAttention's (whose
# public weight paths end in "<sub-layer>/<kernel|bias>").
ATTENTION_DENSES = {"query": "query", "key": "key", "value": "value",
                    "out": "attention_output"}


def _by_path_tail(weights):
    """{"<sub-layer>/<weight>": variable}, from the variables' paths."""
    return {"/".join(w.path.split("/")[-2:]): w for w in weights}


def vmoe_variable_map(model):
    """{official Flax parameter name: keras Variable} for an E3ViT."""
    backbone = model.backbone
    emb = backbone.embedding
    out = {
        "embedding/kernel": emb.conv.kernel,
        "embedding/bias": emb.conv.bias,
        "head/kernel": model.head.kernel,
        "head/bias": model.head.bias,
    }
    if emb.position_embedding is not None:
        out["Encoder/posembed_input/pos_embedding"] = emb.position_embedding
    if emb.use_class_token:
        out["cls"] = emb.class_token
    norm = backbone.get_layer("encoder_norm")
    out["Encoder/encoder_norm/scale"] = norm.gamma
    out["Encoder/encoder_norm/bias"] = norm.beta
    if backbone.classifier == "map":
        head = backbone.get_layer("map_head")
        p = "MapHead/"
        out[f"{p}probe"] = head.probe
        out[f"{p}LayerNorm/scale"] = head.norm.gamma
        out[f"{p}LayerNorm/bias"] = head.norm.beta
        for j, dense in enumerate((head.mlp.dense_0, head.mlp.dense_1)):
            out[f"{p}Mlp/Dense_{j}/kernel"] = dense.kernel
            out[f"{p}Mlp/Dense_{j}/bias"] = dense.bias
        out.update(_attention_variables(
            head.attention, f"{p}MultiHeadDotProductAttention/"))
    if backbone.representation_size:
        pre = backbone.get_layer("pre_logits")
        out["pre_logits/kernel"] = pre.kernel
        out["pre_logits/bias"] = pre.bias
    for i, block in enumerate(backbone.encoder_blocks):
        p = f"Encoder/encoderblock_{i}/"
        for j, ln in enumerate((block.norm_0, block.norm_1)):
            out[f"{p}LayerNorm_{j}/scale"] = ln.gamma
            out[f"{p}LayerNorm_{j}/bias"] = ln.beta
        out.update(_attention_variables(block.attention,
                                        f"{p}SelfAttention/"))
        if block.is_moe:
            experts = block.mlp.experts
            router = block.mlp.router
            if block.mlp.router_type == "soft":
                out[f"{p}Moe/Router/mu"] = router.mu
                out[f"{p}Moe/Router/scale"] = router.scale
            else:
                out[f"{p}Moe/Router/dense/kernel"] = router.kernel
            out[f"{p}Moe/Mlp/Dense_0/kernel"] = experts.kernel_0
            out[f"{p}Moe/Mlp/Dense_0/bias"] = experts.bias_0
            out[f"{p}Moe/Mlp/Dense_1/kernel"] = experts.kernel_1
            out[f"{p}Moe/Mlp/Dense_1/bias"] = experts.bias_1
        else:
            out[f"{p}Mlp/Dense_0/kernel"] = block.mlp.dense_0.kernel
            out[f"{p}Mlp/Dense_0/bias"] = block.mlp.dense_0.bias
            out[f"{p}Mlp/Dense_1/kernel"] = block.mlp.dense_1.kernel
            out[f"{p}Mlp/Dense_1/bias"] = block.mlp.dense_1.bias
    return out


def _attention_variables(attention, prefix):
    """Flax MultiHeadDotProductAttention names of a Keras attention layer."""
    weights = _by_path_tail(attention.weights)
    out = {f"{prefix}{name}/{kind}": weights[f"{keras_name}/{kind}"]
           for name, keras_name in ATTENTION_DENSES.items()
           for kind in ("kernel", "bias")}
    for norm in ("query_ln", "key_ln"):  # qk-norm
        if f"{norm}/gamma" in weights:
            out[f"{prefix}{norm}/scale"] = weights[f"{norm}/gamma"]
    return out


def _all_finite(array):
    array = np.asarray(array)
    if array.dtype.kind in "iub":
        return True
    return bool(np.isfinite(array.astype(np.float32)).all())


def load_vmoe_params(model, params):
    """Assigns official parameters to `model`; all-or-nothing."""
    params = read_params(params)
    variables = vmoe_variable_map(model)
    missing = sorted(set(variables) - set(params))
    unexpected = sorted(set(params) - set(variables))
    wrong = [f"{k}: got {tuple(params[k].shape)}, expected "
             f"{tuple(variables[k].shape)}"
             for k in sorted(set(variables) & set(params))
             if tuple(params[k].shape) != tuple(variables[k].shape)]
    problems = []
    if missing:
        problems.append("missing parameters: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected parameters: " + ", ".join(unexpected))
    if wrong:
        problems.append("wrongly shaped parameters: " + "; ".join(wrong))
    nonfinite = [k for k in sorted(set(variables) & set(params))
                 if not _all_finite(params[k])]
    if nonfinite:
        problems.append("non-finite (NaN or inf) parameters: "
                        + ", ".join(nonfinite))
    if problems:
        raise VmoeConversionError(
            "The parameters do not match the model:\n  - "
            + "\n  - ".join(problems))
    for name, variable in variables.items():
        variable.assign(np.asarray(params[name], dtype=variable.dtype))
    return model


def model_from_vmoe(config, params, task_cls, image_size=None,
                    **task_kwargs):
    """Builds `task_cls` (E3ViT) for a vmoe config and loads `params`.

    `task_kwargs` (`preprocessor`, `class_names`) go to the task's
    constructor with the head settings of the config."""
    params = read_params(params)
    kwargs, num_classes, head_kwargs = backbone_kwargs_from_vmoe(
        config, image_size)
    if kwargs["image_size"] is None:
        kwargs["image_size"] = infer_image_size(
            params, kwargs["patch_size"], kwargs["classifier"])
    backbone = task_cls.backbone_cls(**kwargs)
    model = task_cls(backbone, num_classes, **head_kwargs, **task_kwargs)
    return load_vmoe_params(model, params)
