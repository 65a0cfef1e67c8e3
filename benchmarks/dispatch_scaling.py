"""Dispatch micro-benchmark: time and memory of dispatch + combine alone.

    KERAS_BACKEND=jax python benchmarks/dispatch_scaling.py [--quick]
        [--experts] [--out benchmarks/results/dispatch_scaling_jax.json]

A fixed number of tokens (3200: a batch of 64 S/32 images; width 512)
is split into routing groups of S tokens (400 ... 3200) and routed to E
experts (8 ... 64) with K = 1 or 2 and capacity factor 1.0 or 1.5; the
router gates are random softmax inputs. For each dispatch path ("einsum",
the dense reference, "gather", the index-based fast path with capacity
buffers, and "tiles", the same with the tiled layout where it is smaller) one
compiled call routes the gates (`make_dispatcher`), dispatches the tokens
to the [E, G*C, H] expert buffers and combines them back to [G, S, H]
(identity experts; both are outputs): median time of repeated calls
(warm-up excluded) and, on JAX, the compiled memory (`memory_analysis()`:
deterministic, not affected by load): `dispatch_bytes` = temporary +
output bytes (the buffers, the combined tokens and the routing state).
`--experts` adds the time of the experts' MLP (H -> 4H -> H, GELU) on
the expert buffers, for scale: once per (E, K, cf), on the buffers of the
first group size (the slots, about tokens x K x cf, barely depend on S).

The summary compares each path's memory (and time) at the largest E with
the smallest for the same tokens (the issue's target: the fast path's
memory at E=64 within 2x of E=8). TensorFlow (XLA) and PyTorch (eager):
time only. Prints JSON. Not a test; compare rows of one run only.
"""

import argparse
import itertools

import keras
import numpy as np
from keras import ops

from _common import block
from _common import compile_call
from _common import emit
from _common import emit_row
from _common import run_info
from _common import timed
from keras_e3.layers.dispatch import TILE_SIZE
from keras_e3.layers.dispatch import compute_capacity
from keras_e3.layers.dispatch import gather_layout
from keras_e3.layers.dispatch import make_dispatcher
from keras_e3.layers.dispatch import tiles_supported

TOKENS = 3200
HIDDEN = 512
MEMORY_RATIO_LIMIT = 2.0
FULL = dict(group_sizes=(400, 800, 1600, 3200), experts=(8, 16, 32, 64),
            top_k=(1, 2), capacity_factors=(1.0, 1.5), repeats=3)
QUICK = dict(group_sizes=(400, 1600), experts=(8, 64), top_k=(2,),
             capacity_factors=(1.0,), repeats=2)


def round_trip(num_selected, capacity, implementation):
    """gates [G, S, E], x [G, S, H] -> (expert buffers [E, G*C, H],
    combined [G, S, H]). The buffers are returned so that they exist, as
    they must for real experts: otherwise XLA may fuse combine(dispatch(x))
    into one gather and never build them."""
    tiles = implementation == "tiles" and tiles_supported()

    def fn(gates, x):
        dispatcher = make_dispatcher(
            gates, num_selected, capacity,
            implementation="gather" if tiles else implementation,
            tile_size=TILE_SIZE if tiles else None)
        buffers = dispatcher.dispatch(x)
        return buffers, dispatcher.combine(buffers)
    return fn


def layout(num_selected, capacity, implementation, gates):
    """How a path stores the experts' input: "tiles" (rows sorted by
    expert, where that is smaller) or "buffers" ([E, G*C, H])."""
    if implementation != "tiles" or not tiles_supported():
        return "buffers"
    return gather_layout(*gates.shape, num_selected, capacity, TILE_SIZE)


def experts_mlp(buffers, w_in, w_out):
    """The experts' MLP on [E, T, H] buffers (stacked weights)."""
    hidden = keras.activations.gelu(ops.einsum("eth,ehf->etf", buffers,
                                               w_in))
    return ops.einsum("etf,efh->eth", hidden, w_out)


def inputs(rng, group_size, num_experts):
    groups = TOKENS // group_size
    logits = rng.normal(size=(groups, group_size, num_experts))
    gates = ops.softmax(ops.convert_to_tensor(logits.astype("float32")))
    x = rng.normal(size=(groups, group_size, HIDDEN)).astype("float32")
    return gates, ops.convert_to_tensor(x)


def time_call(fn, args, repeats):
    """(median ms, memory fields or None) of the compiled fn(*args)."""
    call, memory = compile_call(fn, *args)
    seconds, _ = timed(lambda: block(call(*args)), repeats)
    return round(1e3 * seconds, 2), memory


