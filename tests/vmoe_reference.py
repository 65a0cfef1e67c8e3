"""Independent float64 NumPy re-implementation of the official vmoe forward.

Covers google-research/vmoe's `VisionTransformerMoe` (dense ViT and V-MoE)
and `VisionTransformerMoeEnsemble` (E³) in deterministic (eval) mode, with the
top-experts-per-item einsum dispatcher (optionally bfloat16). It takes the
official flat parameter names ("Encoder/encoderblock_1/Moe/Router/dense/
kernel", ...) and returns logits in the official order ([B, C], or [B*M, C]
with row b*M + m for E³).

Written from the semantics documented with the golden fixtures (no Keras, no
JAX): only used by the tests as an oracle for configurations that the golden
fixtures do not cover. The number of token copies must be a multiple of the
group size (no padding of a last partial group).
"""

import math

import numpy as np

LN_EPS = 1e-6


# --------------------------------------------------------------------------
# Config helpers.
# --------------------------------------------------------------------------

def _pair(v):
    return (int(v), int(v)) if np.isscalar(v) else tuple(int(x) for x in v)


def _moe_settings(config):
    """Flattened MoE settings of a vmoe config (None for a dense ViT)."""
    encoder = config["encoder"]
    moe = encoder.get("moe") or {}
    layers = tuple(moe.get("layers") or ())
    if not layers:
        return None
    router = moe.get("router") or {}
    disp = router.get("dispatcher") or {}
    ensemble = config.get("name") == "VisionTransformerMoeEnsemble"
    m = 1
    if ensemble:
        if not moe.get("ensemble_size"):
            raise ValueError("VisionTransformerMoeEnsemble needs "
                             "encoder.moe.ensemble_size >= 1")
        m = int(moe["ensemble_size"])
    return dict(
        layers=layers,
        num_experts=int(moe["num_experts"]),
        group_size=int(moe["group_size"]),
        ensemble_size=m,
        k=int(router.get("num_selected_experts", 1)),
        capacity_factor=float(disp.get("capacity_factor", 1.0)),
        batch_priority=bool(disp.get("batch_priority", False)),
        bfloat16=bool(disp.get("bfloat16", False)),
    )


def capacity_of(group_size, num_experts, k, capacity_factor):
    """ceil(S*K*cf/E), then up to the next multiple of 4."""
    cap = int(math.ceil(group_size * k * capacity_factor / num_experts))
    if cap < 1:
        raise ValueError("capacity < 1")
    return cap + (-cap) % 4


# --------------------------------------------------------------------------
# Building blocks.
# --------------------------------------------------------------------------

def _layer_norm(x, scale, bias):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + LN_EPS) * scale + bias


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi)
                                    * (x + 0.044715 * x ** 3)))


