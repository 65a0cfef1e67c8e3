"""Router load for the benchmarks: how many routed choices the experts keep,
and routers balanced as training balances them.

A freshly initialised router sends most tokens of the benchmark's random
images to a few experts (the tokens share a large common component): with
E³ S/32 about a quarter of the routed choices overflow the capacity and are
dropped, V-MoE S/32 a third. The gather path skips dropped tokens, so it
would be timed on less work than a trained model does, whose load loss
keeps the experts' loads even. `route(..., balance=True)` removes from
each router's kernel its response to the mean router input of the
benchmark images (for E³, per member), which spreads the tokens about
evenly over the experts: E³ S/32 then keeps about 98-100% of its choices,
V-MoE S/32 (K=2, capacity factor 1.05) about 90% with groups of 8 images.
"""

import contextlib

import numpy as np
from keras import ops

from keras_e3.layers.dispatch import top_experts_per_item


def centred_kernel(kernel, x, ensemble_size):
    """kernel [H, E] (or [H, M, E/M]) less its response to the mean of the
    router inputs x [G, S, H] (member m: group positions s*M + m), per
    member: W_m - mu_m (mu_m . W_m) / |mu_m|^2, so that mu_m . W_m = 0.
    Same shape and dtype as `kernel`."""
    kernel = np.asarray(kernel)
    shape, dtype, hidden = kernel.shape, kernel.dtype, x.shape[-1]
    kernel = kernel.astype(np.float64).reshape(hidden, ensemble_size, -1)
    tokens = np.asarray(x, dtype=np.float64).reshape(-1, ensemble_size,
                                                     hidden)
    for member in range(ensemble_size):
        mean = tokens[:, member].mean(axis=0)
        kernel[:, member] -= np.outer(mean, mean @ kernel[:, member]) / (
            mean @ mean)
    return kernel.reshape(shape).astype(dtype)


def kept_choices(gates, moe, valid=None):
    """(kept, routed): the (token, choice) pairs of gates [G, S, E] that fit
    the capacity of the MoeMlp `moe`, and all routed pairs."""
    _, position = top_experts_per_item(
        gates, moe.num_selected_experts, moe.batch_priority, valid)
    position = ops.convert_to_numpy(position)
    routed = position >= 0  # padding tokens have -1
    return int(np.sum(routed & (position < moe.capacity))), int(
        np.sum(routed))


@contextlib.contextmanager
def intercepted_routers(model, wrap):
    """Within the block, each MoE layer's router of `model` (this instance
    only) calls wrap(moe, router, call) instead of its own `call`, which
    `wrap` receives as `call`; the routers are restored on exit."""
    routers = [(block.mlp, block.mlp.router)
               for block in model.backbone.moe_blocks]
    for moe, router in routers:
        router.call = wrap(moe, router, router.call)
    try:
        yield
    finally:
        for _, router in routers:
            del router.call


def route(model, images, balance=False):
    """Runs `model` eagerly on `images` and returns the fraction of routed
    (token, choice) pairs its MoE layers keep. With `balance`, each router's
    kernel is first centred on its own inputs (`centred_kernel`), layer by
    layer in the one forward pass, so that each router sees the tokens of
    the balanced layers before it. Returns None for a dense model."""
    counts = []

    def wrap(moe, router, own_call):
        def call(x, valid=None, **kwargs):
            if balance:
                router.kernel.assign(centred_kernel(
                    ops.convert_to_numpy(router.kernel),
                    ops.convert_to_numpy(x), router.ensemble_size))
            gates, metrics = own_call(x, valid=valid, **kwargs)
            counts.append(kept_choices(gates, moe, valid))
            return gates, metrics
        return call

    with intercepted_routers(model, wrap):
        model(images, training=False)
    if not counts:
        return None
    kept, routed = np.sum(counts, axis=0)
    return float(kept / routed)
