"""keras_e3.metrics: numpy metrics on hand-made cases, OOD metrics against
scikit-learn, and the streaming Keras metrics on the current backend."""

import math

import keras
import numpy as np
import pytest

import keras_e3
from keras_e3 import metrics as km
from conftest import BACKEND


def onehot_rows(conf, pred, num_classes):
    """Rows with probability `conf` on `pred`, the rest spread evenly."""
    rest = (1.0 - conf) / (num_classes - 1)
    probs = np.full((num_classes,), rest)
    probs[pred] = conf
    return probs


def group(conf, n, n_correct, num_classes=3, pred=0):
    """n identical predictions of confidence conf, n_correct of them right."""
    probs = np.tile(onehot_rows(conf, pred, num_classes), (n, 1))
    wrong = (pred + 1) % num_classes
    labels = np.array([pred] * n_correct + [wrong] * (n - n_correct))
    return probs, labels


def stack(*groups):
    return (np.concatenate([g[0] for g in groups]),
            np.concatenate([g[1] for g in groups]))


# ------------------------------------------------------------- basics


@pytest.mark.single_backend
def test_softmax_accuracy_nll_brier_by_hand():
    logits = [[0.0, math.log(3.0)], [math.log(2.0), math.log(2.0)]]
    probs = km.softmax(logits)
    np.testing.assert_allclose(probs, [[0.25, 0.75], [0.5, 0.5]])
    np.testing.assert_allclose(km.softmax([[1000.0, 0.0]]), [[1.0, 0.0]])
    labels = [1, 1]
    # Argmax on ties is the first class: row 2 predicts 0.
    assert km.accuracy(probs, labels) == 0.5
    assert km.nll(probs, labels) == pytest.approx(
        -(math.log(0.75) + math.log(0.5)) / 2)
    # Row 1: 0.25^2 + 0.25^2; row 2: 0.5^2 + 0.5^2.
    assert km.brier(probs, labels) == pytest.approx((0.125 + 0.5) / 2)
    # Lists, [N, 1] labels; log 0 is clipped, not -inf.
    assert km.nll([[1.0, 0.0]], [[1]]) == pytest.approx(-math.log(1e-12))
    assert km.brier([[1.0, 0.0]], [1]) == 2.0


@pytest.mark.single_backend
def test_constant_predictor():
    probs = np.full((10, 4), 0.25)
    labels = [0, 0, 0, 1, 2, 3, 1, 2, 3, 1]  # argmax is class 0: 30 % right
    assert km.accuracy(probs, labels) == pytest.approx(0.3)
    assert km.nll(probs, labels) == pytest.approx(math.log(4))
    assert km.brier(probs, labels) == pytest.approx(0.75**2 + 3 * 0.25**2)
    for binning in ("equal_width", "equal_mass"):
        assert km.ece(probs, labels, binning=binning) == pytest.approx(0.05)


@pytest.mark.single_backend
def test_input_validation():
    with pytest.raises(ValueError):
        km.accuracy(np.ones((2, 3, 4)), [0, 1])
    with pytest.raises(ValueError):
        km.accuracy(np.ones((2, 3)), [0, 1, 2])
    with pytest.raises(ValueError):
        km.nll(np.ones((2, 3)), [0, 3])
    with pytest.raises(ValueError):
        km.ece(np.ones((2, 3)), [0, 1], binning="quantile")


# ---------------------------------------------------------- calibration


@pytest.mark.single_backend
def test_perfectly_calibrated_predictor_has_zero_ece():
    probs, labels = stack(group(0.8, 10, 8), group(0.6, 5, 3),
                          group(1.0, 4, 4), group(0.5, 6, 3, pred=2),
                          group(0.45, 20, 9, pred=1))
    for binning in ("equal_width", "equal_mass"):
        for num_bins in (1, 5, 10, 15):
            assert km.ece(probs, labels, num_bins, binning) == pytest.approx(
                0.0, abs=1e-12)


