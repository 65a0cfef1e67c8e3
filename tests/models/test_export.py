"""Exported artefacts run without keras_e3 and give `model.predict`'s
numbers: model-ready exports at any batch size (1, 5 and 70: partial
routing groups); exports with preprocessing on raw images of any size
(uint8 arrays, and encoded files for a SavedModel), through the model's
own ImageConverter, against `model.predict` on the decoded arrays.

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
import raw_doors
from conftest import BACKEND
from conftest import ROOT

from keras_e3 import E3ViT
from keras_e3 import E3ViTBackbone
from keras_e3.export import ExportError
from keras_e3.export import export_model
from keras_e3.export import format_from_path
from keras_e3.export import resize_area_matmul
from keras_e3.export.serving import check_graph_ops

pytestmark = pytest.mark.export

BATCH_SIZES = (1, 5, 70)
TOLERANCE = 1e-5

# Runs in the isolated subprocess: argv = jobs .json, inputs .npz, outputs
# .npz. Each job runs one artefact ("format", "path") on one input: an
# array of the .npz ("input") or the bytes of image files ("files", fed to
# a SavedModel's "signature"). Writes one output array per job ("key"),
# dict outputs flattened to "<key>/<name>".
RUNNER = r"""
import json
import sys
try:
    import keras_e3
except ImportError:
    pass
else:
    raise SystemExit("keras_e3 is importable in the isolated process")
import numpy as np

jobs, inputs, outputs = sys.argv[1:]
jobs = json.load(open(jobs))
inputs = dict(np.load(inputs))
results, loaded = {}, {}


def store(key, y):
    if isinstance(y, dict):
        if len(y) == 1:
            results[key] = np.asarray(next(iter(y.values())))
        else:
            results.update({f"{key}/{k}": np.asarray(v)
                            for k, v in y.items()})
    else:
        results[key] = np.asarray(y)


for job in jobs:
    fmt, path, key = job["format"], job["path"], job["key"]
    if fmt == "saved_model":
        import tensorflow as tf

        if path not in loaded:  # keep it: it owns the variables
            loaded[path] = tf.saved_model.load(path)
        serve = getattr(loaded[path], job.get("signature") or "serve")
        if "files" in job:
            x = tf.constant([open(f, "rb").read() for f in job["files"]])
        else:
            x = tf.constant(inputs[job["input"]])
        y = serve(x)
        store(key, {k: v.numpy() for k, v in y.items()}
              if isinstance(y, dict) else y.numpy())
    elif fmt == "onnx":
        import onnxruntime

        if path not in loaded:
            loaded[path] = onnxruntime.InferenceSession(path)
        session = loaded[path]
        names = [o.name for o in session.get_outputs()]
        y = session.run(None, {session.get_inputs()[0].name:
                               inputs[job["input"]]})
        store(key, dict(zip(names, y)))
    elif fmt == "litert":
        from ai_edge_litert.interpreter import Interpreter

        runner = Interpreter(model_path=path).get_signature_runner()
        name = next(iter(runner.get_input_details()))
        store(key, runner(**{name: inputs[job["input"]]}))
