"""Renders the benchmark JSONs as Markdown tables into PERFORMANCE.md.

    python benchmarks/report.py [--quick] [--results-dir benchmarks/results]
        [--doc PERFORMANCE.md] [--print]

Reads `dispatch_paths_<backend>.json`, `dispatch_scaling_<backend>.json`,
`overhead_jax.json`, `moe_breakdown_jax.json`, `backends_<backend>.json`
and `run_all.json` (whichever exist) from benchmarks/results/ (--quick:
benchmarks/results/quick/, the smoke run's) and replaces the text
between the markers `<!-- results:start -->` and `<!-- results:end -->`
of the document (--print: print it instead). Every comparison (fast
path vs einsum, a backend vs JAX, E³ vs the deep ensemble, memory at
E=64 vs E=8) and every target's status is computed here from the JSON,
nothing by hand.
"""

import argparse
import json
import os

from _common import ROOT

HERE = os.path.dirname(os.path.abspath(__file__))
BACKENDS = ("jax", "tensorflow", "torch")
NAMES = {"jax": "JAX", "tensorflow": "TensorFlow (XLA)",
         "torch": "PyTorch (eager)", "vit_s32": "ViT S/32",
         "vmoe_s32": "V-MoE S/32", "e3_s32": "E³ S/32",
         "e3_s32_one_expert_per_member": "E³ S/32, one expert per member",
         "de2_vmoe_s32": "2 × V-MoE S/32 (deep ensemble)",
         "ec_s32": "Experts Choice S/32", "soft_s32": "Soft MoE S/32"}
START, END = "<!-- results:start -->", "<!-- results:end -->"
DASH = "–"


def load(results_dir, name):
    """{backend: result} of the `<name>_<backend>.json` files."""
    out = {}
    for backend in BACKENDS:
        path = os.path.join(results_dir, f"{name}_{backend}.json")
        if os.path.exists(path):
            with open(path) as f:
                out[backend] = json.load(f)
    return out


def num(x, digits=None):
    """Compact number: 3 significant digits below 100, else an integer."""
    if x is None:
        return DASH
    if digits is not None:
        return f"{x:.{digits}f}"
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def mib(n):
    return DASH if n is None else f"{n / 2 ** 20:.1f}"


def ratio(a, b):
    return None if a is None or b is None or not b else a / b


def times(x):
    return DASH if x is None else f"{x:.2f}×"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def key(row):
    return (row["model"], row["batch"], row.get("images_per_group"),
            row["dispatcher"])


def group_label(row):
    return row.get("images_per_group") or DASH


def dispatch_label(row):
    if row["dispatcher"] == "-":
        return DASH
    layout = row.get("gather_layout")
    return f"gather ({layout})" if layout else row["dispatcher"]


def runs_table(paths, scaling, durations, overhead=None, breakdown=None,
               backends=None, layouts=None):
    seconds = {(d["script"], d["backend"]): d["seconds"]
               for d in durations.get("steps", [])}
    rows = []
    for label, results, script in (("dispatch_paths", paths,
                                    "dispatch_paths.py"),
                                   ("dispatch_scaling", scaling,
                                    "dispatch_scaling.py"),
                                   ("overhead", overhead or {},
                                    "overhead.py"),
                                   ("moe_breakdown", breakdown or {},
                                    "moe_breakdown.py"),
                                   ("backends", backends or {},
                                    "backends.py"),
                                   ("inference_layouts", layouts or {},
                                    "inference_layouts.py")):
        for backend, r in results.items():
            rows.append([label, NAMES[backend],
                         r.get("backend_version") or DASH, r.get("keras"),
                         r.get("device_kind", DASH),
                         r.get("dtype_policy", "float32"),
                         r.get("cpus"), num(r.get("load_average_1min")),
                         num(r.get("matmul_peak_gflops_per_s")),
                         r.get("routing", DASH), r.get("repeats"),
                         r.get("train_repeats", DASH),
                         num(seconds.get((script, backend)))])
    return table(["benchmark", "backend", "version", "Keras", "device",
                  "dtype policy", "CPUs",
                  "load (1 min) at end", "matmul peak GFLOP/s",
                  "routers", "repeats", "train repeats", "run s"], rows)


