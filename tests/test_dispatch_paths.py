"""The gather fast path against the einsum reference and the fixtures:
same outputs, routing, dropped tokens and training step."""

import keras
import numpy as np
import pytest
from conftest import FIXTURE_NAMES
from conftest import load_fixture
from conftest import official_logits
from conftest import tiny_backbone_kwargs
from conftest import to_numpy

import keras_e3
from keras_e3.layers.dispatch import make_dispatcher
from keras_e3.layers.dispatch import resolve_dispatcher

MOE_FIXTURES = [n for n in FIXTURE_NAMES if n != "vit_tiny"]


def with_dispatcher(model, dispatcher):
    """A copy of `model` using `dispatcher`, with the same weights."""
    config = dict(model.backbone.get_config(), dispatcher=dispatcher)
    backbone = keras_e3.E3ViTBackbone.from_config(config)
    copy = keras_e3.E3ViT(backbone, num_classes=model.num_classes)
    copy.set_weights(model.get_weights())
    return copy


@pytest.mark.parametrize("name", MOE_FIXTURES)
def test_gather_matches_fixtures_and_einsum(name):
    fx = load_fixture(name)
    reference = keras_e3.E3ViT.from_vmoe(fx["config"], fx["params"])
    fast = with_dispatcher(reference, "gather")
    logits = official_logits(fast, fx["inputs"])
    assert np.max(np.abs(logits - fx["logits"])) <= 1e-5
    np.testing.assert_allclose(logits, official_logits(reference,
                                                       fx["inputs"]),
                               atol=2e-6)
    ours = fast.compute_intermediates(fx["inputs"])
    theirs = reference.compute_intermediates(fx["inputs"])
    for block in reference.backbone.moe_blocks:
        key = f"routing/{block.name}"
        np.testing.assert_array_equal(to_numpy(ours[key]["dispatch_mask"]),
                                      to_numpy(theirs[key]["dispatch_mask"]))
        # Later blocks see inputs that differ by fp32 rounding.
        for what in ("combine_weights", "expert_outputs"):
            np.testing.assert_allclose(to_numpy(ours[key][what]),
                                       to_numpy(theirs[key][what]),
                                       atol=2e-6)


def routing_case(rng, groups=3, size=24, experts=8, k=2, valid_from=None):
    logits = rng.normal(size=(groups, size, experts)).astype("float32")
    gates = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    valid = None
    if valid_from is not None:
        valid = np.ones((groups, size), bool)
        valid[-1, valid_from:] = False
        valid = keras.ops.convert_to_tensor(valid)
    return keras.ops.convert_to_tensor(gates), valid


@pytest.mark.parametrize("k,capacity,bpr,padded", [
    (1, 4, False, False), (2, 4, True, False), (2, 8, False, True),
    (2, 12, True, True), (1, 32, False, False)])
def test_gather_dispatch_and_combine_equal_einsum(rng, k, capacity, bpr,
                                                  padded):
    gates, valid = routing_case(rng, k=k, valid_from=10 if padded else None)
    x = rng.normal(size=(3, 24, 5)).astype("float32")
    args = (gates, k, capacity, bpr, valid)
    einsum = make_dispatcher(*args, implementation="einsum")
    gather = make_dispatcher(*args, implementation="gather")
    np.testing.assert_array_equal(to_numpy(gather.dispatch_mask),
                                  to_numpy(einsum.dispatch_mask))
    dispatched = to_numpy(gather.dispatch(x))
    np.testing.assert_array_equal(dispatched, to_numpy(einsum.dispatch(x)))
    assert dispatched.shape == (8, 3 * capacity, 5)
    y = rng.normal(size=dispatched.shape).astype("float32")
    np.testing.assert_allclose(to_numpy(gather.combine(y)),
                               to_numpy(einsum.combine(y)), atol=1e-6)
    if capacity == 4:  # this case drops tokens
        assert to_numpy(einsum.dispatch_mask).sum() < 3 * 24 * k


def test_bfloat16_dispatch_equal(rng):
    gates, _ = routing_case(rng)
    x = rng.normal(size=(3, 24, 5)).astype("float32")
    einsum = make_dispatcher(gates, 2, 8, implementation="einsum",
                             dtype="bfloat16")
    gather = make_dispatcher(gates, 2, 8, implementation="gather",
                             dtype="bfloat16")
    np.testing.assert_array_equal(to_numpy(gather.dispatch(x)),
                                  to_numpy(einsum.dispatch(x)))


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


