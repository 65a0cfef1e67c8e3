"""keras-e3 against the official google-research/vmoe code, side by side,
on the same parameters (JAX, CPU): the S/32 dense ViT, V-MoE and E³ at
224 px, routing groups of 8 images, inference and one training step.

    python benchmarks/official_side_by_side.py [--models dense vmoe eee]
        [--modes infer train] [--batch 32] [--alternations 3]
        [--costs] [--allocators default retain]
        [--vmoe-env FILE] [--tools DIR] [--params DIR]
        [--out benchmarks/results/official_side_by_side_jax.json]

Needs the official code's virtual environment made by
`../shared/tools/vmoe-bench/setup.sh` (its README): the official side runs
there, as a subprocess (`source vmoe-env.sh; python vmoe_bench.py`), and
is never imported into this process. Our side is `ours_bench.py` from the
same folder, run with this interpreter and KERAS_BACKEND=jax on the
parameters the official side wrote (`vmoe_bench.py --save-params`, once,
into --params), through `E3ViT.from_vmoe`.

Timing: for each model and mode, the two programs run alternately
(official, ours, official, ours, ...) --alternations times, each in a
fresh process; each process reports the median of its calls after a
warm-up (vmoe_bench.py: `jax.jit(model.apply)` or a `jax.grad` SGD step;
ours_bench.py: `predict_on_batch` or `train_on_batch`, 7 calls for
inference, 5 for training, the same counts on both sides). Each side's
result is its best process (the least disturbed by other work on the
machine); `ratio` = ours img/s ÷ official img/s (> 1: ours is faster).
The load average is recorded around every process.

--costs: also XLA's static cost analysis (FLOPs and bytes accessed) of
both compiled programs (official: the step vmoe_bench.py times, compiled
in its venv; ours: Keras' compiled train / predict step), independent of
the machine's load.

--allocators: the malloc settings both sides run under, one set of rows
each: "default" (glibc's defaults) and "retain" (both processes with
`RETAIN_TUNABLES` in GLIBC_TUNABLES: glibc's malloc keeps freed memory,
so XLA's per-call scratch buffer is not faulted in again at every call;
PERFORMANCE.md, "Third round").

Without the official environment (or with --skip-official) the official
side is skipped and recorded as such; our side needs the official
side's parameters and is skipped too when they are absent.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TOOLS = os.path.join(os.path.dirname(ROOT), "shared", "tools", "vmoe-bench")
TMP = tempfile.gettempdir()
OUT = os.path.join(ROOT, "benchmarks", "results",
                   "official_side_by_side_jax.json")
MODELS = ("dense", "vmoe", "eee")
MODES = ("infer", "train")
ALLOCATORS = ("default", "retain")
# "retain": large blocks from malloc's heap instead of mmap, freed memory
# kept (up to 2 GiB at the top of the heap), one arena for all threads (a
# non-main arena cannot hold blocks over 64 MB and would mmap them).
RETAIN_TUNABLES = ("glibc.malloc.mmap_max=0:glibc.malloc.arena_max=1:"
                   "glibc.malloc.trim_threshold=2147483647")
REPEATS = {"infer": 7, "train": 5}  # ours_bench.py's call counts
# The targets, ours ÷ official throughput.
TARGETS = {("dense", "infer"): 1.1, ("vmoe", "infer"): 1.1,
           ("eee", "infer"): 1.3, ("dense", "train"): 1.1,
           ("vmoe", "train"): 1.1, ("eee", "train"): 1.1}

# Run in the official venv (a subprocess): the official step's compiled
# cost, the step `official_jitted` captures (this folder on the path).
OFFICIAL_COST = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from official_side_by_side import official_jitted
fn, args = official_jitted(sys.argv[2], sys.argv[3], int(sys.argv[4]),
                           sys.argv[5])
cost = fn.lower(*args).compile().cost_analysis()
cost = cost[0] if isinstance(cost, list) else cost
print(json.dumps({k: float(cost[k]) for k in ("flops", "bytes accessed")}))
"""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS),
                        choices=MODELS)
    parser.add_argument("--modes", nargs="+", default=list(MODES),
                        help="in this order, within each model",
                        choices=MODES)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--alternations", type=int, default=3,
                        help="official/ours process pairs per row (best "
                        "of them per side)")
    parser.add_argument("--allocators", nargs="+", default=["default"],
                        choices=ALLOCATORS,
                        help="malloc settings, both sides (default: "
                        "glibc's defaults only)")
    parser.add_argument("--costs", action="store_true",
                        help="also XLA's cost analysis of both programs")
    parser.add_argument("--tools", default=TOOLS,
                        help="the vmoe-bench folder (vmoe_bench.py, "
                        "ours_bench.py)")
    parser.add_argument("--vmoe-env", default=os.path.join(TMP,
                                                           "vmoe-env.sh"),
                        help="setup.sh's environment file")
    parser.add_argument("--params", default=os.path.join(TMP, "s32"),
                        help="the official parameters (one folder per "
                        "model; written by the official side if absent)")
    parser.add_argument("--skip-official", action="store_true")
    parser.add_argument("--timeout", type=float, default=900,
                        help="seconds per process")
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args(argv)
    if args.batch < 1 or args.alternations < 1:
        parser.error("--batch and --alternations must be at least 1")
    return args