def paths_table(result):
    rows = []
    for r in result["rows"]:
        rate = r.get("infer_useful_gflops_per_s")
        share = r.get("infer_peak_fraction")
        kept = r.get("kept_fraction")
        rows.append([
            NAMES.get(r["model"], r["model"]), r["batch"], group_label(r),
            dispatch_label(r), num(r["gflops_per_image"], 2),
            num(r.get("gflops_per_image_capacity"), 2),
            DASH if kept is None else f"{100 * kept:.1f}%",
            num(r["infer_ms"]), num(r["infer_images_per_s"]),
            f"{num(rate)} ({100 * share:.0f}%)" if share else DASH,
            num(r.get("train_ms")), mib(r.get("infer_peak_bytes")),
            mib(r.get("train_peak_bytes"))])
    return table(["model", "batch", "images / group", "dispatch",
                  "useful GFLOPs/img", "GFLOPs/img with capacity slots",
                  "choices kept", "inference ms", "images/s",
                  "useful GFLOP/s (of peak)", "train step ms",
                  "inference peak MiB", "train step peak MiB"], rows)


def speedups(paths):
    """Rows (backend, model, batch, group, infer, train): einsum / gather."""
    out = []
    for backend, result in paths.items():
        rows = {key(r): r for r in result["rows"]}
        for (model, batch, group, dispatcher), r in rows.items():
            if dispatcher != "gather":
                continue
            ref = rows.get((model, batch, group, "einsum"))
            if ref:
                out.append((backend, model, batch, group,
                            ratio(ref["infer_ms"], r["infer_ms"]),
                            ratio(ref.get("train_ms"), r.get("train_ms"))))
    return out


def speedups_table(paths):
    return table(["backend", "model", "batch", "images / group",
                  "inference", "train step"],
                 [[NAMES[b], NAMES.get(m, m), batch, g, times(i), times(t)]
                  for b, m, batch, g, i, t in speedups(paths)])


def backends_table(paths):
    """Each backend's time over JAX's for the same row."""
    if "jax" not in paths:
        return "No JAX results to compare with."
    jax_rows = {key(r): r for r in paths["jax"]["rows"]}
    others = [b for b in paths if b != "jax"]
    rows = []
    for backend in others:
        for r in paths[backend]["rows"]:
            ref = jax_rows.get(key(r))
            if ref is None:
                continue
            rows.append([NAMES[backend], NAMES.get(r["model"], r["model"]),
                         r["batch"], group_label(r), dispatch_label(r),
                         num(ref["infer_ms"]), num(r["infer_ms"]),
                         times(ratio(r["infer_ms"], ref["infer_ms"])),
                         num(ref.get("train_ms")), num(r.get("train_ms")),
                         times(ratio(r.get("train_ms"), ref.get("train_ms")))])
    return table(["backend", "model", "batch", "images / group", "dispatch",
                  "JAX inference ms", "inference ms", "÷ JAX",
                  "JAX train ms", "train ms", "÷ JAX"], rows)


def ensemble_table(paths):
    """E³ vs the 2-model deep ensemble of V-MoE, same batch and dispatch.
    A training step of the ensemble is two independent V-MoE steps: when
    not measured it is shown as 2 × V-MoE's (marked *)."""
    rows, derived = [], False
    for backend, result in paths.items():
        by_key = {key(r): r for r in result["rows"]}
        for (model, batch, group, dispatcher), de in by_key.items():
            e3 = by_key.get(("e3_s32", batch, group, dispatcher))
            if model != "de2_vmoe_s32" or e3 is None:
                continue
            vmoe = by_key.get(("vmoe_s32", batch, group, dispatcher), {})
            train = de.get("train_ms")
            train_text = num(train)
            if train is None and vmoe.get("train_ms"):
                train, derived = 2 * vmoe["train_ms"], True
                train_text = num(train) + "*"
            rows.append([NAMES[backend], batch, group, dispatcher,
                         num(e3["gflops_per_image"], 2),
                         num(de["gflops_per_image"], 2),
                         num(e3["infer_ms"]), num(de["infer_ms"]),
                         times(ratio(de["infer_ms"], e3["infer_ms"])),
                         num(e3.get("train_ms")), train_text,
                         times(ratio(train, e3.get("train_ms")))])
    text = table(["backend", "batch", "images / group", "dispatch",
                  "E³ GFLOPs/img", "DE-2 GFLOPs/img", "E³ inference ms",
                  "DE-2 inference ms", "DE-2 ÷ E³", "E³ train ms",
                  "DE-2 train ms", "DE-2 ÷ E³"], rows)
    if derived:
        text += ("\n\n\\* not measured: two independent V-MoE training "
                 "steps, 2 × the V-MoE row.")
    return text