@pytest.mark.parametrize("jit", [
    False, pytest.param(True, marks=[pytest.mark.jit, pytest.mark.skipif(
        keras.backend.backend() == "torch", reason="XLA: JAX, TensorFlow")])])
@pytest.mark.parametrize("k,capacity,bpr,padded,dtype", [
    (1, 4, False, False, None), (2, 4, True, False, None),
    (2, 8, False, True, None), (2, 8, True, False, "bfloat16")])
def test_gather_gradients_equal_einsum(rng, jit, k, capacity, bpr, padded,
                                       dtype):
    """Gradients through dispatch, combine (with respect to the expert
    outputs directly) and the gates (the combine weights) agree, dropped
    and padding tokens included."""
    valid = None
    if padded:
        valid = np.ones((3, 24), bool)
        valid[-1, 10:] = False
        valid = keras.ops.convert_to_tensor(valid)
    logits = rng.normal(size=(3, 24, 8)).astype("float32")
    x = rng.normal(size=(3, 24, 5)).astype("float32")
    y = rng.normal(size=(8, 3 * capacity, 5)).astype("float32")
    target = rng.normal(size=(3, 24, 5)).astype("float32")

    def loss(implementation):
        def fn(logits, x, y):
            gates = keras.ops.softmax(logits)
            dispatcher = make_dispatcher(
                gates, k, capacity, bpr, valid, implementation=implementation,
                dtype=dtype)
            expert_outputs = keras.ops.tanh(dispatcher.dispatch(x)) + y
            return keras.ops.sum(keras.ops.multiply(
                dispatcher.combine(expert_outputs), target))

        return fn

    gather = gradients(loss("gather"), (logits, x, y), jit)
    einsum = gradients(loss("einsum"), (logits, x, y), jit)
    for name, a, b in zip(("gates", "x", "expert outputs"), gather, einsum):
        assert np.abs(b).max() > 0.1, name
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("overrides", [
    dict(num_selected_experts=2, ensemble_size=1, capacity_factor=0.5),
    dict(batch_priority=True, capacity_factor=0.5),
    dict(capacity_factor=2.0)])
def test_training_step_equal(rng, overrides):
    """One SGD step (router noise off): every updated weight agrees, so the
    gradients through dispatch, combine and the gates agree."""
    keras.utils.set_random_seed(0)
    backbone = keras_e3.E3ViTBackbone(**tiny_backbone_kwargs(
        router_noise_std=0.0, **overrides))
    reference = keras_e3.E3ViT(backbone, num_classes=3,
                               head_kernel_initializer="glorot_uniform")
    fast = with_dispatcher(reference, "gather")
    x = rng.normal(size=(6, 16, 16, 3)).astype("float32")
    y = np.arange(6) % 3
    for model in (reference, fast):
        model.compile(optimizer=keras.optimizers.SGD(1.0), metrics=None)
        model.train_on_batch(x, y)
    for a, b in zip(reference.weights, fast.weights):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-5,
                                   atol=1e-5, err_msg=a.path)


@pytest.mark.jit
@pytest.mark.skipif(keras.backend.backend() == "torch",
                    reason="XLA compilation: JAX and TensorFlow")
def test_gather_under_jit(rng):
    backbone = keras_e3.E3ViTBackbone(**tiny_backbone_kwargs(
        dispatcher="gather", capacity_factor=0.5))
    model = keras_e3.E3ViT(backbone, num_classes=3,
                           head_kernel_initializer="glorot_uniform")
    x = rng.normal(size=(5, 16, 16, 3)).astype("float32")
    model.compile(jit_compile=True)
    jitted = model.predict(x, verbose=0)
    np.testing.assert_allclose(jitted, to_numpy(model(x)), atol=1e-5)


def test_resolve_dispatcher():
    expected = "einsum" if keras.backend.backend() == "torch" else "gather"
    assert resolve_dispatcher("auto") == expected
    assert resolve_dispatcher("einsum") == "einsum"
    with pytest.raises(ValueError, match="Unknown dispatcher 'sparse'"):
        resolve_dispatcher("sparse")
