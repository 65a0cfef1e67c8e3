"""The data loaders against `model.predict` on the decoded images (issue
28): `from_arrays` (arrays, lists of sizes, paths, bytes),
`from_directory` (class-named sub-folders, PNG and JPEG, mixed sizes),
`from_tfds` (TFDS' offline mock), `load_image_folder` / `load_dataset`
and the OOD sets. Each loader's images, fed to `predict`, must give the
logits of `predict` on each decoded array (`raw_doors.reference`)."""

import os

import numpy as np
import pytest
from raw_doors import CLASS_NAMES
from raw_doors import KINDS
from raw_doors import raw_images
from raw_doors import reference
from raw_doors import tiny_model
from raw_doors import write_images

from keras_e3 import data

TOL = 1e-5


@pytest.fixture(scope="module")
def models():
    """Tiny models built once, by (kind, channels)."""
    cache = {}

    def get(kind, channels=3):
        if (kind, channels) not in cache:
            cache[kind, channels] = tiny_model(kind, num_channels=channels)
        return cache[kind, channels]

    return get


def decoded(path):
    """A file's pixels, decoded by Pillow here (not by the code under
    test): [H, W, C] uint8 with the file's own channels."""
    from PIL import Image

    with Image.open(path) as image:
        if image.mode == "P":
            image = image.convert("RGB")
        array = np.asarray(image)
    return array[..., None] if array.ndim == 2 else array


def model_logits(model, x):
    """Member logits [N, M, C] of the model itself on model inputs `x`
    (`predict_on_batch`: no converter in between, so a loader that yields
    anything but what `predict` feeds is caught)."""
    assert x.dtype == np.float32, x.dtype
    logits = np.asarray(model.predict_on_batch(x), np.float32)
    return logits[:, None] if logits.ndim == 2 else logits


def loader_logits(model, batches):
    """The model's logits on the concatenated images a loader yields."""
    x = np.concatenate([np.asarray(b[0]) for b in batches])
    return model_logits(model, x), x


def make_folder(root, channels, names=("fish", "cat")):
    """Class-named sub-folders of PNG and JPEG files of mixed sizes (gray
    or RGB); returns the folder."""
    images = raw_images(channels, seed=channels)
    for c, name in enumerate(names):
        part = images[c::2]
        write_images(os.path.join(root, name), part[:2], fmt="png",
                     prefix="p")
        write_images(os.path.join(root, name), part[2:], fmt="jpg",
                     prefix="j")
    return str(root)


@pytest.mark.parametrize("kind,channels", [("vit", 3), ("vmoe", 3),
                                           ("e3", 3), ("e3", 1)])
def test_from_arrays_yields_what_predict_feeds(models, tmp_path, kind,
                                               channels):
    model = models(kind, channels)
    images = raw_images(channels)  # the model's size and others
    expected = reference(model, images)
    labels = np.array([0, 1, 2, 0, 1])
    # A list of images of different sizes, in batches of 2.
    ds = data.from_arrays(images, labels, batch_size=2,
                          preprocessor=model.preprocessor)
    got, _ = loader_logits(model, [ds[i] for i in range(len(ds))])
    np.testing.assert_allclose(got, expected, atol=TOL)
    np.testing.assert_array_equal(
        np.concatenate([ds[i][1] for i in range(len(ds))]), labels)
    # File paths and encoded bytes (PNG: the pixels exactly).
    paths = write_images(tmp_path, images)
    for items in (paths, [open(p, "rb").read() for p in paths]):
        ds = data.from_arrays(items, batch_size=3, preprocessor=model)
        got, _ = loader_logits(model, [ds[i] for i in range(len(ds))])
        np.testing.assert_allclose(got, expected, atol=TOL)
    # One array: uint8 and float pixels of the model's size, and away from
    # it ([N, H, W] for gray).
    for size in ((16, 16), (24, 18)):
        batch = np.stack(raw_images(channels, sizes=[size] * 3, seed=5))
        want = reference(model, list(batch))
        for x in (batch, batch.astype(np.float32)):
            if channels == 1 and size != (16, 16):
                x = x[..., 0]
            ds = data.from_arrays(x, batch_size=2, preprocessor=model)
            got, _ = loader_logits(model, [ds[i] for i in range(len(ds))])
            np.testing.assert_allclose(got, want, atol=TOL)


