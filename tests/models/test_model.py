"""E3ViT / E3ViTBackbone behaviour: jit, fit, saving, remainder groups."""

import keras
import numpy as np
import pytest

import keras_e3
from conftest import BACKEND
from conftest import load_fixture
from conftest import official_logits
from conftest import tiny_backbone_kwargs
from conftest import to_numpy


def tiny_model(num_classes=5, **overrides):
    backbone = keras_e3.E3ViTBackbone(**tiny_backbone_kwargs(**overrides))
    return keras_e3.E3ViT(backbone, num_classes,
                          head_kernel_initializer="glorot_uniform")


@pytest.mark.parametrize("overrides,shape", [
    ({"num_experts": 0, "moe_layers": (), "ensemble_size": 1}, (3, 5)),
    ({"ensemble_size": 1, "num_selected_experts": 2}, (3, 5)),
    ({}, (3, 2, 5)),
    ({"classifier": "gap", "representation_size": None}, (3, 2, 5)),
])
def test_configs_build_and_output_shapes(rng, overrides, shape):
    model = tiny_model(**overrides)
    x = rng.normal(size=(3, 16, 16, 3)).astype("float32")
    assert to_numpy(model(x)).shape == shape
    features = model.backbone(x)
    m = model.ensemble_size
    assert to_numpy(features["pooled_output"]).shape[0] == 3 * m


@pytest.mark.skipif(BACKEND == "torch", reason="XLA: JAX and TensorFlow")
@pytest.mark.parametrize("name", ["vmoe_tiny_drop", "eee_tiny_drop"])
def test_jit_compile_gives_same_outputs(name):
    fx = load_fixture(name)
    model = keras_e3.E3ViT.from_vmoe(fx["config"], fx["params"])
    eager = official_logits(model, fx["inputs"])
    model.compile(jit_compile=True)
    compiled = model.predict(fx["inputs"], batch_size=4, verbose=0)
    compiled = compiled.reshape(-1, compiled.shape[-1])
    np.testing.assert_allclose(compiled, eager, atol=1e-6)
    np.testing.assert_allclose(compiled, fx["logits"], atol=1e-5)


def test_auto_jit_compile_is_xla_on_jax_and_tensorflow():
    """`jit_compile="auto"` (never compiled, and compile()'s default)
    means XLA on JAX and on TensorFlow, CPU-only machines included (where
    Keras itself turns XLA off for TensorFlow), and eager on PyTorch; an
    explicit choice is kept."""
    model = keras_e3.E3ViT(keras_e3.E3ViTBackbone(**tiny_backbone_kwargs()),
                           num_classes=3)
    expected = BACKEND != "torch"
    assert model.jit_compile is expected
    model.compile()
    assert model.jit_compile is expected
    model.compile(jit_compile=False)
    assert model.jit_compile is False


@pytest.mark.parametrize("name", ["vmoe_tiny_nodrop", "eee_tiny_nodrop"])
def test_partial_groups_single_image_and_short_last_batch(name):
    """Token counts that are not a multiple of group_size still work.

    Without drops a token's route does not depend on its group, so one image
    alone, or a last batch of 3 with batch_size=3 (group = 2 images), must
    give the rows of the full-batch output.
    """
    fx = load_fixture(name)
    model = keras_e3.E3ViT.from_vmoe(fx["config"], fx["params"])
    reference = to_numpy(model(fx["inputs"]))
    for i in range(4):
        single = to_numpy(model(fx["inputs"][i:i + 1]))
        np.testing.assert_allclose(single[0], reference[i], atol=1e-5)
    model.compile(jit_compile=BACKEND != "torch")
    predicted = model.predict(fx["inputs"], batch_size=3, verbose=0)
    np.testing.assert_allclose(predicted, reference, atol=1e-5)


def test_partial_group_keeps_full_group_capacity(rng):
    """The padded last group's real tokens share a full group's capacity:
    image 1 alone keeps every choice that the official run kept for it
    when it shared group 0 with image 0 (served first), and more."""
    fx = load_fixture("eee_tiny_drop")
    model = keras_e3.E3ViT.from_vmoe(fx["config"], fx["params"])
    one = model.compute_intermediates(fx["inputs"][1:2])
    routing = one["routing/encoderblock_1"]
    mask = to_numpy(routing["dispatch_mask"]).astype(bool)
    valid = to_numpy(routing["valid"])
    assert mask.shape == (1, 68, 4, 12) and valid.sum() == 34
    assert not mask[0, ~valid[0]].any()  # padding is never dispatched
    official = fx["intermediates"][
        "Encoder/encoderblock_1/Moe/Router/__call__/1"].astype(bool)
    kept_alone = mask[0, :34].any(-1)
    kept_shared = official[0, 34:].any(-1)  # image 1's copies in group 0
    assert not (kept_shared & ~kept_alone).any()
    assert kept_alone.sum() > kept_shared.sum()