def official_available(args):
    """(available, reason)."""
    if args.skip_official:
        return False, "--skip-official"
    for path in (args.vmoe_env, os.path.join(args.tools, "vmoe_bench.py")):
        if not os.path.exists(path):
            return False, f"{path} not found (run setup.sh, see its README)"
    return True, None


def official_command(args, kind, mode, save_params=None,
                     allocator="default"):
    """argv of one official run (bash sourcing the vmoe venv)."""
    tunables = (f"export GLIBC_TUNABLES={RETAIN_TUNABLES} && "
                if allocator == "retain" else "")
    script = (f"{tunables}source {q(args.vmoe_env)} && exec python "
              f"{q(os.path.join(args.tools, 'vmoe_bench.py'))} --models "
              f"{kind} --batches {args.batch} --repeats "
              f"{1 if save_params else REPEATS[mode]} --json"
              + (" --train" if mode == "train" else "")
              + (f" --save-params {q(save_params)}" if save_params else ""))
    return ["bash", "-c", script]


def ours_command(args, kind, mode, allocator="default"):
    """argv of one run of ours_bench.py with this interpreter (with
    `RETAIN_TUNABLES` in its environment under the "retain" allocator)."""
    prefix = (["env", f"GLIBC_TUNABLES={RETAIN_TUNABLES}"]
              if allocator == "retain" else [])
    return (prefix + [sys.executable, os.path.join(args.tools,
                                                   "ours_bench.py"),
                      os.path.join(args.params, kind), str(args.batch)]
            + (["--train"] if mode == "train" else []))


def official_cost_command(args, kind, mode):
    script = (f"source {q(args.vmoe_env)} && exec python -c "
              f"{q(OFFICIAL_COST)} {q(HERE)} {q(args.tools)} {kind} "
              f"{args.batch} {mode}")
    return ["bash", "-c", script]


def official_jitted(tools, kind, batch, mode):
    """(the jitted function, its arguments): the official step exactly as
    `vmoe_bench.run` in `tools` builds it for `kind` and `mode`, captured
    at its `lower` (run in the official code's venv; vmoe_bench.run stops
    there, before compiling or timing anything)."""
    sys.path.insert(0, tools)
    import jax
    import vmoe_bench

    captured = {}

    class Captured(Exception):
        pass

    real_jit = jax.jit

    class Jitted:
        def __init__(self, fn):
            self.fn = fn

        def __call__(self, *args):
            return self.fn(*args)

        def lower(self, *args):
            captured.update(fn=self.fn, args=args)
            raise Captured

    jax.jit = lambda fn, *a, **k: Jitted(real_jit(fn, *a, **k))
    try:
        vmoe_bench.run(kind, batch, 1, mode == "train")
    except Captured:
        pass
    finally:
        jax.jit = real_jit
    return captured["fn"], captured["args"]


def ours_cost_command(args, kind, mode):
    return [sys.executable, os.path.abspath(__file__), "--ours-cost",
            os.path.join(args.params, kind), str(args.batch), mode]


def q(text):
    return "'" + str(text).replace("'", "'\\''") + "'"


def load():
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def run_json(argv, timeout):
    """The last JSON document a process prints on stdout (the whole of
    stdout, or its last line), with the load average around it."""
    env = dict(os.environ, KERAS_BACKEND="jax")
    before = load()
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{argv[:3]} failed ({done.returncode}):\n"
                           + done.stderr[-3000:])
    text = done.stdout.strip()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = json.loads(text.splitlines()[-1])
    return data, dict(load_before=before, load_after=load(),
                      process_s=round(seconds, 1))


def ensure_params(args, kinds, log):
    """The official parameters of each model in `kinds`, written by the
    official side (one untimed run each) where missing."""
    for kind in kinds:
        if not os.path.exists(os.path.join(args.params, kind,
                                           "params.npz")):
            log(f"writing the official {kind} parameters to {args.params}")
            run_json(official_command(args, kind, "infer",
                                      save_params=args.params), args.timeout)


