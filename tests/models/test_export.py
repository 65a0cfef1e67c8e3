"""Exported artefacts run without keras_e3 and give `model.predict`'s
numbers at any batch size (1, 5 and 70: partial routing groups).

Each artefact is reloaded in a subprocess that cannot import keras_e3
(`python -I -S`, only the environment's site-packages on sys.path: no
editable install, no project directory), with plain TensorFlow, ONNX
Runtime or the LiteRT interpreter.
"""

import json
import os
import subprocess
import sys
import sysconfig

import keras
import numpy as np
import pytest
from conftest import BACKEND
from conftest import ROOT

from keras_e3 import E3ViT
from keras_e3 import E3ViTBackbone
from keras_e3.data.preprocessing import ImagePreprocessor
from keras_e3.export import ExportError
from keras_e3.export import export_model
from keras_e3.export import raw_image_shape

pytestmark = pytest.mark.export

BATCH_SIZES = (1, 5, 70)
TOLERANCE = 1e-5

# Runs in the isolated subprocess: argv = format, artefact, inputs .npz,
# outputs .npz. Writes one output array per input array (dict outputs are
# flattened to "<input>/<name>").
RUNNER = r'''
import sys
try:
    import keras_e3
except ImportError:
    pass
else:
    raise SystemExit("keras_e3 is importable in the isolated process")
import numpy as np

fmt, path, inputs, outputs = sys.argv[1:]
inputs = dict(np.load(inputs))
results = {}
if fmt == "saved_model":
    import tensorflow as tf

    loaded = tf.saved_model.load(path)  # keep it: it owns the variables
    serve = loaded.serve
    for key, x in inputs.items():
        y = serve(tf.constant(x))
        if isinstance(y, dict):
            results.update({f"{key}/{k}": v.numpy() for k, v in y.items()})
        else:
            results[key] = y.numpy()
elif fmt == "onnx":
    import onnxruntime

    session = onnxruntime.InferenceSession(path)
    name = session.get_inputs()[0].name
    for key, x in inputs.items():
        results[key] = session.run(None, {name: x})[0]
elif fmt == "litert":
    from ai_edge_litert.interpreter import Interpreter

    for key, x in inputs.items():
        interpreter = Interpreter(model_path=path)
        detail = interpreter.get_input_details()[0]
        interpreter.resize_tensor_input(detail["index"], x.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(detail["index"], x)
        interpreter.invoke()
        out = interpreter.get_output_details()[0]["index"]
        results[key] = interpreter.get_tensor(out)
np.savez(outputs, **results)
print("ran without keras_e3")
'''


def run_isolated_script(script, args, cwd):
    """Runs `script` with `args` in a process that cannot import keras_e3
    (see the module docstring); returns its stdout."""
    site = sysconfig.get_paths()["purelib"]
    bootstrap = (f"import sys, runpy; sys.path.append({site!r}); "
                 f"sys.argv = sys.argv[1:]; "
                 f"runpy.run_path(sys.argv[0], run_name='__main__')")
    env = {"PATH": os.environ.get("PATH", ""), "TF_CPP_MIN_LOG_LEVEL": "2"}
    check = "import keras_e3"
    result = subprocess.run([sys.executable, "-I", "-S", "-c", check],
                            capture_output=True, text=True, cwd=cwd, env=env)
    assert "No module named 'keras_e3'" in result.stderr
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", bootstrap, str(script),
         *map(str, args)],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def run_isolated(fmt, path, inputs, tmp_path):
    """Runs the artefact at `path` on each array of `inputs` in a process
    that cannot import keras_e3; returns its outputs."""
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    np.savez(tmp_path / "inputs.npz", **inputs)
    out = run_isolated_script(script, [fmt, path, tmp_path / "inputs.npz",
                                       tmp_path / "outputs.npz"], tmp_path)
    assert "ran without keras_e3" in out
    with np.load(tmp_path / "outputs.npz") as data:
        return {k: data[k] for k in data.files}


def dropping_e3():
    """A small E³ with capacity_factor 0.5: tokens are dropped. Its
    dispatcher is the backend's default (the gather fast path on JAX and
    TensorFlow)."""
    backbone = E3ViTBackbone(
        image_size=16, patch_size=8, hidden_dim=16, num_layers=2,
        num_heads=2, mlp_dim=32, num_experts=4, moe_layers=(1,),
        ensemble_size=2, capacity_factor=0.5, group_size=20, seed=0)
    model = E3ViT(backbone, num_classes=5,
                  head_kernel_initializer="glorot_uniform")
    images = np.random.default_rng(1).normal(size=(4, 16, 16, 3))
    routing = backbone.compute_intermediates(images)["routing/encoderblock_1"]
    kept = np.sum(keras.ops.convert_to_numpy(routing["dispatch_mask"]))
    assert kept < 4 * 5 * 2, "the model is meant to drop tokens"
    return model


@pytest.fixture(scope="module")
def models():
    return {"e3_tiny_digits": E3ViT.from_preset("e3_tiny_digits"),
            "dropping_e3": dropping_e3()}


def model_inputs(model, seed=0):
    rng = np.random.default_rng(seed)
    shape = model.input_shape[1:]
    return {f"b{b}": rng.uniform(-1, 1, size=(b, *shape)).astype("float32")
            for b in BATCH_SIZES}


