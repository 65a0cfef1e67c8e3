"""Shipped label sets: order (not only count) and decode_predictions."""

import os

import numpy as np
import pytest

from keras_e3.data.labels import class_names
from keras_e3.data.labels import decode_predictions
from keras_e3.data.labels import synsets


def test_imagenet2012_order():
    names, ids = class_names("imagenet2012"), synsets("imagenet2012")
    assert len(names) == len(ids) == 1000
    assert ids == sorted(ids) and len(set(ids)) == 1000
    assert (ids[0], names[0]) == ("n01440764", "tench")
    assert (ids[1], names[1]) == ("n01443537", "goldfish")
    assert (ids[207], names[207]) == ("n02099601", "golden retriever")
    assert (ids[281], names[281]) == ("n02123045", "tabby")
    assert (ids[409], names[409]) == ("n02708093", "analog clock")
    assert (ids[999], names[999]) == ("n15075141", "toilet tissue")
    assert class_names("imagenet2012", full=True)[0] == "tench, Tinca tinca"


def test_imagenet2012_equals_tensorflow_datasets_order():
    tfds = pytest.importorskip("tensorflow_datasets")
    path = os.path.join(os.path.dirname(tfds.__file__), "datasets",
                        "imagenet2012", "labels.txt")
    if not os.path.isfile(path):
        pytest.skip("this tensorflow-datasets has no imagenet2012 labels")
    with open(path) as f:
        assert synsets() == [line.strip() for line in f if line.strip()]


def test_cifar100_order():
    names = class_names("cifar100")
    assert len(names) == len(set(names)) == 100
    assert names == sorted(names)  # the dataset's fine labels are sorted
    assert names[:3] == ["apple", "aquarium_fish", "baby"]
    assert (names[19], names[50], names[58]) == ("cattle", "mouse",
                                                 "pickup_truck")
    assert names[-2:] == ["woman", "worm"]


def test_digits_and_unknown():
    assert class_names("digits") == [str(i) for i in range(10)]
    with pytest.raises(ValueError, match="Unknown label set"):
        class_names("imagenet21k")


def test_decode_predictions():
    probs = np.full((2, 10), 0.05)
    probs[0, 3], probs[1, 7] = 0.55, 0.55
    decoded = decode_predictions(probs, "digits", top=2)
    assert decoded == [[("3", 0.55), ("0", 0.05)], [("7", 0.55), ("0", 0.05)]]
    # log-probabilities (predict_ensemble's) give the same probabilities
    again = decode_predictions(np.log(probs), "digits", top=1)
    assert [d[0][0] for d in again] == ["3", "7"]
    assert again[0][0][1] == pytest.approx(0.55)
    one = decode_predictions(probs[0], list("abcdefghij"), top=1)
    assert one == [[("d", 0.55)]]
    with pytest.raises(ValueError, match="class names"):
        decode_predictions(probs, "cifar100")
