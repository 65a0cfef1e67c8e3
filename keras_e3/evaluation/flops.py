"""Analytic parameter and FLOP counts of ViT / V-MoE / E³ models.

Convention (timm / fvcore): only matrix multiplications are counted, as
multiply-accumulates (MACs); ``flops = 2 * macs`` (the convention of XLA's
cost analysis and of vmoe's numbers). Layer norms, softmax, GELU, biases,
residual adds and the routing logic (top-K, cumsum) are ignored. XLA's
cost analysis (which counts them) is 0.4-0.7 % above these FLOPs for ViT-S/32,
ViT-B/16 and E³ S/32, and 5-15 % above on the tiny test models.

What is counted, per image:

- ``embedding``: the patch convolution, (#patches) x p^2 x channels x D.
- ``attention``: per token Q, K, V and output projections (4 D^2) and per
  sequence the QK^T and AV matmuls (2 T^2 D).
- ``mlp``: dense MLPs, 2 D x mlp_dim per token.
- ``router``: D x E per token: one matmul scores each E³ copy against
  every partition's experts, and the copy keeps its own partition's E/M
  logits (`Router.call`).
- ``moe_experts``: 2 D x mlp_dim per expert buffer slot. With
  ``expert_tokens="capacity"`` (default) every slot of every group's
  buffers counts, empty or not (what the einsum dispatcher computes):
  E x capacity per group of ``group_size`` token copies. With
  ``"routed"``, K slots per token (an ideal dispatcher, no slack, no drops).
- ``dispatch``: the einsum dispatcher's dense dispatch and combine
  (2 x S x E x C x D per group). A gather/scatter dispatcher does none of
  it, so it is left out of the totals unless ``include_dispatch=True``.
- Experts Choice: E x C slots per group (both ``expert_tokens``). Soft
  MoE: E x P slots per group; its router counts D x E x P per token plus
  the dispatch and combine matmuls (2 x S x E x P x D per group), which
  are the algorithm itself, not a dispatcher's overhead.
- ``head``: the MAP head (``classifier="map"``) if any, pre-logits
  (``representation_size``) and the classifier.

E³ (``ensemble_size`` M > 1) tiles the sequence M times before the first
MoE block: that block and every later one (attention included), the
pooling, pre-logits and head process M copies.

``batch_size=None`` amortises the routing groups (a fractional number of
groups per image); ``batch_size=n`` counts the groups a batch of n images
really uses (the last one padded to ``group_size``), divided by n.
"""

import math

from keras_e3.layers.embedding import as_pair
from keras_e3.models.backbone import backbone_settings
from keras_e3.models.backbone import validate_config

BREAKDOWN = ("embedding", "attention", "mlp", "router", "moe_experts",
             "dispatch", "head")
EXPERT_TOKENS = ("capacity", "routed")


