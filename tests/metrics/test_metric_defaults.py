"""The documented calibration default: top-label ECE over 15 equal-width
bins (`keras_e3.metrics.ece`, `evaluate_predictions`, the Keras `ECE`
metric). The case puts two examples in one bin of 10 but in two bins of 15,
so another bin count gives another value."""

import numpy as np

from keras_e3.metrics import ECE
from keras_e3.metrics import ece
from keras_e3.metrics import evaluate_predictions

# Confidence 0.62 (correct) and 0.68 (wrong). 15 equal-width bins: 0.62 in
# (9/15, 10/15], 0.68 in (10/15, 11/15], so ECE = (|1 - 0.62| + |0 -
# 0.68|) / 2 = 0.53. 10 bins: both in (0.6, 0.7], ECE = |0.5 - 0.65| =
# 0.15. 15 equal-mass bins: one example per bin, also 0.53, so the binning
# is pinned by a third example (below).
PROBS = np.array([[0.62, 0.38], [0.32, 0.68]])
LABELS = np.array([0, 0])
ECE_15 = 0.53
ECE_10 = 0.15


def test_ece_default_is_15_equal_width_bins():
    assert abs(ece(PROBS, LABELS, num_bins=10) - ECE_10) < 1e-9
    assert abs(ece(PROBS, LABELS, num_bins=15) - ECE_15) < 1e-9
    assert abs(ece(PROBS, LABELS) - ECE_15) < 1e-9


def test_ece_default_binning_is_equal_width():
    # Three confident examples: 0.95 right, 0.96 wrong, 0.97 right. Equal
    # width: one bin (14/15, 1], ECE = |2/3 - 0.96|. Equal mass: one bin
    # each, ECE = (0.05 + 0.96 + 0.03) / 3.
    probs = np.array([[0.95, 0.05], [0.04, 0.96], [0.97, 0.03]])
    labels = np.array([0, 0, 0])
    width = abs(2 / 3 - 0.96)
    mass = (0.05 + 0.96 + 0.03) / 3
    assert abs(ece(probs, labels, binning="equal_width") - width) < 1e-9
    assert abs(ece(probs, labels, binning="equal_mass") - mass) < 1e-9
    assert abs(ece(probs, labels) - width) < 1e-9
    out = evaluate_predictions(np.log(probs), labels)
    assert abs(out["ensemble/ece"] - width) < 1e-9


def test_evaluate_predictions_default_ece():
    logits = np.log(PROBS)
    assert abs(evaluate_predictions(logits, LABELS, num_bins=10)
               ["ensemble/ece"] - ECE_10) < 1e-9
    out = evaluate_predictions(logits, LABELS)
    assert abs(out["ensemble/ece"] - ECE_15) < 1e-9
    assert abs(out["member_0/ece"] - ECE_15) < 1e-9
    # Members [N, M, C]: member 1 is the same predictions, ensemble too.
    out = evaluate_predictions(np.stack([logits, logits], axis=1), LABELS)
    assert abs(out["member_1/ece"] - ECE_15) < 1e-9
    assert abs(out["ensemble/ece"] - ECE_15) < 1e-9


def test_keras_ece_metric_default():
    logits = np.log(PROBS).astype("float32")
    for metric, expected in ((ECE(), ECE_15), (ECE(num_bins=10), ECE_10)):
        metric.update_state(LABELS, logits)
        assert abs(float(metric.result()) - expected) < 1e-5