def scaling_table(result):
    rows = {}
    for r in result["rows"]:
        rows.setdefault((r["group_size"], r["num_experts"], r["top_k"],
                         r["capacity_factor"]), {})[r["dispatcher"]] = r
    out = []
    for (s, e, k, cf), paths in sorted(rows.items()):
        einsum, gather = paths.get("einsum", {}), paths.get("gather", {})
        tiles = paths.get("tiles", {})
        first = einsum or gather or tiles
        out.append([s, e, k, cf, first["capacity"], num(einsum.get("ms")),
                    num(gather.get("ms")),
                    times(ratio(einsum.get("ms"), gather.get("ms"))),
                    f"{num(tiles.get('ms'))} ({tiles['layout']})"
                    if tiles else DASH,
                    mib(einsum.get("dispatch_bytes")),
                    mib(gather.get("dispatch_bytes")),
                    mib(tiles.get("dispatch_bytes")),
                    num(first.get("experts_ms"))])
    return table(["tokens / group S", "experts E", "K", "cf", "capacity C",
                  "einsum ms", "gather ms", "speedup",
                  "gather, tiles ms (layout)", "einsum MiB", "gather MiB",
                  "gather, tiles MiB", "experts' MLP ms"], out)


def memory_ratio_table(result):
    summary = result["summary"]
    rows = [[r["dispatcher"], r["group_size"], r["top_k"],
             r["capacity_factor"], times(r.get("memory_ratio")),
             times(r.get("time_ratio")),
             {True: "yes", False: "no"}.get(r.get("memory_within_limit"),
                                             DASH)]
            for r in summary["ratios_large_over_small"]]
    large, small = summary["experts_large"], summary["experts_small"]
    return table(["dispatch", "tokens / group S", "K", "cf",
                  f"memory E={large} ÷ E={small}",
                  f"time E={large} ÷ E={small}",
                  f"memory within {summary['memory_ratio_limit']:g}×"], rows)


def gather_memory_ratio(paths, scaling):
    """The largest fast-path memory ratio E=64 / E=8 over the grid."""
    summary = scaling.get("jax", {}).get("summary", {})
    if summary.get("experts_small") != 8 or \
            summary.get("experts_large") != 64:
        return None
    return summary.get("gather_memory_ratio_max")


def _row(paths, backend, model, batch, group, dispatcher):
    for r in paths.get(backend, {}).get("rows", []):
        if key(r) == (model, batch, group, dispatcher):
            return r
    return {}


def _speedup(batch, group, field):
    """einsum ÷ gather for E³ S/32 on JAX (inference or training)."""
    def metric(paths, scaling):
        einsum = _row(paths, "jax", "e3_s32", batch, group, "einsum")
        gather = _row(paths, "jax", "e3_s32", batch, group, "gather")
        return ratio(einsum.get(field), gather.get(field))
    return metric


def _utilisation(paths, scaling):
    return _row(paths, "jax", "e3_s32", 128, 8, "gather").get(
        "infer_peak_fraction")


