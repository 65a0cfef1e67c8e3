"""The examples run (with small settings) and print what they promise."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import BACKEND
from conftest import ROOT


def run_example(name, *args):
    env = dict(os.environ, KERAS_BACKEND=BACKEND,
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get(
                   "PYTHONPATH", ""))
    result = subprocess.run([sys.executable, str(ROOT / "examples" / name),
                             *args], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.single_backend
def test_classify_image(tmp_path):
    import keras

    from keras_e3.data.digits import load_digits_raw

    images, labels = load_digits_raw()
    path = tmp_path / "digit.png"
    keras.utils.save_img(path, np.round(images[3][..., None] * 255 / 16),
                         scale=False)
    out = run_example("classify_image.py", str(path)).splitlines()
    assert out[0] == str(path)
    assert out[3].strip().startswith(f"ensemble: {labels[3]} ")  # class names


@pytest.mark.single_backend
def test_finetune_digits(tmp_path):
    out = run_example("finetune_digits.py", "--shots", "1", "--epochs", "1",
                      "--out", str(tmp_path / "tuned"))
    report = json.loads(out)
    assert set(report["after"]) == {"ensemble/accuracy", "ensemble/nll",
                                    "ensemble/ece"}
    assert (tmp_path / "tuned" / "finetune.json").is_file()


@pytest.mark.single_backend
def test_evaluate_finetuned(tmp_path):
    out = run_example("evaluate_finetuned.py", "--shots", "1", "--epochs",
                      "1", "--out", str(tmp_path))
    assert "OOD (digits-rotated)" in out
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["preset"] == str(tmp_path / "preset")
    assert (tmp_path / "report" / "routing_maps.png").is_file()


@pytest.mark.single_backend
def test_train_expert_parallel(tmp_path):
    pytest.importorskip("jax")
    out = run_example("train_expert_parallel.py", "--batch-axis", "2",
                      "--expert-axis", "4", "--epochs", "1", "--train-size",
                      "128", "--batch-size", "32", "--out",
                      str(tmp_path / "preset"))
    report = json.loads(out)
    assert report["devices"] == 8
    assert report["expert_kernel"]["sharding"] == ["expert", None, None]
    assert report["expert_kernel"]["experts_per_device"] == 2
    assert np.isfinite(report["loss"][0])
    import keras_e3

    model = keras_e3.E3ViT.from_preset(str(tmp_path / "preset"))
    assert model.backbone.num_experts == 8


def readme_snippet(heading=None, contains=None):
    """The first ```python block of README.md under `heading` (a "## ..."
    line), or the first one containing `contains`."""
    text = (ROOT / "README.md").read_text()
    if heading is not None:
        text = text[text.index(heading + "\n"):]
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    if contains is not None:
        blocks = [b for b in blocks if contains in b]
    return blocks[0]


def run_snippet(code, tmp_path):
    env = dict(os.environ, KERAS_BACKEND=BACKEND,
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get(
                   "PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path,
                            capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.single_backend
def test_readme_fine_tuning_and_few_shot_snippet_runs_on_raw_images(
        tmp_path):
    """Issue 28: the snippet, as written, on raw uint8 digits."""
    code = readme_snippet("## Fine-tuning, few-shot transfer and data")
    assert "x_raw" in code and "fewshot_evaluate" in code
    accuracy = float(run_snippet(code, tmp_path).strip().splitlines()[-1])
    assert 0.2 < accuracy <= 1.0  # 10-shot on 10 digit classes


@pytest.mark.single_backend
def test_readme_hand_built_model_snippet_runs(tmp_path):
    code = readme_snippet(contains="preprocessor=keras_e3.ImageConverter")
    code = "import keras_e3, numpy as np\n" + code + (
        "\nprint(model.decode_predictions(model.predict_ensemble("
        "np.zeros((8, 8), np.uint8)), top=1)[0][0][0])")
    assert run_snippet(code, tmp_path).strip().splitlines()[-1] in [
        str(i) for i in range(10)]


@pytest.mark.single_backend
def test_readme_robustness_snippet_runs(tmp_path):
    pytest.importorskip("imagecorruptions")
    code = readme_snippet("## Robustness under distribution shift")
    out = run_snippet(code, tmp_path).strip().splitlines()
    assert 0.0 < float(out[-2]) < 10.0  # an mCE against the V-MoE
    assert "'severity': 0" in out[-1] and "'model': 'ensemble'" in out[-1]


@pytest.mark.single_backend
def test_readme_upcycle_snippet_runs(tmp_path):
    code = readme_snippet("## Dense ViTs and sparse upcycling")
    assert run_snippet(code, tmp_path).strip().splitlines()[-1] == "4 2"
    assert (tmp_path / "e3_from_vit" / "preprocessor.json").is_file()