@pytest.mark.single_backend
def test_from_arrays_labels_and_preprocessor_errors(models):
    model = models("vit")
    images = raw_images(3, sizes=[(16, 16)] * 4)
    # String labels are the model's class names.
    ds = data.from_arrays(images, ["fish", "cat", "dog", "cat"],
                          preprocessor=model, batch_size=4)
    np.testing.assert_array_equal(ds[0][1], [2, 0, 1, 0])
    # One-hot rows pass as they are (for a loss with sparse=False).
    one_hot = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]
    np.testing.assert_array_equal(
        data.from_arrays(images, one_hot, preprocessor=model)[0][1], one_hot)
    cases = [([0, 1, 2, 3], "outside \\[0, 3\\)"),
             (["fish", "bird", "cat", "cat"], "bird"),
             ([0.5, 1, 2, 0], "whole numbers"),
             (np.eye(4)[[0, 1, 2, 3]], "4 columns")]
    for labels, message in cases:
        with pytest.raises(ValueError, match=message):
            data.from_arrays(images, labels, preprocessor=model)
    with pytest.raises(ValueError, match="outside"):
        data.from_arrays(images, [0, 1, -1, 0],
                         preprocessor=model.preprocessor)
    with pytest.raises(ValueError, match="class names"):
        data.from_arrays(images, ["a", "b", "a", "b"],
                         preprocessor=model.preprocessor)
    flat = {"image_size": [16, 16], "num_channels": 3,
            "value_range": [-1.0, 1.0]}
    for loader in (lambda: data.from_arrays(images, preprocessor=flat),
                   lambda: data.load_images(["x.png"], flat)):
        with pytest.raises(ValueError, match="ImageConverter"):
            loader()
    with pytest.raises(ValueError, match="need the model's converter"):
        data.from_arrays(["a.png", "b.png"])


@pytest.mark.single_backend
@pytest.mark.parametrize("kind,channels", [("vmoe", 3), ("e3", 1)])
def test_from_directory_decodes_with_the_converter(models, tmp_path, kind,
                                                   channels):
    pytest.importorskip("tensorflow")
    model = models(kind, channels)
    # Sub-folders fish/ and cat/: the model's classes 2 and 0 (by name,
    # not by position).
    folder = make_folder(tmp_path / "data", channels)
    ds = data.from_directory(folder, model, batch_size=3, shuffle=False)
    assert ds.class_names == list(CLASS_NAMES)
    batches = list(ds.as_numpy_iterator())
    got, x = loader_logits(model, batches)
    assert x.shape[1:] == (16, 16, channels)
    labels = np.concatenate([b[1] for b in batches])
    expected_labels = [CLASS_NAMES.index(os.path.basename(
        os.path.dirname(p))) for p in ds.file_paths]
    np.testing.assert_array_equal(labels, expected_labels)
    assert {0, 2} == set(labels.tolist())
    assert {os.path.splitext(p)[1] for p in ds.file_paths} == {".png",
                                                               ".jpg"}
    expected = reference(model, [decoded(p) for p in ds.file_paths])
    np.testing.assert_allclose(got, expected, atol=TOL)
    # A converter without names: the sorted sub-folders are new classes.
    new = data.from_directory(folder, model.preprocessor, batch_size=8,
                              shuffle=False)
    assert new.class_names == ["cat", "fish"]
    assert sorted(set(np.concatenate(
        [b[1] for b in new.as_numpy_iterator()]).tolist())) == [0, 1]
    # Shuffled, split: every file once.
    train, val = data.from_directory(folder, model, batch_size=2, seed=1,
                                     validation_split=0.25, subset="both")
    count = sum(len(b[1]) for d in (train, val)
                for b in d.as_numpy_iterator())
    assert count == len(ds.file_paths)
    os.makedirs(os.path.join(folder, "bird"))
    write_images(os.path.join(folder, "bird"), raw_images(channels)[:1])
    with pytest.raises(ValueError, match="bird.*fish"):
        data.from_directory(folder, model)


