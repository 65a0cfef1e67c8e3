"""E³ inference on JAX by the gather path's layout of the experts' rows:
row buckets (`BucketDispatcher`, the default for inference) against tiles
(`TiledDispatcher`, the layout of training), with the dense ViT in the
same interleaving for the useful-FLOP shares the issue compares.

    KERAS_BACKEND=jax python benchmarks/inference_layouts.py [--quick]
        [--models e3_s32 vmoe_s32] [--batches 32 128] [--repeats 7]
        [--out benchmarks/results/inference_layouts_jax.json]

Per batch: the dense ViT-S/32 and each MoE model of `--models` (the S/32
shapes of `dispatch_paths.py`, routing groups of 8 images, routers
balanced on the batch's images) once per layout, the same weights, their
compiled `predict` calls (`dispatch_paths.inference_call`) timed
interleaved (medians). Each row: its layout as the layers chose it
("buckets", "tiles" or "buffers": a layout that does not pay falls back),
`infer_ms`, the useful GFLOP/s and their share of a float32 matmul peak
measured in the same run (start and end, the higher), and
`share_gap_points`: the dense ViT's share minus the row's. Prints JSON.

Each model with one expert per token (K = 1: E³) also gets a row for its
twin with one expert per ensemble member (`one_expert_per_member`): the
same useful FLOPs in the same places (E³'s tiled tokens through the later
layers, the ensemble head), but each MoE layer a dense MLP per member on
exactly full buffers. Its gap to the ViT is what E³'s architecture costs;
the model's gap beyond the twin's is what routing each member's tokens
over its experts costs. With it, the dense ViT on M times the batch (the
rows E³'s tiled layers and head see), timed in the same interleaving
(`run_batch`: the batch of that interleaving; its gap is to the ViT at
that batch).
"""

import numpy as np

from _common import emit
from _common import emit_row
from _common import jax_models_args
from _common import matmul_peak
from _common import run_info
from dispatch_paths import MODELS
from dispatch_paths import build
from dispatch_paths import gather_layout
from dispatch_paths import inference_call
from dispatch_paths import measure
from dispatch_paths import routing

LAYOUTS = ("buckets", "tiles")
TWIN = "{}_one_expert_per_member"


def one_expert_per_member(config):
    """The twin of a K = 1 config: one expert per ensemble member and room
    for every token (capacity factor 1, no rounding), so each member's
    tokens all go through that expert, the capacity buffers exactly full."""
    return dict(config, num_experts=config.get("ensemble_size", 1),
                capacity_factor=1.0, capacity_multiple_of=1)


def with_layout(models, layout):
    """`models` with their MoE layers' inference set to `layout`."""
    for model in models:
        for block in model.backbone.moe_blocks:
            block.mlp.row_buckets = layout == "buckets"
    return models


def rows_for(batch, names, repeats):
    import keras_e3

    images = np.random.default_rng(batch).normal(
        size=(batch, 224, 224, 3)).astype("float32")
    models = {("vit_s32", "-"): build(MODELS["vit_s32"][0], 1, "-", None)}
    for name in names:
        first = build(MODELS[name][0], 1, "gather", 8)
        models[(name, LAYOUTS[0])] = with_layout(first, LAYOUTS[0])
        for layout in LAYOUTS[1:]:
            models[(name, layout)] = with_layout(
                build(MODELS[name][0], 1, "gather", 8), layout)
        # The same balanced routers and weights for every layout.
        routing({"gather": first, **{layout: models[(name, layout)]
                                     for layout in LAYOUTS[1:]}},
                images, "balanced")
        if MODELS[name][0].get("num_selected_experts", 1) == 1:
            models[(TWIN.format(name), "twin")] = build(
                one_expert_per_member(MODELS[name][0]), 1, "gather", 8)
    batches = {key: batch for key in models}
    calls = {key: (lambda m=m: inference_call(m, images))
             for key, m in models.items()}
    members = max(MODELS[name][0].get("ensemble_size", 1) for name in names)
    if members > 1:
        wide = ("vit_s32", f"x{members}")
        models[wide], batches[wide] = models[("vit_s32", "-")], \
            batch * members
        calls[wide] = lambda: inference_call(
            models[wide], np.concatenate([images] * members))
    timings = measure(calls, repeats, "infer", batch)
    rows = []
    for (name, layout), (fields, seconds) in timings.items():
        model, rows_batch = models[(name, layout)][0], batches[(name, layout)]
        useful = keras_e3.count_flops(model, expert_tokens="routed")["flops"]
        rate = useful / 1e9 * rows_batch / seconds
        dense = not model.backbone.moe_blocks
        fields["infer_images_per_s"] = round(rows_batch / seconds, 1)
        rows.append(dict(
            model=name, batch=rows_batch, run_batch=batch,
            images_per_group=None if dense else 8,
            layout="-" if dense else gather_layout(model, batch),
            gflops_per_image=round(useful / 1e9, 3), **fields,
            infer_useful_gflops_per_s=round(rate, 1)))
    return rows


def add_shares(rows, peak):
    """Each row's share of `peak` and its gap to the dense ViT's share in
    the same run (`run_batch`, else `batch`: that batch's interleaving),
    in points."""
    def run(row):
        return row.get("run_batch", row["batch"])

    for row in rows:
        row["infer_share_of_peak"] = round(
            row["infer_useful_gflops_per_s"] / peak, 4)
    for row in rows:
        dense = next(r["infer_share_of_peak"] for r in rows
                     if r["layout"] == "-" and r["batch"] == run(r) == run(row))
        row["share_gap_points"] = round(
            100 * (dense - row["infer_share_of_peak"]), 1)
        emit_row(row)
    return rows


def main(argv=None):
    top_k_models = [name for name, (config, members, _) in MODELS.items()
                    if config.get("num_experts") and members == 1
                    and not config.get("router")]
    args = jax_models_args(argv, __doc__, "inference_layouts.py",
                           top_k_models, ["e3_s32"])
    peak_start = matmul_peak()
    rows = []
    for batch in args.batches:
        rows += rows_for(batch, args.models, args.repeats)
    peak_end = matmul_peak()
    peak = max(peak_start, peak_end)
    add_shares(rows, peak)
    emit(run_info(benchmark="inference_layouts", quick=args.quick,
                  matmul_peak_gflops_per_s=round(peak, 1),
                  matmul_peak_start_gflops_per_s=round(peak_start, 1),
                  matmul_peak_end_gflops_per_s=round(peak_end, 1),
                  repeats=args.repeats, routing="balanced", rows=rows),
         args.out)


if __name__ == "__main__":
    main()
