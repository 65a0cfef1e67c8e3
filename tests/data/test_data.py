"""keras_e3.data: k-shot sampling, pipelines, augmentation (each loader
against `predict`: tests/data/test_data_doors.py)."""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import tiny_backbone_kwargs

import keras_e3
from keras_e3.data import from_arrays
from keras_e3.data import from_directory
from keras_e3.data import make_augmentation
from keras_e3.data import sample_k_shot

CONVERTER = keras_e3.ImageConverter(image_size=16, num_channels=3)


# --- k-shot sampling -------------------------------------------------------


@pytest.mark.single_backend
def test_k_shot_exact_and_deterministic():
    labels = np.repeat([0, 1, 2], [5, 7, 9])
    a = sample_k_shot(labels, 3, seed=1)
    assert len(a) == 9 and len(set(a.tolist())) == 9
    np.testing.assert_array_equal(np.bincount(labels[a]), [3, 3, 3])
    np.testing.assert_array_equal(a, sample_k_shot(labels, 3, seed=1))
    assert not np.array_equal(a, sample_k_shot(labels, 3, seed=2))
    # vmoe's sampler: the 2-shot set is the start of each class's 3-shot set.
    two = sample_k_shot(labels, 2, seed=1)
    np.testing.assert_array_equal(two, a.reshape(3, 3)[:, :2].ravel())


@pytest.mark.single_backend
def test_k_shot_errors():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    with pytest.raises(ValueError, match=r"class 1 has only 2 examples"):
        sample_k_shot(labels, 3, seed=0)
    with pytest.raises(ValueError, match=r"class 5 has only 0"):
        sample_k_shot(labels, 1, classes=[0, 5])
    with pytest.raises(ValueError, match="positive integer"):
        sample_k_shot(labels, 0)
    with pytest.raises(ValueError, match="1-D"):
        sample_k_shot(labels[:, None], 1)


# --- pipelines -------------------------------------------------------------


def test_from_arrays_batches_and_shuffle(rng):
    x = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1)
    y = np.arange(10)
    plain = from_arrays(x, y, batch_size=4)
    assert len(plain) == 3
    np.testing.assert_array_equal(plain[2][1], [8, 9])
    assert len(from_arrays(x, y, batch_size=4, drop_remainder=True)) == 2

    def epoch(ds):
        return np.concatenate([ds[i][1] for i in range(len(ds))])

    a, b = (from_arrays(x, y, batch_size=4, shuffle=True, seed=3)
            for _ in range(2))
    first = epoch(a)
    np.testing.assert_array_equal(first, epoch(b))  # same seed, same order
    np.testing.assert_array_equal(np.sort(first), y)
    a.on_epoch_end()
    assert not np.array_equal(first, epoch(a))  # reshuffled each epoch
    for i in range(len(a)):  # images stay paired with their labels
        np.testing.assert_array_equal(a[i][0].ravel(), a[i][1])
    with pytest.raises(ValueError, match="differ in length"):
        from_arrays(x, y[:3])


@pytest.fixture(scope="module")
def soft_label_model():
    """One tiny E³, compiled once for every pipeline's 1-step fit (one-hot
    or mixed labels)."""
    backbone = keras_e3.E3ViTBackbone(**tiny_backbone_kwargs())
    model = keras_e3.E3ViT(backbone, num_classes=3, preprocessor=CONVERTER)
    model.compile(optimizer="sgd",
                  loss=keras_e3.EnsembleSoftmaxCrossEntropy(sparse=False))
    return model


def test_from_arrays_fit_with_augmentation(rng, soft_label_model):
    images = rng.integers(0, 256, (8, 16, 16, 3)).astype(np.uint8)
    labels = rng.integers(0, 3, 8)
    augment = make_augmentation(flip=True, mixup_alpha=0.2, num_classes=3,
                                seed=0)
    ds = from_arrays(images, labels, batch_size=4, shuffle=True, seed=0,
                     preprocessor=CONVERTER, augment=augment)
    x, y = ds[0]
    assert x.shape == (4, 16, 16, 3) and y.shape == (4, 3)  # one-hot, mixed
    assert x.dtype == np.float32 and y.dtype == np.float32
    np.testing.assert_allclose(y.sum(axis=1), 1.0, atol=1e-5)
    history = soft_label_model.fit(ds, epochs=1, steps_per_epoch=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    with pytest.raises(ValueError, match="num_classes"):
        make_augmentation(mixup_alpha=0.2)
    rand = make_augmentation(rand_augment={"num_ops": 1}, value_range=(-1, 1))
    assert [type(layer).__name__ for layer in rand.layers] == [
        "RandomFlip", "RandAugment"]
    assert tuple(rand.layers[1].value_range) == (-1, 1)
    with pytest.raises(ValueError, match="not both"):
        make_augmentation(mixup_alpha=0.2, cutmix_factor=1.0, num_classes=3)


def _write_folder(root, rng, sizes=((12, 10), (20, 20), (16, 8))):
    from PIL import Image

    for c, name in enumerate(("cat", "dog")):
        (root / name).mkdir()
        for i, (h, w) in enumerate(sizes):
            pixels = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
            pixels[0, 0] = (255 * c, 0, 0)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def test_from_directory_and_fit(tmp_path, rng, soft_label_model):
    pytest.importorskip("tensorflow")
    _write_folder(tmp_path, rng)
    ds = from_directory(tmp_path, CONVERTER, batch_size=4, shuffle=True,
                        seed=0)
    assert ds.class_names == ["cat", "dog"]
    batches = list(ds.as_numpy_iterator())
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    assert images.shape == (6, 16, 16, 3) and images.dtype == np.float32
    assert images.min() >= -1.0 - 1e-5 and images.max() <= 1.0 + 1e-5
    np.testing.assert_array_equal(np.bincount(labels), [3, 3])
    gray = from_directory(tmp_path, keras_e3.ImageConverter(
        image_size=16, num_channels=1), batch_size=6, shuffle=False)
    assert next(gray.as_numpy_iterator())[0].shape == (6, 16, 16, 1)
    # tf.data + Keras augmentation layers (run with TF ops on any backend).
    augment = make_augmentation(cutmix_factor=1.0, num_classes=3, seed=0)
    mixed = from_directory(tmp_path, soft_label_model, batch_size=4, seed=0,
                           augment=augment)
    x, y = next(mixed.as_numpy_iterator())
    assert x.shape == (4, 16, 16, 3) and y.shape == (4, 3)
    history = soft_label_model.fit(mixed, epochs=1, steps_per_epoch=1,
                                   verbose=0)
    assert np.isfinite(history.history["loss"][0])
    with pytest.raises(ValueError, match="image_size"):
        from_directory(tmp_path, keras_e3.ImageConverter(num_channels=3))


@pytest.mark.single_backend
def test_data_imports_without_tensorflow():
    code = ("import sys; import keras_e3.data, keras_e3.training.fewshot, "
            "keras_e3.training; "
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
    env = {**os.environ, "KERAS_BACKEND": "numpy"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                            text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
