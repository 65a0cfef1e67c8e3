"""The built wheel holds the whole package: it is built from a copy of the
source tree, installed (without its dependencies, which a .pth file borrows
from the running environment) into a fresh virtual environment, and checked
from outside the source tree: every sub-package and module, every preset
card and every shipped file (weights, configs) is installed, and
`keras-e3 demo` runs from the installed package."""

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import keras
import pytest

# The project root, wherever this file sits under tests/.
ROOT = next(p for p in Path(__file__).resolve().parents
            if (p / "pyproject.toml").is_file())
SOURCE = ROOT / "keras_e3"
IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info",
                                "__pycache__", "*.pyc", ".pytest_cache",
                                "tests", "benchmarks", "out")

pytestmark = pytest.mark.single_backend


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shipped_files(folder):
    """Every file of `folder` that is not Python source or bytecode."""
    return [p for p in folder.rglob("*") if p.is_file()
            and p.suffix not in (".py", ".pyc") and "__pycache__" not in
            p.parts]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=IGNORE)
    wheels = tmp / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps",
         "--no-build-isolation", "-q", str(source), "-w", str(wheels)],
        check=True, cwd=tmp, capture_output=True, text=True, timeout=300)
    wheel, = wheels.glob("keras_e3-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)],
                   check=True, timeout=120)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else
                     "bin/python")
    site = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; "
         "print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True).stdout.strip())
    # The dependencies (keras, numpy, ...) from this environment, after
    # the venv's own site-packages; .pth files of that folder (the editable
    # install of keras_e3) are not run from there.
    borrowed = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    (site / "borrowed_dependencies.pth").write_text("\n".join(sorted(
        borrowed)) + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install",
         "--no-deps", "--no-index", "--ignore-installed", "-q", str(wheel)],
        check=True, cwd=tmp, capture_output=True, text=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(KERAS_BACKEND=keras.backend.backend(), HF_HUB_OFFLINE="1")
    return dict(venv=venv, package=site / "keras_e3", python=python, env=env,
                cwd=tmp)


def test_the_wheel_not_the_source_is_imported(installed):
    proc = subprocess.run(
        [str(installed["python"]), "-c",
         "import keras_e3; print(keras_e3.__file__)"],
        cwd=installed["cwd"], env=installed["env"], capture_output=True,
        text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = Path(proc.stdout.strip().splitlines()[-1]).parent
    assert imported == installed["package"], imported
    assert installed["venv"] in imported.parents
    assert imported.resolve() != SOURCE.resolve()


def test_every_subpackage_and_module_is_installed(installed):
    package = installed["package"]
    subpackages = [p.parent.relative_to(SOURCE)
                   for p in SOURCE.rglob("__init__.py")
                   if "__pycache__" not in p.parts]
    assert len(subpackages) > 1
    missing = [str(p) for p in subpackages
               if not (package / p / "__init__.py").is_file()]
    assert not missing, f"sub-packages missing from the wheel: {missing}"
    modules = [p.relative_to(SOURCE) for p in SOURCE.rglob("*.py")
               if "__pycache__" not in p.parts]
    missing = [str(p) for p in modules if not (package / p).is_file()]
    assert not missing, f"modules missing from the wheel: {missing}"


def test_every_preset_card_and_shipped_file_is_installed(installed):
    package = installed["package"]
    by_content = {}
    for path in shipped_files(package):
        by_content.setdefault((path.name, digest(path)), path)
    cards = sorted((ROOT / "presets").glob("*.json"))
    assert cards
    # Shipped files inside the package keep their place; the top-level
    # presets/ folder (cards, and anything shipped beside them) is
    # installed as package data somewhere inside keras_e3.
    data = shipped_files(SOURCE)
    missing = [str(p.relative_to(SOURCE)) for p in data
               if not (package / p.relative_to(SOURCE)).is_file()
               or digest(package / p.relative_to(SOURCE)) != digest(p)]
    missing += [str(p.relative_to(ROOT)) for p in
                shipped_files(ROOT / "presets")
                if (p.name, digest(p)) not in by_content]
    assert not missing, f"files missing from the wheel: {missing}"
    weights = [p for p in data + shipped_files(ROOT / "presets")
               if p.name.endswith((".h5", ".keras", ".npz",
                                   ".safetensors"))]
    assert weights, "no shipped weight file found in the source tree"


def test_demo_runs_from_the_installed_package(installed):
    script = installed["venv"] / ("Scripts/keras-e3.exe" if os.name == "nt"
                                  else "bin/keras-e3")
    assert script.is_file()
    proc = subprocess.run([str(script), "demo"], cwd=installed["cwd"],
                          env=installed["env"], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ensemble" in proc.stdout.lower(), proc.stdout