@pytest.mark.single_backend
def test_overconfident_predictor_ece_by_hand():
    # Conf 0.95 with accuracy 1/2 (6 examples), conf 0.7 with accuracy 1
    # (4 examples): the gaps cancel partially when the bins are merged.
    probs, labels = stack(group(0.95, 6, 3), group(0.7, 4, 4))
    assert km.ece(probs, labels) == pytest.approx(0.6 * 0.45 + 0.4 * 0.3)
    one_bin = abs((3 + 4) / 10 - (6 * 0.95 + 4 * 0.7) / 10)
    assert km.ece(probs, labels, num_bins=1) == pytest.approx(one_bin)
    # Equal mass, 2 bins: the inner edge is the 5th smallest confidence,
    # 0.95, so every example is in bin 0; with 3 bins the edges are 0.7 and
    # 0.95 and the two groups are apart again.
    assert km.ece(probs, labels, 2, "equal_mass") == pytest.approx(one_bin)
    assert km.ece(probs, labels, 3, "equal_mass") == pytest.approx(
        0.6 * 0.45 + 0.4 * 0.3)
    stats = km.reliability(probs, labels, num_bins=10)
    assert stats["count"].tolist() == [0] * 6 + [4, 0, 0, 6]
    np.testing.assert_allclose(stats["confidence"][[6, 9]], [0.7, 0.95])
    np.testing.assert_allclose(stats["accuracy"][[6, 9]], [1.0, 0.5])
    assert np.all(np.isnan(stats["accuracy"][:6]))  # empty bins
    np.testing.assert_allclose(stats["edges"], np.arange(11) / 10)