@pytest.mark.single_backend
@pytest.mark.parametrize("channels", [1, 3])
def test_from_tfds_converts_each_example(models, tmp_path, channels):
    tfds = pytest.importorskip("tensorflow_datasets")
    model = models("e3", channels)
    with pytest.raises(ValueError, match="not prepared in data_dir"):
        data.from_tfds("mnist", "train", model.preprocessor,
                       data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="Unknown TFDS dataset"):
        data.from_tfds("no_such_dataset_xyz", "train", model,
                       data_dir=str(tmp_path))
    # TFDS' own offline mock: random 28x28 gray examples in mnist's
    # format; the raw examples are read back under the same mock.
    with tfds.testing.mock_data(num_examples=5, data_dir=str(tmp_path)):
        with pytest.raises(ValueError, match="10 classes"):
            data.from_tfds("mnist", "train", model, data_dir=str(tmp_path))
        ds = data.from_tfds("mnist", "train", model.preprocessor,
                            data_dir=str(tmp_path), batch_size=2)
        batches = list(ds.as_numpy_iterator())
        raw = list(tfds.builder("mnist", data_dir=str(tmp_path)).as_dataset(
            split="train").as_numpy_iterator())
    got, x = loader_logits(model, batches)
    assert x.shape == (5, 16, 16, channels)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]),
                                  [r["label"] for r in raw])
    expected = reference(model, [r["image"] for r in raw])
    np.testing.assert_allclose(got, expected, atol=TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_load_image_folder_labels_by_name_and_matches_predict(models,
                                                              tmp_path, kind):
    model = models(kind)
    # Gray and RGB files, PNG and JPEG, of mixed sizes, for an RGB model.
    folder = make_folder(tmp_path / "data", 1, names=("fish", "dog"))
    make_folder(tmp_path / "data", 3, names=("dog", "cat"))
    x, y, names = data.load_image_folder(folder, model,
                                         class_names=model.class_names)
    assert names == list(CLASS_NAMES)
    paths = [os.path.join(folder, c, f) for c in sorted(os.listdir(folder))
             for f in sorted(os.listdir(os.path.join(folder, c)))]
    np.testing.assert_array_equal(
        y, [CLASS_NAMES.index(os.path.basename(os.path.dirname(p)))
            for p in paths])
    expected = reference(model, [decoded(p) for p in paths])
    np.testing.assert_allclose(model_logits(model, x), expected, atol=TOL)
    # load_dataset on a folder is the same; without class names the
    # sub-folders are new classes 0, 1, 2 in sorted order.
    x2, y2, names2 = data.load_dataset(folder, model.preprocessor)
    np.testing.assert_array_equal(x2, x)
    assert names2 == ["cat", "dog", "fish"]
    np.testing.assert_array_equal(y2, [names2.index(CLASS_NAMES[i])
                                       for i in y])
    with pytest.raises(ValueError, match="cat, dog, fish.*zebra|zebra"):
        data.load_image_folder(folder, model, class_names=["zebra", "dog",
                                                           "fish"])


@pytest.mark.single_backend
def test_digits_and_ood_sets_go_through_the_converter(models):
    from keras_e3.data import ood
    from keras_e3.data.digits import load_digits_raw
    from keras_e3.data.digits import split_indices

    model = models("e3", 1)
    images, labels = load_digits_raw()
    _, test = split_indices()
    raw = np.round(images[test] * 255 / 16).astype(np.uint8)[..., None]
    x, y, names = data.load_dataset("digits", model.preprocessor,
                                    split="test")
    np.testing.assert_array_equal(y, labels[test])
    assert names == [str(i) for i in range(10)]
    pick = [0, 7, 100]
    np.testing.assert_allclose(model_logits(model, x[pick]),
                               reference(model, raw[pick]), atol=TOL)
    inverted = ood.load_ood_dataset("digits-inverted", model, x)
    np.testing.assert_allclose(model_logits(model, inverted[pick]),
                               reference(model, 255 - raw[pick]), atol=TOL)
    rotated = ood.load_ood_dataset("digits-rotated", model.preprocessor, x)
    np.testing.assert_allclose(
        model_logits(model, rotated[pick]),
        reference(model, np.rot90(raw[pick], axes=(1, 2))), atol=TOL)
    noise = ood.load_ood_dataset("noise", model, x)
    assert noise.shape == x.shape and noise.dtype == np.float32
    np.testing.assert_array_equal(noise,
                                  ood.load_ood_dataset("noise", model, x))
    assert -1.0 - TOL <= noise.min() < noise.max() <= 1.0 + TOL
    # Digits are classes "0".."9" by name: a model whose names differ is
    # refused, one with other names in another order relabels them.
    with pytest.raises(ValueError, match="not among the model's class"):
        data.load_dataset("digits", model, class_names=CLASS_NAMES)
    reverse = [str(9 - i) for i in range(10)]
    _, y_rev, _ = data.load_dataset("digits", model, class_names=reverse)
    np.testing.assert_array_equal(y_rev, 9 - labels[test])
