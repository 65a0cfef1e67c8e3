import os
import subprocess
import sys

from conftest import BACKEND
from conftest import ROOT


def run_cli(*args):
    env = dict(os.environ, KERAS_BACKEND=BACKEND,
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get(
                   "PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "keras_e3.cli", *args],
                          capture_output=True, text=True, env=env,
                          timeout=300)


def test_demo_prints_members_and_ensemble(tmp_path):
    import keras

    image = tmp_path / "image.png"
    keras.utils.save_img(image, (keras.random.uniform((40, 50, 3)) * 255))
    result = run_cli("demo", "--image", str(image))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f"backend {BACKEND}" in lines[0]
    assert lines[1].startswith("member 0: class ")
    assert lines[2].startswith("member 1: class ")
    assert lines[3].startswith("ensemble: class ")


def test_demo_missing_image_is_a_clear_error():
    result = run_cli("demo", "--image", "no/such/file.png")
    assert result.returncode == 2
    assert "no such image file: no/such/file.png" in result.stderr
