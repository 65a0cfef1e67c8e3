"""`keras-e3 finetune` and `keras-e3 predict`."""

import json

import keras
import numpy as np
import pytest
from conftest import run_in_process
from conftest import ROOT

import keras_e3
from keras_e3.presets import files as preset_io
from keras_e3.metrics import evaluate_predictions

VIT_DIGITS = str(ROOT / "presets" / "vit_tiny_digits")


def run(capsys, *argv):
    return run_in_process(capsys, *argv)


def image_folder(root, counts, size=12):
    rng = np.random.default_rng(0)
    for c, n in enumerate(counts):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 255, (size, size, 3)).astype("uint8")
            pixels[..., c % 3] = 255  # a class-dependent colour
            keras.utils.save_img(root / f"class_{c}" / f"{i}.png", pixels)
    return root


def test_finetune_writes_a_preset_that_reloads(capsys, tmp_path):
    out = tmp_path / "tuned"
    code, stdout, stderr = run(
        capsys, "finetune", "--preset", VIT_DIGITS, "--data", "digits",
        "--shots", "2", "--epochs", "1", "--out", str(out))
    assert code == 0, stderr
    assert f"wrote {out}" in stdout
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["num_train"] == 20 and summary["shots"] == 2
    assert "loss" in summary["history"]
    assert "finetune.json" in preset_io.verify_preset(out)["files"]
    # The reloaded preset reproduces the held-out metrics of the summary,
    # by predict on the raw 8x8 uint8 held-out digits.
    from keras_e3.data.digits import load_digits_raw
    from keras_e3.data.digits import split_indices

    images, labels = load_digits_raw()
    _, test = split_indices()
    x_test = np.round(images[test] * 255 / 16).astype(np.uint8)[..., None]
    model = keras_e3.E3ViT.from_preset(out)
    report = evaluate_predictions(model.predict_members(x_test),
                                  labels[test])
    for key in ("ensemble/accuracy", "ensemble/nll", "ensemble/ece"):
        assert report[key] == pytest.approx(summary["held_out"][key],
                                            abs=1e-6)
    assert model.class_names == [str(i) for i in range(10)]


def test_finetune_on_an_image_folder_with_a_new_head(capsys, tmp_path):
    data = image_folder(tmp_path / "data", [4, 3, 5])
    out = tmp_path / "tuned"
    code, stdout, stderr = run(
        capsys, "finetune", "--preset", VIT_DIGITS, "--data", str(data),
        "--shots", "2", "--epochs", "1", "--train", "head", "--out",
        str(out))
    assert code == 0, stderr
    model = keras_e3.E3ViT.from_preset(out)
    assert model.num_classes == 3
    assert model.class_names == ["class_0", "class_1", "class_2"]
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["held_out"]["num_examples"] == 12 - 6


@pytest.mark.single_backend
def test_bad_finetune_input_is_a_clear_error(capsys, tmp_path):
    data = image_folder(tmp_path / "data", [4, 2])
    cases = [
        (["--preset", VIT_DIGITS, "--data", str(data), "--shots", "3"],
         "k=3 exceeds the smallest class: class 1 has only 2"),
        (["--preset", VIT_DIGITS, "--data", str(tmp_path / "missing")],
         "Unknown dataset"),
        (["--preset", "no_such_preset", "--data", "digits"],
         "Unknown preset 'no_such_preset'"),
    ]
    for args, message in cases:
        code, _, stderr = run(capsys, "finetune", *args, "--out",
                              str(tmp_path / "out"))
        assert code == 1, stderr
        assert message in stderr
    assert not (tmp_path / "out").exists()


def test_interrupted_finetune_keeps_the_previous_output(capsys, tmp_path,
                                                        monkeypatch):
    out = tmp_path / "tuned"
    keras_e3.E3ViT.from_preset(VIT_DIGITS).save_to_preset(out)
    before = {n: preset_io.sha256(out / n) for n in
              preset_io.verify_preset(out)["files"]}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(keras_e3.E3ViT, "fit", interrupted)
    code, _, stderr = run(capsys, "finetune", "--preset", VIT_DIGITS,
                          "--data", "digits", "--shots", "1", "--out",
                          str(out))
    assert code == 130
    assert "interrupted" in stderr and "not changed" in stderr
    assert {n: preset_io.sha256(out / n) for n in before} == before
    assert [p.name for p in tmp_path.iterdir()] == ["tuned"]


def test_predict_prints_ensemble_and_members(capsys, tmp_path):
    e3 = str(ROOT / "presets" / "e3_tiny_digits")
    from keras_e3.data.digits import load_digits_raw

    images, labels = load_digits_raw()
    paths = []
    for i in (0, 1):
        path = tmp_path / f"digit_{labels[i]}.png"
        pixels = np.round(images[i][..., None] * 255 / 16).astype("uint8")
        keras.utils.save_img(path, pixels, scale=False)
        paths.append(str(path))
    code, stdout, stderr = run(capsys, "predict", "--preset", e3,
                               "--top-k", "3", "--json", *paths)
    assert code == 0, stderr
    results = json.loads(stdout)
    assert [r["image"] for r in results] == paths
    for r, label in zip(results, labels[:2]):
        assert len(r["top_k"]) == 3
        probs = [t["probability"] for t in r["top_k"]]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0
        assert len(r["members"]) == 2
        assert 0.0 <= r["disagreement"] <= 1.0
        assert r["top_k"][0]["class"] == str(label)
    code, stdout, _ = run(capsys, "predict", "--preset", e3,
                          str(tmp_path / "missing.png"))
    assert code == 1 and "No such image file" in stdout