def _softmax(x, axis=-1):
    z = x - x.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def _to_bf16(x):
    """Round to bfloat16 (nearest even) via float32, returned as float64."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    bits = (bits + rounding) & np.uint32(0xFFFF0000)
    return bits.view(np.float32).astype(np.float64)


def _attention(x, p, num_heads):
    """Multi-head self-attention with DenseGeneral kernels."""
    q = np.einsum("bth,hnd->btnd", x, p["query/kernel"]) + p["query/bias"]
    k = np.einsum("bth,hnd->btnd", x, p["key/kernel"]) + p["key/bias"]
    v = np.einsum("bth,hnd->btnd", x, p["value/kernel"]) + p["value/bias"]
    head_dim = q.shape[-1]
    q = q / np.sqrt(head_dim)
    weights = _softmax(np.einsum("bqnd,bknd->bnqk", q, k), axis=-1)
    ctx = np.einsum("bnqk,bknd->bqnd", weights, v)
    return np.einsum("bqnd,ndh->bqh", ctx, p["out/kernel"]) + p["out/bias"]


def _mlp(x, w0, b0, w1, b1):
    return _gelu_tanh(x @ w0 + b0) @ w1 + b1


# --------------------------------------------------------------------------
# Routing.
# --------------------------------------------------------------------------

def _top_k(gates_row, k):
    """Indices of the k largest values; ties -> lower index first."""
    return np.argsort(-gates_row, kind="stable")[:k]


def route_group(gates, k, capacity, batch_priority):
    """Top-experts-per-item routing of one group.

    gates [S, E]. Returns (slots [S, E] int: buffer position or -1 when the
    expert is not used for that token, num_dropped assignments).
    Every top-1 choice is served before any top-2 choice; within a rank the
    tokens are served in order (or by decreasing top-1 gate with batch
    priority, stable).
    """
    s, e = gates.shape
    choices = np.stack([_top_k(gates[i], k) for i in range(s)])  # [S, K]
    if batch_priority:
        order = np.argsort(-gates[np.arange(s), choices[:, 0]], kind="stable")
    else:
        order = np.arange(s)
    filled = np.zeros(e, dtype=np.int64)
    slots = np.full((s, e), -1, dtype=np.int64)
    dropped = 0
    for rank in range(k):
        for i in order:
            expert = choices[i, rank]
            if filled[expert] < capacity:
                slots[i, expert] = filled[expert]
            else:
                dropped += 1
            filled[expert] += 1
    return slots, dropped


def _moe_layer(x, p, moe, info):
    """x [B*M, T, H] -> [B*M, T, H] through the sparse MoE of MLPs."""
    m, e, k = moe["ensemble_size"], moe["num_experts"], moe["k"]
    n_seq, t, h = x.shape
    s = moe["group_size"]
    # [B*M, T, H] -> [B, M, T, H] -> [B, T, M, H] -> flat token copies.
    flat = x.reshape(n_seq // m, m, t, h).transpose(0, 2, 1, 3).reshape(-1, h)
    if flat.shape[0] % s:
        raise ValueError(f"{flat.shape[0]} token copies are not a multiple "
                         f"of group_size={s}")
    if s % m:
        raise ValueError("group_size must be a multiple of ensemble_size")
    groups = flat.reshape(-1, s, h)
    kernel = p["Router/dense/kernel"]
    per = e // m
    gates = np.zeros((groups.shape[0], s, e))
    if m == 1:
        gates[:] = _softmax(groups @ kernel)
    else:
        kernel = kernel.reshape(h, m, per)
        for member in range(m):
            rows = groups[:, member::m]  # group position s*M + member
            gates[:, member::m, member * per:(member + 1) * per] = _softmax(
                rows @ kernel[:, member, :])
    cap = capacity_of(s, e, k, moe["capacity_factor"])
    w0, b0 = p["Mlp/Dense_0/kernel"], p["Mlp/Dense_0/bias"]
    w1, b1 = p["Mlp/Dense_1/kernel"], p["Mlp/Dense_1/bias"]
    out = np.zeros_like(groups)
    dropped = 0
    all_slots = np.empty(gates.shape, dtype=np.int64)
    for g in range(groups.shape[0]):
        slots, d = route_group(gates[g], k, cap, moe["batch_priority"])
        all_slots[g] = slots
        dropped += d
        for expert in range(e):
            tokens = np.nonzero(slots[:, expert] >= 0)[0]
            if tokens.size == 0:
                continue
            # Buffer of this expert in this group; empty slots hold zeros
            # and their outputs are never combined, so only the used ones
            # are computed.
            xin = groups[g, tokens]
            if moe["bfloat16"]:
                xin = _to_bf16(xin)
            y = _mlp(xin, w0[expert], b0[expert], w1[expert], b1[expert])
            if moe["bfloat16"]:
                y = _to_bf16(y)
            out[g, tokens] += gates[g, tokens, expert][:, None] * y
    info.append(dict(capacity=cap, dropped=dropped, gates=gates,
                     slots=all_slots, num_groups=groups.shape[0]))
    # Back: flat [B, T, M, H] -> [B, M, T, H] -> [B*M, T, H].
    return out.reshape(-1, t, m, h).transpose(0, 2, 1, 3).reshape(-1, t, h)


# --------------------------------------------------------------------------
# Forward.
# --------------------------------------------------------------------------

def reference_forward(config, params, images, return_info=False):
    """Official vmoe logits ([B, C] or [B*M, C] for E³) in float64.

    With `return_info`, also returns a list (one dict per MoE block, in
    order) with `capacity`, `dropped` (token-expert assignments over
    capacity, summed over groups), `gates` [G, S, E] and `num_groups`.
    """
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    x = np.asarray(images, dtype=np.float64)
    enc = config["encoder"]
    moe = _moe_settings(config)
    ph, pw = _pair(config["patch_size"])
    b, ih, iw, c = x.shape
    gh, gw = ih // ph, iw // pw
    # Patch embedding: conv, kernel = stride = patch, VALID.
    patches = x[:, :gh * ph, :gw * pw].reshape(b, gh, ph, gw, pw, c)
    x = np.einsum("bipjqc,pqcd->bijd", patches, p["embedding/kernel"])
    x = x + p["embedding/bias"]
    x = x.reshape(b, gh * gw, -1)
    hidden = x.shape[-1]
    classifier = config.get("classifier", "token")
    if classifier == "token":
        cls = np.broadcast_to(p["cls"].reshape(1, 1, hidden), (b, 1, hidden))
        x = np.concatenate([cls, x], axis=1)
    x = x + p["Encoder/posembed_input/pos_embedding"]
    info = []
    tiled = False
    for i in range(enc["num_layers"]):
        pre = f"Encoder/encoderblock_{i}/"
        is_moe = moe is not None and i in moe["layers"]
        if is_moe and not tiled and moe["ensemble_size"] > 1:
            x = np.repeat(x, moe["ensemble_size"], axis=0)
            tiled = True
        y = _layer_norm(x, p[pre + "LayerNorm_0/scale"],
                        p[pre + "LayerNorm_0/bias"])
        attn = {k[len(pre + "SelfAttention/"):]: v for k, v in p.items()
                if k.startswith(pre + "SelfAttention/")}
        x = x + _attention(y, attn, enc["num_heads"])
        y = _layer_norm(x, p[pre + "LayerNorm_1/scale"],
                        p[pre + "LayerNorm_1/bias"])
        if is_moe:
            sub = {k[len(pre + "Moe/"):]: v for k, v in p.items()
                   if k.startswith(pre + "Moe/")}
            y = _moe_layer(y, sub, moe, info)
        else:
            y = _mlp(y, p[pre + "Mlp/Dense_0/kernel"], p[pre + "Mlp/Dense_0/bias"],
                     p[pre + "Mlp/Dense_1/kernel"], p[pre + "Mlp/Dense_1/bias"])
        x = x + y
    x = _layer_norm(x, p["Encoder/encoder_norm/scale"],
                    p["Encoder/encoder_norm/bias"])
    if classifier == "token":
        x = x[:, 0]
    elif classifier == "gap":
        x = x.mean(axis=1)
    else:
        raise ValueError(f"classifier {classifier!r}")
    if config.get("representation_size") is not None:
        x = np.tanh(x @ p["pre_logits/kernel"] + p["pre_logits/bias"])
    logits = x @ p["head/kernel"] + p["head/bias"]
    return (logits, info) if return_info else logits


# --------------------------------------------------------------------------
# Random parameters.
# --------------------------------------------------------------------------

def param_shapes(config, image_size, num_classes):
    """{official name: shape} of a vmoe config."""
    enc = config["encoder"]
    moe = _moe_settings(config)
    h = int(config["hidden_size"])
    heads = int(enc["num_heads"])
    mlp = int(enc["mlp_dim"])
    ph, pw = _pair(config["patch_size"])
    ih, iw = _pair(image_size)
    tokens = (ih // ph) * (iw // pw)
    classifier = config.get("classifier", "token")
    shapes = {
        "embedding/kernel": (ph, pw, 3, h),
        "embedding/bias": (h,),
        "Encoder/encoder_norm/scale": (h,),
        "Encoder/encoder_norm/bias": (h,),
        "head/kernel": (config.get("representation_size") or h, num_classes),
        "head/bias": (num_classes,),
    }
    if classifier == "token":
        shapes["cls"] = (1, 1, h)
        tokens += 1
    shapes["Encoder/posembed_input/pos_embedding"] = (1, tokens, h)
    if config.get("representation_size") is not None:
        r = int(config["representation_size"])
        shapes["pre_logits/kernel"] = (h, r)
        shapes["pre_logits/bias"] = (r,)
    for i in range(enc["num_layers"]):
        pre = f"Encoder/encoderblock_{i}/"
        for j in range(2):
            shapes[f"{pre}LayerNorm_{j}/scale"] = (h,)
            shapes[f"{pre}LayerNorm_{j}/bias"] = (h,)
        for name in ("query", "key", "value"):
            shapes[f"{pre}SelfAttention/{name}/kernel"] = (h, heads, h // heads)
            shapes[f"{pre}SelfAttention/{name}/bias"] = (heads, h // heads)
        shapes[f"{pre}SelfAttention/out/kernel"] = (heads, h // heads, h)
        shapes[f"{pre}SelfAttention/out/bias"] = (h,)
        if moe is not None and i in moe["layers"]:
            e, m = moe["num_experts"], moe["ensemble_size"]
            shapes[f"{pre}Moe/Router/dense/kernel"] = (
                (h, e) if m == 1 else (h, m, e // m))
            shapes[f"{pre}Moe/Mlp/Dense_0/kernel"] = (e, h, mlp)
            shapes[f"{pre}Moe/Mlp/Dense_0/bias"] = (e, mlp)
            shapes[f"{pre}Moe/Mlp/Dense_1/kernel"] = (e, mlp, h)
            shapes[f"{pre}Moe/Mlp/Dense_1/bias"] = (e, h)
        else:
            shapes[f"{pre}Mlp/Dense_0/kernel"] = (h, mlp)
            shapes[f"{pre}Mlp/Dense_0/bias"] = (mlp,)
            shapes[f"{pre}Mlp/Dense_1/kernel"] = (mlp, h)
            shapes[f"{pre}Mlp/Dense_1/bias"] = (h,)
    return shapes


def random_params(config, image_size, num_classes, seed=0):
    """Random float32 parameters with the official names and shapes.

    Weights ~ N(0, 0.3) (fan-in scaled for the wide patch-embedding kernel,
    0.1 for the head), LayerNorm scales ~ 1 + N(0, 0.1). Router kernels get N(0, 0.5) plus a
    per-expert preference along the LayerNorm bias direction, so that the
    routing is unbalanced and small capacities drop tokens.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in param_shapes(config, image_size, num_classes).items():
        if name.endswith("/scale"):
            v = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name == "embedding/kernel":
            fan_in = shape[0] * shape[1] * shape[2]
            v = rng.standard_normal(shape) / np.sqrt(fan_in)
        elif name.endswith("Router/dense/kernel"):
            v = 0.5 * rng.standard_normal(shape)
        elif name == "head/kernel":
            # Logits of magnitude ~1, so that float32 round-off stays well
            # below the tests' 1e-5 tolerance.
            v = 0.1 * rng.standard_normal(shape)
        else:
            v = 0.3 * rng.standard_normal(shape)
        out[name] = v
    # Unbalance the routers: the LayerNorm_1 output always contains the
    # LayerNorm bias, so adding bias ⊗ preference to the router kernel gives
    # every token the same per-expert offset of |bias|^2 * preference.
    for name in list(out):
        if name.endswith("Moe/Router/dense/kernel"):
            pre = name[:-len("Moe/Router/dense/kernel")]
            beta = out[pre + "LayerNorm_1/bias"]
            shape = out[name].shape
            pref = rng.standard_normal(shape[1:]) / (beta @ beta)
            out[name] = out[name] + np.einsum("h,...->h...", beta, pref)
    return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}
