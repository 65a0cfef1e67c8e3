"""How a model routes its tokens: per MoE block, each expert's load, the
tokens no expert serves, and each token's top expert (for the routing
maps), for each router (top-K, Experts Choice, Soft MoE).

The routing is read from the model's own `compute_intermediates` (the
dispatch masks, gates and Soft MoE combine weights that the MoE layers
return), batch by batch as `predict` routes them (same routing groups).
"""

import contextlib

import keras
import numpy as np

from keras_e3.layers.moe import ungroup

# What `route` reads of each MoE block's routing intermediates, by router.
ROUTING_KEYS = {"top_k": ("dispatch_mask", "gates"),
                "experts_choice": ("dispatch_mask", "gates"),
                "soft": ("combine_weights",)}
# Per-token arrays of a block's stats (for the plots; not JSON).
TOKEN_ARRAYS = ("top_expert", "dropped", "top_expert_weight")


def routing_stats(model, images, batch_size=64):
    """Per-token routing of every MoE block over `images`.

    `images`: raw images of any kind the model's `preprocess` takes
    (arrays of any size, lists, paths, bytes, a `tf.data.Dataset`), taken
    through its converter (`model.preprocessor`), or model-ready images.

    Returns {"num_examples": N, "images": the model-ready images routed
    (float32 [N, H, W, C], for the routing maps), "layers": {block name:
    {...}}}. Every block
    has "router" (the backbone's), "expert_member" [E],
    "num_token_copies", "expert_load" [E], "uniform_load" (the load of
    every expert under perfectly balanced routing), "dropped_fraction",
    and, as numpy arrays [N, M, T] for the plots, "top_expert" and
    "dropped". By router:

    - "top_k": "expert_load" is the fraction of the token copies of the
      expert's member dispatched to it (sums to K per member without
      drops); "top_expert" the dispatched expert with the largest gate,
      -1 when the copy is dropped (dispatched to no expert).
    - "experts_choice": "expert_load" is the fraction of the tokens each
      expert takes (every expert takes C tokens of each routing group);
      "dropped_fraction" the tokens taken by no expert; "experts_per_token"
      [E + 1] the fraction of tokens taken by 0, 1, ..., E experts;
      "top_expert" the taking expert with the largest gate (-1: none).
    - "soft": every token combines every expert's slots, nothing is
      dropped. A token's weight on an expert is its combine weights summed
      over that expert's slots (they sum to 1 over the experts);
      "expert_load" is each expert's mean weight over the tokens (sums to
      1), "top_expert" the expert with the largest weight,
      "top_expert_weight" [N, M, T] that weight and
      "mean_top_expert_weight" its mean.

    Batches of `batch_size` images are routed as `predict` routes them.

    Args:
        model: an `E3ViT` with MoE blocks.
        images: see above.
        batch_size: images per batch.

    Example:
    ```python
    import numpy as np

    import keras_e3
    from keras_e3 import evaluation

    model = keras_e3.E3ViT.from_preset("e3_tiny_digits")
    raw = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 1), np.uint8)
    stats = evaluation.routing_stats(model, raw)
    layer = next(iter(stats["layers"].values()))
    layer["router"], len(layer["expert_load"])  # "top_k", 4 experts
    ```
    """
    backbone = model.backbone
    router = getattr(backbone, "router", "top_k")
    m = backbone.ensemble_size
    tokens = backbone.embedding.num_tokens
    num_experts = backbone.num_experts
    per_member = num_experts // m
    arrays, sums = {}, {}
    images = model_inputs(model, images)
    n = images.shape[0]
    route = _router_outputs(backbone)
    for start in range(0, n, int(batch_size)):
        batch = images[start:start + int(batch_size)]
        b = batch.shape[0]

        def per_token(x):  # routing groups [G, S, E] -> [b, M, T, E]
            x = ungroup(x, b * tokens * m, tokens, m)
            return np.reshape(x, (b, m, tokens, num_experts))

        for name, out in route(batch).items():
            if router == "soft":
                weight = per_token(_numpy(out["combine_weights"],
                                          np.float64).sum(-1))
                token = {"top_expert": np.argmax(weight, axis=-1),
                         "top_expert_weight": np.max(weight, axis=-1)}
                load = weight.sum(axis=(0, 1, 2))
            else:
                served = per_token(_numpy(out["dispatch_mask"]).any(-1))
                gates = per_token(_numpy(out["gates"], np.float64))
                best = np.argmax(np.where(served, gates, -np.inf), axis=-1)
                token = {"top_expert": np.where(served.any(-1), best, -1),
                         "num_experts": served.sum(-1)}
                load = served.sum(axis=(0, 1, 2))
            for key, value in token.items():
                arrays.setdefault(name, {}).setdefault(key, []).append(value)
            sums[name] = sums.get(name, 0) + load
    layers = {}
    copies_per_member = n * tokens
    for name in arrays:
        token = {k: np.concatenate(v) for k, v in arrays[name].items()}
        best = token["top_expert"]
        dropped = best < 0
        layer = {
            "router": router,
            "expert_load": (sums[name] / copies_per_member).tolist(),
            "uniform_load": _uniform_load(backbone, router),
            "expert_member": [e // per_member for e in range(num_experts)],
            "dropped_fraction": float(np.mean(dropped)),
            "num_token_copies": int(n * tokens * m),
            "top_expert": best, "dropped": dropped}
        if router == "experts_choice":
            layer["experts_per_token"] = (np.bincount(
                token["num_experts"].ravel(), minlength=num_experts + 1)
                / token["num_experts"].size).tolist()
        if router == "soft":
            layer["top_expert_weight"] = token["top_expert_weight"]
            layer["mean_top_expert_weight"] = float(
                np.mean(token["top_expert_weight"]))
        layers[name] = layer
    return {"num_examples": int(n), "images": images, "layers": layers}


def model_inputs(model, images):
    """`images` as `model` takes them, as one float32 NumPy batch: raw
    images through the model's `preprocess` (its converter), a dataset's
    batches gathered."""
    preprocess = getattr(model, "preprocess", None)
    if preprocess is not None:
        images = preprocess(images)
    if hasattr(images, "element_spec"):  # a tf.data.Dataset
        batches = [b[0] if isinstance(b, tuple) else b
                   for b in images.as_numpy_iterator()]
        images = np.concatenate(batches) if batches else np.zeros((0,))
    return np.asarray(keras.ops.convert_to_numpy(images), np.float32)


def _numpy(x, dtype=None):
    return np.asarray(keras.ops.convert_to_numpy(x), dtype)


def _uniform_load(backbone, router):
    """An expert's load when the routing is perfectly balanced."""
    if router == "soft":
        return 1.0 / backbone.num_experts
    if router == "experts_choice":  # C of each group's S tokens
        mlp = backbone.moe_blocks[0].mlp
        return mlp.capacity / mlp.group_size
    m = backbone.ensemble_size
    return backbone.num_selected_experts / (backbone.num_experts / m)


def _router_outputs(backbone):
    """A function: images -> {block name: {key: routing intermediate}}
    (the `ROUTING_KEYS` of the backbone's router); jitted on JAX (eager
    JAX compiles every op of every new shape)."""
    keys = ROUTING_KEYS[getattr(backbone, "router", "top_k")]

    def route(images):
        with _no_grad():
            out = backbone.compute_intermediates(images)
        return {key.split("/", 1)[1]: {k: r[k] for k in keys}
                for key, r in out.items() if key.startswith("routing/")}

    if keras.backend.backend() != "jax":
        return route
    import jax

    variables = backbone.variables

    def stateless(values, images):
        with keras.StatelessScope(state_mapping=list(zip(variables,
                                                         values))):
            return route(images)

    jitted = jax.jit(stateless)
    return lambda images: jitted([v.value for v in variables], images)


def _no_grad():
    if keras.backend.backend() == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()


