"""Where a compiled step's time goes, op by op, in keras-e3 and in the
official google-research/vmoe code, on the same S/32 models (JAX, CPU).

    python benchmarks/step_profile.py [--models dense vmoe eee]
        [--modes train infer] [--calls 3] [--allocator default|retain]
        [--skip-official] [--vmoe-env FILE] [--tools DIR] [--params DIR]
        [--out benchmarks/results/step_profile_jax.json]

Each side runs in its own process (the official one in the official
code's virtual environment, `../shared/tools/vmoe-bench/setup.sh`; the
same file, `--side official`, imports nothing of keras-e3 there): the step
as the side-by-side benchmark times it (official: the jitted step
`vmoe_bench.py` builds, captured from it; ours: `train_on_batch` /
`predict_on_batch` on `E3ViT.from_vmoe` of the same parameters), one
warm-up call, then `--calls` calls under JAX's profiler with XLA's CPU
ops traced (`--xla_cpu_enable_xprof_traceme`).

For each op XLA ran, its exclusive time (less the ops nested in it) on
its thread, averaged over the calls; each op is named by the `op_name`
XLA keeps for it in the optimised program the process compiled (dumped
with `--xla_dump_to`), and put in a component: embedding, layer norms,
attention projections, attention core, dense MLP, MoE layers, head and
loss, parameter update, other; forward or backward (`transpose(...)` in
its name). XLA runs independent ops on both cores at once, so the op
times add up to more than the wall time on 2 cores. Alongside: the wall
time of a call (median, without the profiler), and the page faults,
kernel and user CPU seconds of a call (`getrusage`).
"""

import argparse
import collections
import glob
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

# Its "retain" malloc settings, shell quoting and capture of the official
# step (stdlib only at import, as here: this file also runs in the official
# code's venv).
from official_side_by_side import RETAIN_TUNABLES
from official_side_by_side import official_jitted
from official_side_by_side import q

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(os.path.dirname(ROOT), "shared", "tools", "vmoe-bench")
TMP = tempfile.gettempdir()
OUT = os.path.join(ROOT, "benchmarks", "results", "step_profile_jax.json")
MODELS = ("dense", "vmoe", "eee")
MODES = ("train", "infer")
# The start of an HLO instruction's line; group 1: its name.
INSTRUCTION = r"^\s*(?:ROOT )?%?([\w.\-]+) = "
# Profiler bookkeeping events, not XLA ops.
NOT_OPS = ("ThreadpoolListener", "end: ", "ThunkExecutor",
           "SlinkyThreadPool")
# (component, pattern on the op_name), first match wins; both sides'
# module names (ours: e3_vi_t_backbone/encoderblock_N/attention/query/...;
# the official: VisionTransformerMoe/Encoder/encoderblock_N/SelfAttention/
# query/...).
COMPONENTS = (
    ("parameter update", r"^(sgd/|sub$)"),
    ("embedding", r"/embedding/|posembed|/ensemble_tile/|"
                  r"^VisionTransformer\w*/concatenate$"),
    ("layer norms", r"/(norm_[01]|LayerNorm_[01]|encoder_norm)/"),
    ("attention projections",
     r"/(attention|SelfAttention)/(query|key|value|out|attention_output)/"),
    ("attention core", r"/(attention|SelfAttention)/"),
    ("MoE layers", r"/(moe|Moe)/"),
    ("dense MLP", r"/(mlp|Mlp)/"),
    ("other encoder ops", r"^(e3_vi_t_backbone|VisionTransformer)"),
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS),
                        choices=MODELS)
    parser.add_argument("--modes", nargs="+", default=list(MODES),
                        choices=MODES)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--calls", type=int, default=3,
                        help="profiled calls per process, after a warm-up")
    parser.add_argument("--allocator", default="default",
                        choices=("default", "retain"),
                        help="glibc's malloc defaults, or both sides "
                        "keeping freed memory (official_side_by_side.py's "
                        "RETAIN_TUNABLES)")
    parser.add_argument("--skip-official", action="store_true")
    parser.add_argument("--tools", default=TOOLS)
    parser.add_argument("--vmoe-env", default=os.path.join(TMP,
                                                           "vmoe-env.sh"))
    parser.add_argument("--params", default=os.path.join(TMP, "s32"))
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args(argv)
    if args.batch < 1 or args.calls < 1:
        parser.error("--batch and --calls must be at least 1")
    return args


# ----------------------------------------------------------------------
# The aggregation (no JAX needed).


