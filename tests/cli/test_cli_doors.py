"""The command line's doors against `model.predict` on the decoded files
(issue 28): `keras-e3 evaluate --data FOLDER` (class-named sub-folders),
`keras-e3 predict` (a bad file among good ones, RGB/RGBA/palette files for
a grayscale model) and `keras-e3 finetune` on a folder (trains on the
converter's inputs, saves the same converter)."""

import json
import os

import keras
import numpy as np
import pytest
from conftest import run_in_process
from PIL import Image
from raw_doors import raw_images
from raw_doors import reference
from raw_doors import tiny_model
from raw_doors import write_images

import keras_e3
from keras_e3.data.digits import load_digits_raw
from keras_e3.metrics import evaluate_predictions

TOL = 1e-5


def run(capsys, *argv):
    return run_in_process(capsys, *argv)


def decoded(path):
    """Pillow's pixels of a file ([H, W, C] uint8; palette expanded)."""
    with Image.open(path) as image:
        if image.mode == "P":
            image = image.convert("RGBA" if "transparency" in image.info
                                  else "RGB")
        array = np.asarray(image)
    return array[..., None] if array.ndim == 2 else array


@pytest.fixture(scope="module")
def digits_model():
    return keras_e3.E3ViT.from_preset("e3_tiny_digits")


def digit_folder(root, digits=(0, 1, 7), per_class=3):
    """Sub-folders named after digits, with PNG files of those digits (one
    of each class as an RGB JPEG upsampled to 24x24)."""
    images, labels = load_digits_raw()
    paths = []
    for d in digits:
        folder = root / str(d)
        folder.mkdir(parents=True)
        for j, i in enumerate(np.flatnonzero(labels == d)[:per_class]):
            pixels = np.round(images[i] * 255 / 16).astype(np.uint8)
            if j == 0:
                path = folder / f"{i}.jpg"
                Image.fromarray(pixels).resize((24, 24)).convert(
                    "RGB").save(path)
            else:
                path = folder / f"{i}.png"
                Image.fromarray(pixels).save(path)
            paths.append(str(path))
    return root, paths


def test_evaluate_on_a_folder_reports_predicts_accuracy(capsys, tmp_path,
                                                        digits_model):
    folder, paths = digit_folder(tmp_path / "data")
    out = tmp_path / "report"
    code, stdout, stderr = run(
        capsys, "evaluate", "--preset", "e3_tiny_digits", "--data",
        str(folder), "--out", str(out), "--no-plots")
    assert code == 0, stderr
    report = json.loads((out / "report.json").read_text())
    labels = np.array([int(os.path.basename(os.path.dirname(p)))
                       for p in paths])  # 0, 1, 7: not 0, 1, 2
    logits = reference(digits_model, [decoded(p) for p in paths])
    expected = evaluate_predictions(logits, labels)
    for key in ("ensemble/accuracy", "ensemble/nll", "member_1/nll"):
        assert report["metrics"][key] == pytest.approx(expected[key],
                                                       abs=1e-5), key
    assert expected["ensemble/accuracy"] == 1.0
    assert report["class_names"] == [str(i) for i in range(10)]
    # Sub-folders the model has no class of: an error listing both.
    (folder / "zero").mkdir()
    os.replace(paths[0], folder / "zero" / os.path.basename(paths[0]))
    code, _, stderr = run(capsys, "evaluate", "--preset", "e3_tiny_digits",
                          "--data", str(folder), "--out", str(out))
    assert code == 1
    assert "zero" in stderr and "0, 1, 2, 3, 4, 5, 6, 7, 8, 9" in stderr


