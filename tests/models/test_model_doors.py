"""Issue 28, the model-level doors: predict / predict_members /
predict_ensemble / fit / evaluate, tf.data of every kind, labels, few-shot,
routing maps and DeepEnsemble take raw images through the model's one
converter, and give `model.predict`'s numbers on the decoded arrays
(tests/raw_doors.py's `reference`, one image at a time) within 1e-5.

Dense ViT, V-MoE and E³; gray and RGB; images at and away from the
model's size (raw_doors.SIZES)."""

import io
import json

import keras
import numpy as np
import pytest
from conftest import to_numpy
from raw_doors import CLASS_NAMES
from raw_doors import IMAGE_SIZE
from raw_doors import KINDS
from raw_doors import NUM_CLASSES
from raw_doors import raw_images
from raw_doors import reference
from raw_doors import tiny_model
from raw_doors import write_images

import keras_e3
from keras_e3.data.targets import prepare_labels

tf = pytest.importorskip("tensorflow")

ATOL = 1e-5
MODELS = [(kind, channels) for kind in KINDS for channels in (1, 3)]
IDS = [f"{kind}-{'gray' if c == 1 else 'rgb'}" for kind, c in MODELS]
# The heavier doors run on three of the six (each kind; gray and RGB).
CORE = [("vit", 1), ("vmoe", 3), ("e3", 3)]
CORE_IDS = ["vit-gray", "vmoe-rgb", "e3-rgb"]


class _Zoo(dict):
    """{(kind, channels): (model, images, reference, paths, encoded)},
    each built on first use."""

    def __init__(self, folder_factory):
        super().__init__()
        self.folder_factory = folder_factory

    def __missing__(self, key):
        kind, channels = key
        model = tiny_model(kind, num_channels=channels)
        images = raw_images(channels)
        paths = write_images(self.folder_factory.mktemp(f"{kind}{channels}"),
                             images)
        encoded = [open(p, "rb").read() for p in paths]
        self[key] = (model, images, reference(model, images), paths,
                     encoded)
        return self[key]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return _Zoo(tmp_path_factory)


def members(x):
    x = np.asarray(x, np.float32)
    return x[:, None, :] if x.ndim == 2 else x


def ensemble(logits):
    return to_numpy(keras_e3.ensemble_log_probs(logits))


@pytest.mark.parametrize("key", MODELS, ids=IDS)
def test_predict_takes_every_host_kind(zoo, key):
    from PIL import Image

    model, images, ref, paths, encoded = zoo[key]
    kinds = {
        "list of arrays": images,
        "list of paths": paths,
        "list of bytes": encoded,
        "list of PIL images": [Image.open(io.BytesIO(b)) for b in encoded],
        "float 0..255 arrays": [x.astype(np.float32) for x in images],
    }
    if key[1] == 1:
        kinds["gray without a channel axis"] = [x[..., 0] for x in images]
    for name, x in kinds.items():
        np.testing.assert_allclose(model.predict_members(x), ref, atol=ATOL,
                                   err_msg=name)
    np.testing.assert_allclose(members(model.predict(paths[1], verbose=0)),
                               ref[1:2], atol=ATOL)
    np.testing.assert_allclose(model.predict_ensemble(encoded),
                               ensemble(ref), atol=ATOL)


def _sized(channels, size, n=3, seed=5):
    return raw_images(channels, sizes=(size,) * n, seed=seed)


@pytest.mark.parametrize("key", CORE, ids=CORE_IDS)
def test_batches_at_and_away_from_the_models_size(zoo, key):
    """uint8 and float 0..255 batches [B, H, W, C] (and [B, H, W] gray) of
    the model's size go through the converter too (they are not
    model-ready)."""
    model = zoo[key][0]
    for size in ((IMAGE_SIZE, IMAGE_SIZE), (20, 30)):
        images = _sized(key[1], size)
        ref = reference(model, images)
        batch = np.stack(images)
        np.testing.assert_allclose(model.predict_members(batch), ref,
                                   atol=ATOL)
        np.testing.assert_allclose(
            model.predict_members(batch.astype(np.float32)), ref, atol=ATOL)
        if key[1] == 1:
            np.testing.assert_allclose(model.predict_members(batch[..., 0]),
                                       ref, atol=ATOL)


