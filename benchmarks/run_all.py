"""Runs the whole benchmark suite, one backend per process, then the report.

    python benchmarks/run_all.py [--quick] [--backends jax tensorflow torch]
        [--results-dir benchmarks/results] [--no-report]

1. `dispatch_paths.py` on JAX, TensorFlow (XLA) and PyTorch (eager), each
   in its own process (KERAS_BACKEND set) -> `dispatch_paths_<backend>.json`;
2. `dispatch_scaling.py` on JAX (memory is measured there; add backends
   with --scaling-backends) -> `dispatch_scaling_<backend>.json`;
3. `overhead.py` on JAX (with JAX among --backends): Keras'
   `train_on_batch` / `predict_on_batch` against bare jitted calls of the
   same S/32 models -> `overhead_jax.json`; `moe_breakdown.py` on JAX:
   an MoE layer's time by stage -> `moe_breakdown_jax.json`;
4. `report.py`: the Markdown tables in PERFORMANCE.md.

Results go to benchmarks/results/ (--quick: benchmarks/results/quick/).

The full grid takes about 17 minutes on a 2-core CPU (PLANS):
inference at batch 32 and 128 for every model; routing groups of the
whole batch, the deep ensemble and the memory analysis on JAX only;
training steps at batch 32 with groups of 8 images. Anything else:
run the scripts themselves (see their --help). Durations of every step
go to `run_all.json`. Run it on an otherwise idle machine.
"""

import argparse
import os
import subprocess
import sys
import time

from _common import emit

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BACKENDS = ("jax", "tensorflow", "torch")
SINGLE_MODELS = ("vit_s32", "vmoe_s32", "e3_s32")
TRAIN = ("--train-batches", "32", "--train-groups", "8",
         "--train-models", *SINGLE_MODELS)
PLANS = {
    "jax": TRAIN,
    "tensorflow": ("--groups", "8", "--models", *SINGLE_MODELS, *TRAIN),
    "torch": ("--groups", "8", "--models", *SINGLE_MODELS, *TRAIN),
}
SCALING = ("--experts",)
# Keras' train_on_batch / predict_on_batch vs bare jitted calls (JAX only).
OVERHEAD = ("--batch", "32")


def run_step(script, backend, args, out):
    """Runs one benchmark script in a fresh process; (ok, seconds)."""
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
    command = [sys.executable, os.path.join(HERE, script), *args,
               "--out", out]
    print(f"# {backend}: {' '.join(command[1:])}", file=sys.stderr,
          flush=True)
    start = time.perf_counter()
    code = subprocess.call(command, env=env, cwd=ROOT)
    seconds = time.perf_counter() - start
    if code:
        print(f"# {script} on {backend} failed (exit {code})",
              file=sys.stderr, flush=True)
    return code == 0, round(seconds, 1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run of every step (tiny grids)")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS),
                        choices=BACKENDS)
    parser.add_argument("--scaling-backends", nargs="*", default=["jax"],
                        choices=BACKENDS)
    parser.add_argument("--results-dir", help="default: benchmarks/results"
                        " (--quick: benchmarks/results/quick)")
    parser.add_argument("--no-report", action="store_true",
                        help="do not update PERFORMANCE.md")
    args = parser.parse_args(argv)
    results_dir = args.results_dir or os.path.join(
        HERE, "results", "quick" if args.quick else "")
    steps = [("dispatch_paths.py", backend,
              ("--quick",) if args.quick else PLANS[backend])
             for backend in args.backends]
    steps += [("dispatch_scaling.py", backend,
               ("--quick", *SCALING) if args.quick else SCALING)
              for backend in args.scaling_backends]
    steps += [("backends.py", backend, ("--quick",) if args.quick else ())
              for backend in args.backends]
    if "jax" in args.backends:
        steps.append(("overhead.py", "jax",
                      ("--quick",) if args.quick else OVERHEAD))
        steps.append(("moe_breakdown.py", "jax",
                      ("--quick",) if args.quick else ()))
        steps.append(("inference_layouts.py", "jax",
                      ("--quick",) if args.quick else ()))
    durations, failed = [], []
    for script, backend, step_args in steps:
        name = script.removesuffix(".py")
        out = os.path.join(results_dir, f"{name}_{backend}.json")
        ok, seconds = run_step(script, backend, step_args, out)
        durations.append(dict(script=script, backend=backend,
                              args=list(step_args), seconds=seconds, ok=ok))
        if not ok:
            failed.append(f"{script} ({backend})")
    emit(dict(quick=args.quick, steps=durations,
              total_seconds=round(sum(d["seconds"] for d in durations), 1)),
         os.path.join(results_dir, "run_all.json"))
    if not args.no_report:
        from report import main as report

        report(["--results-dir", results_dir]
               + (["--quick"] if args.quick else []))
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
