"""How a model routes its tokens: per MoE block, each expert's load, the
dropped token copies, and each token's top expert (for the routing maps).

The routing is read from the model's own `compute_intermediates` (the
dispatch masks and gates that the MoE layers return), batch by batch as
`predict` routes them (same routing groups).
"""

import contextlib

import keras
import numpy as np

from keras_e3.layers.moe import ungroup


def routing_stats(model, images, batch_size=64):
    """Per-token routing of every MoE block over `images`.

    Returns {"num_examples": N, "layers": {block name: {...}}} where each
    block has "expert_load" [E] (fraction of the token copies of the
    expert's member dispatched to it; sums to K per member without drops),
    "expert_member" [E], "dropped_fraction" (token copies dispatched to no
    expert), "num_token_copies", and, as numpy arrays for the plots,
    "top_expert" [N, M, T] (the dispatched expert with the largest gate,
    -1 when dropped) and "dropped" [N, M, T]. Batches of `batch_size`
    images are routed as `predict` routes them (same routing groups).
    """
    backbone = model.backbone
    m = backbone.ensemble_size
    tokens = backbone.embedding.num_tokens
    num_experts = backbone.num_experts
    per_member = num_experts // m
    top, counts = {}, {}
    n = images.shape[0]
    route = _router_outputs(backbone)
    for start in range(0, n, int(batch_size)):
        batch = images[start:start + int(batch_size)]
        b = batch.shape[0]
        for name, (mask, gates) in route(batch).items():
            mask = np.asarray(keras.ops.convert_to_numpy(mask))
            gates = np.asarray(keras.ops.convert_to_numpy(gates), np.float64)
            # Routing groups [G, S, E(, C)] back to [B, M, T, E].
            served = ungroup(mask.any(-1), b * tokens * m, tokens, m)
            served = np.reshape(served, (b, m, tokens, num_experts))
            gates = np.reshape(ungroup(gates, b * tokens * m, tokens, m),
                               (b, m, tokens, num_experts))
            best = np.argmax(np.where(served, gates, -np.inf), axis=-1)
            best = np.where(served.any(-1), best, -1)
            top.setdefault(name, []).append(best)
            counts.setdefault(name, np.zeros(num_experts, np.int64))
            counts[name] += served.sum(axis=(0, 1, 2))
    layers = {}
    copies_per_member = n * tokens
    for name in top:
        best = np.concatenate(top[name])
        dropped = best < 0
        layers[name] = {
            "expert_load": (counts[name] / copies_per_member).tolist(),
            "expert_member": [e // per_member for e in range(num_experts)],
            "dropped_fraction": float(np.mean(dropped)),
            "num_token_copies": int(n * tokens * m),
            "top_expert": best, "dropped": dropped}
    return {"num_examples": int(n), "layers": layers}


def _router_outputs(backbone):
    """A function: images -> {block name: (dispatch_mask, gates)}; jitted
    on JAX (eager JAX compiles every op of every new shape)."""
    def route(images):
        with _no_grad():
            out = backbone.compute_intermediates(images)
        return {key.split("/", 1)[1]: (r["dispatch_mask"], r["gates"])
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


