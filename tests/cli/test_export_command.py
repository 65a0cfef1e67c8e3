"""`keras-e3 export PRESET OUT --format ...`."""

import os

import numpy as np
import pytest
from conftest import BACKEND
from conftest import run_cli


def run_cli_slow(*args):
    return run_cli(*args, timeout=600)


UNSUPPORTED = {"jax": "litert", "tensorflow": None, "torch": "saved_model"}


@pytest.mark.export
def test_export_writes_a_saved_model_or_names_backend_and_format(tmp_path):
    """The preset with its converter: raw uint8 digits of any size in
    (8x8 and 32x32 here), as `predict` gives them."""
    out = tmp_path / "served"
    result = run_cli_slow("export", "e3_tiny_digits", str(out),
                          "--include-preprocessing")
    if BACKEND == "torch":
        assert result.returncode == 1
        assert ("Cannot export format 'saved_model' from the 'torch' "
                "backend") in result.stderr
        assert os.listdir(tmp_path) == []
        return
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == f"wrote {out}"
    assert os.listdir(tmp_path) == ["served"]  # no temporary left behind
    import tensorflow as tf

    from keras_e3 import E3ViT

    loaded = tf.saved_model.load(str(out))
    model = E3ViT.from_preset("e3_tiny_digits")
    for size in (8, 32):
        images = np.zeros((3, size, size, 1), "uint8")
        images[:, size // 4:3 * size // 4, size // 3:2 * size // 3] = 255
        logits = loaded.serve(tf.constant(images))["member_logits"].numpy()
        np.testing.assert_allclose(logits, model.predict(images, verbose=0),
                                   rtol=0, atol=1e-5)


@pytest.mark.export
def test_export_format_follows_the_file_name(tmp_path):
    """`keras-e3 export PRESET out.onnx` writes ONNX (from TensorFlow; an
    error naming the backend elsewhere); --format saved_model with a .onnx
    name is a clear error."""
    result = run_cli_slow("export", "e3_tiny_digits",
                          str(tmp_path / "out.onnx"), "--format",
                          "saved_model")
    assert result.returncode == 1
    assert "A SavedModel is a directory" in result.stderr
    assert os.listdir(tmp_path) == []
    result = run_cli_slow("export", "e3_tiny_digits",
                          str(tmp_path / "out.onnx"))
    if BACKEND != "tensorflow":
        assert result.returncode == 1
        assert f"Cannot export format 'onnx' from the '{BACKEND}' " \
            "backend" in result.stderr
        assert os.listdir(tmp_path) == []
        return
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.isfile(tmp_path / "out.onnx")
    onnx = pytest.importorskip("onnx")
    graph = onnx.load(str(tmp_path / "out.onnx")).graph
    assert len(graph.input) == 1  # model-ready float32 images


def test_export_unsupported_format_is_a_clear_error(tmp_path):
    fmt = UNSUPPORTED[BACKEND]
    if fmt is None:  # TensorFlow exports every format: an unknown one
        result = run_cli_slow("export", "e3_tiny_digits",
                              str(tmp_path / "x"), "--format", "pb")
        assert result.returncode == 2
        assert "invalid choice: 'pb'" in result.stderr
        return
    name = "model.tflite" if fmt == "litert" else "model"
    result = run_cli_slow("export", "e3_tiny_digits",
                          str(tmp_path / name), "--format", fmt)
    assert result.returncode == 1
    assert f"Cannot export format '{fmt}' from the '{BACKEND}' backend" in \
        result.stderr
    assert os.listdir(tmp_path) == []