def assert_matches_predict(model, inputs, outputs):
    for key, x in inputs.items():
        expected = model.predict(x, verbose=0)
        assert outputs[key].shape == expected.shape
        np.testing.assert_allclose(outputs[key], expected, rtol=0,
                                   atol=TOLERANCE, err_msg=key)


NEEDS = {"onnx": ("tf2onnx", "onnxruntime"), "litert": ("ai_edge_litert",)}
SUPPORTED = {("saved_model", "jax"), ("saved_model", "tensorflow"),
             ("onnx", "tensorflow"), ("litert", "tensorflow")}


@pytest.mark.parametrize("fmt", ["saved_model", "onnx", "litert"])
@pytest.mark.parametrize("name", ["e3_tiny_digits", "dropping_e3"])
def test_export_runs_without_keras_e3(models, name, fmt, tmp_path):
    model = models[name]
    path = tmp_path / ("artefact" + {"saved_model": "", "onnx": ".onnx",
                                     "litert": ".tflite"}[fmt])
    if (fmt, BACKEND) not in SUPPORTED:
        with pytest.raises(ExportError, match=f"{fmt}.*{BACKEND}"):
            export_model(model, path, fmt)
        assert not path.exists()
        return
    for module in NEEDS.get(fmt, ()):
        pytest.importorskip(module, reason="pip install keras-e3[export]")
    export_model(model, path, fmt)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]
    inputs = model_inputs(model)
    assert_matches_predict(model, inputs,
                           run_isolated(fmt, path, inputs, tmp_path))


@pytest.fixture(scope="module")
def served(models, tmp_path_factory):
    """The preset exported with its preprocessing (raw uint8 images in)."""
    if ("saved_model", BACKEND) not in SUPPORTED:
        pytest.skip(f"no SavedModel from {BACKEND}")
    path = tmp_path_factory.mktemp("served") / "served"
    export_model(models["e3_tiny_digits"], path, "saved_model",
                 include_preprocessing=True)
    return path


def preset_outputs(model, images):
    """What the served function must return, from `model.predict` on the
    preset's own (NumPy) preprocessing."""
    logits = model.predict(
        ImagePreprocessor.from_config(model.preprocessor_config)(images),
        verbose=0)
    probs = np.mean(keras.ops.convert_to_numpy(
        keras.ops.softmax(logits, axis=-1)), axis=1)
    return logits, probs


def test_saved_model_with_preprocessing(models, served, tmp_path):
    """Raw uint8 images in; the preset's preprocessing, member logits and
    ensemble probabilities out."""
    model = models["e3_tiny_digits"]
    shape = raw_image_shape(model.preprocessor_config)
    # The preset's converter has no fixed raw size: the model's own.
    assert shape == (32, 32, 1)
    rng = np.random.default_rng(2)
    raw = {f"b{b}": rng.integers(0, 256, size=(b, *shape)).astype("uint8")
           for b in BATCH_SIZES}
    outputs = run_isolated("saved_model", served, raw, tmp_path)
    for key, images in raw.items():
        logits, probs = preset_outputs(model, images)
        np.testing.assert_allclose(outputs[f"{key}/member_logits"], logits,
                                   rtol=0, atol=TOLERANCE)
        np.testing.assert_allclose(
            outputs[f"{key}/ensemble_probabilities"], probs, rtol=0,
            atol=TOLERANCE)


def test_serve_saved_model_example(models, served, tmp_path):
    """examples/serve_saved_model.py, run where keras_e3 cannot be
    imported, classifies digit PNGs as the preset does."""
    from keras_e3.data.digits import load_digits_raw

    images, labels = load_digits_raw()
    # PNGs of the digits (value * 255 / 16) at the served size, so that
    # the example does not resize them.
    images = keras.ops.image.resize(images[:3, ..., None] * 255 / 16,
                                    (32, 32), interpolation="bilinear")
    images = np.clip(np.round(keras.ops.convert_to_numpy(images)), 0,
                     255).astype("uint8")
    paths = []
    for i, image in enumerate(images):
        paths.append(str(tmp_path / f"digit{i}.png"))
        keras.utils.save_img(paths[-1], image, scale=False)
    out = run_isolated_script(ROOT / "examples" / "serve_saved_model.py",
                              [str(served), *paths, "--json"], tmp_path)
    served_outputs = json.loads(out)
    logits, probs = preset_outputs(models["e3_tiny_digits"], images)
    np.testing.assert_allclose(served_outputs["member_logits"], logits,
                               rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(served_outputs["ensemble_probabilities"],
                               probs, rtol=0, atol=TOLERANCE)
    np.testing.assert_array_equal(np.argmax(probs, -1), labels[:3])


def test_export_errors(models, tmp_path):
    model = models["dropping_e3"]
    with pytest.raises(ExportError, match="Unknown export format 'pb'"):
        export_model(model, tmp_path / "x", "pb")
    if ("litert", BACKEND) in SUPPORTED:
        with pytest.raises(ExportError, match=r"\.tflite"):
            export_model(model, tmp_path / "model.bin", "litert")
    (tmp_path / "taken").write_text("a file")
    if ("saved_model", BACKEND) in SUPPORTED:
        with pytest.raises(ExportError, match="exists and is a file"):
            export_model(model, tmp_path / "taken", "saved_model")
        assert (tmp_path / "taken").read_text() == "a file"
    assert sorted(os.listdir(tmp_path)) == ["taken"]