def _dataset(kind, images, paths, encoded, batched, labels):
    if kind == "arrays":
        if batched:  # equal sizes only: a batch is one tensor
            data = np.stack(images)
        else:  # images of different sizes, one by one
            ds = tf.data.Dataset.from_generator(
                lambda: iter(images), output_signature=tf.TensorSpec(
                    [None, None, images[0].shape[-1]], tf.uint8))
            if labels is not None:
                ds = tf.data.Dataset.zip(
                    ds, tf.data.Dataset.from_tensor_slices(labels))
            return ds
    elif kind == "gray [B, H, W]":
        data = np.stack(images)[..., 0]
    else:
        data = paths if kind == "paths" else encoded
    ds = tf.data.Dataset.from_tensor_slices(
        data if labels is None else (data, labels))
    return ds.batch(2) if batched else ds


DATASETS = [("arrays", False), ("arrays", True), ("bytes", False),
            ("bytes", True), ("paths", False), ("paths", True),
            ("gray [B, H, W]", True)]


@pytest.mark.parametrize("key", CORE, ids=CORE_IDS)
def test_tf_data_of_every_kind_equals_predict(zoo, key):
    model, images, ref, paths, encoded = zoo[key]
    labels = np.arange(len(images)) % NUM_CLASSES
    for i, (kind, batched) in enumerate(DATASETS):
        x, r = images, ref
        if kind == "gray [B, H, W]":
            if key[1] != 1:
                continue
        if batched and kind in ("arrays", "gray [B, H, W]"):
            x = _sized(key[1], (20, 30), n=3)
            r = reference(model, x)
        ds = _dataset(kind, x, paths, encoded, batched,
                      labels[:len(x)] if i % 2 else None)
        np.testing.assert_allclose(model.predict_members(ds), r, atol=ATOL,
                                   err_msg=f"{kind}, batched={batched}")
    ds = _dataset("paths", images, paths, encoded, False, None)
    np.testing.assert_allclose(model.predict_ensemble(ds), ensemble(ref),
                               atol=ATOL)


def test_tf_data_of_the_models_size_is_converted_unless_model_ready(zoo):
    """uint8 never skips the converter, float 0..255 neither; a float batch
    already in the value range is fed as it is; [0, 1] floats are
    refused."""
    model = zoo["e3", 3][0]
    images = _sized(3, (IMAGE_SIZE, IMAGE_SIZE), n=4)
    ref = reference(model, images)
    batch = np.stack(images)
    ready = model.preprocessor(batch)
    for name, data in (("uint8", batch),
                       ("float 0..255", batch.astype(np.float32)),
                       ("model-ready", ready)):
        ds = tf.data.Dataset.from_tensor_slices(data).batch(2)
        np.testing.assert_allclose(model.predict_members(ds), ref,
                                   atol=ATOL, err_msg=name)
        unbatched = tf.data.Dataset.from_tensor_slices(data)
        np.testing.assert_allclose(model.predict_members(unbatched), ref,
                                   atol=ATOL, err_msg=name)
    scaled = tf.data.Dataset.from_tensor_slices(
        batch.astype(np.float32) / 255.0).batch(2)
    with pytest.raises(Exception, match=r"\[0, 1\]"):
        model.predict(scaled, verbose=0)


def _trainable_copy(model, preprocessor="same"):
    """A copy of `model` without router noise, sharing its weights' values
    (and its converter, or `preprocessor`)."""
    config = model.get_config()
    config["backbone"] = dict(config["backbone"])
    config["backbone"]["config"] = dict(config["backbone"]["config"],
                                        router_noise_std=0.0)
    copy = type(model).from_config(config)
    copy.set_weights(model.get_weights())
    if preprocessor != "same":
        copy.preprocessor = preprocessor
    # (XLA compiles slower than these few steps run, except on JAX)
    copy.compile(optimizer=keras.optimizers.SGD(0.5),
                 jit_compile="auto" if keras.backend.backend() == "jax"
                 else False)
    return copy


