"""A test harness in keras-hub's spirit (`keras_hub/src/tests/test_case.py`:
`run_layer_test`, `run_backbone_test`, `run_task_test`), written for
keras-e3's public API only: layer classes with their constructor
arguments and documented calls, `E3ViTBackbone` and `E3ViT`.

Each check runs on the backend the suite runs under (`tests/run_backends.py`
runs it on JAX, TensorFlow and PyTorch). The oracles are the model's own
earlier outputs (a copy built from its config with the same weights, a
reloaded file must reproduce them), shapes and dtypes written in the test,
and finiteness; never a second path of the code under test.

- `run_layer_test`: build + call (output shapes, dtypes, finite values),
  `get_config` / `from_config` (and Keras serialisation) round trip with
  equal outputs, a functional model holding the layer saved to a `.keras`
  file and reloaded (equal outputs through `predict`), and mixed precision
  (every sublayer with weights under the policy, variables float32,
  floating outputs in the compute dtype, finite, close to the float32
  outputs with the same weights).
- `run_backbone_test`: the same for a backbone (dict outputs), plus
  `save_to_preset` / `from_preset`.
- `run_task_test`: `predict` on raw uint8 images of another size than the
  model's, config round trip, `save_to_preset` / `from_preset` (equal
  predictions, class names and converter), then one `fit` step on the raw
  images (finite loss, weights moved).
"""

import json

import keras
import numpy as np
from keras import ops

MIXED_POLICY = "mixed_bfloat16"


def _is_tensor(x):
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _dtype(x):
    return keras.backend.standardize_dtype(x.dtype)


def _leaves(x):
    """The tensors of an output structure (None leaves dropped)."""
    return [t for t in keras.tree.flatten(x) if t is not None]


def to_numpy(x):
    """An output structure as float32 / integer NumPy arrays (bfloat16 and
    float16 cast up first: not every backend converts them)."""
    def convert(t):
        if t is None:
            return None
        if "float" in _dtype(t):
            t = ops.cast(t, "float32")
        return np.asarray(ops.convert_to_numpy(t))

    return keras.tree.map_structure(convert, x)


def shapes(x):
    """The structure of `x` with each tensor replaced by its shape tuple."""
    return keras.tree.map_structure(
        lambda t: None if t is None else tuple(t.shape), x)


def assert_finite(x, what=""):
    for leaf in _leaves(to_numpy(x)):
        if np.issubdtype(leaf.dtype, np.floating):
            assert np.all(np.isfinite(leaf)), f"{what}: non-finite values"


def assert_all_close(actual, expected, atol=1e-5, rtol=1e-5, what=""):
    """Same structure, shapes and values (floats within atol + rtol)."""
    actual, expected = to_numpy(actual), to_numpy(expected)
    assert keras.tree.flatten(shapes(actual)) == \
        keras.tree.flatten(shapes(expected)), what
    for a, e in zip(_leaves(actual), _leaves(expected)):
        np.testing.assert_allclose(a, e, atol=atol, rtol=rtol, err_msg=what)


def assert_float_dtypes(x, dtype, what=""):
    """Every floating tensor of `x` has `dtype`."""
    for leaf in _leaves(x):
        if "float" in _dtype(leaf):
            assert _dtype(leaf) == dtype, f"{what}: {_dtype(leaf)} != {dtype}"


def assert_shapes(x, expected, what="output"):
    """`expected`: a shape tuple for a single tensor, else the structure of
    `x` with a shape tuple for each tensor (None where `x` has None)."""
    actual = tuple(x.shape) if _is_tensor(x) else shapes(x)
    assert actual == expected, f"{what} shapes {actual} != {expected}"


def assert_symbolic_shapes(x, expected):
    """As `assert_shapes`, a symbolic dimension (None) matching any."""
    actual = [tuple(t.shape) for t in _leaves(x)]
    wanted = _flat_shapes(expected)
    assert len(actual) == len(wanted), (actual, wanted)
    for a, e in zip(actual, wanted):
        assert len(a) == len(e) and all(
            d is None or d == w for d, w in zip(a, e)), \
            f"symbolic output shapes {actual} do not match {wanted}"


def _is_shape(x):
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def _flat_shapes(expected):
    """The shape tuples of an expected structure in `keras.tree.flatten`'s
    order (dicts by sorted key), None entries dropped."""
    if expected is None:
        return []
    if _is_shape(expected):
        return [expected]
    if isinstance(expected, dict):
        return [s for k in sorted(expected) for s in _flat_shapes(expected[k])]
    return [s for e in expected for s in _flat_shapes(e)]


