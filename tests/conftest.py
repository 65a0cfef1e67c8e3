import json
import os
import subprocess
import sys
from pathlib import Path

# The suite compiles hundreds of small XLA programs (JAX, and TensorFlow's
# jit_compile), each run a few times: without LLVM's optimisations XLA's
# CPU backend compiles them faster (measured: JAX's tests/models/
# test_model.py 203 s -> 154 s, TensorFlow's test_model.py +
# test_dispatch_paths.py 166 s -> 147 s). The HLO and the matmul kernels
# are the same; the fixture tolerances hold. An XLA_FLAGS that already
# sets the level is left as it is.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_backend_optimization_level=0").strip()

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


_FIXTURE_MODELS = {}


def fixture_model(name):
    """(E3ViT.from_vmoe of golden fixture `name`, the fixture), built once
    per test session."""
    if name not in _FIXTURE_MODELS:
        import keras_e3

        fx = load_fixture(name)
        _FIXTURE_MODELS[name] = (
            keras_e3.E3ViT.from_vmoe(fx["config"], fx["params"]), fx)
    return _FIXTURE_MODELS[name]


def official_moe_calls(name):
    """Each MoE layer of fixture `name`'s model called on its official
    input: yields (block name, its vmoe prefix "Encoder/<block>/Moe", the
    output, the routing (`return_routing=True`), the official
    intermediates)."""
    model, fx = fixture_model(name)
    ref = fx["intermediates"]
    for i in fx["config"]["encoder"]["moe"]["layers"]:
        block = f"encoderblock_{i}"
        moe = model.backbone.get_layer(block).mlp
        y, routing = moe(ref[f"Encoder/{block}/LayerNorm_1/__call__/0"],
                         return_routing=True)
        yield block, f"Encoder/{block}/Moe", y, routing, ref


def assert_close(actual, expected, atol=1e-5, what=""):
    """Same shape and max abs error <= atol (fp32 equivalence: 1e-5)."""
    actual = to_numpy(actual)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err = float(np.max(np.abs(actual - expected)))
    assert err <= atol, f"{what}: max abs error {err:.3g} > {atol:.1g}"


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


def run_in_process(capsys, *argv):
    """(exit code, stdout, stderr) of `keras-e3 ARGV`, in this process."""
    from keras_e3 import cli

    try:
        code = cli.main(list(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err