@pytest.mark.parametrize("kind", KINDS)
def test_fit_on_raw_images_trains_on_the_converters_inputs(zoo, kind):
    """One SGD step on raw images (a list of sizes; for E³ also a tf.data
    of file paths with class-name labels) = one step on converter(raw)
    fed to a copy without a converter."""
    model, images, _, paths, _ = zoo[kind, dict(CORE)[kind]]
    labels = np.arange(len(images)) % NUM_CLASSES
    plain = _trainable_copy(model, preprocessor=None)
    plain.fit(model.preprocessor(images), labels, batch_size=len(images),
              epochs=1, shuffle=False, verbose=0)
    expected = [to_numpy(w) for w in plain.trainable_weights]
    raw = _trainable_copy(model)
    raw.fit(images, labels, batch_size=len(images), epochs=1,
            shuffle=False, verbose=0)
    runs = {"list of arrays": raw}
    if kind == "e3":
        from_ds = _trainable_copy(model)
        names = np.asarray(CLASS_NAMES)[labels]
        from_ds.fit(tf.data.Dataset.from_tensor_slices(
            (paths, names)).batch(len(paths)), epochs=1, verbose=0)
        runs["tf.data of paths, class names"] = from_ds
    for name, trained in runs.items():
        for w, e in zip(trained.trainable_weights, expected):
            np.testing.assert_allclose(to_numpy(w), e, atol=ATOL,
                                       err_msg=f"{name}: {w.path}")
    # the step did change the weights
    assert any(not np.allclose(e, to_numpy(w)) for w, e in
               zip(model.trainable_weights, expected))


@pytest.mark.parametrize("key", CORE, ids=CORE_IDS)
def test_evaluate_on_raw_equals_evaluate_on_converted(zoo, key):
    model, images, _, paths, encoded = zoo[key]
    labels = np.arange(len(images)) % NUM_CLASSES
    model.compile()
    expected = model.evaluate(model.preprocessor(images), labels,
                              verbose=0, return_dict=True)
    names = list(np.asarray(CLASS_NAMES)[labels])
    one_hot = np.eye(NUM_CLASSES)[labels]
    runs = {
        "list of arrays": model.evaluate(images, labels, verbose=0,
                                         return_dict=True),
        "paths, class names": model.evaluate(paths, names, verbose=0,
                                             return_dict=True),
        "tf.data of bytes, one-hot": model.evaluate(
            tf.data.Dataset.from_tensor_slices((encoded, one_hot)).batch(5),
            verbose=0, return_dict=True),
    }
    for name, got in runs.items():
        for metric, value in expected.items():
            np.testing.assert_allclose(got[metric], value, rtol=1e-5,
                                       atol=1e-6, err_msg=f"{name} {metric}")


def test_labels_are_checked_at_fit_and_evaluate(zoo):
    model, images, ref, paths, _ = zoo["vit", 1]
    model.compile()
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        model.fit(images, [0, 1, 2, 7, 9], epochs=1, verbose=0)
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        model.evaluate(images, [0, 1, 2, 0, -1], verbose=0)
    with pytest.raises(ValueError, match="not among the model's class_names"):
        model.evaluate(images, ["cat", "dog", "fish", "cat", "cow"],
                       verbose=0)
    with pytest.raises(ValueError, match="Soft label rows"):
        model.evaluate(images, np.full((5, 3), 1 / 3), verbose=0)
    with pytest.raises(ValueError, match="rows of 4 columns"):
        model.evaluate(images, np.eye(4)[[0, 1, 2, 0, 1]], verbose=0)
    # validation labels too
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        model.fit(images, [0, 1, 2, 0, 1], epochs=1, verbose=0,
                  validation_data=(images, [5, 5, 5, 5, 5]))
    # in a tf.data pipeline: an assertion when the batch is read
    ds = tf.data.Dataset.from_tensor_slices((paths, [0, 1, 2, 3, 0]))
    with pytest.raises(Exception, match=r"outside \[0, 3\)"):
        model.evaluate(ds.batch(5), verbose=0)
    ds = tf.data.Dataset.from_tensor_slices((paths, ["cat"] * 4 + ["cow"]))
    with pytest.raises(Exception, match="does not have"):
        model.evaluate(ds, verbose=0)
    # the error inside Keras' loop leaves the model whole (JAX detaches the
    # weights while its loops run)
    np.testing.assert_allclose(model.predict_members(images), ref,
                               atol=ATOL)
    # string labels need class names
    nameless = keras_e3.E3ViT(model.backbone, NUM_CLASSES,
                              preprocessor=model.preprocessor)
    nameless.compile()
    with pytest.raises(ValueError, match="class_names"):
        nameless.evaluate(images, ["cat"] * 5, verbose=0)


