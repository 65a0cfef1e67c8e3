"""evaluate_corruptions against metrics computed here from predict_members
on the corrupted images (not the library's aggregation), for a dense ViT, a
V-MoE, an E³ and a DeepEnsemble; mCE against a hand-made table."""

import numpy as np
import pytest
import raw_doors
from raw_doors import own_metrics

from keras_e3.data.corruptions import corrupt
from keras_e3.evaluation import robustness
from keras_e3.evaluation.deep_ensemble import DeepEnsemble
from keras_e3.evaluation.robustness import evaluate_corruptions
from keras_e3.evaluation.robustness import mean_corruption_error
from keras_e3.evaluation.robustness import summarize_corruptions

pytest.importorskip("imagecorruptions",
                    reason="pip install keras-e3[corruptions]")


@pytest.fixture(scope="module")
def data():
    images = np.stack(raw_doors.raw_images(sizes=[(36, 40)] * 6, seed=3))
    labels = np.array([0, 1, 2, 0, 1, 2])
    return images, labels


@pytest.fixture(scope="module")
def models():
    out = {kind: raw_doors.tiny_model(kind) for kind in raw_doors.KINDS}
    out["deep_ensemble"] = DeepEnsemble(
        [raw_doors.tiny_model("vit", seed=1), raw_doors.tiny_model(
            "vmoe", seed=2)])
    return out


@pytest.mark.parametrize("kind", ["vit", "vmoe", "e3", "deep_ensemble"])
def test_rows_equal_metrics_of_predict_members(models, data, kind):
    model = models[kind]
    images, labels = data
    rows = evaluate_corruptions(model, images, labels,
                                corruptions=["contrast", "shot_noise"],
                                severities=(1, 4), seed=5, verbose=0)
    members = {"vit": 1, "vmoe": 1, "e3": 2, "deep_ensemble": 2}[kind]
    outputs = ["ensemble"] + [f"member_{m}" for m in range(members)]
    keys = [(r["corruption"], r["severity"], r["model"]) for r in rows]
    assert keys == [(c, s, o) for c, s in [("clean", 0), ("contrast", 1),
                                           ("contrast", 4),
                                           ("shot_noise", 1),
                                           ("shot_noise", 4)]
                    for o in outputs]
    for (c, s), chunk in zip([("clean", 0), ("contrast", 1), ("contrast", 4),
                              ("shot_noise", 1), ("shot_noise", 4)],
                             np.split(np.array(rows), 5)):
        x = images if c == "clean" else corrupt(images, c, s, seed=5)
        logits = model.predict_members(x)
        for row in chunk:
            if row["model"] == "ensemble":
                expected = own_metrics(logits, labels)
            else:
                m = int(row["model"].split("_")[1])
                expected = own_metrics(logits[:, m], labels)
            for name, value in expected.items():
                assert row[name] == pytest.approx(value, abs=1e-6), (
                    row, name)


@pytest.mark.single_backend  # argument handling: 96 predict calls
def test_defaults_and_lists_of_sizes(models, data):
    """Every corruption at every severity by default; images of different
    sizes as a list; a model without predict_members is refused."""
    model = models["vit"]
    images, labels = data
    rows = evaluate_corruptions(model, images[:2], labels[:2], verbose=0)
    assert len(rows) == 2 * (1 + 19 * 5)
    assert {r["severity"] for r in rows} == {0, 1, 2, 3, 4, 5}
    mixed = [images[0], images[1, :33, :35]]
    rows = evaluate_corruptions(model, mixed, labels[:2],
                                corruptions="fog", severities="2",
                                verbose=0)
    assert [r["corruption"] for r in rows] == ["clean", "clean", "fog",
                                               "fog"]
    with pytest.raises(TypeError, match="predict_members"):
        evaluate_corruptions(object(), images, labels, verbose=0)
    with pytest.raises(ValueError, match="severities must be integers"):
        evaluate_corruptions(model, images, labels, severities=(0,),
                             verbose=0)
    with pytest.raises(ValueError, match="Unknown corruption"):
        evaluate_corruptions(model, images, labels, corruptions="haze",
                             verbose=0)


def table(errors, clean, model="ensemble"):
    rows = [{"corruption": "clean", "severity": 0, "model": model,
             "accuracy": 1 - clean}]
    for c, per_severity in errors.items():
        rows += [{"corruption": c, "severity": s, "model": model,
                  "accuracy": 1 - e} for s, e in per_severity.items()]
    return rows