def count_flops_from_config(num_classes=None, batch_size=None,
                            expert_tokens="capacity", include_dispatch=False,
                            **backbone_kwargs):
    """Counts params, MACs and FLOPs per image from an `E3ViTBackbone`
    config, without building the model.

    Args:
        num_classes: classifier size (None: backbone only).
        batch_size, expert_tokens, include_dispatch: see the module doc.
        **backbone_kwargs: `E3ViTBackbone` arguments (unknown names raise).

    Returns:
        A dict: "params" (int), "macs" and "flops" per image, "breakdown"
        (MACs per part, see `BREAKDOWN`; "dispatch" is always reported),
        "tokens" (T), "ensemble_size" and "expert_slots" (expert buffer
        slots per image and MoE layer).

    The defaults and the MoE rules (router defaults, routing group,
    capacity) are the backbone's own: `backbone_settings` and
    `MoeSettings`, nothing re-derived here.

    Example:

    ```python
    from keras_e3 import count_flops_from_config

    counts = count_flops_from_config(
        num_classes=10, image_size=32, patch_size=16, hidden_dim=8,
        num_layers=1, num_heads=2, mlp_dim=16)
    assert (counts["tokens"], counts["params"]) == (5, 6906)
    ```
    """
    architecture, moe = backbone_settings(backbone_kwargs)
    if expert_tokens not in EXPERT_TOKENS:
        raise ValueError(f"expert_tokens must be one of {EXPERT_TOKENS}; "
                         f"got {expert_tokens!r}.")
    if batch_size is not None and int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
    cfg = architecture
    image_hw = as_pair(cfg["image_size"], "image_size")
    ph, pw = as_pair(cfg["patch_size"], "patch_size")
    if image_hw[0] % ph or image_hw[1] % pw:
        raise ValueError(f"image_size {image_hw} is not divisible by "
                         f"patch_size {(ph, pw)}.")
    d, mlp, c = cfg["hidden_dim"], cfg["mlp_dim"], cfg["num_channels"]
    if d % cfg["num_heads"]:
        raise ValueError(f"hidden_dim={d} is not divisible by "
                         f"num_heads={cfg['num_heads']}.")
    moe_layers = cfg["moe_layers"]
    e = moe.num_experts if moe_layers else 0
    router = moe.router  # Experts Choice: C per expert; Soft: P slots
    k, m = moe.num_selected_experts or 1, moe.ensemble_size
    validate_config(cfg["num_layers"], cfg["classifier"], e, moe_layers, k, m)
    patches = (image_hw[0] // ph) * (image_hw[1] // pw)
    prefix = int(cfg["classifier"] == "token")
    t = patches + prefix
    moe = moe.resolved(t)  # the routing group of t tokens per image
    group_size = moe.group_size
    capacity = moe.capacity if moe_layers else 0
    slots_per_group = capacity if router == "soft" else 1  # router width
    rep = cfg["representation_size"]
    qk_norm = 2 * (d // cfg["num_heads"]) if cfg["attention_qk_norm"] else 0

    macs = dict.fromkeys(BREAKDOWN, 0.0)
    macs["embedding"] = patches * ph * pw * c * d
    learned = cfg["position_embedding"] == "learned"
    params = ph * pw * c * d + d + learned * t * d + prefix * d
    slots_per_image = 0.0
    for i in range(cfg["num_layers"]):
        copies = m if moe_layers and i >= moe_layers[0] else 1
        tokens = copies * t
        macs["attention"] += tokens * 4 * d * d + copies * 2 * t * t * d
        params += 4 * d * d + 4 * d + 4 * d + qk_norm  # attention, norms
        expert_params = 2 * d * mlp + mlp + d
        if i not in moe_layers:
            macs["mlp"] += tokens * 2 * d * mlp
            params += expert_params
            continue
        params += d * e * slots_per_group + (router == "soft") \
            + e * expert_params
        if batch_size is None:
            groups = tokens / group_size
        else:
            groups = math.ceil(batch_size * tokens / group_size) / batch_size
        # Padding tokens of a partial group are scored too, against all
        # E experts (the router's one matmul; each keeps its partition's).
        macs["router"] += groups * group_size * d * e * slots_per_group
        slots = (groups * e * capacity
                 if expert_tokens == "capacity" or router != "top_k"
                 else tokens * k)
        slots_per_image = slots
        macs["moe_experts"] += slots * 2 * d * mlp
        dispatch = groups * 2 * group_size * e * capacity * d
        if router == "soft":  # its batched matmuls are the algorithm
            macs["router"] += dispatch
        else:
            macs["dispatch"] += dispatch
    params += 2 * d  # encoder norm
    copies = m
    features = d
    if cfg["classifier"] == "map":  # probe, attention, norm, MLP
        params += d + 4 * d * d + 4 * d + qk_norm + 2 * d + 2 * d * mlp \
            + mlp + d
        macs["head"] += copies * (2 * d * d + 2 * t * d * d + 2 * t * d
                                  + 2 * d * mlp)
    if rep:
        macs["head"] += copies * d * rep
        params += d * rep + rep
        features = rep
    if num_classes:
        macs["head"] += copies * features * num_classes
        params += features * num_classes + num_classes
    total = sum(v for key, v in macs.items()
                if include_dispatch or key != "dispatch")
    return {"params": int(params), "macs": total, "flops": 2 * total,
            "breakdown": macs, "tokens": t, "ensemble_size": m,
            "expert_slots": slots_per_image}


def count_flops(model, batch_size=None, expert_tokens="capacity",
                include_dispatch=False):
    """Params, MACs and FLOPs per image of a model (see the module doc).

    Only the config is read: nothing is run.

    Args:
        model: an `E3ViT`, an `E3ViTBackbone`, a `DeepEnsemble` (members
            summed), or a backbone config dict (optionally with
            "num_classes").
        batch_size, expert_tokens, include_dispatch: as
            `count_flops_from_config`.

    Returns:
        The counts dict of `count_flops_from_config`.

    Example:

    ```python
    import keras_e3

    backbone = keras_e3.E3ViTBackbone(
        image_size=16, patch_size=8, hidden_dim=16, num_layers=2,
        num_heads=2, mlp_dim=32, num_experts=4, moe_layers=(1,))
    counts = keras_e3.count_flops(backbone)
    assert counts["params"] == backbone.count_params()
    ```
    """
    options = dict(batch_size=batch_size, expert_tokens=expert_tokens,
                   include_dispatch=include_dispatch)
    members = getattr(model, "models", None)
    if members is not None:  # DeepEnsemble
        return _sum([count_flops(x, **options) for x in members])
    if isinstance(model, dict):
        return count_flops_from_config(**model, **options)
    backbone = getattr(model, "backbone", model)
    if not hasattr(backbone, "get_config") or not hasattr(backbone,
                                                          "moe_layers"):
        raise ValueError("count_flops expects an E3ViT, an E3ViTBackbone, a "
                         f"DeepEnsemble or a config dict; got "
                         f"{type(model).__name__}.")
    config = backbone.get_config()
    for key in ("name", "trainable", "dtype"):
        config.pop(key, None)
    return count_flops_from_config(
        num_classes=getattr(model, "num_classes", None), **config, **options)


def _sum(counts):
    out = {"params": sum(c["params"] for c in counts),
           "macs": sum(c["macs"] for c in counts),
           "flops": sum(c["flops"] for c in counts),
           "breakdown": {k: sum(c["breakdown"][k] for c in counts)
                         for k in BREAKDOWN},
           "ensemble_size": sum(c["ensemble_size"] for c in counts)}
    return out


def deep_ensemble_flops(model, num_models, **options):
    """Counts of a deep ensemble of `num_models` copies of `model`: every
    number times `num_models`.

    Args:
        model: a model, config dict or counts dict (as `count_flops`).
        num_models: copies in the ensemble (>= 1).
        **options: `count_flops` options.

    Returns:
        A counts dict (params, macs, flops, breakdown, ensemble_size).

    Example:

    ```python
    from keras_e3.evaluation.flops import count_flops_from_config
    from keras_e3.evaluation.flops import deep_ensemble_flops

    config = dict(image_size=32, patch_size=16, hidden_dim=8, num_layers=1,
                  num_heads=2, mlp_dim=16)
    one = count_flops_from_config(**config)
    assert deep_ensemble_flops(config, 2)["flops"] == 2 * one["flops"]
    ```
    """
    if int(num_models) < 1:
        raise ValueError(f"num_models must be >= 1; got {num_models}.")
    return _sum([_as_counts(model, options)] * int(num_models))


def _as_counts(x, options):
    if isinstance(x, dict) and "flops" in x and "breakdown" in x:
        return x
    return count_flops(x, **options)


def flops_ratio(a, b, **options):
    """FLOPs of `a` / FLOPs of `b`.

    Args:
        a, b: each a model, config dict or counts dict (as `count_flops`).
        **options: `count_flops` options.

    Returns:
        The ratio, a float.

    Example:

    ```python
    from keras_e3.evaluation.flops import flops_ratio

    small = dict(image_size=32, patch_size=16, hidden_dim=8, num_layers=1,
                 num_heads=2, mlp_dim=16)
    assert flops_ratio(dict(small, num_layers=2), small) > 1.0
    ```
    """
    return _as_counts(a, options)["flops"] / _as_counts(b, options)["flops"]
