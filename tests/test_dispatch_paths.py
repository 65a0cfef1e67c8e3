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
