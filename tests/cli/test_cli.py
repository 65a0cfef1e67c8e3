"""`keras-e3 demo`, `--backend` and `keras-e3 evaluate` on an older
preset."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import run_in_process
from conftest import BACKEND
from conftest import ROOT



def run(capsys, *argv):
    return run_in_process(capsys, *argv)


def test_demo_predicts_raw_digits_and_an_image_through_the_converter(
        capsys, tmp_path):
    import keras_e3
    from keras_e3.data.digits import load_digits_raw
    from keras_e3.data.digits import split_indices
    from keras_e3.metrics import evaluate_predictions

    images, labels = load_digits_raw()
    raw = np.round(images * 255 / 16).astype(np.uint8)
    image = tmp_path / "seven.png"
    seven = int(np.flatnonzero(labels == 7)[0])
    keras.utils.save_img(image, raw[seven][..., None], scale=False)
    code, stdout, stderr = run(capsys, "demo", "--image", str(image))
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert lines[0].startswith("e3_tiny_digits: E³ with 4 experts in 2 "
                               "partitions")
    assert lines[0].endswith(f"backend {BACKEND}")
    assert lines[1].startswith("held-out digits: 450 images")
    rows = {line.split()[0] + (line.split()[1] if line.startswith("member")
                               else ""): line for line in lines[3:6]}
    assert set(rows) == {"ensemble", "member0", "member1"}
    # The oracle: predict on the raw 8x8 uint8 test digits.
    model = keras_e3.E3ViT.from_preset("e3_tiny_digits")
    _, test = split_indices()
    report = evaluate_predictions(
        model.predict_members(raw[test][..., None]), labels[test])
    assert float(rows["ensemble"].split()[1]) == pytest.approx(
        report["ensemble/accuracy"], abs=1e-4)
    assert float(rows["ensemble"].split()[2]) == pytest.approx(
        report["ensemble/nll"], abs=1e-4)
    assert report["ensemble/accuracy"] >= 0.95
    assert lines[6] == f"{image}:"
    assert lines[7].strip().startswith("member 0: ")
    top = model.predict_ensemble(raw[seven][..., None]).argmax(-1)[0]
    assert lines[9].strip().startswith(f"ensemble: {top} ")
    assert top == 7


def test_demo_missing_image_is_a_clear_error(capsys):
    code, _, stderr = run(capsys, "demo", "--image", "no/such/file.png")
    assert code == 2
    assert "no such image file: no/such/file.png" in stderr


def test_backend_is_chosen_before_keras_is_imported(capsys):
    """The console script's module sets KERAS_BACKEND from --backend before
    Keras is imported: `--backend B demo` runs on B whatever
    KERAS_BACKEND says. In a process where Keras is loaded already, another
    --backend is a clear error, not ignored."""
    other = "jax" if BACKEND != "jax" else "tensorflow"
    env = dict(os.environ, KERAS_BACKEND=BACKEND,
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get(
                   "PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-m", "keras_e3_launcher", "--backend", other,
         "demo"], capture_output=True, text=True, env=env, cwd=ROOT,
        timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    first = result.stdout.splitlines()[0]
    assert first.endswith(f"backend {other}"), first
    code, _, stderr = run(capsys, "--backend", other, "presets")
    assert code == 2
    assert f"--backend {other}" in stderr and f"{BACKEND} backend" in stderr
    code, stdout, _ = run(capsys, "--backend", BACKEND, "presets")
    assert code == 0 and "e3_tiny_digits" in stdout


def test_evaluate_command_reports_soft_moe_routing(capsys, tmp_path):
    """`keras-e3 evaluate` on a tiny Soft MoE preset saved with an older
    flat preprocessor dict (0..16 source range): each expert's mean combine
    weight in the report and the summary (the plots are checked in
    process, tests/evaluation/test_evaluate.py)."""
    import json

    import keras_e3

    backbone = keras_e3.E3ViTBackbone(
        image_size=32, patch_size=8, num_channels=1, hidden_dim=16,
        num_layers=2, num_heads=2, mlp_dim=32, num_experts=4,
        moe_layers=(1,), router="soft", num_slots=2, seed=0)
    preset = tmp_path / "soft"
    keras_e3.E3ViT(backbone, num_classes=10).save_to_preset(
        str(preset), preprocessor={"image_size": [32, 32], "num_channels": 1,
                                   "value_range": [-1.0, 1.0],
                                   "source_range": [0.0, 16.0]})
    out = tmp_path / "out"
    code, stdout, stderr = run(
        capsys, "evaluate", "--preset", str(preset), "--data", "digits",
        "--out", str(out), "--max-examples", "8", "--batch-size", "8",
        "--no-plots")
    assert code == 0, stderr
    report = json.loads((out / "report.json").read_text())
    layer = report["routing"]["encoderblock_1"]
    assert layer["router"] == "soft"
    assert abs(sum(layer["expert_load"]) - 1.0) < 1e-6
    assert 0.25 <= layer["mean_top_expert_weight"] <= 1.0
    assert "encoderblock_1: expert weight [" in stdout
    assert "top expert weight" in stdout
