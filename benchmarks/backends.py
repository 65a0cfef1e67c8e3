"""What a user gets on each backend: `predict_on_batch` of the S/32 models
with every setting at its default.

    KERAS_BACKEND=... python benchmarks/backends.py [--quick]
        [--models vit_s32 vmoe_s32 e3_s32] [--batch 32] [--repeats 5]
        [--out benchmarks/results/backends_<backend>.json]

The dense ViT, V-MoE and E³ S/32 of `dispatch_paths.py` (routing groups of
8 images, `dispatcher="auto"`, routers balanced on the benchmark images),
never compiled, so `predict_on_batch` runs as Keras' `jit_compile="auto"`
resolves for `E3ViT` (JAX: jit; TensorFlow: XLA, also on a CPU; PyTorch:
eager, under `no_grad`). The models' calls are timed interleaved (ViT,
V-MoE, E³, ViT, ...; medians). Each row has the useful GFLOP/s and, for
the MoE models, `throughput_vs_dense`: its images per second ÷ the dense
ViT's in the same run (the issue's "E³ ÷ dense" ratio). On TensorFlow, a
row `without_xla` times the same E³ with `jit_compile=False`, which is
what Keras' "auto" would give on a CPU-only machine. `run_all.py` runs
this once per backend, one after the other, and the report compares the
backends' rows. Prints JSON (and writes it with --out).
"""

import argparse
import functools

import numpy as np

from _common import backend
from _common import emit
from _common import emit_row
from _common import matmul_peak
from _common import run_info
from _common import timed_interleaved

MODEL_NAMES = ("vit_s32", "vmoe_s32", "e3_s32")
DENSE = "vit_s32"
# TensorFlow only: E³ with `jit_compile=False`, what Keras' own "auto"
# gives on a CPU-only machine (E3ViT resolves it to XLA).
WITHOUT_XLA = "e3_s32 without XLA"


def resolved_dispatcher(model, batch):
    """The dispatch path `dispatcher="auto"` runs on this backend, with its
    layout for inference ("gather (tiles)"; `gather_layout` asks the layer,
    which knows where the tiles are supported), or None for a dense
    model."""
    from dispatch_paths import gather_layout
    from keras_e3.layers.dispatch import resolve_dispatcher

    blocks = model.backbone.moe_blocks
    if not blocks:
        return None
    path = resolve_dispatcher(blocks[0].mlp.dispatcher)
    if path == "gather":
        path = f"gather ({gather_layout(model, batch)})"
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: batch 4, one repeat")
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES),
                        choices=MODEL_NAMES)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.repeats = 4, 1

    from keras import ops

    import keras_e3
    from dispatch_paths import MODELS
    from dispatch_paths import build
    from _routing import route

    rng = np.random.default_rng(0)
    images = ops.convert_to_tensor(
        rng.uniform(-1, 1, (args.batch, 224, 224, 3)).astype("float32"))
    peak_start = matmul_peak()
    models, rows = {}, {}
    for name in args.models:
        config = MODELS[name][0]
        moe = bool(config.get("num_experts"))
        (model,) = build(config, 1, "auto" if moe else None, 8)
        kept = route(model, images, balance=True)
        models[name] = model
        rows[name] = dict(
            model=name, batch=args.batch,
            images_per_group=8 if moe else None,
            dispatcher=resolved_dispatcher(model, args.batch),
            jit_compile=bool(model.jit_compile),
            kept_fraction=None if kept is None else round(float(kept), 4),
            gflops_per_image=round(keras_e3.count_flops(
                model, expert_tokens="routed")["flops"] / 1e9, 3))
    if backend() == "tensorflow" and "e3_s32" in models:
        # Keras' own "auto" on a CPU-only machine (no XLA), for comparison:
        # the same E³ weights in a second model.
        (plain,) = build(MODELS["e3_s32"][0], 1, "auto", 8)
        plain.set_weights(models["e3_s32"].get_weights())
        plain.jit_compile = False
        models[WITHOUT_XLA] = plain
        rows[WITHOUT_XLA] = dict(rows["e3_s32"], jit_compile=False,
                                 without_xla=True)
    timings = timed_interleaved(
        {name: functools.partial(model.predict_on_batch, images)
         for name, model in models.items()}, args.repeats)
    peak = max(peak_start, matmul_peak())
    for name, (seconds, first) in timings.items():
        row = rows[name]
        row.update(
            predict_ms=round(1e3 * seconds, 1),
            images_per_s=round(args.batch / seconds, 1),
            first_call_s=round(first, 1),
            useful_gflops_per_s=round(
                row["gflops_per_image"] * args.batch / seconds, 1))
        row["peak_fraction"] = round(row["useful_gflops_per_s"] / peak, 3)
    dense = rows.get(DENSE)
    for row in rows.values():
        if dense and row is not dense:
            row["throughput_vs_dense"] = round(
                row["images_per_s"] / dense["images_per_s"], 3)
        emit_row(row)
    result = run_info(benchmark="backends", quick=args.quick,
                      batch=args.batch, repeats=args.repeats,
                      routing="balanced",
                      matmul_peak_gflops_per_s=round(peak, 1),
                      matmul_peak_start_gflops_per_s=round(peak_start, 1),
                      rows=list(rows.values()))
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
