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

    loaded = tf.saved_model.load(str(out))
    # Raw uint8 images at the size the preset's ImageConverter serves.
    images = np.zeros((3, 32, 32, 1), "uint8")
    images[:, 8:24, 12:20] = 255
    probs = loaded.serve(tf.constant(images))["ensemble_probabilities"].numpy()
    assert probs.shape == (3, 10)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)


def test_export_unsupported_format_is_a_clear_error(tmp_path):
    fmt = UNSUPPORTED[BACKEND]
    if fmt is None:  # TensorFlow exports every format: an unknown one
        result = run_cli_slow("export", "e3_tiny_digits",
                              str(tmp_path / "x"), "--format", "pb")
        assert result.returncode == 2
        assert "invalid choice: 'pb'" in result.stderr
        return
    result = run_cli_slow("export", "e3_tiny_digits",
                          str(tmp_path / "model.tflite"), "--format", fmt)
    assert result.returncode == 1
    assert f"Cannot export format '{fmt}' from the '{BACKEND}' backend" in \
        result.stderr
    assert os.listdir(tmp_path) == []