def _tf_over_jax(paths, scaling):
    """TensorFlow (XLA) ÷ JAX, E³ S/32 inference, the default (gather)."""
    jax_rows = [_row(paths, "jax", "e3_s32", b, 8, "gather")
                for b in (128, 32)]
    tf_rows = [_row(paths, "tensorflow", "e3_s32", b, 8, "gather")
               for b in (128, 32)]
    for j, t in zip(jax_rows, tf_rows):
        if j and t:
            return ratio(t["infer_ms"], j["infer_ms"])
    return None


def _share_gap(paths, scaling):
    """The dense ViT S/32's useful-FLOP share of the matmul peak less
    E³ S/32's (gather, groups of 8 images), JAX inference, the larger of
    batch 32 and 128 (in points of the peak)."""
    gaps = []
    for batch in (32, 128):
        dense = _row(paths, "jax", "vit_s32", batch, None, "-")
        e3 = _row(paths, "jax", "e3_s32", batch, 8, "gather")
        if dense.get("infer_peak_fraction") and e3.get(
                "infer_peak_fraction"):
            gaps.append(100 * (dense["infer_peak_fraction"]
                               - e3["infer_peak_fraction"]))
    return max(gaps) if gaps else None


def _torch_reported(paths, scaling):
    row = _row(paths, "torch", "e3_s32", 128, 8, "einsum") or \
        _row(paths, "torch", "e3_s32", 32, 8, "einsum")
    return row.get("infer_ms")


def points(value):
    return f"{value:.1f} points"


# (target, metric(paths, scaling) -> value or None, test, format): `paths`
# and `scaling` are {backend: result JSON}; met when test(value).
TARGETS = [
    ("E³ S/32 inference, JAX, batch 128, groups of 8 images: gather ≥ 1.3× "
     "einsum", _speedup(128, 8, "infer_ms"), lambda v: v >= 1.3, times),
    ("E³ S/32 inference, JAX, batch 128, groups of 8: useful GFLOP/s ≥ 80% "
     "of the matmul peak", _utilisation, lambda v: v >= 0.8,
     lambda v: f"{100 * v:.0f}%"),
    ("E³ S/32 inference, JAX, batch 32 in one routing group: gather ≥ 2× "
     "einsum", _speedup(32, 32, "infer_ms"), lambda v: v >= 2.0, times),
    ("E³ S/32 inference, TensorFlow (XLA) within 1.25× of JAX (gather, "
     "groups of 8; batch 128, else 32)", _tf_over_jax, lambda v: v <= 1.25,
     times),
    ("E³ S/32 inference, JAX, groups of 8: useful-FLOP share of the "
     "matmul peak within 3 points of the dense ViT S/32's (the larger gap "
     "of batch 32 and 128; `dispatch_paths.py`'s run)", _share_gap,
     lambda v: v <= 3.0, points),
    ("E³ S/32 on PyTorch runs and is reported (eager, einsum, groups of 8; "
     "ms per batch)", _torch_reported, lambda v: v > 0, num),
    ("E³ S/32 training step, JAX, groups of 8: gather ≥ 1.3× einsum "
     "(batch 32)", _speedup(32, 8, "train_ms"), lambda v: v >= 1.3, times),
    ("Fast-path (gather) dispatch + combine memory at E=64 within 2× of "
     "E=8 for the same tokens (JAX compiled memory; the largest ratio "
     "over the measured S, K, cf)",
     gather_memory_ratio, lambda v: v <= 2.0, times),
]


def _overhead_ratio(part, field="ratio"):
    """The largest Keras ÷ bare ratio of `part` over the overhead rows
    (`field`: "ratio" of the medians, "min_ratio" of the fastest calls)."""
    def metric(overhead):
        values = [r[f"{part}_{field}"] for r in
                  overhead.get("jax", {}).get("rows", [])
                  if f"{part}_{field}" in r]
        return max(values) if values else None
    return metric