def _copy_weights(source, target):
    weights = source.get_weights()
    assert len(weights) == len(target.get_weights())
    target.set_weights(weights)


def _check_config_round_trip(obj, cls):
    """from_config(get_config()) has the same config, JSON-able, and Keras
    serialisation revives the same class; returns the revived object."""
    config = obj.get_config()
    json.dumps(config)
    revived = cls.from_config(config)
    assert revived.get_config() == config, "get_config after from_config"
    serialized = keras.saving.serialize_keras_object(obj)
    json.dumps(serialized)
    again = keras.saving.deserialize_keras_object(serialized)
    assert type(again) is cls, type(again)
    assert again.get_config() == config, "Keras serialisation round trip"
    return revived


def run_layer_test(layer_cls, init_kwargs, input_data, expected_output_shape,
                   tmp_path, call_kwargs=None, expected_output_dtype=None,
                   expected_mixed_output_dtype=None,
                   expected_num_trainable_weights=None,
                   run_mixed_precision_check=True, mixed_precision_atol=0.1,
                   run_saving_check=True):
    """Checks one layer class on tiny inputs.

    Args:
        layer_cls: the layer class.
        init_kwargs: its constructor arguments.
        input_data: one input array (NumPy), the call's first argument.
        expected_output_shape: a shape tuple, or the output structure
            with a shape tuple per tensor.
        tmp_path: a directory for the `.keras` file.
        call_kwargs: more call arguments (documented ones only).
        expected_output_dtype: of every floating output (default: the
            layer's compute dtype, float32).
        expected_mixed_output_dtype: the same under `MIXED_POLICY`
            (default: its compute dtype, bfloat16).
        expected_num_trainable_weights: checked when given.
        run_mixed_precision_check: build and call it under `MIXED_POLICY`.
        mixed_precision_atol: max abs difference between the mixed and the
            float32 outputs with the same weights, relative to the largest
            float32 output (None: not compared; routing may differ).
        run_saving_check: save and reload a functional model holding it.
    """
    call_kwargs = call_kwargs or {}
    layer = layer_cls(**init_kwargs)
    output = layer(input_data, **call_kwargs)
    assert layer.built, "the layer is not built after its first call"
    assert_shapes(output, expected_output_shape)
    assert_float_dtypes(output, expected_output_dtype or layer.compute_dtype,
                        "output")
    assert_finite(output, "output")
    if expected_num_trainable_weights is not None:
        assert len(layer.trainable_weights) == expected_num_trainable_weights

    revived = _check_config_round_trip(layer, layer_cls)
    revived(input_data, **call_kwargs)
    _copy_weights(layer, revived)
    assert_all_close(revived(input_data, **call_kwargs), output,
                     what="from_config copy with the same weights")

    if run_saving_check:
        inputs = keras.Input(batch_shape=np.shape(input_data),
                             dtype=str(np.asarray(input_data).dtype))
        symbolic = layer(inputs, **call_kwargs)
        assert_symbolic_shapes(symbolic, expected_output_shape)
        model = keras.Model(inputs, symbolic)
        path = str(tmp_path / f"{layer_cls.__name__}.keras")
        model.save(path)
        loaded = keras.saving.load_model(path)
        loaded_layer = [x for x in loaded.layers
                        if isinstance(x, layer_cls)]
        assert len(loaded_layer) == 1
        assert loaded_layer[0].get_config() == layer.get_config()
        assert_all_close(loaded.predict(input_data, verbose=0), output,
                         atol=1e-4, what="reloaded .keras model (predict)")

    if run_mixed_precision_check:
        mixed = layer_cls(**dict(init_kwargs, dtype=MIXED_POLICY))
        mixed_output = mixed(input_data, **call_kwargs)
        for sublayer in mixed._flatten_layers():  # itself included
            if sublayer.weights:
                assert sublayer.dtype_policy.name == MIXED_POLICY, \
                    f"{sublayer.name} ignores the dtype policy"
        for weight in mixed.weights:
            if "float" in _dtype(weight):
                assert _dtype(weight) == "float32", (weight.path,
                                                     weight.dtype)
        assert_shapes(mixed_output, expected_output_shape, "mixed output")
        assert_float_dtypes(
            mixed_output, expected_mixed_output_dtype or mixed.compute_dtype,
            "mixed-precision output")
        assert_finite(mixed_output, "mixed-precision output")
        if mixed_precision_atol is not None:
            _copy_weights(layer, mixed)
            scale = max([1.0] + [float(np.max(np.abs(a)))
                                 for a in _leaves(to_numpy(output))])
            assert_all_close(mixed(input_data, **call_kwargs), output,
                             atol=mixed_precision_atol * scale, rtol=0,
                             what="mixed precision vs float32")
    return output


