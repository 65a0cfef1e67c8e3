"""Runs the test suite once per Keras backend, each in its own process.

    python tests/run_backends.py [BACKEND ...] [-- PYTEST ARGS]

Default: jax, tensorflow and torch. Prints each backend's pytest summary and
a final "N passed, N failed, N skipped" line; exits non-zero if any backend
fails, runs no test, or skips a test because a golden fixture is missing
(an empty or incomplete KERAS_E3_FIXTURES folder). Tests marked
`single_backend` (independent of the Keras backend) run on the first
backend only.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("jax", "tensorflow", "torch")
# What the tests' skips say when a golden fixture is missing
# (conftest.fixture_dir: "golden fixtures not found at ...",
# test_vmoe_checkpoint: "native checkpoint fixture not found at ...").
MISSING_FIXTURE = re.compile(r"fixtures? not found", re.IGNORECASE)
COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected)")


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


def main(argv):
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
    for i, backend in enumerate(backends):
        print(f"=== KERAS_BACKEND={backend}", flush=True)
        # Backend-independent tests (pure NumPy, file formats) run once.
        restricted = not (i == 0 or "-m" in extra)
        select = ["-m", "not single_backend"] if restricted else []
        env = dict(os.environ, KERAS_BACKEND=backend,
                   PYTHONPATH=os.pathsep.join(
                       filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-rs", "-p",
             "no:cacheprovider", "-o", "console_output_style=classic",
             *select, *extra],
            cwd=ROOT, env=env, capture_output=True, text=True)
        counts = parse_summary(proc.stdout)
        ran = counts and counts["passed"] + counts["failed"] + counts["error"]
        # Later backends may legitimately deselect everything that a
        # selection of single_backend tests leaves.
        only_single_backend = (restricted and counts is not None
                               and not ran and counts["deselected"] > 0
                               and counts["skipped"] == 0)
        missing = missing_fixture_skips(proc.stdout)
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
            print(proc.stdout[-20000:])
            print(proc.stderr[-5000:], file=sys.stderr)
        if problem:
            problems.append(problem)
        summary = ", ".join(f"{v} {k}" for k, v in (counts or {}).items()
                            if v) or "no summary"
        print(f"{backend}: {summary}", flush=True)
        for key in totals:
            totals[key] += (counts or {}).get(key, 0)
    failed = totals["failed"] + totals["error"]
    print(f"{totals['passed']} passed, {failed} failed, "
          f"{totals['skipped']} skipped")
    if problems:
        print("FAILED:\n" + "\n".join(problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