# As TARGETS, metric(overhead) with overhead = {backend: result} of
# overhead.py.
OVERHEAD_TARGETS = [
    ("JAX, S/32 models, batch 32: `train_on_batch` (compile() defaults, "
     "SGD) within 5% of a bare jitted value_and_grad + SGD step (the "
     "largest ratio over ViT, V-MoE, E³; timed)", _overhead_ratio("train"),
     lambda v: v <= 1.05, times),
    ("JAX, S/32 models, batch 32: `predict_on_batch` within 5% of a jitted "
     "`stateless_call` (the largest ratio; timed)", _overhead_ratio("infer"),
     lambda v: v <= 1.05, times),
    ("The same two, the ratio of the fastest calls (the least disturbed "
     "on a loaded machine): `train_on_batch`",
     _overhead_ratio("train", "min_ratio"), lambda v: v <= 1.05, times),
    ("… and `predict_on_batch`, fastest calls",
     _overhead_ratio("infer", "min_ratio"), lambda v: v <= 1.05, times),
]


def _backends_row(backends, backend, model):
    for row in backends.get(backend, {}).get("rows", []):
        if row["model"] == model and not row.get("without_xla"):
            return row
    return {}


def _predict_over_jax(backends):
    """TensorFlow's `predict_on_batch` time ÷ JAX's, E³ S/32."""
    return ratio(_backends_row(backends, "tensorflow", "e3_s32").get(
        "predict_ms"), _backends_row(backends, "jax", "e3_s32").get(
        "predict_ms"))


def _e3_vs_dense_torch_over_jax(backends):
    """PyTorch's E³ ÷ dense throughput ratio ÷ JAX's."""
    return ratio(*(_backends_row(backends, b, "e3_s32").get(
        "throughput_vs_dense") for b in ("torch", "jax")))


# As TARGETS, metric(backends) with backends = {backend: result} of
# backends.py (`predict_on_batch`, defaults, batch 32).
BACKENDS_TARGETS = [
    ("E³ S/32 `predict_on_batch` at batch 32 (every setting at its "
     "default): TensorFlow within 1.25× of JAX's time", _predict_over_jax,
     lambda v: v <= 1.25, times),
    ("… PyTorch's E³ ÷ dense ViT throughput ratio at JAX's (PyTorch's "
     "ratio ÷ JAX's ≥ 1)", _e3_vs_dense_torch_over_jax,
     lambda v: v >= 1.0, times),
]


def backends_predict_table(backends):
    rows = []
    for backend, result in backends.items():
        for r in result["rows"]:
            jax_row = _backends_row(backends, "jax", r["model"])
            jit = "yes" if r["jit_compile"] else "no"
            if r.get("without_xla"):
                jit = "no (set: Keras' own \"auto\" on a CPU)"
            rows.append([
                NAMES[backend], NAMES.get(r["model"], r["model"]),
                r["batch"], r["dispatcher"] or DASH, jit,
                num(r["predict_ms"]),
                num(r["images_per_s"]),
                times(ratio(r["predict_ms"], jax_row.get("predict_ms"))),
                f"{100 * r['peak_fraction']:.0f}%",
                num(r.get("throughput_vs_dense"), 2)])
    return table(["backend", "model", "batch", "dispatch (auto)",
                  "jit_compile (auto)", "ms", "images / s", "÷ JAX (time)",
                  "useful share of the backend's matmul peak",
                  "images / s ÷ dense ViT's"], rows)


def overhead_table(result):
    rows = []
    for r in result["rows"]:
        for part, name in (("infer", "predict_on_batch"),
                           ("train", "train_on_batch")):
            if f"{part}_ratio" not in r:
                continue
            rows.append([
                NAMES.get(r["model"], r["model"]), r["batch"],
                group_label(r), name, num(r[f"{part}_keras_ms"]),
                num(r[f"{part}_bare_ms"]), times(r[f"{part}_ratio"]),
                times(r.get(f"{part}_min_ratio")),
                num(r.get(f"{part}_flops_ratio"), 4),
                num(r.get(f"{part}_bytes_ratio"), 4),
                num(r.get(f"{part}_host_ms"), 1),
                num(r.get(f"{part}_host_ratio"), 4)])
    return table(["model", "batch", "images / group", "Keras call",
                  "Keras ms", "bare ms", "Keras ÷ bare (medians)",
                  "Keras ÷ bare (fastest calls)",
                  "compiled FLOPs Keras ÷ bare",
                  "compiled bytes Keras ÷ bare",
                  "Keras host ms per call (tiny model)",
                  "ratio implied by the host time"], rows)


