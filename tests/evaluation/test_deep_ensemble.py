"""keras_e3.DeepEnsemble: pooled member logits, the shared report, FLOPs."""

import numpy as np
import pytest

import keras_e3
from keras_e3.evaluation import flops
from keras_e3.evaluation.deep_ensemble import DeepEnsemble
from keras_e3.metrics import evaluate_predictions
from conftest import tiny_backbone_kwargs


def tiny_model(num_classes=5, **overrides):
    backbone = keras_e3.E3ViTBackbone(**tiny_backbone_kwargs(**overrides))
    return keras_e3.E3ViT(backbone, num_classes=num_classes,
                          head_kernel_initializer="glorot_uniform")


@pytest.fixture(scope="module")
def models():
    vit = dict(moe_layers=(), ensemble_size=1)
    vmoe = dict(ensemble_size=1)
    return [tiny_model(**vit), tiny_model(**vmoe), tiny_model()]  # + E³


def test_members_and_report(models, rng):
    images = rng.normal(size=(6, 16, 16, 3)).astype("float32")
    labels = rng.integers(0, 5, size=6)
    ensemble = DeepEnsemble(models)
    assert len(ensemble) == 3 and ensemble.ensemble_size == 4
    logits = ensemble.predict_members(images, batch_size=6)
    assert logits.shape == (6, 4, 5)
    own = [np.asarray(m.predict(images, verbose=0))
           for m in models]
    np.testing.assert_allclose(logits[:, 0], own[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(logits[:, 1], own[1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(logits[:, 2:], own[2], rtol=1e-6, atol=1e-6)

    report = ensemble.evaluate_ensemble(images, labels, num_bins=5)
    expected = evaluate_predictions(np.concatenate(
        [own[0][:, None], own[1][:, None], own[2]], axis=1), labels,
        num_bins=5)
    assert report.keys() == expected.keys()
    for key, value in expected.items():
        assert report[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert "member_3/nll" in report and "disagreement" in report
    # One E³ model alone gives exactly its own evaluate_predictions report.
    alone = DeepEnsemble(models[2:]).evaluate_ensemble(images, labels)
    assert alone == pytest.approx(evaluate_predictions(own[2], labels))

    log_probs = ensemble.predict_ensemble(images)
    np.testing.assert_allclose(np.exp(log_probs).sum(-1), 1.0, rtol=1e-6)


def test_flops_sum_members(models):
    ensemble = DeepEnsemble(models)
    counts = ensemble.flops()
    assert counts["flops"] == pytest.approx(
        sum(flops.count_flops(m)["flops"] for m in models))
    assert counts["params"] == sum(m.count_params() for m in models)
    assert flops.count_flops(ensemble)["macs"] == counts["macs"]
    two = flops.deep_ensemble_flops(models[1], 2)
    assert DeepEnsemble([models[1], models[1]]).flops()["flops"] == (
        two["flops"])


def test_errors(models):
    with pytest.raises(ValueError, match="at least one model"):
        DeepEnsemble([])
    with pytest.raises(ValueError, match="num_classes"):
        DeepEnsemble([models[0], tiny_model(num_classes=3)])
    with pytest.raises(ValueError, match="image shape"):
        DeepEnsemble([models[0], tiny_model(image_size=24)])
    with pytest.raises(ValueError, match="E3ViT"):
        DeepEnsemble([models[0], models[0].backbone])
    with pytest.raises(ValueError, match="images must be"):
        DeepEnsemble(models[:1]).predict_members(np.zeros((2, 8, 8, 3)))