np.savez(outputs, **results)
print("ran without keras_e3")
"""


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


def run_isolated(jobs, inputs, tmp_path):
    """Runs `jobs` (see RUNNER) on `inputs` (name -> array) in one process
    that cannot import keras_e3; returns their outputs."""
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    (tmp_path / "jobs.json").write_text(json.dumps(
        [{k: str(v) if k == "path" else v for k, v in job.items()}
         for job in jobs]))
    np.savez(tmp_path / "inputs.npz", **inputs)
    out = run_isolated_script(script, [tmp_path / "jobs.json",
                                       tmp_path / "inputs.npz",
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


NEEDS = {"onnx": ("tf2onnx", "onnxruntime"), "litert": ("ai_edge_litert",)}
SUPPORTED = {("saved_model", "jax"), ("saved_model", "tensorflow"),
             ("onnx", "tensorflow"), ("litert", "tensorflow")}
FORMATS = ("saved_model", "onnx", "litert")
EXTENSION = {"saved_model": "", "onnx": ".onnx", "litert": ".tflite"}


def supported_formats():
    """The formats this backend exports (skipping those whose runtime is
    not installed)."""
    out = []
    for fmt in FORMATS:
        if (fmt, BACKEND) in SUPPORTED:
            for module in NEEDS.get(fmt, ()):
                pytest.importorskip(module,
                                    reason="pip install keras-e3[export]")
            out.append(fmt)
    return out


def test_export_runs_without_keras_e3(models, tmp_path):
    """Model-ready exports (no preprocessing) of the preset and of an E³
    that drops tokens, in every format this backend writes, give
    `model.predict`'s numbers at batch sizes 1, 5 and 70; the others are
    ExportErrors naming the format and the backend."""
    jobs, inputs, expected = [], {}, {}
    for fmt in FORMATS:
        for name, model in models.items():
            path = tmp_path / fmt / (name + EXTENSION[fmt])
            if (fmt, BACKEND) not in SUPPORTED:
                with pytest.raises(ExportError, match=f"{fmt}.*{BACKEND}"):
                    export_model(model, path)
                assert not path.parent.exists() or not os.listdir(
                    path.parent)
                continue
            if fmt not in supported_formats():
                continue
            export_model(model, path)  # the format from the extension
            # atomic: nothing but the artefacts
            assert not [p for p in os.listdir(path.parent)
                        if p.startswith(".")]
            for key, x in model_inputs(model).items():
                inputs[f"{name}/{key}"] = x
                expected[f"{fmt}/{name}/{key}"] = model.predict(x,
                                                                verbose=0)
                jobs.append({"format": fmt, "path": path,
                             "input": f"{name}/{key}",
                             "key": f"{fmt}/{name}/{key}"})
    if not jobs:
        return
    outputs = run_isolated(jobs, inputs, tmp_path)
    for key, value in expected.items():
        assert outputs[key].shape == value.shape, key
        np.testing.assert_allclose(outputs[key], value, rtol=0,
                                   atol=TOLERANCE, err_msg=key)


# --------------------------------------------------------------------
# Exports with preprocessing: raw images in, through the model's own
# ImageConverter (a vmoe pipeline: resize_small + central_crop, area).
# (kind, channels): a dense ViT (RGB), a V-MoE (gray) and an E³ (RGB).
SERVED_MODELS = (("vit", 3), ("vmoe", 1), ("e3", 3))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """{(kind, channels): (model, {format: artefact})}: each raw_doors tiny
    model exported with its preprocessing as a SavedModel, and the E³ in
    every other supported format too."""
    folder = tmp_path_factory.mktemp("served")
    out = {}
    for kind, channels in SERVED_MODELS:
        model = raw_doors.tiny_model(kind, num_channels=channels)
        paths = {}
        # ONNX and LiteRT once (the E³: area resampling, routing), the
        # SavedModel for all three (each export takes seconds to minutes).
        formats = [f for f in supported_formats()
                   if kind == "e3" or f == "saved_model"]
        for fmt in formats:
            paths[fmt] = folder / f"{kind}{channels}{EXTENSION[fmt]}"
            export_model(model, paths[fmt], include_preprocessing=True)
        out[(kind, channels)] = (model, paths)
    return out


def expected_outputs(model, images):
    """`model.predict` on each decoded array (`raw_doors.reference`):
    member logits [N, M, C] and their ensemble probabilities [N, C]."""
    logits = raw_doors.reference(model, images)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs = np.mean(probs / probs.sum(-1, keepdims=True), axis=1)
    return {"member_logits": logits, "ensemble_probabilities": probs}


def test_served_equals_predict(served, tmp_path):
    """Every served artefact gives `model.predict`'s member logits and
    ensemble probabilities (1e-5) on raw uint8 images of several sizes
    and aspect ratios (a batch of one per size, and a batch of three
    equal-size images), and a SavedModel's `serve_encoded` on PNG files of
    all sizes in one batch, gray and RGB ones (the converter's channel
    rule), all run in one process without keras_e3."""
    if not served[SERVED_MODELS[0]][1]:
        pytest.skip(f"no format is exported from {BACKEND}")
    jobs, inputs, expected = [], {}, {}
    for (kind, channels), (model, paths) in served.items():
        name = f"{kind}{channels}"
        images = raw_doors.raw_images(channels, seed=channels)
        groups = {f"size{i}": [image] for i, image in enumerate(images)}
        groups["batch3"] = raw_doors.raw_images(
            channels, [raw_doors.SIZES[1]] * 3, seed=7)
        for key, group in groups.items():
            inputs[f"{name}/{key}"] = np.stack(group)
            expected[f"{name}/{key}"] = expected_outputs(model, group)
        for fmt, path in paths.items():
            jobs += [{"format": fmt, "path": path, "input": f"{name}/{key}",
                      "key": f"{fmt}/{name}/{key}"} for key in groups]
        if "saved_model" in paths:
            # PNG files, gray and RGB, of every size, in one batch.
            other = raw_doors.raw_images(4 - channels, seed=3)
            files = raw_doors.write_images(tmp_path / name, images) + \
                raw_doors.write_images(tmp_path / name, other,
                                       prefix="other")
            expected[f"{name}/png"] = expected_outputs(model, images + other)
            jobs.append({"format": "saved_model",
                         "path": paths["saved_model"], "files": files,
                         "signature": "serve_encoded",
                         "key": f"saved_model/{name}/png"})
    outputs = run_isolated(jobs, inputs, tmp_path)
    for job in jobs:
        fmt, rest = job["key"].split("/", 1)
        for output, value in expected[rest].items():
            key = f"{job['key']}/{output}"
            assert outputs[key].shape == value.shape, key
            np.testing.assert_allclose(outputs[key], value, rtol=0,
                                       atol=TOLERANCE, err_msg=key)


def test_served_saved_model_signatures(served):
    """The SavedModel's signatures are exactly the documented ones."""
    import tensorflow as tf

    paths = served[("e3", 3)][1]
    if "saved_model" not in paths:
        pytest.skip(f"no SavedModel from {BACKEND}")
    loaded = tf.saved_model.load(str(paths["saved_model"]))
    assert sorted(loaded.signatures) == ["serve_encoded", "serving_default"]
    images = loaded.signatures["serving_default"]
    assert images.structured_input_signature[1] == {"images": tf.TensorSpec(
        [None, None, None, 3], tf.uint8, name="images")}
    encoded = loaded.signatures["serve_encoded"]
    assert encoded.structured_input_signature[1] == {"encoded": tf.TensorSpec(
        [None], tf.string, name="encoded")}
    for fn in (images, encoded):
        assert {k: (v.shape.as_list(), v.dtype)
                for k, v in fn.structured_outputs.items()} == {
            "member_logits": ([None, 2, 3], tf.float32),
            "ensemble_probabilities": ([None, 3], tf.float32)}