def breakdown_table(result):
    rows = []
    for r in result["rows"]:
        def share(ms, layer=r["layer_ms"]):
            return f"{num(ms)} ({100 * ms / layer:.0f}%)"
        rows.append([NAMES.get(r["model"], r["model"]), r["batch"],
                     r["images_per_group"], share(r["router_ms"]),
                     share(r["dispatch_ms"]), share(r["experts_ms"]),
                     share(r["combine_ms"]), num(r["layer_ms"]),
                     num(r["ideal_experts_ms"]),
                     f"{100 * r['overhead_over_ideal_share']:.0f}%",
                     num(r.get("dense_mlp_ms")),
                     times(r.get("ideal_over_dense"))])
    return table(["model", "batch", "images / group", "router ms",
                  "dispatch ms (positions, layout, gather)", "experts ms",
                  "combine ms", "layer ms", "experts on the routed rows "
                  "alone ms", "layer time beyond that",
                  "the same rows through one dense MLP ms",
                  "routed rows alone ÷ one dense MLP"], rows)


def layouts_table(result):
    """inference_layouts.py: E³'s inference by layout beside the dense
    ViT, with the useful-FLOP shares and their gaps."""
    rows = [[NAMES.get(r["model"], r["model"]), r["batch"],
             r.get("run_batch", r["batch"]), r["layout"],
             num(r["infer_ms"]), num(r["infer_useful_gflops_per_s"]),
             f"{100 * r['infer_share_of_peak']:.1f}%",
             num(r["share_gap_points"])] for r in result["rows"]]
    return table(["model", "batch", "timed with the batch-N run", "layout",
                  "ms", "useful GFLOP/s", "share of the matmul peak",
                  "points behind that run's ViT"], rows)


def _layouts_gap(model, layout):
    """The larger gap, in points, of `model`'s rows (layout `layout`, None:
    any) to the dense ViT of their own run in inference_layouts.py (JAX),
    over the runs (batch 32 and 128)."""
    def metric(layouts):
        gaps = [r["share_gap_points"] for r in
                layouts.get("jax", {}).get("rows", [])
                if r["model"] == model and layout in (None, r["layout"])
                and r["batch"] == r.get("run_batch", r["batch"])]
        return max(gaps) if gaps else None
    return metric


# As TARGETS, metric(layouts) with layouts = {backend: result} of
# inference_layouts.py; a test of None: reported, no target of its own.
LAYOUTS_TARGETS = [
    ("E³ S/32 inference, JAX, groups of 8, on its default layout (row "
     "buckets): useful-FLOP share within 3 points of the dense ViT S/32's "
     "timed in the same interleaving (`inference_layouts.py`; the larger "
     "gap of batch 32 and 128)", _layouts_gap("e3_s32", "buckets"),
     lambda v: v <= 3.0, points),
    ("… the same for E³'s twin with one expert per member (the same useful "
     "FLOPs and architecture, no routing over 8 experts): what E³'s "
     "architecture costs against the ViT",
     _layouts_gap("e3_s32_one_expert_per_member", None), None, points),
]


def targets_table(paths, scaling, overhead=None, backends=None,
                  layouts=None):
    rows = []
    targets = [(text, lambda p, s, m=metric: m(p, s), test, fmt)
               for text, metric, test, fmt in TARGETS]
    targets += [(text, lambda p, s, m=metric: m(overhead or {}), test, fmt)
                for text, metric, test, fmt in OVERHEAD_TARGETS]
    targets += [(text, lambda p, s, m=metric: m(backends or {}), test, fmt)
                for text, metric, test, fmt in BACKENDS_TARGETS]
    targets += [(text, lambda p, s, m=metric: m(layouts or {}), test, fmt)
                for text, metric, test, fmt in LAYOUTS_TARGETS]
    for text, metric, test, fmt in targets:
        value = metric(paths, scaling)
        status = DASH if value is None or test is None else (
            "met" if test(value) else "not met")
        rows.append([text, "not measured" if value is None else fmt(value),
                     status])
    return table(["target", "measured", "status"], rows)