@pytest.mark.single_backend
def test_ece_bin_edges():
    # 0.6 is on the edge 3/5: it goes to the lower bin (0.4, 0.6]; 0.2 (five
    # equal classes) goes to the first bin, 1.0 to the last.
    probs = [[0.6, 0.4], [0.2] * 5 + [0.0], [1.0, 0.0], [0.8, 0.2],
             [0.0, 0.0]]
    probs = np.array([np.pad(p, (0, 6 - len(p))) for p in probs])
    stats = km.reliability(probs, [0, 0, 0, 1, 0], num_bins=5)
    assert stats["count"].tolist() == [2, 0, 1, 1, 1]  # 0.8 -> (0.6, 0.8]
    np.testing.assert_allclose(stats["confidence"][[0, 2, 3, 4]],
                               [0.1, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(stats["accuracy"][[0, 2, 3, 4]],
                               [1.0, 1.0, 0.0, 1.0])
    # ECE: (2 |1 - 0.1| + 1 |1 - 0.6| + 1 |0 - 0.8| + 1 |1 - 1|) / 5
    assert km.ece(probs, [0, 0, 0, 1, 0], num_bins=5) == pytest.approx(
        (1.8 + 0.4 + 0.8) / 5)
    # float32 inputs are binned in float32: float32(0.6) is still on 3/5.
    stats32 = km.reliability(probs.astype("float32"), [0] * 5, num_bins=5)
    assert stats32["count"].tolist() == [2, 0, 1, 1, 1]


@pytest.mark.single_backend
def test_equal_mass_bins():
    rng = np.random.default_rng(1)
    conf = rng.permutation(np.linspace(0.5, 0.99, 10))
    probs = np.stack([conf, 1 - conf], axis=1)
    labels = rng.integers(0, 2, size=10)
    stats = km.reliability(probs, labels, num_bins=3, binning="equal_mass")
    assert stats["count"].tolist() == [4, 3, 3]
    order = np.argsort(conf)
    for b, idx in enumerate(np.split(order, [4, 7])):
        assert stats["confidence"][b] == pytest.approx(conf[idx].mean())
        assert stats["accuracy"][b] == pytest.approx(
            np.mean(labels[idx] == 0))
    # Fewer examples than bins: one example per bin, the rest empty.
    small = km.reliability(probs[:2], labels[:2], num_bins=3,
                           binning="equal_mass")
    assert small["count"].tolist() == [1, 1, 0]


@pytest.mark.single_backend
def test_equal_mass_ties_share_a_bin():
    # Confidences [.5 x4, .9 x2], 3 bins: both inner edges are 0.5, so the
    # four ties stay together in bin 0 and bin 1 is empty.
    probs, labels = stack(group(0.5, 4, 1, num_classes=2),
                          group(0.9, 2, 2, num_classes=2))
    stats = km.reliability(probs, labels, num_bins=3, binning="equal_mass")
    assert stats["count"].tolist() == [4, 0, 2]
    np.testing.assert_allclose(stats["edges"], [0.0, 0.5, 0.5, 1.0])
    expected = (4 * abs(0.25 - 0.5) + 2 * abs(1.0 - 0.9)) / 6
    assert km.ece(probs, labels, 3, "equal_mass") == pytest.approx(expected)
    # Order of the examples does not matter.
    perm = np.random.default_rng(0).permutation(6)
    assert km.ece(probs[perm], labels[perm], 3, "equal_mass") == (
        pytest.approx(expected))


def brute_force_ece(conf, correct, edges):
    """ECE with bins (edges[b], edges[b+1]], confidence 0 in the first."""
    total = 0.0
    for b in range(len(edges) - 1):
        lo, hi = edges[b], edges[b + 1]
        members = [i for i, c in enumerate(conf)
                   if lo < c <= hi or (b == 0 and c <= lo)]
        if members:
            gap = np.mean(correct[members]) - np.mean(conf[members])
            total += len(members) * abs(gap)
    return total / len(conf)


@pytest.mark.single_backend
@pytest.mark.parametrize("num_bins", [1, 3, 4, 15])
def test_ece_against_brute_force(num_bins):
    rng = np.random.default_rng(num_bins)
    probs = km.softmax(rng.normal(size=(37, 4)) * 2)
    labels = rng.integers(0, 4, size=37)
    conf = probs.max(-1)
    correct = (probs.argmax(-1) == labels).astype(float)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    assert km.ece(probs, labels, num_bins) == pytest.approx(
        brute_force_ece(conf, correct, edges))
    # Equal mass, no ties: bin b holds sorted ranks
    # (ceil(b N / num_bins), ceil((b + 1) N / num_bins)].
    order = np.argsort(conf)
    cuts = [-(-b * 37 // num_bins) for b in range(num_bins + 1)]
    expected = sum(abs(correct[order[lo:hi]].sum() - conf[order[lo:hi]].sum())
                   for lo, hi in zip(cuts[:-1], cuts[1:])) / 37
    assert km.ece(probs, labels, num_bins, "equal_mass") == pytest.approx(
        expected)
    stats = km.reliability(probs, labels, num_bins, "equal_mass")
    assert stats["count"].tolist() == np.diff(cuts).tolist()


@pytest.mark.single_backend
def test_ece_confidence_one_and_extremes():
    # Confidence 1 always right: calibrated; always wrong: ECE 1. Equal
    # width puts 1.0 in the last bin; equal mass puts the ties in the lowest
    # bin their value allows (every inner edge is 1.0: bin 0).
    probs = np.array([[1.0, 0.0]] * 4)
    for binning in ("equal_width", "equal_mass"):
        assert km.ece(probs, [0] * 4, 10, binning) == 0.0
        assert km.ece(probs, [1] * 4, 10, binning) == 1.0
    assert km.reliability(probs, [1] * 4, 10)["count"][-1] == 4
    assert km.reliability(probs, [1] * 4, 10, "equal_mass")["count"][0] == 4
    # Over-confident predictor (conf 0.9, accuracy 0.6): ECE 0.3 whatever
    # the binning, as all examples share a bin.
    probs, labels = group(0.9, 10, 6)
    for binning in ("equal_width", "equal_mass"):
        for num_bins in (1, 7, 15):
            assert km.ece(probs, labels, num_bins, binning) == (
                pytest.approx(0.3))


# ------------------------------------------------------------- ensembles


@pytest.mark.single_backend
def test_ensemble_helpers_by_hand():
    a, b, c = [0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.1, 0.2, 0.7]
    member_probs = np.array([[a, a, b], [a, b, c]])  # [N=2, M=3, C=3]
    np.testing.assert_allclose(km.ensemble_probs(member_probs)[0],
                               [2 / 3, 1 / 3, 0.0])
    # Example 0: pairs (0,1) agree, (0,2), (1,2) differ -> 2/3; example 1: 1.
    assert km.member_disagreement(member_probs) == pytest.approx(5 / 6)
    assert km.member_disagreement(member_probs[:, :1]) == 0.0
    # Ensemble predicts class 0 for both; with labels [0, 1] its error is 1/2.
    assert km.normalized_disagreement(member_probs, [0, 1]) == (
        pytest.approx(5 / 3))
    assert math.isnan(km.normalized_disagreement(member_probs[:, :1], [0, 0]))

    p = np.clip(member_probs, 1e-12, 1.0)
    kls = [np.sum(p[:, i] * np.log(p[:, i] / p[:, j]), axis=-1)
           for i in range(3) for j in range(3) if i != j]
    assert km.average_pairwise_kl(member_probs) == pytest.approx(
        np.mean(kls))
    assert km.diversity(member_probs, [0, 1])["normalized_disagreement"] == (
        pytest.approx(5 / 3))
    assert "normalized_disagreement" not in km.diversity(member_probs)


def test_evaluate_predictions(rng):
    logits = rng.normal(size=(40, 3, 5)) * 3
    labels = rng.integers(0, 5, size=40)
    out = km.evaluate_predictions(logits, labels, num_bins=10)
    member_probs = km.softmax(logits)
    ens = member_probs.mean(axis=1)
    assert out["ensemble/accuracy"] == km.accuracy(ens, labels)
    assert out["ensemble/nll"] == pytest.approx(km.nll(ens, labels))
    assert out["ensemble/ece"] == pytest.approx(km.ece(ens, labels, 10))
    assert out["ensemble/brier"] == pytest.approx(km.brier(ens, labels))
    ens_logp = keras.ops.convert_to_numpy(
        keras_e3.ensemble_log_probs(logits.astype("float32")))
    assert out["ensemble/nll"] == pytest.approx(
        -np.mean(ens_logp[np.arange(40), labels]), rel=1e-5)
    for m in range(3):
        assert out[f"member_{m}/nll"] == pytest.approx(
            km.nll(member_probs[:, m], labels))
        assert out[f"member_{m}/accuracy"] == km.accuracy(
            member_probs[:, m], labels)
    assert out["disagreement"] == km.member_disagreement(member_probs)
    assert len(out) == 4 * 4 + 3

    single = km.evaluate_predictions(logits[:, 0], labels)
    assert set(single) == {f"{p}/{k}" for p in ("ensemble", "member_0")
                           for k in ("accuracy", "nll", "ece", "brier")}
    assert single["ensemble/nll"] == pytest.approx(out["member_0/nll"])
    # Log-space NLL does not saturate where probabilities underflow.
    huge = km.evaluate_predictions([[0.0, 2000.0]], [0])
    assert huge["ensemble/nll"] == pytest.approx(2000.0)


# ------------------------------------------------------------------ OOD


@pytest.mark.single_backend
def test_ood_scores_by_hand():
    probs = np.array([[0.5, 0.5], [1.0, 0.0]])
    np.testing.assert_allclose(km.msp_score(probs), [-0.5, -1.0])
    np.testing.assert_allclose(km.entropy_score(probs), [math.log(2), 0.0])
    np.testing.assert_allclose(km.max_logit_score([[1.0, 3.0], [-2, -1]]),
                               [-3.0, 1.0])
    # Two confident members that disagree: MI = log 2; agreeing: MI = 0.
    member_probs = np.array([[[1.0, 0.0], [0.0, 1.0]],
                             [[0.5, 0.5], [0.5, 0.5]]])
    np.testing.assert_allclose(km.mutual_information_score(member_probs),
                               [math.log(2), 0.0], atol=1e-12)
    np.testing.assert_allclose(km.entropy_score(member_probs),
                               [math.log(2), math.log(2)])
    np.testing.assert_allclose(km.msp_score(member_probs), [-0.5, -0.5])


def brute_force_auroc(in_scores, out_scores):
    diff = np.asarray(out_scores)[:, None] - np.asarray(in_scores)[None, :]
    return np.mean((diff > 0) + 0.5 * (diff == 0))


@pytest.mark.single_backend
def test_auroc_aupr_fpr_by_hand():
    assert km.auroc([0, 1, 2], [3, 4]) == 1.0
    assert km.auroc([3, 4], [0, 1, 2]) == 0.0
    assert km.auroc([1, 1], [1, 1, 1]) == 0.5
    assert km.aupr([1, 1], [1, 1, 1]) == pytest.approx(0.6)
    assert km.aupr([0, 1], [2, 3]) == 1.0
    # Descending: 3 (out) 2 (in) 1 (out): AP = 1/2 * 1 + 1/2 * 2/3.
    assert km.aupr([2], [3, 1]) == pytest.approx(0.5 + 1 / 3)
    assert km.auroc([0.1, 0.4, 0.4], [0.4, 0.9]) == pytest.approx(
        brute_force_auroc([0.1, 0.4, 0.4], [0.4, 0.9]))
    # OOD scores 1..20: detecting >= 95 % (19 of 20) needs threshold 2;
    # in-distribution scores >= 2: 2.5, 10, 30 -> FPR 3/5.
    in_scores = [0.5, 1.5, 2.5, 10, 30]
    assert km.fpr_at_95_tpr(in_scores, np.arange(1, 21)) == pytest.approx(0.6)
    assert km.fpr_at_95_tpr([0, 0, 5], [1, 2]) == pytest.approx(1 / 3)
    assert km.fpr_at_95_tpr([9, 9], [1, 9]) == 1.0  # tie: in flagged too
    with pytest.raises(ValueError):
        km.auroc([], [1.0])
    with pytest.raises(ValueError):
        km.aupr([np.nan], [1.0])


@pytest.mark.single_backend
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ood_metrics_match_sklearn_with_ties(seed):
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    in_scores = rng.integers(0, 12, size=57).astype(float)
    out_scores = rng.integers(3, 15, size=41).astype(float)
    y = np.r_[np.zeros(57), np.ones(41)]
    s = np.r_[in_scores, out_scores]
    assert km.auroc(in_scores, out_scores) == pytest.approx(
        sk.roc_auc_score(y, s), abs=1e-12)
    assert km.auroc(in_scores, out_scores) == pytest.approx(
        brute_force_auroc(in_scores, out_scores), abs=1e-12)
    assert km.aupr(in_scores, out_scores) == pytest.approx(
        sk.average_precision_score(y, s), abs=1e-12)
    fpr, tpr, _ = sk.roc_curve(y, s, drop_intermediate=False)
    assert km.fpr_at_95_tpr(in_scores, out_scores) == pytest.approx(
        fpr[np.searchsorted(tpr, 0.95)], abs=1e-12)
    # Continuous scores (no ties) too.
    cont_in, cont_out = rng.normal(size=30), rng.normal(0.5, size=25)
    y = np.r_[np.zeros(30), np.ones(25)]
    s = np.r_[cont_in, cont_out]
    assert km.auroc(cont_in, cont_out) == pytest.approx(
        sk.roc_auc_score(y, s), abs=1e-12)
    assert km.aupr(cont_in, cont_out) == pytest.approx(
        sk.average_precision_score(y, s), abs=1e-12)


# --------------------------------------------------------- Keras metrics


def keras_metrics():
    return [km.EnsembleAccuracy(), km.EnsembleNLL(), km.MemberAccuracy(1),
            km.ECE(num_bins=10), km.EnsembleBrier(), km.EnsembleNLL(1),
            km.EnsembleBrier(1), km.ECE(10, member=1),
            km.MemberDisagreement()]


def numpy_reference(logits, labels):
    out = km.evaluate_predictions(logits, labels, num_bins=10)
    m = "member_1" if logits.ndim == 3 else "member_0"
    return [out["ensemble/accuracy"], out["ensemble/nll"],
            out[f"{m}/accuracy"], out["ensemble/ece"], out["ensemble/brier"],
            out[f"{m}/nll"], out[f"{m}/brier"], out[f"{m}/ece"],
            out.get("disagreement", 0.0)]


@pytest.mark.parametrize("members", [3, None])
def test_keras_metrics_stream_like_numpy(rng, members):
    shape = (21, members, 7) if members else (21, 7)
    logits = (rng.normal(size=shape) * 2).astype("float32")
    labels = rng.integers(0, 7, size=21)
    metrics = keras_metrics()
    if members is None:
        metrics[2] = km.MemberAccuracy(0)
        metrics[5:8] = [km.EnsembleNLL(0), km.EnsembleBrier(0),
                        km.ECE(10, member=0)]
    for m in metrics:
        for batch in np.split(np.arange(21), 3):
            m.update_state(labels[batch], logits[batch])
    results = [float(keras.ops.convert_to_numpy(m.result())) for m in metrics]
    np.testing.assert_allclose(results, numpy_reference(logits, labels),
                               rtol=1e-5, atol=1e-6)
    for m in metrics:
        m.reset_state()
        assert float(keras.ops.convert_to_numpy(m.result())) == 0.0


def test_keras_ece_sample_weight_and_edges(rng):
    logits = rng.normal(size=(12, 2, 4)).astype("float32")
    labels = rng.integers(0, 4, size=12)
    weights = rng.integers(0, 3, size=12)
    metric = km.ECE(num_bins=5)
    metric.update_state(labels, logits, sample_weight=weights)
    repeat = np.repeat(np.arange(12), weights)
    expected = km.evaluate_predictions(logits[repeat], labels[repeat],
                                       num_bins=5)["ensemble/ece"]
    assert float(keras.ops.convert_to_numpy(metric.result())) == (
        pytest.approx(expected, rel=1e-5))
    # Confidence 1.0 (logit gap 100) falls in the last bin, as in numpy.
    logits = np.array([[0.0, -100.0], [0.0, -100.0], [0.0, 0.5]], "float32")
    metric = km.ECE(num_bins=5)
    metric.update_state([0, 1, 1], logits)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(metric.bin_count),
                               [0, 0, 0, 1, 2])
    assert float(keras.ops.convert_to_numpy(metric.result())) == (
        pytest.approx(km.ece(km.softmax(logits), [0, 1, 1], num_bins=5),
                      abs=1e-6))


def test_keras_metrics_serialize():
    for m in keras_metrics():
        clone = keras.metrics.deserialize(keras.metrics.serialize(m))
        assert type(clone) is type(m)
        assert clone.get_config() == m.get_config()
    assert km.MemberAccuracy(2).get_config()["member"] == 2
    assert km.MemberAccuracy(2).name == "member_2_accuracy"
    assert km.ECE(num_bins=7).get_config()["num_bins"] == 7
    assert km.ECE(member=1).name == "member_1_ece"
    assert km.EnsembleBrier(1).name == "member_1_brier"
    with pytest.raises(ValueError, match="no members axis"):
        km.EnsembleNLL(1).update_state([0], np.zeros((1, 3), "float32"))


def test_ensemble_metrics_list():
    metrics = km.ensemble_metrics(2, num_bins=5)
    names = [m.name for m in metrics]
    assert names[:4] == ["ensemble_accuracy", "ensemble_nll",
                         "ensemble_brier", "ece"]
    assert names[4:8] == ["member_0_accuracy", "member_0_nll",
                          "member_0_brier", "member_0_ece"]
    assert names[-1] == "disagreement" and len(names) == 13
    assert len(km.ensemble_metrics(1)) == 8
    # Values: test_keras_metrics_stream_like_numpy covers every class.


@pytest.mark.parametrize("jit", [
    pytest.param(True, marks=[
        pytest.mark.jit,
        pytest.mark.skipif(BACKEND == "torch", reason="XLA: JAX and TF")]),
    pytest.param(False, marks=pytest.mark.skipif(
        BACKEND != "torch", reason="JAX and TF run the XLA variant")),
])
def test_model_evaluate_with_metrics(rng, jit):
    """model.evaluate with the metrics: XLA-compiled on JAX and TensorFlow,
    PyTorch's default (uncompiled) step on PyTorch."""
    inputs = keras.Input((6,))
    x = keras.layers.Dense(3 * 5, kernel_initializer="glorot_normal")(inputs)
    outputs = keras.layers.Reshape((3, 5))(x)
    model = keras.Model(inputs, outputs)
    model.compile(loss=keras_e3.EnsembleSoftmaxCrossEntropy(),
                  metrics=keras_metrics(), jit_compile=jit)
    x = rng.normal(size=(40, 6)).astype("float32") * 3
    y = rng.integers(0, 5, size=40)
    results = model.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)
    logits = model.predict(x, batch_size=16, verbose=0)
    expected = dict(zip([m.name for m in keras_metrics()],
                        numpy_reference(logits, y)))
    for name, value in expected.items():
        assert results[name] == pytest.approx(value, rel=1e-5, abs=1e-6)


def test_keras_metrics_accept_one_hot_labels(rng):
    """MixUp / CutMix give one-hot or soft targets: scored by argmax."""
    from keras_e3.metrics import ensemble_metrics

    logits = rng.normal(size=(6, 2, 3)).astype("float32")
    labels = rng.integers(0, 3, 6)
    soft = 0.8 * np.eye(3)[labels] + 0.2 / 3
    for sparse_metric, dense_metric in zip(ensemble_metrics(2),
                                           ensemble_metrics(2)):
        sparse_metric.update_state(labels, logits)
        dense_metric.update_state(soft.astype("float32"), logits)
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(dense_metric.result()),
            keras.ops.convert_to_numpy(sparse_metric.result()), rtol=1e-6)