def exclusive_times(events):
    """[(start_ns, duration_ns, name)] of one thread -> {index: exclusive
    ns}: each event's duration less that of the events nested in it."""
    order = sorted(range(len(events)),
                   key=lambda i: (events[i][0], -events[i][1]))
    exclusive, stack = {}, []
    for i in order:
        start, duration, _ = events[i]
        while stack and (events[stack[-1]][0] + events[stack[-1]][1]
                         <= start):
            stack.pop()
        exclusive[i] = duration
        if stack:
            exclusive[stack[-1]] -= duration
        stack.append(i)
    return exclusive


def op_names(hlo_text):
    """{instruction name: op_name metadata} of an optimised HLO module."""
    names = {}
    pattern = re.compile(INSTRUCTION + r'.*?op_name="([^"]*)"')
    for line in hlo_text.splitlines():
        match = pattern.match(line)
        if match:
            names.setdefault(match.group(1), match.group(2))
    return names


def classify(op_name):
    """(component, "forward" / "backward") of an op_name: "head and loss"
    for the ops outside the backbone and the update, "unnamed" for ops XLA
    kept no op_name for (e.g. the copies of donated weights)."""
    if not op_name:
        return "unnamed", "forward"
    direction = "backward" if "transpose(" in op_name else "forward"
    path = re.sub(r"jit\([^)]*\)/|jvp\(|transpose\(|\)|checkpoint/", "",
                  op_name)
    for component, pattern in COMPONENTS:
        if re.search(pattern, path):
            return component, direction
    return "head and loss", direction


def aggregate(thread_events, hlo_text, calls):
    """{thread: [(start, duration, name)]} of `calls` calls -> per op and
    per component, ms per call (exclusive times)."""
    names = op_names(hlo_text)
    per_op = collections.Counter()
    for events in thread_events.values():
        events = [e for e in events
                  if not any(e[2].startswith(p) for p in NOT_OPS)]
        for i, ns in exclusive_times(events).items():
            per_op[events[i][2]] += ns / 1e6 / calls
    components = collections.Counter()
    for op, ms in per_op.items():
        if op.startswith("H2D"):  # the host's inputs copied in
            component, direction = "input transfer", "forward"
        else:
            component, direction = classify(names.get(op, ""))
        components[f"{component} ({direction})"] += ms
    return dict(
        op_ms=round(sum(per_op.values()), 1),
        components={k: round(v, 1) for k, v in components.most_common()},
        top_ops=[dict(op=op, ms=round(ms, 2),
                      op_name=names.get(op, ""))
                 for op, ms in per_op.most_common(25)])


def ran_module(dump, threads):
    """(HLO text, file name) of the dumped optimised module the profiled
    ops belong to: the one that defines the most of their names (the
    process also compiled other programs: the official side's parameter
    initialisation, for one)."""
    ran = {name for events in threads.values() for _, _, name in events}
    best = (-1, None, None)
    for path in glob.glob(os.path.join(dump, "*after_optimizations.txt")):
        if "buffer" in os.path.basename(path):
            continue
        with open(path) as f:
            text = f.read()
        defined = set(re.findall(INSTRUCTION, text, re.MULTILINE))
        hits = len(ran & defined)
        if hits > best[0]:
            best = (hits, text, os.path.basename(path))
    return best[1], best[2]


# ----------------------------------------------------------------------
# One side, in its own process (`--side`).


def official_step(tools, kind, batch, mode):
    """The official jitted step as the side-by-side benchmark times it
    (`official_jitted`), ready to call."""
    import jax

    fn, args = official_jitted(tools, kind, batch, mode)
    return lambda: jax.block_until_ready(fn(*args))


def ours_step(params, kind, batch, mode):
    """keras-e3's step as ours_bench.py times it."""
    import keras
    import numpy as np

    import keras_e3

    directory = os.path.join(params, kind)
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    model = keras_e3.E3ViT.from_vmoe(config,
                                     os.path.join(directory, "params.npz"))
    x = np.random.default_rng(1).normal(
        size=(batch, 224, 224, 3)).astype("float32")
    if mode == "train":
        y = np.arange(batch) % 1000
        model.compile(optimizer=keras.optimizers.SGD(0.01))
        return lambda: model.train_on_batch(x, y)
    return lambda: np.asarray(model.predict_on_batch(x))