def measure_row(args, kind, mode, official, log, allocator="default"):
    """One model and mode: the alternated runs and each side's best."""
    row = dict(model=kind, mode=mode, batch=args.batch, allocator=allocator,
               official_runs=[], ours_runs=[])
    for i in range(args.alternations):
        if official:
            data, cond = run_json(official_command(
                args, kind, mode, allocator=allocator), args.timeout)
            result = data["results"][0]
            row["official_env"] = data.get("env")
            row["official_gflops_per_img"] = result.get("gflops_per_img")
            row["official_runs"].append(dict(
                img_per_s=result["img_per_s"], median_s=result["median_s"],
                **cond))
        data, cond = run_json(ours_command(args, kind, mode, allocator),
                              args.timeout)
        row["ours_runs"].append(dict(img_per_s=data["img_per_s"], **cond))
        log(f"{kind} {mode} ({allocator} malloc) alternation {i + 1}: "
            "official "
            f"{row['official_runs'][-1]['img_per_s'] if official else '-'}"
            f" img/s, ours {data['img_per_s']} img/s")
    summarize(row)
    if args.costs and allocator == args.allocators[0]:
        if official:
            row["official_cost"], _ = run_json(
                official_cost_command(args, kind, mode), args.timeout)
        row["ours_cost"], _ = run_json(ours_cost_command(args, kind, mode),
                                       args.timeout)
        if official:
            for key in ("flops", "bytes accessed"):
                row[f"cost_ratio_{key.replace(' ', '_')}"] = round(
                    row["ours_cost"][key] / row["official_cost"][key], 4)
    return row


def summarize(row):
    """Each side's best run, the ratio and the issue's target."""
    for side in ("official", "ours"):
        runs = row[f"{side}_runs"]
        row[f"{side}_img_per_s"] = max(
            (r["img_per_s"] for r in runs), default=None)
    if row["official_img_per_s"] and row["ours_img_per_s"]:
        row["ratio"] = round(row["ours_img_per_s"]
                             / row["official_img_per_s"], 3)
        target = TARGETS.get((row["model"], row["mode"]))
        row["target"] = target
        row["target_met"] = target is not None and row["ratio"] >= target
    return row


def ours_cost(directory, batch, mode):
    """XLA's cost analysis of Keras' compiled step (`--ours-cost`), run in
    its own process: FLOPs and bytes accessed."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras
    import numpy as np

    sys.path.insert(0, HERE)
    import keras_e3
    from overhead import cost
    from overhead import keras_compiled

    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    model = keras_e3.E3ViT.from_vmoe(config, os.path.join(directory,
                                                          "params.npz"))
    size = config.get("image_size", 224)
    x = np.random.default_rng(1).normal(
        size=(batch, size, size, 3)).astype("float32")
    y = np.arange(batch) % model.num_classes
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    if mode == "train":
        model.train_on_batch(x, y)  # builds the optimizer and metrics
    else:
        model.build(x.shape)
    flops, accessed = cost(keras_compiled(model, mode, x, y))
    print(json.dumps({"flops": flops, "bytes accessed": accessed}))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--ours-cost"]:
        return ours_cost(argv[1], int(argv[2]), argv[3])
    args = parse_args(argv)

    def log(message):
        print(message, file=sys.stderr, flush=True)

    official, reason = official_available(args)
    result = dict(
        run=dict(
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            machine=platform.machine(), cpus=os.cpu_count(),
            load_average_1min_start=load(), batch=args.batch,
            alternations=args.alternations, repeats=REPEATS,
            statistic="per process: median of its calls after a warm-up; "
                      "per side: the best (highest img/s) of the "
                      "alternated processes; ratio = ours / official img/s",
            official="google-research/vmoe (vmoe_bench.py, its venv)",
            official_skipped=reason,
            ours="keras-e3 ours_bench.py (E3ViT.from_vmoe, KERAS_BACKEND=jax)",
            conditions="shared 2-core machine; other processes may run: "
                       "see each run's load averages"),
        rows=[])
    params_ok = all(os.path.exists(os.path.join(args.params, kind,
                                                "params.npz"))
                    for kind in args.models)
    if official:
        ensure_params(args, args.models, log)
        params_ok = True
    if not params_ok:
        result["run"]["ours_skipped"] = (
            f"no official parameters in {args.params} (written by the "
            "official side)")
    else:
        for kind in args.models:
            for mode in args.modes:
                for allocator in args.allocators:
                    row = measure_row(args, kind, mode, official, log,
                                      allocator)
                    result["rows"].append(row)
                    write(args.out, result)  # each row as it is measured
                    print(json.dumps({k: row.get(k) for k in (
                        "model", "mode", "allocator", "official_img_per_s",
                        "ours_img_per_s", "ratio")}), flush=True)
    result["run"]["load_average_1min_end"] = load()
    write(args.out, result)
    print(json.dumps(result["run"], indent=1))
    return result


def write(path, result):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sys.path.insert(0, HERE)
    from _common import write_json_atomic

    write_json_atomic(path, result)


if __name__ == "__main__":
    main()
