"""Runs the test suite once per Keras backend, each in its own process.

    python tests/run_backends.py [--jobs N] [BACKEND ...] [-- PYTEST ARGS]

Default: jax, tensorflow and torch. Prints each backend's pytest summary and
a final "N passed, N failed, N skipped" line; exits non-zero if any backend
fails, runs no test, or skips a test because a golden fixture is missing
(an empty or incomplete KERAS_E3_FIXTURES folder). Tests marked
`single_backend` (independent of the Keras backend) run on the first
backend only.

`--jobs N`: pytest processes run at once (default: 2 where the machine has
2 or more cores, else 1). The suite is mostly single-threaded compilation
and small ops, so two side by side on 2 cores take about the time of the
longest instead of the sum. Their reports are printed whole, one after the
other, as they finish.

Each backend's suite runs as `SHARDS` pytest processes, each on a share of
the test folders and top-level modules (balanced by size): one process for
the whole suite grows past 18 GB on TensorFlow (every traced function and
model it built stays alive) and two side by side exceed a 24 GB machine;
with three shares, one TensorFlow process still reached 17.8 GB.
With explicit test paths in the pytest arguments, one process per backend.
"""

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("jax", "tensorflow", "torch")
# What the tests' skips say when a golden fixture is missing
# (conftest.fixture_dir: "golden fixtures not found at ...",
# test_vmoe_checkpoint: "native checkpoint fixture not found at ...").
MISSING_FIXTURE = re.compile(r"fixtures? not found", re.IGNORECASE)
COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected)")
SHARDS = 5


def shards(count=SHARDS):
    """The test folders and top-level test modules of tests/, dealt into
    `count` lists of about equal size (bytes of test code), largest first;
    deterministic."""
    tests = ROOT / "tests"
    items = []
    for path in sorted(tests.iterdir()):
        if path.is_dir():
            size = sum(f.stat().st_size for f in path.rglob("test_*.py"))
        elif path.name.startswith("test_") and path.suffix == ".py":
            size = path.stat().st_size
        else:
            continue
        if size:
            items.append((size, str(path.relative_to(ROOT))))
    groups = [[0, []] for _ in range(count)]
    for size, name in sorted(items, key=lambda item: (-item[0], item[1])):
        lightest = min(groups, key=lambda group: group[0])
        lightest[0] += size
        lightest[1].append(name)
    return [sorted(names) for _, names in groups if names]


def _has_paths(extra):
    """Whether the pytest arguments name test paths (then no sharding)."""
    return any(not a.startswith("-") and (ROOT / a.split("::")[0]).exists()
               for a in extra)


def parse_summary(stdout):
    """Counts of pytest's final summary line (`= 3 passed, 1 skipped in
    2s =`, `no tests ran`), or None when there is no such line."""
    for line in reversed(stdout.splitlines()):
        if not line.startswith("=") and " in " not in line:
            continue
        if "no tests ran" in line or COUNT.search(line):
            counts = {"passed": 0, "failed": 0, "skipped": 0, "error": 0,
                      "deselected": 0}
            for count, word in COUNT.findall(line):
                counts["error" if word.startswith("error") else word] += \
                    int(count)
            return counts
    return None


def missing_fixture_skips(stdout):
    """The `-rs` lines of tests skipped for a missing golden fixture."""
    return [line for line in stdout.splitlines()
            if line.startswith("SKIPPED") and MISSING_FIXTURE.search(line)]


def plan(backends, extra, jobs):
    """The pytest runs: (backend, label, marker selection, restricted).

    Backend-independent tests (`single_backend`: pure NumPy, file formats,
    multi-device subprocesses) run on the first backend only. With more
    than one job they are a run of their own beside the first backend's
    other tests, so that the longest backend is not also the one that
    runs them all."""
    if "-m" in extra:
        runs = [(b, b, [], False) for b in backends]
    else:
        first, rest = backends[0], backends[1:]
        later = [(b, b, ["-m", "not single_backend"], True) for b in rest]
        if jobs == 1 or not rest:
            runs = [(first, first, [], False)] + later
        else:
            # Either half may select nothing (main() still fails a run in
            # which no test ran at all).
            runs = ([(first, first, ["-m", "not single_backend"], True)]
                    + later + [(first, f"{first} (single_backend tests)",
                                ["-m", "single_backend"], True)])
    if _has_paths(extra):
        return runs
    parts = shards()
    # A shard may select nothing: its run counts as restricted.
    return [(backend, f"{label} [{i + 1}/{len(parts)}]", select + part,
             True)
            for backend, label, select, restricted in runs
            for i, part in enumerate(parts)]