def time_experts(rng, num_experts, slots, repeats):
    """Median ms of the experts' MLP on [E, slots, H] buffers."""
    buffers, w_in, w_out = (ops.convert_to_tensor(
        scale * rng.normal(size=shape).astype("float32"))
        for scale, shape in (
            (1.0, (num_experts, slots, HIDDEN)),
            (0.02, (num_experts, HIDDEN, 4 * HIDDEN)),
            (0.02, (num_experts, 4 * HIDDEN, HIDDEN))))
    return time_call(experts_mlp, (buffers, w_in, w_out), repeats)[0]


def measure(rng, group_size, num_experts, top_k, factor, dispatchers,
            repeats, experts_ms=None):
    """The rows of one configuration, one per dispatch path.
    `experts_ms`: a dict caching the experts' time per (E, K, cf), or None
    for no experts column."""
    groups = TOKENS // group_size
    capacity = compute_capacity(group_size, num_experts, top_k, factor)
    gates, x = inputs(rng, group_size, num_experts)
    config = dict(group_size=group_size, groups=groups,
                  num_experts=num_experts, top_k=top_k,
                  capacity_factor=factor, capacity=capacity,
                  einsum_gflops=round(
                      4 * groups * group_size * num_experts * capacity
                      * HIDDEN / 1e9, 3))
    if experts_ms is not None:
        key = (num_experts, top_k, factor)
        if key not in experts_ms:
            experts_ms[key] = time_experts(rng, num_experts,
                                           groups * capacity, repeats)
        config["experts_ms"] = experts_ms[key]
    rows = []
    for implementation in dispatchers:
        ms, memory = time_call(
            round_trip(top_k, capacity, implementation), (gates, x), repeats)
        row = dict(config, dispatcher=implementation, ms=ms,
                   layout=layout(top_k, capacity, implementation, gates))
        if memory is not None:
            row.update(dispatch_bytes=memory["temp"] + memory["output"],
                       temp_bytes=memory["temp"],
                       output_bytes=memory["output"],
                       argument_bytes=memory["argument"])
        rows.append(row)
        emit_row(row)
    return rows


def expert_ratios(rows, small, large):
    """Per path and (S, K, cf): memory and time at E=large over E=small,
    and whether the memory stays within MEMORY_RATIO_LIMIT."""
    def key(row):
        return (row["dispatcher"], row["group_size"], row["top_k"],
                row["capacity_factor"])

    by_e = {(key(r), r["num_experts"]): r for r in rows}
    ratios = []
    for k in sorted({key(r) for r in rows}):
        a, b = by_e.get((k, small)), by_e.get((k, large))
        if a is None or b is None:
            continue
        entry = dict(zip(("dispatcher", "group_size", "top_k",
                          "capacity_factor"), k),
                     time_ratio=round(b["ms"] / a["ms"], 3))
        if "dispatch_bytes" in a:
            ratio = b["dispatch_bytes"] / a["dispatch_bytes"]
            entry.update(memory_ratio=round(ratio, 3),
                         memory_within_limit=ratio <= MEMORY_RATIO_LIMIT)
        ratios.append(entry)
    return ratios


def summary(rows, experts):
    small, large = min(experts), max(experts)
    ratios = expert_ratios(rows, small, large)
    fast = [r["memory_ratio"] for r in ratios
            if r["dispatcher"] in ("gather", "tiles")
            and "memory_ratio" in r]
    out = dict(experts_small=small, experts_large=large,
               memory_ratio_limit=MEMORY_RATIO_LIMIT,
               ratios_large_over_small=ratios)
    if fast:
        out.update(gather_memory_ratio_max=max(fast),
                   gather_memory_within_limit=max(fast)
                   <= MEMORY_RATIO_LIMIT)
    else:
        out["gather_memory_ratio_max"] = None  # memory not measured
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny grid (S 400/1600, E 8/64, K=2, cf 1.0)")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--experts", action="store_true",
                        help="also time the experts' MLP per configuration")
    parser.add_argument("--dispatchers", nargs="+",
                        default=["einsum", "gather", "tiles"],
                        help='"tiles": the gather path with its tiled '
                        'layout wherever that is smaller (as MoeMlp uses it)')
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    grid = QUICK if args.quick else FULL
    repeats = args.repeats or grid["repeats"]
    rng = np.random.default_rng(0)
    rows = []
    experts_ms = {} if args.experts else None
    for group_size, num_experts, top_k, factor in itertools.product(
            grid["group_sizes"], grid["experts"], grid["top_k"],
            grid["capacity_factors"]):
        rows += measure(rng, group_size, num_experts, top_k, factor,
                        args.dispatchers, repeats, experts_ms)
    result = run_info(
        benchmark="dispatch_scaling", quick=args.quick, tokens=TOKENS,
        hidden=HIDDEN, repeats=repeats,
        memory="compiled memory_analysis" if rows and "dispatch_bytes"
        in rows[0] else "not measured on this backend",
        rows=rows, summary=summary(rows, grid["experts"]))
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
