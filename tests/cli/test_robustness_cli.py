"""`keras-e3 evaluate P1 P2 --corruptions ... / --shift-dataset ...`: rows
per preset equal metrics computed here from predict_members on the same
corrupted files; JSON, CSV and the plot written; clear errors."""

import csv
import json

import numpy as np
import pytest
import raw_doors
from raw_doors import own_metrics

from keras_e3.cli import main
from keras_e3.data.corruptions import corrupt
from keras_e3.preprocessing.image_converter import decode_image

pytest.importorskip("imagecorruptions",
                    reason="pip install keras-e3[corruptions]")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust")
    presets = {}
    for kind in ("vit", "e3"):
        model = raw_doors.tiny_model(kind)
        presets[kind] = (model, str(root / kind))
        model.save_to_preset(presets[kind][1])
    data = root / "data"
    files, labels = [], []
    for label, name in enumerate(raw_doors.CLASS_NAMES):
        images = raw_doors.raw_images(sizes=[(34, 40), (36, 33)],
                                      seed=label)
        files += raw_doors.write_images(data / name, images)
        labels += [label] * 2
    return presets, data, files, np.array(labels), root


def test_corruptions_of_several_presets(setup):
    presets, data, files, labels, root = setup
    out = root / "out"
    assert main(["evaluate", presets["vit"][1], presets["e3"][1],
                 "--data", str(data), "--corruptions", "contrast,fog",
                 "--severities", "2", "--out", str(out)]) == 0
    report = json.loads((out / "robustness.json").read_text())
    images = [decode_image(f) for f in sorted(files)]
    order = np.argsort(files)
    for kind in ("vit", "e3"):
        model, path = presets[kind]
        rows = report["rows"][path]
        assert [(r["corruption"], r["severity"]) for r in rows
                if r["model"] == "ensemble"] == [
            ("clean", 0), ("contrast", 2), ("fog", 2)]
        for corruption, severity in (("clean", 0), ("fog", 2)):
            x = images if corruption == "clean" else [
                corrupt(image, corruption, severity, seed=s) for s, image
                in zip(_list_seeds(0, len(images)), images)]
            expected = own_metrics(model.predict_members(x),
                                   labels[order])
            row = [r for r in rows if r["corruption"] == corruption
                   and r["model"] == "ensemble"][0]
            for name, value in expected.items():
                assert row[name] == pytest.approx(value, abs=1e-5), (
                    kind, corruption, name)
    assert report["summary"][presets["vit"][1]]["mce_vs_first"]["mce"] == \
        pytest.approx(1.0)
    with open(out / "robustness.csv") as f:
        table = list(csv.DictReader(f))
    # vit: 3 sets x (ensemble, member_0); e3: 3 x (ensemble + 2 members)
    assert len(table) == 3 * 2 + 3 * 3
    assert (out / "corruptions.png").stat().st_size > 1000


def _list_seeds(seed, n):
    from keras_e3.evaluation.robustness import _image_seed

    return [_image_seed(seed, i) for i in range(n)]


def test_errors(setup, capsys):
    presets, data, _, _, root = setup
    for argv, message in [
            ([presets["vit"][1], presets["e3"][1], "--data", str(data)],
             "robustness mode only"),
            ([presets["vit"][1], "--data", str(data), "--corruptions",
              "haze"], "Unknown corruption 'haze'"),
            ([presets["vit"][1], "--data", str(data), "--corruptions",
              "fog", "--severities", "0"], "severities must be integers"),
            ([presets["vit"][1], "--corruptions", "fog"], "needs --data"),
            ([presets["vit"][1], "--shift-dataset", "imagenet_c"],
             "Unknown shifted test set")]:
        with pytest.raises(SystemExit):
            main(["evaluate", *argv, "--out", str(root / "bad")])
        assert message in capsys.readouterr().err