def _start(run, extra):
    """Starts one planned pytest run; returns the job."""
    backend, label, select, restricted = run
    env = dict(os.environ, KERAS_BACKEND=backend,
               PYTHONPATH=os.pathsep.join(
                   filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p",
         "no:cacheprovider", "-o", "console_output_style=classic",
         *select, *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    # Drained by threads: a full pipe must not block a running backend.
    out = {}
    threads = [_drain(proc.stdout, out, "stdout"),
               _drain(proc.stderr, out, "stderr")]
    return label, restricted, proc, out, threads, time.monotonic()


def _drain(stream, out, key):
    def read():
        out[key] = stream.read()

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def _report(job, fixtures):
    """Prints a finished backend's report; returns (counts, problem)."""
    backend, restricted, proc, out, threads, start = job
    for thread in threads:
        thread.join()
    stdout, stderr = out.get("stdout", ""), out.get("stderr", "")
    print(f"=== KERAS_BACKEND={backend} "
          f"({time.monotonic() - start:.0f} s)", flush=True)
    counts = parse_summary(stdout)
    ran = counts and counts["passed"] + counts["failed"] + counts["error"]
    # Later backends may legitimately deselect everything that a
    # selection of single_backend tests leaves.
    only_single_backend = (restricted and counts is not None
                           and not ran and counts["deselected"] > 0
                           and counts["skipped"] == 0)
    missing = missing_fixture_skips(stdout)
    problem = None
    if counts is None:
        problem = f"{backend}: no pytest summary (exit {proc.returncode})"
    elif only_single_backend:
        pass
    elif not ran:
        problem = f"{backend}: ran no test"
    elif proc.returncode != 0:
        problem = f"{backend}: pytest exited {proc.returncode}"
    if missing:
        problem = (f"{backend}: {len(missing)} skip line(s) for missing "
                   f"golden fixtures (KERAS_E3_FIXTURES={fixtures}):\n  "
                   + "\n  ".join(missing[:10]))
    if problem or (proc.returncode not in (0, 5)):
        print(stdout[-20000:])
        print(stderr[-5000:], file=sys.stderr)
    summary = ", ".join(f"{v} {k}" for k, v in (counts or {}).items()
                        if v) or "no summary"
    print(f"{backend}: {summary}", flush=True)
    return counts, problem


def main(argv):
    jobs = 2 if (os.cpu_count() or 1) >= 2 else 1
    if argv[:1] == ["--jobs"]:
        jobs, argv = max(1, int(argv[1])), argv[2:]
    if "--" in argv:
        split = argv.index("--")
        backends, extra = argv[:split], argv[split + 1:]
    else:
        backends, extra = argv, []
    backends = backends or list(BACKENDS)
    fixtures = Path(os.environ.get(
        "KERAS_E3_FIXTURES", ROOT.parent / "shared" / "fixtures" / "vmoe"))
    if not fixtures.is_dir():
        print(f"golden fixtures not found at {fixtures}; the equivalence "
              "tests need them (set KERAS_E3_FIXTURES)", file=sys.stderr)
        return 1
    totals = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    problems = []
    pending = plan(backends, extra, jobs)
    running = []
    while pending or running:
        while pending and len(running) < jobs:
            running.append(_start(pending.pop(0), extra))
        time.sleep(0.5)
        for job in [j for j in running if j[2].poll() is not None]:
            running.remove(job)
            counts, problem = _report(job, fixtures)
            if problem:
                problems.append(problem)
            for key in totals:
                totals[key] += (counts or {}).get(key, 0)
    if not totals["passed"] + totals["failed"] + totals["error"]:
        problems.append("no test ran on any backend")
    failed = totals["failed"] + totals["error"]
    print(f"{totals['passed']} passed, {failed} failed, "
          f"{totals['skipped']} skipped")
    if problems:
        print("FAILED:\n" + "\n".join(problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
