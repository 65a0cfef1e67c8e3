"""keras_e3.fewshot: the closed-form linear probe and k-shot evaluation."""

import numpy as np
import pytest
from conftest import tiny_backbone_kwargs
from conftest import to_numpy

import keras_e3
from keras_e3.training.fewshot import BIAS_CONSTANT
from keras_e3.training.fewshot import extract_features
from keras_e3.training.fewshot import fewshot_evaluate
from keras_e3.training.fewshot import fit_ridge_probe
from keras_e3.training.fewshot import linear_probe
from keras_e3.training.fewshot import probe_scores


def clusters(rng, n_per_class, num_classes=3, members=2, dim=6, noise=0.3):
    """Features [N, M, D] around one centre per (class, member)."""
    centres = rng.normal(size=(num_classes, members, dim)) * 3
    labels = np.repeat(np.arange(num_classes), n_per_class)
    feats = centres[labels] + noise * rng.normal(
        size=(len(labels), members, dim))
    return feats, labels


def reference_weights(x, labels, num_classes, l2):
    """Ridge regression as an augmented least-squares problem (lstsq)."""
    mean, std = x.mean(0), x.std(0) + 1e-5
    z = np.concatenate([(x - mean) / std,
                        np.full((len(x), 1), BIAS_CONSTANT)], axis=1)
    y = 2.0 * np.eye(num_classes)[labels] - 1.0
    d = z.shape[1]
    a = np.concatenate([z, np.sqrt(l2) * np.eye(d)])
    b = np.concatenate([y, np.zeros((d, num_classes))])
    return np.linalg.lstsq(a, b, rcond=None)[0]


@pytest.mark.single_backend
@pytest.mark.parametrize("n,dim", [(40, 8), (6, 20)])  # primal and dual forms
def test_probe_matches_lstsq(rng, n, dim):
    x = rng.normal(size=(n, dim)) * rng.uniform(0.5, 3, size=dim) + 2.0
    labels = np.arange(n) % 4
    for l2 in (1e-2, 1.0, 2.0 ** 10):
        probe = fit_ridge_probe(x, labels, 4, l2_reg=l2)
        np.testing.assert_allclose(probe["weights"],
                                   reference_weights(x, labels, 4, l2),
                                   rtol=1e-6, atol=1e-9)
    scores = probe_scores(probe, x[:3])
    assert scores.shape == (3, 4)


@pytest.mark.single_backend
def test_linear_probe_members_and_ensemble(rng):
    train, y_train = clusters(rng, 5)
    test, y_test = clusters(np.random.default_rng(0), 20)
    out = linear_probe(train, y_train, test, y_test, l2_reg=1.0)
    assert set(out) >= {"member_accuracy", "ensemble_accuracy",
                        "concat_accuracy", "accuracy", "probes"}
    assert len(out["member_accuracy"]) == 2 and len(out["probes"]) == 2
    assert out["ensemble_accuracy"] == out["accuracy"] == 1.0
    # The ensemble averages the members' scores.
    scores = [probe_scores(p, test[:, m]) for m, p in enumerate(out["probes"])]
    expected = np.mean(np.argmax(np.mean(scores, 0), 1) == y_test)
    assert out["ensemble_accuracy"] == expected
    # One model ([N, D]): all accuracies coincide.
    single = linear_probe(train[:, 0], y_train, test[:, 0], y_test)
    assert single["member_accuracy"] == [single["ensemble_accuracy"]]
    assert single["concat_accuracy"] == single["ensemble_accuracy"]
    with pytest.raises(ValueError, match="differ in"):
        linear_probe(train, y_train, test[:, :1], y_test)


@pytest.mark.single_backend
def test_fewshot_evaluate_features_deterministic(rng):
    feats, labels = clusters(rng, 30, noise=2.0)
    test, y_test = clusters(np.random.default_rng(1), 10, noise=2.0)
    kwargs = dict(shots=(1, 5, 10, 25), seeds=(0, 1), l2_reg=1.0)
    a = fewshot_evaluate(None, (feats, labels), (test, y_test), **kwargs)
    b = fewshot_evaluate(None, (feats, labels), (test, y_test), **kwargs)
    assert a["results"] == b["results"]  # deterministic per seed
    assert sorted(a["results"]) == [1, 5, 10, 25]
    assert a["ensemble_size"] == 2 and a["num_classes"] == 3
    r = a["results"][25]
    assert set(r["per_seed"]) == {0, 1} and len(r["member_accuracy"]) == 2
    seeds = [r["per_seed"][s]["ensemble_accuracy"] for s in (0, 1)]
    assert r["ensemble_accuracy"] == pytest.approx(np.mean(seeds))
    other = fewshot_evaluate(None, (feats, labels), (test, y_test),
                             shots=(1,), seeds=(7,), l2_reg=1.0)
    assert other["results"][1]["per_seed"].keys() == {7}
    # An l2 sweep keeps the best value (by ensemble accuracy), as vmoe.
    sweep = fewshot_evaluate(None, (feats, labels), (test, y_test),
                             shots=(5,), l2_reg=[1e-3, 1.0, 1e6])
    best = sweep["results"][5]
    assert best["accuracy"] == max(best["by_l2"].values())
    assert best["l2_reg"] in (1e-3, 1.0, 1e6)
    with pytest.raises(ValueError, match="smallest class"):
        fewshot_evaluate(None, (feats, labels), (test, y_test), shots=(31,))


@pytest.mark.parametrize("overrides", [
    {},  # E³, M = 2
    {"moe_layers": (), "num_experts": 0, "ensemble_size": 1},  # dense ViT
], ids=["e3", "vit"])
def test_fewshot_on_model(rng, overrides):
    backbone = keras_e3.E3ViTBackbone(**tiny_backbone_kwargs(**overrides))
    model = keras_e3.E3ViT(backbone, num_classes=3,
                           head_kernel_initializer="glorot_uniform")
    m = backbone.ensemble_size
    images = rng.normal(size=(12, 16, 16, 3)).astype("float32")
    labels = np.arange(12) % 3
    feats = extract_features(model, images, batch_size=6)
    assert feats.shape == (12, m, 16)
    # Member m of image b: the head on feats[b, m] gives the model's logits.
    logits = model.predict(images, batch_size=6, verbose=0).reshape(12, m, 3)
    kernel, bias = (to_numpy(w) for w in model.head.weights)
    np.testing.assert_allclose(feats @ kernel + bias, logits, atol=1e-5)
    report = fewshot_evaluate(model, (images, labels), (images, labels),
                              shots=(1, 2), seeds=(0,), batch_size=6)
    assert report["ensemble_size"] == m
    for k in (1, 2):
        result = report["results"][k]
        assert len(result["member_accuracy"]) == m
        assert 0.0 <= result["ensemble_accuracy"] <= 1.0
    with pytest.raises(ValueError, match="E3ViT or E3ViTBackbone"):
        extract_features(object(), images)