def profile_side(argv):
    """`--side SIDE KIND MODE BATCH CALLS SOURCE DUMP TRACE ALLOCATOR`:
    runs in a fresh process with XLA_FLAGS set by the parent; prints one
    JSON document."""
    side, kind, mode, batch, calls, source, dump, trace, allocator = argv
    batch, calls = int(batch), int(calls)
    import jax
    from jax.profiler import ProfileData

    step = (official_step(source, kind, batch, mode) if side == "official"
            else ours_step(source, kind, batch, mode))
    step()  # compile (the dump) and warm up
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(calls):
        step()
    after = resource.getrusage(resource.RUSAGE_SELF)
    jax.profiler.start_trace(trace)
    for _ in range(calls):
        step()
    jax.profiler.stop_trace()
    data = ProfileData.from_file(
        sorted(glob.glob(os.path.join(trace, "**", "*.xplane.pb"),
                         recursive=True))[-1])
    threads = {}
    for plane in data.planes:
        for line in plane.lines:
            if line.name == "python":
                continue
            threads[f"{plane.name}/{line.name}"] = [
                (e.start_ns, e.duration_ns, e.name) for e in line.events]
    hlo, module = ran_module(dump, threads)
    result = dict(side=side, model=kind, mode=mode, batch=batch,
                  allocator=allocator, calls=calls,
                  wall_ms=round(statistics.median(times) * 1e3, 1),
                  page_faults_per_call=round(
                      (after.ru_minflt - before.ru_minflt) / calls),
                  kernel_s_per_call=round(
                      (after.ru_stime - before.ru_stime) / calls, 3),
                  user_s_per_call=round(
                      (after.ru_utime - before.ru_utime) / calls, 3),
                  module=module,
                  **aggregate(threads, hlo, calls))
    print(json.dumps(result))


# ----------------------------------------------------------------------
# The parent: both sides, each model and mode.


def side_command(args, side, kind, mode, dump, trace):
    rest = [kind, mode, str(args.batch), str(args.calls),
            args.tools if side == "official" else args.params, dump, trace,
            args.allocator]
    me = os.path.abspath(__file__)
    retain = f"GLIBC_TUNABLES={RETAIN_TUNABLES}"
    if side == "ours":
        return ((["env", retain] if args.allocator == "retain" else [])
                + [sys.executable, me, "--side", side] + rest)
    tunables = f"export {retain} && " if args.allocator == "retain" else ""
    return ["bash", "-c", f"{tunables}source {q(args.vmoe_env)} && exec "
            f"python {q(me)} --side {side} "
            + " ".join(q(a) for a in rest)]


def run_side(args, side, kind, mode):
    work = tempfile.mkdtemp(prefix=f"step_profile_{side}_")
    dump, trace = os.path.join(work, "dump"), os.path.join(work, "trace")
    env = dict(os.environ, KERAS_BACKEND="jax", XLA_FLAGS=(
        f"--xla_cpu_enable_xprof_traceme=true --xla_dump_to={dump} "
        "--xla_dump_hlo_as_text --xla_dump_hlo_module_re="
        ".*(train_step|predict_step|jit_step|jit__lambda).*"))
    try:
        done = subprocess.run(side_command(args, side, kind, mode, dump,
                                           trace),
                              capture_output=True, text=True, env=env,
                              timeout=args.timeout, cwd=ROOT)
        if done.returncode:
            raise RuntimeError(f"{side} {kind} {mode} failed:\n"
                               + done.stderr[-3000:])
        return json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--side"]:
        return profile_side(argv[1:])
    args = parse_args(argv)
    sides = ["ours"]
    skipped = None
    if args.skip_official:
        skipped = "--skip-official"
    elif not os.path.exists(args.vmoe_env):
        skipped = f"{args.vmoe_env} not found (run setup.sh, see its README)"
    else:
        sides.insert(0, "official")
    result = dict(run=dict(
        date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        cpus=os.cpu_count(), batch=args.batch, calls=args.calls,
        allocator=args.allocator, official_skipped=skipped,
        load_average_1min_start=round(os.getloadavg()[0], 2)), rows=[])
    for kind in args.models:
        if not os.path.exists(os.path.join(args.params, kind,
                                           "params.npz")):
            result["run"].setdefault("missing_params", []).append(kind)
            continue
        for mode in args.modes:
            for side in sides:
                row = run_side(args, side, kind, mode)
                result["rows"].append(row)
                print(json.dumps({k: row[k] for k in (
                    "side", "model", "mode", "wall_ms", "op_ms",
                    "page_faults_per_call")}), flush=True)
                write(args.out, result)
    result["run"]["load_average_1min_end"] = round(os.getloadavg()[0], 2)
    write(args.out, result)
    return result


def write(path, result):
    """Atomic: a temporary file renamed over `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