def test_one_hot_labels_with_a_one_hot_loss(zoo):
    model, images, _, _, _ = zoo["vmoe", 3]
    labels = np.arange(5) % NUM_CLASSES
    model.compile(loss=keras_e3.EnsembleSoftmaxCrossEntropy(sparse=False))
    soft = np.full((5, 3), 1 / 3)
    by_rows = model.evaluate(images, np.eye(3)[labels], verbose=0)
    by_index = model.evaluate(images, labels, verbose=0)  # made one-hot
    np.testing.assert_allclose(by_rows, by_index, rtol=1e-6)
    assert np.isfinite(model.evaluate(images, soft, verbose=0)).all()


@pytest.mark.single_backend
def test_prepare_labels():
    names = ["cat", "dog", "fish"]
    np.testing.assert_array_equal(
        prepare_labels(["fish", "cat"], 3, names), [2, 0])
    np.testing.assert_array_equal(prepare_labels([b"dog"], 3, names), [1])
    np.testing.assert_array_equal(prepare_labels([[0, 0, 1]], 3), [2])
    np.testing.assert_array_equal(prepare_labels([[2], [1]], 3), [2, 1])
    np.testing.assert_array_equal(prepare_labels([1.0, 2.0], 3), [1, 2])
    np.testing.assert_allclose(prepare_labels([1], 3, sparse=False),
                               [[0, 1, 0]])
    np.testing.assert_allclose(prepare_labels([[0.5, 0.5, 0]], 3,
                                              sparse=False), [[0.5, 0.5, 0]])
    assert prepare_labels([[0.0, 1.0, 0.0]], 3, sparse=None).shape == (1, 3)
    for labels, match in (([3], r"outside \[0, 3\)"),
                          ([-1], r"outside \[0, 3\)"),
                          ([0.5], "whole numbers"),
                          (["cow"], "not among"),
                          ([[0.2, 0.2, 0.2]], "sum to 1"),
                          ([[[0]]], "shape")):
        with pytest.raises(ValueError, match=match):
            prepare_labels(labels, 3, names)
    with pytest.raises(ValueError, match="class names"):
        prepare_labels(["cat"], 3)
    with pytest.raises(ValueError, match="several classes"):
        prepare_labels(["crane"], 3, ["crane", "dog", "crane"])


def test_unknown_keywords_are_type_errors():
    from raw_doors import backbone_kwargs

    with pytest.raises(TypeError, match="image_shape.*image_size"):
        keras_e3.E3ViTBackbone(image_shape=(32, 32, 1),
                               **backbone_kwargs("vit"))
    backbone = keras_e3.E3ViTBackbone(name="named", trainable=True,
                                      **backbone_kwargs("vit"))
    assert backbone.name == "named"
    with pytest.raises(TypeError, match="activation.*logits"):
        keras_e3.E3ViT(backbone, 3, activation="softmax")
    with pytest.raises(TypeError, match="num_clases"):
        keras_e3.E3ViT(backbone, 3, num_clases=3)
    model = keras_e3.E3ViT(backbone, 3, name="task", trainable=False,
                           dtype="float32")
    assert model.name == "task" and not model.trainable