@pytest.fixture(scope="module")
def digits_served(models, tmp_path_factory):
    """{format: artefact}: the shipped digits preset (1 channel, bilinear
    resize to 32x32) exported with its preprocessing in every format this
    backend writes."""
    folder = tmp_path_factory.mktemp("digits")
    paths = {fmt: folder / f"served{EXTENSION[fmt]}"
             for fmt in supported_formats()}
    if not paths:
        pytest.skip(f"no format is exported from {BACKEND}")
    for fmt, path in paths.items():
        export_model(models["e3_tiny_digits"], path,
                     include_preprocessing=True)
    return paths


def digit_images():
    """Three 8x8 uint8 digits (0..255) and the same digits at 32x32 (each
    pixel a 4x4 block), with their labels."""
    from keras_e3.data.digits import load_digits_raw
    from keras_e3.data.digits import to_uint8

    images, labels = load_digits_raw()
    small = to_uint8(images[:3])[..., None]
    large = np.kron(small, np.ones((1, 4, 4, 1), np.uint8))
    return small, large, labels[:3]


def test_digits_preset_served(models, digits_served, tmp_path):
    """The digits preset's artefacts serve 8x8 uint8 digits and 32x32 ones
    (and the SavedModel PNG files of both sizes) as `model.predict` on the
    same arrays, and examples/serve_saved_model.py, run where keras_e3
    cannot be imported, prints the same numbers for the PNG files."""
    model = models["e3_tiny_digits"]
    small, large, labels = digit_images()
    files = raw_doors.write_images(tmp_path / "png", list(small) +
                                   list(large))
    jobs = [{"format": fmt, "path": path, "input": size,
             "key": f"{fmt}/{size}"}
            for fmt, path in digits_served.items()
            for size in ("small", "large")]
    want = {"small": expected_outputs(model, small),
            "large": expected_outputs(model, large)}
    want["png"] = {k: np.concatenate([want["small"][k], want["large"][k]])
                   for k in want["small"]}
    saved_model = digits_served.get("saved_model")
    if saved_model:
        jobs.append({"format": "saved_model", "path": saved_model,
                     "files": files, "signature": "serve_encoded",
                     "key": "saved_model/png"})
    outputs = run_isolated(jobs, {"small": small, "large": large}, tmp_path)
    for job in jobs:
        for output, value in want[job["key"].split("/")[1]].items():
            key = f"{job['key']}/{output}"
            np.testing.assert_allclose(outputs[key], value, rtol=0,
                                       atol=TOLERANCE, err_msg=key)
    np.testing.assert_array_equal(
        np.argmax(want["small"]["ensemble_probabilities"], -1), labels)
    if not saved_model:
        return
    out = run_isolated_script(ROOT / "examples" / "serve_saved_model.py",
                              [str(saved_model), *files, "--json"],
                              tmp_path)
    printed = json.loads(out)
    for output, value in want["png"].items():
        np.testing.assert_allclose(printed[output], value, rtol=0,
                                   atol=TOLERANCE, err_msg=output)


