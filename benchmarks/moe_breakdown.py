"""Where an MoE layer's inference time goes, on JAX: router, dispatch
(routing positions, sort into row buckets, tiles or buffers, gather),
experts, combine.

    KERAS_BACKEND=jax python benchmarks/moe_breakdown.py [--quick]
        [--models e3_s32 vmoe_s32] [--batches 32 128] [--repeats 7]
        [--out benchmarks/results/moe_breakdown_jax.json]

For the first MoE layer of the S/32 models of `dispatch_paths.py`
(routing groups of 8 images, the default dispatch path) on random
normal tokens (whose loads are even), four compiled calls, each a prefix
of the layer's forward pass, timed interleaved (medians):
`router` (grouping and the router's gates), `+dispatch` (the dispatcher:
top-K, capacity positions, the row buckets', tiles' or buffers' layout,
and the gather of the tokens), `+experts` (the experts' MLP on those
rows) and `layer` (the whole layer: + combine and ungrouping). The stages are their
differences. `ideal_experts_ms` is the experts' MLP alone on exactly the
routed rows (G·S·K, split evenly over the experts, batched): what the
useful FLOPs cost at the experts' own matmul speed; `dense_mlp_ms` is
the same rows through one expert's MLP as a single [G·S·K, H] product,
the shape a dense model's MLP has: `ideal_over_dense` is what splitting
the rows into E smaller products costs by itself. Prints JSON.
"""

import numpy as np

from _common import emit
from _common import emit_row
from _common import jax_models_args
from _common import run_info
from _common import timed_interleaved

MODEL_NAMES = ("e3_s32", "vmoe_s32")
STAGES = ("router", "+dispatch", "+experts", "layer")


def prefixes(mlp):
    """{stage: fn(x)}: the layer's forward pass cut after each stage."""
    from keras_e3.layers.dispatch import make_dispatcher
    from keras_e3.layers.moe import ungroup

    def run(x, upto):
        groups, valid, num_tokens = mlp._to_groups(x)
        gates, _ = mlp.router(groups, valid=valid, training=False)
        if upto == "router":
            return gates
        dispatcher = make_dispatcher(
            gates, mlp.num_selected_experts, mlp.capacity,
            batch_priority=mlp.batch_priority, valid=valid,
            implementation=mlp.dispatcher, dtype=mlp.dispatch_dtype,
            tile_size=mlp.expert_tile_size(False, False),
            row_buckets=mlp.expert_row_buckets(False, False))
        rows = dispatcher.dispatch(groups)
        if upto == "+dispatch":
            return rows
        outputs = dispatcher.run_experts(mlp.experts, rows, training=False)
        if upto == "+experts":
            return outputs
        return ungroup(dispatcher.combine(outputs), num_tokens, x.shape[1],
                       mlp.ensemble_size)
    return {stage: (lambda x, s=stage: run(x, s)) for stage in STAGES}


def dense_mlp(experts, rows):
    """One expert's MLP (expert 0's weights) over all `rows` [N, H] as two
    unbatched matmuls: the same FLOPs as the experts on the routed rows,
    at the shape of a dense model's MLP, whose one [N, H] x [H, F] product
    is E times taller than each expert's."""
    from keras_e3.layers.expert_tiles import expert_mlp

    return expert_mlp(rows, *(w.value[0] for w in (
        experts.kernel_0, experts.bias_0, experts.kernel_1, experts.bias_1)))


def compiled(layer, fn, *args):
    """run(): fn(*args) jitted with the layer's weights as arguments."""
    import jax
    import keras

    variables = layer.variables
    values = [v.value for v in variables]

    def stateless(values, *args):
        with keras.StatelessScope(state_mapping=list(zip(variables,
                                                         values))):
            return fn(*args)
    call = jax.jit(stateless).lower(values, *args).compile()
    return lambda: jax.block_until_ready(call(values, *args))


def measure(name, batch, args):
    import keras

    from dispatch_paths import MODELS
    from dispatch_paths import TOKENS_PER_IMAGE
    from dispatch_paths import build

    (model,) = build(MODELS[name][0], 1, "auto", 8)
    mlp = model.backbone.moe_blocks[0].mlp
    rng = np.random.default_rng(0)
    x = keras.ops.convert_to_tensor(rng.normal(size=(
        batch * mlp.ensemble_size, TOKENS_PER_IMAGE,
        mlp.router.kernel.shape[0])).astype("float32"))
    routed = batch * mlp.ensemble_size * TOKENS_PER_IMAGE \
        * mlp.num_selected_experts
    ideal_rows = keras.ops.convert_to_tensor(rng.normal(size=(
        mlp.num_experts, routed // mlp.num_experts,
        x.shape[-1])).astype("float32"))
    runs = {stage: compiled(mlp, fn, x)
            for stage, fn in prefixes(mlp).items()}
    runs["ideal_experts"] = compiled(
        mlp, lambda r: mlp.experts(r, training=False), ideal_rows)
    runs["dense_mlp"] = compiled(
        mlp, lambda r: dense_mlp(mlp.experts, r),
        keras.ops.reshape(ideal_rows, (-1, x.shape[-1])))
    times = {k: 1e3 * v[0] for k, v in
             timed_interleaved(runs, args.repeats).items()}
    row = dict(model=name, batch=batch, images_per_group=8,
               dispatcher=mlp.dispatcher, layer="first MoE layer",
               **{f"{k.lstrip('+')}_prefix_ms": round(v, 2)
                  for k, v in times.items() if k in STAGES},
               router_ms=round(times["router"], 2),
               dispatch_ms=round(times["+dispatch"] - times["router"], 2),
               experts_ms=round(times["+experts"] - times["+dispatch"], 2),
               combine_ms=round(times["layer"] - times["+experts"], 2),
               layer_ms=round(times["layer"], 2),
               ideal_experts_ms=round(times["ideal_experts"], 2),
               dense_mlp_ms=round(times["dense_mlp"], 2))
    row["overhead_over_ideal_share"] = round(
        1 - row["ideal_experts_ms"] / row["layer_ms"], 3)
    row["ideal_over_dense"] = round(
        row["ideal_experts_ms"] / row["dense_mlp_ms"], 3)
    emit_row(row)
    return row


def main(argv=None):
    args = jax_models_args(argv, __doc__, "moe_breakdown.py", MODEL_NAMES,
                           MODEL_NAMES)
    rows = [measure(name, batch, args)
            for batch in args.batches for name in args.models]
    emit(run_info(benchmark="moe_breakdown", quick=args.quick,
                  repeats=args.repeats, rows=rows), args.out)


if __name__ == "__main__":
    main()