def test_class_names_and_converter_round_trip(zoo, tmp_path):
    model, images, ref, _, _ = zoo["e3", 3]
    config = json.loads(json.dumps(model.get_config()))
    assert config["class_names"] == list(CLASS_NAMES)
    again = keras_e3.E3ViT.from_config(config)
    again.set_weights(model.get_weights())
    assert again.class_names == list(CLASS_NAMES)
    assert again.preprocessor.get_config() == model.preprocessor.get_config()
    np.testing.assert_allclose(again.predict_members(images), ref,
                               atol=ATOL)
    model.save_to_preset(tmp_path / "p")
    task = json.loads((tmp_path / "p" / "task.json").read_text())
    assert task["config"]["class_names"] == list(CLASS_NAMES)
    loaded = keras_e3.E3ViT.from_preset(str(tmp_path / "p"))
    assert loaded.class_names == list(CLASS_NAMES)
    assert loaded.preprocessor.get_config() == model.preprocessor.get_config()
    np.testing.assert_allclose(loaded.predict_members(images), ref,
                               atol=ATOL)
    # a fresh head of another size keeps the converter, not the names
    fresh = keras_e3.E3ViT.from_preset(str(tmp_path / "p"), num_classes=5)
    assert fresh.class_names is None and fresh.preprocessor is not None
    with pytest.raises(ValueError, match="2 names for a model of 3"):
        keras_e3.E3ViT(model.backbone, 3, class_names=["a", "b"])


def test_a_model_without_a_converter_saves_the_default_one(tmp_path):
    from raw_doors import backbone_kwargs

    backbone = keras_e3.E3ViTBackbone(**backbone_kwargs("vit", 1))
    keras_e3.E3ViT(backbone, 3).save_to_preset(tmp_path / "p")
    saved = json.loads((tmp_path / "p" / "preprocessor.json").read_text())
    assert saved["class_name"] == "ImageConverter"
    converter = keras_e3.E3ViT.from_preset(str(tmp_path / "p")).preprocessor
    assert (converter.image_size, converter.num_channels,
            converter.value_range, converter.input_range) == (
        (IMAGE_SIZE, IMAGE_SIZE), 1, (-1.0, 1.0), (0.0, 255.0))
    assert not hasattr(backbone, "preprocessor_config")


@pytest.mark.parametrize("kind", ("vit", "e3"))
def test_fewshot_on_raw_equals_fewshot_on_converted(zoo, kind):
    from keras_e3.training.fewshot import extract_features
    from keras_e3.training.fewshot import fewshot_evaluate

    channels = dict(CORE)[kind]
    model, images, _, paths, _ = zoo[kind, channels]
    images = images + raw_images(channels, seed=1)  # 10 images, 2 sets of sizes
    labels = np.arange(len(images)) % 2
    converted = model.preprocessor(images)
    features = extract_features(model, converted)
    np.testing.assert_allclose(extract_features(model, images), features,
                               atol=ATOL)
    np.testing.assert_allclose(extract_features(model, paths),
                               features[:len(paths)], atol=ATOL)
    kwargs = dict(shots=(1, 2), seeds=(0, 1), num_classes=2)
    expected = fewshot_evaluate(model, (converted, labels),
                                (converted, labels), **kwargs)
    got = fewshot_evaluate(model, (images, labels), (images, labels),
                           **kwargs)
    for k in (1, 2):
        for key in ("member_accuracy", "ensemble_accuracy",
                    "concat_accuracy"):
            assert got["results"][k][key] == expected["results"][k][key]


def test_routing_and_deep_ensemble_take_raw_images(zoo):
    from keras_e3.evaluation.routing import routing_stats

    model, images, ref, paths, _ = zoo["e3", 3]
    converted = model.preprocessor(images)
    expected = routing_stats(model, converted)
    for x in (images, paths):
        got = routing_stats(model, x)
        np.testing.assert_allclose(got["images"], converted, atol=ATOL)
        for name, layer in expected["layers"].items():
            np.testing.assert_array_equal(got["layers"][name]["top_expert"],
                                          layer["top_expert"])
    vmoe, _, vmoe_ref, _, _ = zoo["vmoe", 3]
    pooled = keras_e3.DeepEnsemble([model, vmoe])
    both = np.concatenate([ref, vmoe_ref], axis=1)
    np.testing.assert_allclose(pooled.predict_members(paths), both,
                               atol=ATOL)
    np.testing.assert_allclose(pooled.predict_ensemble(images),
                               ensemble(both), atol=ATOL)
    labels = np.arange(5) % 3
    by_name = pooled.evaluate_ensemble(images, list(np.asarray(CLASS_NAMES)[
        labels]))
    assert by_name == pooled.evaluate_ensemble(converted, labels)