def test_export_errors(models, tmp_path):
    model = models["dropping_e3"]
    with pytest.raises(ExportError, match="Unknown export format 'pb'"):
        export_model(model, tmp_path / "x", "pb")
    with pytest.raises(ExportError, match=r"A LiteRT export is a \.tflite"):
        export_model(model, tmp_path / "model.bin", "litert")
    with pytest.raises(ExportError, match=r"A SavedModel is a directory.*"
                                          r"out\.onnx'.*says 'onnx'"):
        export_model(model, tmp_path / "out.onnx", "saved_model")
    with pytest.raises(ExportError, match="model.preprocessor is None"):
        export_model(model, tmp_path / "served", include_preprocessing=True)
    (tmp_path / "taken").write_text("a file")
    if ("saved_model", BACKEND) in SUPPORTED:
        with pytest.raises(ExportError, match="exists and is a file"):
            export_model(model, tmp_path / "taken", "saved_model")
        assert (tmp_path / "taken").read_text() == "a file"
    assert sorted(os.listdir(tmp_path)) == ["taken"]


@pytest.mark.single_backend
@pytest.mark.parametrize("path, fmt", [
    ("served", "saved_model"), ("a/b.d/served/", "saved_model"),
    ("m.onnx", "onnx"), ("M.ONNX", "onnx"), ("m.tflite", "litert")])
def test_format_follows_the_extension(path, fmt):
    assert format_from_path(path) == fmt
    assert format_from_path(path, fmt) == fmt
    for other in set(FORMATS) - {fmt}:
        with pytest.raises(ExportError, match=f"says {fmt!r}"):
            format_from_path(path, other)


@pytest.mark.single_backend
@pytest.mark.parametrize("size, out", [
    ((16, 16), (16, 16)), ((20, 30), (20, 30)), ((37, 21), (35, 20)),
    ((9, 12), (20, 27)), ((23, 23), (7, 11)), ((1, 5), (3, 2))])
def test_resize_area_matmul_is_tensorflows_resize_area(size, out):
    """The area resampling ONNX and LiteRT exports use (matrix products
    with in-graph weights) is TensorFlow's ResizeArea, down and up."""
    import tensorflow as tf

    x = np.stack(raw_doors.raw_images(3, [size] * 2))
    want = tf.compat.v1.image.resize_area(x, out).numpy()
    got = tf.function(resize_area_matmul)(
        tf.constant(x), tf.constant(out)).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


@pytest.mark.single_backend
def test_unexpressible_ops_are_named():
    import tensorflow as tf

    def graph(fn, spec):
        return tf.function(fn).get_concrete_function(spec).graph

    area = graph(lambda x: tf.compat.v1.image.resize_area(x, [4, 4]),
                 tf.TensorSpec([None, 8, 8, 3], tf.uint8))
    for fmt in ("onnx", "litert"):
        with pytest.raises(ExportError, match=f"{fmt}.*ResizeArea"):
            check_graph_ops(area, fmt)
    check_graph_ops(area, "saved_model")
    decode = graph(lambda s: tf.io.decode_image(s, expand_animations=False),
                   tf.TensorSpec([], tf.string))
    with pytest.raises(ExportError, match="'litert'.*DecodeImage"):
        check_graph_ops(decode, "litert")
