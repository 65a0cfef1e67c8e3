"""tests/run_backends.py fails loudly when a backend runs no test or when
fixture tests skip for a missing fixture (an empty KERAS_E3_FIXTURES
folder), and every fixture test honours KERAS_E3_FIXTURES. Runs the script
on tiny pytest targets with the NumPy Keras backend (fast to import)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FIXTURES

# The project root, wherever this file sits under tests/.
ROOT = next(p for p in Path(__file__).resolve().parents
            if (p / "pyproject.toml").is_file())
SCRIPT = ROOT / "tests" / "run_backends.py"
sys.path.insert(0, str(SCRIPT.parent))
import run_backends  # noqa: E402

pytestmark = pytest.mark.single_backend

TARGET = '''
import sys
sys.path.insert(0, {tests!r})
from conftest import fixture_dir


def test_plain():
    assert 1 + 1 == 2


def test_needs_a_fixture():
    assert (fixture_dir("vit_tiny") / "config.json").exists()
'''


@pytest.fixture
def target(tmp_path):
    path = tmp_path / "tiny_target_test.py"
    path.write_text(TARGET.format(tests=str(ROOT / "tests")))
    return path


def run(fixtures, *pytest_args, backends=("numpy",), jobs=1):
    env = dict(os.environ, KERAS_E3_FIXTURES=str(fixtures))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--jobs", str(jobs), *backends, "--",
         *map(str, pytest_args)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def test_passes_when_tests_run(tmp_path, target):
    code, out = run(tmp_path, target, "-k", "plain")
    assert code == 0, out
    assert "1 passed" in out


def test_backends_side_by_side_add_up(tmp_path, target):
    """Two jobs at once: every backend reported, the totals summed, and a
    failure in either one fails the run."""
    code, out = run(FIXTURES, target, "-k", "plain",
                    backends=("numpy", "numpy", "numpy"), jobs=2)
    assert code == 0, out
    assert out.count("=== KERAS_BACKEND=numpy") == 4  # 3 + single_backend
    assert "3 passed, 0 failed, 0 skipped" in out
    code, out = run(tmp_path, target, backends=("numpy", "numpy"), jobs=2)
    assert code != 0 and "missing golden fixtures" in out, out
    code, out = run(FIXTURES, target, "-k", "no_such_test",
                    backends=("numpy", "numpy"), jobs=2)
    assert code != 0 and "no test ran" in out, out


@pytest.mark.parametrize("jobs", [1, 2])
def test_single_backend_tests_run_once(jobs):
    """On the first backend only; with 2 jobs as a run of their own."""
    runs = run_backends.plan(["jax", "tensorflow", "torch"], [], jobs)
    parts = len(run_backends.shards())
    assert parts == run_backends.SHARDS
    assert [r[0] for r in runs].count("tensorflow") == parts
    markers = [(r[0], " ".join(r[2][:2] if r[2][:1] == ["-m"] else []))
               for r in runs]
    single = {b for b, sel in markers if sel in ("", "-m single_backend")}
    assert single == {"jax"}
    assert len(runs) == (3 + (jobs > 1)) * parts


def test_shards_cover_every_test_once():
    """Each backend's processes share out the test folders and top-level
    test modules: each exactly once (what tests/ holds, listed here)."""
    parts = run_backends.shards()
    names = [name for part in parts for name in part]
    tests = run_backends.ROOT / "tests"
    expected = sorted(
        f"tests/{p.name}" for p in tests.iterdir()
        if (p.is_dir() and any(p.rglob("test_*.py")))
        or (p.name.startswith("test_") and p.suffix == ".py"))
    assert sorted(names) == expected
    # explicit paths: one process per backend, unsharded
    runs = run_backends.plan(["jax", "torch"], ["tests/layers"], 2)
    assert [r[0] for r in runs] == ["jax", "torch", "jax"]
    assert all("tests/models" not in r[2] for r in runs)


def test_fails_when_a_fixture_is_missing(tmp_path, target):
    # The fixtures folder exists but is empty: the fixture test skips.
    code, out = run(tmp_path, target)
    assert code != 0, out
    assert "missing golden fixtures" in out


def test_fails_when_no_test_runs(tmp_path, target):
    code, out = run(tmp_path, target, "-k", "no_such_test")
    assert code != 0, out
    assert "ran no test" in out


@pytest.mark.parametrize("stdout,expected", [
    ("....\n3 passed, 1 skipped in 2.0s", (3, 0, 1)),
    ("ss\n2 skipped in 0.1s", (0, 0, 2)),
    ("F\n===== 1 failed, 2 errors in 0.3s =====", (0, 1, 0)),
    ("===== no tests ran in 0.3s =====", (0, 0, 0)),
])
def test_summary_lines_are_parsed(stdout, expected):
    counts = run_backends.parse_summary(stdout)
    assert (counts["passed"], counts["failed"], counts["skipped"]) == expected
    assert run_backends.parse_summary("no summary here") is None


def test_reference_configs_honour_keras_e3_fixtures(tmp_path):
    """test_reference_configs finds the fixtures through KERAS_E3_FIXTURES:
    it skips with an empty folder and runs with the real one."""
    module = next(ROOT.glob("tests/**/test_reference_configs.py"))
    args = [module, "-k", "test_reference_matches_fixtures and vit_tiny"]
    code, out = run(tmp_path, *args)
    assert code != 0 and "missing golden fixtures" in out, out
    if not (FIXTURES / "vit_tiny").is_dir():
        pytest.skip(f"golden fixtures not found at {FIXTURES}")
    code, out = run(FIXTURES, *args)
    assert code == 0 and "1 passed" in out, out
