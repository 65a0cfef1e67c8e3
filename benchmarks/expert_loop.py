"""The training step's loop over the experts, unrolled or not (JAX): the
measurements behind `expert_tiles.UNROLL_UP_TO`.

    KERAS_BACKEND=jax python benchmarks/expert_loop.py [--quick]
        [--cases 4:420 8:420 8:212 16:212 16:420 32:108] [--repeats 10]
        [--out benchmarks/results/expert_loop_jax.json]

For each case E:bound (E experts, each with a segment of `bound` rows, at
S/32's width: H 512, MLP 2048), the gradient of one MoE layer's experts
(`expert_segments(..., differentiable=True)`, the training step's forward
pass and its hand-written backward) is compiled twice: with the loop over
the experts unrolled, and with the loop kept (`fori_loop`, as inference
runs). Each expert gets 70-100% of its bound (a balanced router's loads).
Reported: compile seconds, and the median of `repeats` calls timed
interleaved; `loop_over_unrolled` > 1 means unrolling is faster. Bounds:
V-MoE S/32 at batch 32 (4 groups of 400 tokens, K=2, capacity factor
1.05) gives about 420 rows per expert at E=8, 212 at E=16, 108 at E=32.
Prints JSON.
"""

import argparse
import time

import numpy as np

from _common import backend
from _common import block
from _common import emit
from _common import emit_row
from _common import run_info
from _common import timed_interleaved


def measure(num_experts, bound, repeats, hidden=512, mlp_dim=2048):
    import jax
    import jax.numpy as jnp

    import keras_e3.layers.expert_tiles as et
    from keras_e3.layers.dispatch import segment_sizes

    sizes = segment_sizes(bound)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(num_experts, bound, hidden)),
                    "float32")
    params = [jnp.asarray(rng.normal(size=shape), "float32") for shape in (
        (num_experts, hidden, mlp_dim), (num_experts, mlp_dim),
        (num_experts, mlp_dim, hidden), (num_experts, hidden))]
    counts = jnp.asarray(rng.integers(int(0.7 * bound), bound + 1,
                                      size=num_experts), "int32")

    def loss(x, *params):
        return jnp.sum(et.expert_segments(
            x, params, counts, sizes, differentiable=True) ** 2)

    calls, compile_s = {}, {}
    saved = et.UNROLL_UP_TO
    try:
        for name, limit in (("unrolled", num_experts), ("loop", -1)):
            et.UNROLL_UP_TO = limit
            start = time.perf_counter()
            compiled = jax.jit(jax.grad(loss, argnums=range(5))).lower(
                x, *params).compile()
            compile_s[name] = time.perf_counter() - start
            calls[name] = (lambda c=compiled: block(c(x, *params)))
    finally:
        et.UNROLL_UP_TO = saved
    times = timed_interleaved(calls, repeats)
    ms = {name: times[name][0] * 1e3 for name in calls}
    return {"experts": num_experts, "bound": bound,
            "branches": len(sizes),
            "compile_s": {k: round(v, 2) for k, v in compile_s.items()},
            "ms": {k: round(v, 1) for k, v in ms.items()},
            "loop_over_unrolled": round(ms["loop"] / ms["unrolled"], 3)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: two small cases, two repeats")
    parser.add_argument("--cases", nargs="+",
                        default=["4:420", "8:420", "8:212", "16:212",
                                 "16:420", "32:108"],
                        help="E:bound pairs")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if backend() != "jax":
        raise SystemExit("expert_loop.py measures JAX's compiled programs: "
                         "run it with KERAS_BACKEND=jax")
    cases = ["2:16", "4:24"] if args.quick else args.cases
    repeats = 2 if args.quick else args.repeats
    rows = []
    for case in cases:
        num_experts, bound = (int(v) for v in case.split(":"))
        rows.append(measure(num_experts, bound, repeats))
        emit_row(rows[-1])
    from keras_e3.layers.expert_tiles import UNROLL_UP_TO

    emit(run_info(benchmark="expert_loop", quick=args.quick,
                  repeats=repeats, unroll_up_to=UNROLL_UP_TO, rows=rows),
         args.out)


if __name__ == "__main__":
    main()