def test_fit_includes_aux_losses_and_reduces_loss(rng):
    keras.utils.set_random_seed(0)
    model = tiny_model()
    x = rng.normal(size=(16, 16, 16, 3)).astype("float32")
    y = rng.integers(0, 5, size=16)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = model.fit(x, y, batch_size=8, epochs=6, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    aux = history.history["aux_loss"]
    assert all(a > 0 for a in aux)
    # The routers' losses are metrics too: aux = 0.005 * (importance + load).
    importance = np.array(history.history["importance_loss"])
    load = np.array(history.history["load_loss"])
    assert np.all(importance > 0) and np.all(load > 0)
    np.testing.assert_allclose(aux, 0.005 * (importance + load), rtol=1e-4)
    # Evaluation: loss = members' mean cross-entropy + the aux losses.
    results = model.evaluate(x, y, batch_size=16, verbose=0,
                             return_dict=True)
    logits = to_numpy(model(x))
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = -np.mean(log_probs[np.arange(16), :, y])
    assert results["aux_loss"] > 0
    # In evaluation only the importance loss exists (vmoe's deterministic
    # mode); the reported metric is the one of the fixtures' metrics.npz.
    assert results["load_loss"] == 0
    np.testing.assert_allclose(results["aux_loss"],
                               0.005 * results["importance_loss"], rtol=1e-4)
    np.testing.assert_allclose(results["loss"], ce + results["aux_loss"],
                               rtol=1e-4)


def test_router_noise_only_in_training(rng):
    model = tiny_model(capacity_factor=4.0, seed=0)
    x = rng.normal(size=(2, 16, 16, 3)).astype("float32")
    a, b = to_numpy(model(x, training=False)), to_numpy(model(x))
    np.testing.assert_array_equal(a, b)
    noisy = to_numpy(model(x, training=True))
    assert np.abs(noisy - a).max() > 1e-6
    quiet = tiny_model(capacity_factor=4.0, router_noise_std=0.0)
    quiet.set_weights(model.get_weights())
    np.testing.assert_allclose(to_numpy(quiet(x, training=True)), a,
                               atol=1e-6)


def test_keras_file_round_trip(tmp_path, rng):
    model = tiny_model(batch_priority=True)
    x = rng.normal(size=(3, 16, 16, 3)).astype("float32")
    expected = to_numpy(model(x))
    path = tmp_path / "e3.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, keras_e3.E3ViT)
    np.testing.assert_array_equal(to_numpy(loaded(x)), expected)
    assert loaded.get_config() == model.get_config()
    assert loaded.backbone.get_config() == model.backbone.get_config()


def test_get_config_round_trip():
    backbone = keras_e3.E3ViTBackbone(**tiny_backbone_kwargs())
    clone = keras_e3.E3ViTBackbone.from_config(backbone.get_config())
    assert clone.get_config() == backbone.get_config()
    assert clone.count_params() == backbone.count_params()


def test_ensemble_log_probs_is_log_mean_softmax(rng):
    logits = rng.normal(size=(4, 3, 7)).astype("float32") * 3
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    expected = np.log(probs.mean(axis=1))
    np.testing.assert_allclose(to_numpy(keras_e3.ensemble_log_probs(logits)),
                               expected, atol=1e-5)


def test_loss_matches_official_train_step_main_loss():
    for name in ("eee_tiny_nodrop", "vmoe_tiny_drop"):
        fx = load_fixture(name)
        model = keras_e3.E3ViT.from_vmoe(fx["config"], fx["params"])
        logits = model(fx["inputs"], training=False)
        loss = keras_e3.EnsembleSoftmaxCrossEntropy()(
            fx["train_step"]["labels"], logits)
        np.testing.assert_allclose(to_numpy(loss),
                                   fx["train_step"]["main_loss"], atol=1e-5)
        aux = sum(float(to_numpy(v)) for v in model.losses)
        np.testing.assert_allclose(aux, fx["train_step"]["auxiliary_loss"],
                                   atol=1e-7)


def test_backbone_returns_router_metrics(rng):
    """The routers' statistics come back from the call (no layer state):
    per MoE block, [groups, M] values equal to compute_intermediates'."""
    model = tiny_model()
    backbone = model.backbone
    x = rng.normal(size=(3, 16, 16, 3)).astype("float32")
    outputs, metrics = backbone(x, return_router_metrics=True)
    assert sorted(metrics) == sorted(b.name for b in backbone.moe_blocks)
    np.testing.assert_allclose(to_numpy(outputs["pooled_output"]),
                               to_numpy(backbone(x)["pooled_output"]),
                               rtol=1e-6, atol=1e-6)
    inter = backbone.compute_intermediates(x)
    for name, block_metrics in metrics.items():
        assert "load_loss" not in block_metrics  # inference: no noise
        np.testing.assert_allclose(
            to_numpy(block_metrics["importance_loss"]),
            to_numpy(inter[f"routing/{name}"]["importance_loss"]), rtol=1e-6)
    _, trained = backbone(x, training=True, return_router_metrics=True)
    assert all("load_loss" in m for m in trained.values())
    for layer in backbone._flatten_layers():
        assert "latest_metrics" not in vars(layer), layer.name