def test_predict_reports_bad_files_and_predicts_the_others(
        capsys, tmp_path, digits_model):
    images, labels = load_digits_raw()
    seven = np.round(images[labels == 7][0] * 255 / 16).astype(np.uint8)
    gray = Image.fromarray(seven)
    files = {"gray.png": gray, "rgb.jpg": gray.convert("RGB"),
             "rgba.png": gray.convert("RGBA"), "palette.png": gray.convert(
                 "RGB").convert("P", palette=Image.ADAPTIVE, colors=16)}
    paths = []
    for name, image in files.items():
        image.save(tmp_path / name)
        paths.append(str(tmp_path / name))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    argv = [paths[0], str(broken), *paths[1:], str(tmp_path / "missing.png")]
    code, stdout, stderr = run(capsys, "predict", "--preset",
                               "e3_tiny_digits", "--json", *argv)
    assert code == 1, stderr
    results = json.loads(stdout)
    assert [r["image"] for r in results] == argv
    assert "broken.png" in results[1]["error"]
    assert "No such image file" in results[-1]["error"]
    good = [r for r in results if "error" not in r]
    assert [r["image"] for r in good] == paths
    expected = reference(digits_model, [decoded(p) for p in paths])
    probs = np.exp(keras_e3.ensemble_log_probs(expected))
    for r, p in zip(good, np.asarray(probs)):
        top = r["top_k"][0]
        assert top["class"] == str(int(p.argmax())) == "7"
        assert top["probability"] == pytest.approx(float(p.max()), abs=1e-5)
    code, stdout, _ = run(capsys, "predict", "--preset", "e3_tiny_digits",
                          paths[0], str(broken))
    assert code == 1
    assert f"{broken}: error: " in stdout and f"{paths[0]}: 7 " in stdout


def test_finetune_on_a_folder_trains_on_the_converters_inputs(
        capsys, tmp_path, monkeypatch):
    source = tiny_model("e3", num_channels=1)
    preset = tmp_path / "source"
    source.save_to_preset(str(preset))
    # New classes "b" and "a" (any names: fine-tuning builds a new head),
    # gray and RGB files, PNG and JPEG, of mixed sizes.
    data = tmp_path / "data"
    paths = (write_images(data / "b", raw_images(1)[:3], prefix="g")
             + write_images(data / "b", raw_images(3, seed=1)[:2], "jpg")
             + write_images(data / "a", raw_images(3, seed=2)[2:], "png"))
    seen = []
    fit = keras_e3.E3ViT.fit

    def recording_fit(self, x=None, *args, **kwargs):
        seen.extend(x[i] for i in range(len(x)))
        return fit(self, x, *args, **kwargs)

    monkeypatch.setattr(keras_e3.E3ViT, "fit", recording_fit)
    out = tmp_path / "tuned"
    code, stdout, stderr = run(
        capsys, "finetune", "--preset", str(preset), "--data", str(data),
        "--epochs", "1", "--batch-size", "16", "--train", "head", "--out",
        str(out))
    assert code == 0, stderr
    (x, y), = seen  # one shuffled batch of the 7 files
    classes = {"a": 0, "b": 1}
    assert sorted(y.tolist()) == sorted(
        classes[os.path.basename(os.path.dirname(p))] for p in paths)
    # The training inputs: the source's predict on them is its predict on
    # the decoded files (rows matched within each class, as shuffled).
    assert x.dtype == np.float32
    got = np.asarray(source.predict_on_batch(x))  # no converter between
    for name, label in classes.items():
        files = [p for p in paths if os.path.basename(
            os.path.dirname(p)) == name]
        rows = np.flatnonzero(y == label)
        want = reference(source, [decoded(p) for p in files])
        dist = np.abs(got[rows][:, None] - want[None]).max(axis=(2, 3))
        assert dist.min(axis=1).max() <= TOL, dist
        assert sorted(dist.argmin(axis=1).tolist()) == list(range(
            len(files)))
    tuned = keras_e3.E3ViT.from_preset(str(out))
    assert tuned.class_names == ["a", "b"] and tuned.num_classes == 2
    assert tuned.preprocessor.get_config() == source.preprocessor.get_config()
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["backend"] == keras.backend.backend()
    assert summary["classes"] == ["a", "b"]