def render(results_dir, quick):
    paths = load(results_dir, "dispatch_paths")
    scaling = load(results_dir, "dispatch_scaling")
    overhead = load(results_dir, "overhead")
    breakdown = load(results_dir, "moe_breakdown")
    backends = load(results_dir, "backends")
    layouts = load(results_dir, "inference_layouts")
    durations = {}
    run_all = os.path.join(results_dir, "run_all.json")
    if os.path.exists(run_all):
        with open(run_all) as f:
            durations = json.load(f)
    files = os.path.relpath(os.path.join(results_dir, "*.json"), ROOT)
    parts = [f"Generated by `python benchmarks/report.py"
             f"{' --quick' if quick else ''}` from `{files}`."]
    if quick:
        parts.append(
            "**Quick smoke run** (`run_all.py --quick`: batch 8, one "
            "repeat, a tiny scaling grid, on a shared machine): it shows "
            "that every step runs and what the tables hold. Its times are "
            "not performance results.")
    parts += ["### Runs", runs_table(paths, scaling, durations, overhead,
                                         breakdown, backends, layouts),
              "### Targets", targets_table(paths, scaling, overhead,
                                           backends, layouts)]
    if backends:
        parts += ["### `predict_on_batch` by backend (every setting at its "
                  "default, run one backend after the other)",
                  backends_predict_table(backends)]
    for backend, result in overhead.items():
        parts += [f"### Keras' overhead, {NAMES[backend]}: Keras' calls vs "
                  "bare jitted ones on the same model",
                  overhead_table(result)]
    for backend, result in breakdown.items():
        parts += [f"### An MoE layer's inference time by stage, "
                  f"{NAMES[backend]} (first MoE layer, calls interleaved)",
                  breakdown_table(result)]
    for backend, result in layouts.items():
        parts += [f"### E³ inference by the experts' row layout, "
                  f"{NAMES[backend]} (routing groups of 8 images, calls "
                  f"interleaved with the dense ViT's)",
                  layouts_table(result)]
    for backend, result in paths.items():
        parts += [f"### Models, {NAMES[backend]}", paths_table(result)]
    parts += ["### Fast path (gather) speedup over einsum, "
              "einsum ms ÷ gather ms", speedups_table(paths),
              "### Backends compared with JAX (same rows)",
              backends_table(paths),
              "### E³ vs a deep ensemble of two V-MoE (DE-2)",
              ensemble_table(paths)]
    for backend, result in scaling.items():
        parts += [f"### Dispatch micro-benchmark, {NAMES[backend]} "
                  f"({result['tokens']} tokens, width {result['hidden']}; "
                  f"memory: {result['memory']})", scaling_table(result),
                  f"### Memory and time, largest vs smallest E, "
                  f"{NAMES[backend]}", memory_ratio_table(result)]
    return "\n\n".join(parts)


def replace_between_markers(text, block):
    if START not in text or END not in text:
        raise ValueError(f"the document needs {START} and {END}")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{block}\n{END}{tail}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="the smoke run's results (results/quick/)")
    parser.add_argument("--results-dir", help="default: benchmarks/results"
                        " (--quick: benchmarks/results/quick)")
    parser.add_argument("--doc", default=os.path.join(ROOT,
                                                      "PERFORMANCE.md"))
    parser.add_argument("--print", action="store_true",
                        help="print the tables; leave the document alone")
    args = parser.parse_args(argv)
    results_dir = args.results_dir or os.path.join(
        HERE, "results", "quick" if args.quick else "")
    block = render(results_dir, args.quick)
    if args.print:
        print(block)
        return block
    with open(args.doc) as f:
        text = f.read()
    with open(args.doc, "w") as f:
        f.write(replace_between_markers(text, block))
    print(f"updated {args.doc}")
    return block


if __name__ == "__main__":
    main()
