"""Shifted test sets by tensorflow-datasets name (tfds.testing.mock_data,
no network): the authors' 200-class lists, logits restricted to them,
rows equal to metrics computed here from predict_members."""

import hashlib

import numpy as np
import pytest
import raw_doors
from raw_doors import own_metrics

from keras_e3.data.shift import class_subset
from keras_e3.data.shift import shift_dataset_info
from keras_e3.evaluation.robustness import evaluate_shift
from keras_e3.evaluation.robustness import mean_corruption_error

tfds = pytest.importorskip("tensorflow_datasets")
tf = pytest.importorskip("tensorflow")


@pytest.mark.single_backend
def test_class_subsets_are_the_authors_lists():
    """Literal values of the authors' evaluation code: ImageNet-A's
    `indices_in_1k` (hendrycks/natural-adv-examples eval.py) and
    ImageNet-R's `imagenet_r_mask` (hendrycks/imagenet-r eval.py), as
    index lists into ILSVRC2012's sorted synsets, and their SHA-256 (of
    the indices joined by commas)."""
    a, r = class_subset("imagenet_a"), class_subset("imagenet_r")
    assert len(a) == len(r) == 200
    assert a[:8].tolist() == [6, 11, 13, 15, 17, 22, 23, 27]
    assert a[-3:].tolist() == [986, 987, 988]
    assert r[:8].tolist() == [1, 2, 4, 6, 8, 9, 11, 13]
    assert r[-3:].tolist() == [981, 983, 988]
    digest = {n: hashlib.sha256(",".join(map(str, s)).encode()).hexdigest()
              for n, s in (("a", a), ("r", r))}
    assert digest == {
        "a": "973e8c3e530bf5dbd49999d046e74084ba5184ab98036b42b111d8dcdecf1015",
        "r": "a1d9a9ace3098120f5db861d97049116efe80683f4e48c65a62f9bd30fc3366a"}
    with pytest.raises(ValueError, match="No class subset"):
        class_subset("imagenet_v2")


@pytest.mark.single_backend
def test_names():
    assert shift_dataset_info("imagenet2012_corrupted/glass_blur_5")[
        "split"] == "validation"
    assert shift_dataset_info("cifar10_corrupted/saturate_2")[
        "num_classes"] == 10
    for bad, match in [("imagenet_c", "Unknown shifted test set"),
                       ("cifar10_corrupted/fog", "<corruption>_<severity>"),
                       ("cifar10_corrupted/haze_1", "Unknown corruption"),
                       ("imagenet2012_corrupted/fog_6", "severity")]:
        with pytest.raises(ValueError, match=match):
            shift_dataset_info(bad)


def mocked(labels, sizes):
    """as_dataset_fn for tfds.testing.mock_data: uint8 images of `sizes`
    with `labels`."""
    images = raw_doors.raw_images(sizes=sizes, seed=4)

    def as_dataset(self, split, as_supervised=False, **kwargs):
        def gen():
            for image, label in zip(images, labels):
                yield image, label
        ds = tf.data.Dataset.from_generator(gen, output_signature=(
            tf.TensorSpec([None, None, 3], tf.uint8),
            tf.TensorSpec([], tf.int64)))
        return ds if as_supervised else ds.map(
            lambda x, y: {"image": x, "label": y})
    return images, as_dataset


@pytest.fixture(scope="module")
def imagenet_model():
    return raw_doors.tiny_model("e3", num_classes=1000)


def test_imagenet_a_restricts_the_logits_to_its_classes(imagenet_model):
    subset = class_subset("imagenet_a")
    labels = subset[[0, 5, 199, 5]]
    images, as_dataset = mocked(labels, [(20, 30), (37, 21), (16, 16),
                                         (23, 23)])
    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        rows = evaluate_shift(imagenet_model, "imagenet_a", batch_size=3,
                              verbose=0)
    logits = raw_doors.reference(imagenet_model, images)[..., subset]
    assert [r["model"] for r in rows] == ["ensemble", "member_0",
                                          "member_1"]
    positions = np.array([0, 5, 199, 5])
    for row in rows:
        part = logits if row["model"] == "ensemble" else logits[
            :, int(row["model"][-1])]
        expected = own_metrics(part, positions)
        for name, value in expected.items():
            assert row[name] == pytest.approx(value, abs=1e-5), (row, name)
        assert row["dataset"] == "imagenet_a" and row["num_examples"] == 4
    # a label outside the 200 classes is refused
    _, outside = mocked([subset[0], 0], [(16, 16), (16, 16)])
    with tfds.testing.mock_data(as_dataset_fn=outside):
        with pytest.raises(ValueError, match="outside its 200 classes"):
            evaluate_shift(imagenet_model, "imagenet_r", verbose=0)


def test_corrupted_and_cifar_sets(imagenet_model):
    labels = np.array([3, 7, 999])
    images, as_dataset = mocked(labels, [(20, 30), (37, 21), (16, 16)])
    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        rows = evaluate_shift(imagenet_model, "imagenet2012_corrupted/fog_3",
                              verbose=0)
        with pytest.raises(ValueError, match="CIFAR|cifar10's 10 classes"):
            evaluate_shift(imagenet_model, "cifar10_1", verbose=0)
    expected = own_metrics(raw_doors.reference(imagenet_model, images),
                           labels)
    assert rows[0]["accuracy"] == pytest.approx(expected["accuracy"])
    assert rows[0]["nll"] == pytest.approx(expected["nll"], abs=1e-5)
    assert (rows[0]["corruption"], rows[0]["severity"]) == ("fog", 3)
    mce = mean_corruption_error(rows, corruptions=["fog"])
    assert mce["ce"]["fog"] == pytest.approx(
        (1 - expected["accuracy"]) / 0.84378)