def test_mce_on_a_hand_made_table():
    ours = table({"fog": {1: 0.2, 3: 0.4}, "snow": {1: 0.3, 3: 0.5}}, 0.1)
    base = table({"fog": {1: 0.5, 3: 0.7}, "snow": {1: 0.6, 3: 0.6}}, 0.3)
    out = mean_corruption_error(ours, base, corruptions=["fog", "snow"])
    # CE_fog = (0.2 + 0.4) / (0.5 + 0.7) = 0.5; CE_snow = 0.8 / 1.2
    assert out["ce"]["fog"] == pytest.approx(0.5)
    assert out["ce"]["snow"] == pytest.approx(2 / 3)
    assert out["mce"] == pytest.approx((0.5 + 2 / 3) / 2)
    # relative: (0.1 + 0.3) / (0.2 + 0.4) and (0.2 + 0.4) / (0.3 + 0.3)
    assert out["relative_ce"]["fog"] == pytest.approx(2 / 3)
    assert out["relative_ce"]["snow"] == pytest.approx(1.0)
    assert out["relative_mce"] == pytest.approx(5 / 6)
    assert out["severities"] == [1, 3]


def test_mce_against_alexnet_by_default():
    """Errors equal to AlexNet's published ImageNet-C errors give mCE 1;
    half of them 0.5. Literal constants from Hendrycks & Dietterich's code:
    the per-corruption means 0.886428 (Gaussian noise) ... 0.606500 (JPEG)
    that the literature divides by."""
    published_means = {
        "gaussian_noise": 0.886428, "shot_noise": 0.894468,
        "impulse_noise": 0.922640, "defocus_blur": 0.819880,
        "glass_blur": 0.826268, "motion_blur": 0.785948,
        "zoom_blur": 0.798360, "snow": 0.866816, "frost": 0.826572,
        "fog": 0.819324, "brightness": 0.564592, "contrast": 0.853204,
        "elastic_transform": 0.646056, "pixelate": 0.717840,
        "jpeg_compression": 0.606500}
    for c, errors in robustness.ALEXNET_ERRORS.items():
        assert np.mean(errors) == pytest.approx(published_means[c],
                                                abs=1e-6), c
    same = table({c: dict(zip(range(1, 6), e))
                  for c, e in robustness.ALEXNET_ERRORS.items()}, 0.435)
    assert mean_corruption_error(same)["mce"] == pytest.approx(1.0)
    assert mean_corruption_error(same)["relative_mce"] == pytest.approx(1.0)
    half = table({c: {s: e / 2 for s, e in zip(range(1, 6), errors)}
                  for c, errors in robustness.ALEXNET_ERRORS.items()}, 0.2)
    assert mean_corruption_error(half)["mce"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no gaussian_noise"):
        mean_corruption_error(table({"fog": {1: 0.1}}, 0.1))
    assert mean_corruption_error(table({"fog": {1: 0.1}}, 0.1),
                                 corruptions=["fog"])["mce"] == \
        pytest.approx(0.1 / 0.67474)


def test_summary_per_severity():
    rows = table({"fog": {1: 0.2, 2: 0.4}, "snow": {1: 0.4, 2: 0.6}}, 0.1)
    for r in rows:
        r.update(nll=1.0 - r["accuracy"], ece=0.0, brier=0.5)
    out = summarize_corruptions(rows)
    assert [(r["severity"], r["num_corruptions"]) for r in out] == [
        (0, 1), (1, 2), (2, 2)]
    assert out[1]["accuracy"] == pytest.approx(0.7)
    assert out[2]["nll"] == pytest.approx(0.5)


def test_relative_ce_is_none_where_the_baseline_does_not_degrade():
    ours = table({"fog": {1: 0.3}, "snow": {1: 0.4}}, 0.1)
    base = table({"fog": {1: 0.2}, "snow": {1: 0.5}}, 0.2)
    out = mean_corruption_error(ours, base, corruptions=["fog", "snow"])
    assert out["relative_ce"]["fog"] is None
    # snow: (0.4 - 0.1) / (0.5 - 0.2)
    assert out["relative_mce"] == pytest.approx(1.0)
