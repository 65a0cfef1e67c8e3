"""The shipped digits presets (presets/*_tiny_digits/) and their data split."""

import json
from pathlib import Path

import keras
import numpy as np
import pytest

pytest.importorskip("sklearn")

import keras_e3  # noqa: E402
from keras_e3.presets import builtin  # noqa: E402
from keras_e3.presets import files as preset_io  # noqa: E402
from keras_e3.data import digits  # noqa: E402

PRETRAINED = Path(builtin.cards_dir())
PRESETS = ("e3_tiny_digits", "vit_tiny_digits", "vmoe_tiny_digits")


def metadata(name):
    return json.loads((PRETRAINED / name / "metadata.json").read_text())


def split_of(name):
    split = metadata(name)["split"]
    return split["test_fraction"], split["seed"]


@pytest.mark.single_backend
def test_split_is_deterministic_stratified_and_recorded():
    test_fraction, seed = split_of("e3_tiny_digits")
    (x_train, y_train), (x_test, y_test) = digits.load_digits_splits(
        seed=seed, test_fraction=test_fraction)
    (x_train2, y_train2), (x_test2, y_test2) = digits.load_digits_splits(
        seed=seed, test_fraction=test_fraction)
    for a, b in ((x_train, x_train2), (y_train, y_train2),
                 (x_test, x_test2), (y_test, y_test2)):
        np.testing.assert_array_equal(a, b)
    assert x_train.shape == (1347, 32, 32, 1) and x_test.shape[0] == 450
    assert x_train.dtype == np.float32
    assert x_train.min() == -1.0 and x_train.max() == 1.0
    # Stratified: every class keeps its share of the test set (to rounding).
    counts = np.bincount(y_test, minlength=10)
    totals = counts + np.bincount(y_train, minlength=10)
    assert np.all(np.abs(counts - totals * test_fraction) <= 0.5)
    # The exact split the presets were evaluated on.
    for name in PRESETS:
        assert (metadata(name)["split"]["test_indices_sha256"]
                == digits.split_fingerprint(*split_of(name)))
    other = digits.split_indices(test_fraction, seed + 1)[1]
    assert not np.array_equal(other, digits.split_indices(test_fraction,
                                                          seed)[1])


@pytest.mark.single_backend
def test_bilinear_upsampling_and_scaling():
    # Half-pixel centres, edges clamped: x4 upsampling of a ramp gives the
    # source values at the block pairs' midpoints, the ends held flat.
    ramp = np.tile(np.arange(8.0), (1, 8, 1))
    up = digits.upsample(ramp, 32)[0, 0]
    np.testing.assert_allclose(up[:2], 0.0)
    np.testing.assert_allclose(up[-2:], 7.0)
    np.testing.assert_allclose(up[2:-2], (np.arange(2, 30) - 1.5) / 4.0)
    np.testing.assert_allclose(digits.upsample(np.full((1, 8, 8), 5.0), 32),
                               5.0)
    x = digits.preprocess(np.full((1, 8, 8), 16.0), 16, num_channels=3)
    assert x.shape == (1, 16, 16, 3)
    np.testing.assert_array_equal(x, 1.0)
    with pytest.raises(ValueError, match="8, 8"):
        digits.preprocess(np.zeros((2, 7, 7)))


@pytest.mark.parametrize("name", PRESETS)
def test_shipped_preset_is_complete_and_verified(name):
    meta = preset_io.verify_preset(PRETRAINED / name)
    assert meta["dataset"] == "sklearn load_digits"
    preprocessor = json.loads(
        (PRETRAINED / name / "preprocessor.json").read_text())
    config = json.loads((PRETRAINED / name / "config.json").read_text())
    expected = digits.digits_preprocessor(
        config["config"]["image_size"], config["config"]["num_channels"])
    # (the module path moved with the converter; the config is the same)
    for saved in (preprocessor, expected):
        saved.pop("module")
    assert preprocessor == expected
    # Small enough to ship inside the package.
    size = sum(f.stat().st_size for f in (PRETRAINED / name).iterdir())
    assert size < 1_000_000


def test_e3_preset_accuracy_on_held_out_digits():
    name = "e3_tiny_digits"
    model = keras_e3.E3ViT.from_preset(str(PRETRAINED / name))
    assert model.ensemble_size == 2
    test_fraction, seed = split_of(name)
    _, (x_test, y_test) = digits.load_digits_splits(
        seed=seed, test_fraction=test_fraction)
    # One batch: a single XLA compilation on JAX.
    member_logits = model.predict(x_test, batch_size=len(x_test), verbose=0)
    assert member_logits.shape == (450, 2, 10)
    log_probs = keras.ops.convert_to_numpy(
        keras_e3.ensemble_log_probs(member_logits))
    accuracy = np.mean(np.argmax(log_probs, axis=-1) == y_test)
    assert accuracy >= 0.95
    # The recorded metrics (JAX, at training time) hold on this backend up
    # to a single borderline example.
    recorded = metadata(name)["metrics"]["ensemble/accuracy"]
    assert abs(accuracy - recorded) <= 1.5 / len(y_test)
    members = np.mean(np.argmax(member_logits, axis=-1) == y_test[:, None],
                      axis=0)
    assert np.all(members >= 0.93)