def run_backbone_test(cls, init_kwargs, input_data, expected_output_shape,
                      tmp_path, run_mixed_precision_check=True):
    """Checks a backbone class (outputs a dict of tensors).

    Args:
        cls: the backbone class (`E3ViTBackbone`).
        init_kwargs: its constructor arguments (a tiny config).
        input_data: model-ready float32 images [B, H, W, C].
        expected_output_shape: {output name: shape tuple}.
        tmp_path: a directory for the `.keras` file and the preset.
        run_mixed_precision_check: build and call it under `MIXED_POLICY`.
    """
    backbone = cls(**init_kwargs)
    output = backbone(input_data)
    assert_shapes(output, expected_output_shape)
    assert_float_dtypes(output, "float32", "output")
    assert_finite(output, "output")

    revived = _check_config_round_trip(backbone, cls)
    _copy_weights(backbone, revived)
    assert_all_close(revived(input_data), output,
                     what="from_config copy with the same weights")

    path = str(tmp_path / "backbone.keras")
    backbone.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is cls
    assert_all_close(loaded.predict(input_data, verbose=0), output,
                     atol=1e-4, what="reloaded .keras backbone (predict)")

    preset = str(tmp_path / "backbone_preset")
    backbone.save_to_preset(preset)
    restored = cls.from_preset(preset)
    assert type(restored) is cls
    assert restored.get_config() == backbone.get_config()
    assert_all_close(restored(input_data), output,
                     what="save_to_preset / from_preset")

    if run_mixed_precision_check:
        mixed = cls(**dict(init_kwargs, dtype=MIXED_POLICY))
        mixed_output = mixed(input_data)
        assert_shapes(mixed_output, expected_output_shape, "mixed output")
        compute_dtype = keras.DTypePolicy(MIXED_POLICY).compute_dtype
        assert_float_dtypes(mixed_output, compute_dtype,
                            "mixed-precision output")
        for layer in mixed.layers:
            if layer.weights:
                assert layer.dtype_policy.name == MIXED_POLICY, layer.name
        assert_finite(mixed_output, "mixed-precision output")
        assert {_dtype(w) for w in mixed.weights} == {"float32"}
    return output


def run_task_test(task, raw_images, labels, expected_output_shape, tmp_path):
    """Checks a task (`E3ViT`) end to end on raw images.

    Args:
        task: a built-or-not task with a `preprocessor` and `class_names`.
        raw_images: uint8 images [N, H, W, C] of another size than the
            model's (the converter resizes them).
        labels: class indices [N].
        expected_output_shape: of `predict(raw_images)`.
        tmp_path: a directory for the preset.
    """
    raw_images = np.asarray(raw_images)
    assert raw_images.dtype == np.uint8
    model_size = tuple(task.backbone.get_config()["image_size"]) \
        if isinstance(task.backbone.get_config()["image_size"],
                      (list, tuple)) else \
        (task.backbone.get_config()["image_size"],) * 2
    assert raw_images.shape[1:3] != model_size, "use another size"
    predictions = task.predict(raw_images, verbose=0)
    assert_shapes(predictions, expected_output_shape, "predict")
    assert_finite(predictions, "predict")

    # The config round trip (outputs: through the preset below, which
    # rebuilds the task from its config and reloads the weights).
    _check_config_round_trip(task, type(task))

    preset = str(tmp_path / "task_preset")
    task.save_to_preset(preset)
    restored = type(task).from_preset(preset)
    assert list(restored.class_names or []) == list(task.class_names or [])
    assert restored.preprocessor.get_config() == \
        task.preprocessor.get_config()
    assert_all_close(restored.predict(raw_images, verbose=0), predictions,
                     what="save_to_preset / from_preset")

    before = [np.array(w) for w in to_numpy(task.trainable_weights)]
    task.compile(optimizer=keras.optimizers.SGD(0.1))
    history = task.fit(raw_images, np.asarray(labels),
                       batch_size=len(raw_images), epochs=1, verbose=0)
    loss = history.history["loss"]
    assert len(loss) == 1 and np.isfinite(loss[0]), loss
    after = to_numpy(task.trainable_weights)
    assert any(not np.array_equal(b, a) for b, a in zip(before, after)), \
        "one fit step changed no weight"
    return predictions
