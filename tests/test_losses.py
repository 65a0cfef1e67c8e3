"""The ensemble training objectives against direct NumPy formulas."""

import numpy as np
import pytest
from conftest import tiny_backbone_kwargs
from conftest import to_numpy

import keras_e3


def numpy_losses(labels, logits, smoothing=0.0):
    """(softmax, sigmoid) per-example losses, averaged over members."""
    c = logits.shape[-1]
    y = np.eye(c)[labels] * (1 - smoothing) + smoothing / c
    y = y[:, None, :]
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    softmax = -(y * log_softmax).sum(-1).mean(1)
    log_sig = -np.log1p(np.exp(-logits))
    log_sig_neg = -np.log1p(np.exp(logits))
    sigmoid = -(y * log_sig + (1 - y) * log_sig_neg).sum(-1).mean(1)
    return softmax, sigmoid


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_losses_match_numpy(rng, smoothing):
    logits = rng.normal(size=(5, 3, 4)).astype("float32")
    labels = rng.integers(0, 4, 5)
    softmax, sigmoid = numpy_losses(labels, logits.astype("float64"),
                                    smoothing)
    for loss, expected in (
            (keras_e3.EnsembleSoftmaxCrossEntropy(label_smoothing=smoothing),
             softmax),
            (keras_e3.EnsembleSigmoidCrossEntropy(label_smoothing=smoothing),
             sigmoid)):
        got = to_numpy(loss(labels, logits))
        np.testing.assert_allclose(got, expected.mean(), rtol=1e-5)
        one_hot = keras_e3.EnsembleSoftmaxCrossEntropy.from_config(
            dict(loss.get_config(), sparse=False))
        assert one_hot.label_smoothing == smoothing
        restored = type(loss).from_config(loss.get_config())
        np.testing.assert_allclose(to_numpy(restored(labels, logits)), got)


def test_compile_loss_names(rng):
    backbone = keras_e3.E3ViTBackbone(**tiny_backbone_kwargs())
    model = keras_e3.E3ViT(backbone, num_classes=3)
    model.compile(loss="sigmoid")
    assert isinstance(model.loss, keras_e3.EnsembleSigmoidCrossEntropy)
    model.compile()
    assert isinstance(model.loss, keras_e3.EnsembleSoftmaxCrossEntropy)
    names = [m.name for m in model.metrics]
    x = rng.normal(size=(4, 16, 16, 3)).astype("float32")
    logs = model.evaluate(x, np.arange(4) % 3, verbose=0, return_dict=True)
    for name in ("ensemble_accuracy", "ensemble_nll", "member_0_accuracy",
                 "member_1_accuracy"):
        assert name in logs, (name, names)
