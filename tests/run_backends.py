"""Runs the test suite once per Keras backend, each in its own process.

    python tests/run_backends.py [BACKEND ...] [-- PYTEST ARGS]

Default: jax, tensorflow and torch. Prints each backend's pytest summary and
a final "N passed, N failed, N skipped" line; exits non-zero if any backend
fails or runs no test. Tests marked `single_backend` (independent of the
Keras backend) run on the first backend only.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("jax", "tensorflow", "torch")


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
    failed_backends = []
    for i, backend in enumerate(backends):
        print(f"=== KERAS_BACKEND={backend}", flush=True)
        # Backend-independent tests (pure NumPy, file formats) run once.
        select = ([] if i == 0 or "-m" in extra
                  else ["-m", "not single_backend"])
        env = dict(os.environ, KERAS_BACKEND=backend,
                   PYTHONPATH=os.pathsep.join(
                       filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             "-o", "console_output_style=classic", *select, *extra],
            cwd=ROOT, env=env, capture_output=True, text=True)
        summary = [line for line in proc.stdout.splitlines()
                   if re.search(r"\d+ (passed|failed|error)", line)]
        if proc.returncode != 0:
            print(proc.stdout[-20000:])
            print(proc.stderr[-5000:], file=sys.stderr)
            failed_backends.append(backend)
        print(f"{backend}: {summary[-1] if summary else 'no summary'}",
              flush=True)
        for key in totals:
            for count, word in re.findall(r"(\d+) (passed|failed|skipped|error)",
                                          summary[-1] if summary else ""):
                if word == key:
                    totals[key] += int(count)
    failed = totals["failed"] + totals["error"]
    print(f"{totals['passed']} passed, {failed} failed, "
          f"{totals['skipped']} skipped")
    if failed_backends:
        print("failing backends: " + ", ".join(failed_backends))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
