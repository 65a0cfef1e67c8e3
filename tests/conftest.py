import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("KERAS_E3_FIXTURES",
                               ROOT.parent / "shared" / "fixtures" / "vmoe"))
FIXTURE_NAMES = ("vit_tiny", "vmoe_tiny_nodrop", "vmoe_tiny_drop",
                 "eee_tiny_nodrop", "eee_tiny_drop",
                 "eee_tiny_nodrop_bf16dispatch")
BACKEND = keras.backend.backend()


def fixture_dir(name):
    path = FIXTURES / name
    if not path.is_dir():
        pytest.skip(f"golden fixtures not found at {path} "
                    "(set KERAS_E3_FIXTURES)")
    return path


def load_fixture(name):
    """config, params, inputs, logits and the other arrays of a fixture."""
    path = fixture_dir(name)
    out = {"config": json.loads((path / "config.json").read_text()),
           "params": str(path / "params.npz")}
    for f in path.glob("*.npy"):
        out[f.stem] = np.load(f)
    for f in ("intermediates", "metrics", "train_step"):
        if (path / f"{f}.npz").exists():
            with np.load(path / f"{f}.npz") as data:
                out[f] = {k: data[k] for k in data.files}
    return out


def to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def gradients(fn, args, jit):
    """Gradients of the scalar fn(*args) with respect to every arg."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        grad = jax.grad(fn, argnums=tuple(range(len(args))))
        return [to_numpy(g) for g in (jax.jit(grad) if jit else grad)(*args)]
    if backend == "tensorflow":
        import tensorflow as tf

        def grad(*args):
            with tf.GradientTape() as tape:
                tape.watch(args)
                value = fn(*args)
            return tape.gradient(value, args)

        if jit:
            grad = tf.function(grad, jit_compile=True)
        return [to_numpy(g) for g in grad(*map(tf.constant, args))]
    import torch

    args = [torch.tensor(a, requires_grad=True) for a in args]
    fn(*args).backward()
    return [to_numpy(a.grad) for a in args]


def official_logits(model, images):
    """Model output in vmoe's order: [B, C], or [B*M, C] for E³."""
    logits = to_numpy(model(images))
    return logits.reshape(-1, logits.shape[-1])


def tiny_backbone_kwargs(**overrides):
    kwargs = dict(image_size=16, patch_size=8, hidden_dim=16, num_layers=2,
                  num_heads=2, mlp_dim=32, representation_size=16,
                  num_experts=4, moe_layers=(1,), num_selected_experts=1,
                  ensemble_size=2, capacity_factor=2.0, group_size=20)
    kwargs.update(overrides)
    return kwargs


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def run_cli(*args, timeout=300):
    """`python -m keras_e3.cli ARGS` in a subprocess on this backend."""
    env = dict(os.environ, KERAS_BACKEND=BACKEND,
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get(
                   "PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "keras_e3.cli", *args],
                          capture_output=True, text=True, env=env,
                          timeout=timeout)
