"""`gshard_loss_weight > 0` and the experts' dropout, against vmoe's code
(vmoe/nn/routing.py, vmoe/nn/vit_moe.py):

* the GShard loss is mean_e(mean gate_e x fraction routed top-1 to e) x E²,
  per group (and per E³ member), computed from the gates the dispatch uses
  (the noisy ones in training); the auxiliary loss is the sum of
  weight x loss over the losses whose weight is > 0;
* the experts are vit_jax MlpBlocks: Dense -> GELU -> Dropout -> Dense ->
  Dropout (inverted dropout, training only); vmoe's MoE blocks take the
  encoder's `dropout_rate` unless `moe.dropout_rate` is given.
"""

import copy

import numpy as np
import pytest

import keras_e3
from conftest import load_fixture
from conftest import tiny_backbone_kwargs
from conftest import to_numpy
from keras_e3.conversion.vmoe import backbone_kwargs_from_vmoe
from keras_e3.layers import MoeMlp
from keras_e3.layers import Router


def official_gshard(gates):
    """vmoe's _gshard_auxiliary_loss of one group's gates [S, E]."""
    e = gates.shape[-1]
    top1 = np.eye(e)[gates.argmax(-1)]
    return np.mean(gates.mean(0) * top1.mean(0)) * e ** 2


@pytest.mark.parametrize("name", ["vmoe_tiny_drop", "eee_tiny_drop"])
def test_gshard_weight_adds_the_official_gshard_loss(name):
    """The fixtures were made with gshard_loss_weight 0; their metrics hold
    the official GShard loss of every group, which a weight > 0 adds."""
    fx = load_fixture(name)
    config = copy.deepcopy(fx["config"])
    router = config["encoder"]["moe"].setdefault("router", {})
    weight = 0.25
    router["gshard_loss_weight"] = weight
    model = keras_e3.E3ViT.from_vmoe(config, fx["params"])
    model(fx["inputs"], training=False)
    added = sum(float(to_numpy(v)) for v in model.losses)
    metrics = fx["metrics"]
    gshard = sum(np.mean(metrics[f"encoderblock_{i}/gshard_loss"])
                 for i in config["encoder"]["moe"]["layers"])
    assert gshard > 0
    expected = np.mean(metrics["auxiliary_loss"]) + weight * gshard
    assert abs(added - expected) < 1e-6 * max(1.0, expected)
    out = model.compute_intermediates(fx["inputs"])
    for i in config["encoder"]["moe"]["layers"]:
        block = f"encoderblock_{i}"
        ref = {k: metrics[f"{block}/{k}"] for k in
               ("importance_loss", "gshard_loss", "auxiliary_loss")}
        aux = to_numpy(out[f"routing/{block}"]["auxiliary_loss"])
        np.testing.assert_allclose(
            aux.reshape(ref["auxiliary_loss"].shape),
            ref["auxiliary_loss"] + weight * ref["gshard_loss"], atol=1e-6)


@pytest.mark.parametrize("ensemble_size", [1, 2])
def test_gshard_loss_in_training_uses_the_noisy_gates(rng, ensemble_size):
    m, experts, group, hidden = ensemble_size, 4, 16, 8
    router = Router(experts, ensemble_size=m, gshard_loss_weight=0.25,
                    importance_loss_weight=0.5, load_loss_weight=0.125,
                    seed=3)
    x = rng.normal(size=(2, group, hidden)).astype("float32")
    gates, metrics = router(x, training=True)
    gates = to_numpy(gates).astype("float64")
    metrics = {k: to_numpy(v) for k, v in metrics.items()}
    per = experts // m
    kernel = to_numpy(router.kernel).astype("float64").reshape(hidden, m, per)
    expected_gshard = np.zeros((2, m))
    expected_importance = np.zeros((2, m))
    for g in range(2):
        for member in range(m):
            cols = slice(member * per, (member + 1) * per)
            noisy = gates[g, member::m, cols]
            expected_gshard[g, member] = official_gshard(noisy)
            logits = x[g, member::m].astype("float64") @ kernel[:, member]
            clean = np.exp(logits - logits.max(-1, keepdims=True))
            clean /= clean.sum(-1, keepdims=True)
            imp = clean.sum(0)
            expected_importance[g, member] = imp.var() / imp.mean() ** 2
    np.testing.assert_allclose(metrics["gshard_loss"].reshape(2, m),
                               expected_gshard, rtol=1e-5)
    # The importance loss is mean((imp / mean - 1)²): in float32 the
    # deviations carry about 1.2e-7 of rounding each, so a near-uniform
    # loss (4.8e-6: deviations of 2e-3) has about 5e-10 of absolute error
    # (PyTorch's CI run differed from float64 by 1.6e-10, rtol 3.3e-5).
    np.testing.assert_allclose(metrics["importance_loss"].reshape(2, m),
                               expected_importance, rtol=1e-5, atol=1e-9)
    # The noisy gates' GShard loss is not the clean one (the check above
    # tells them apart).
    clean_router = Router(experts, ensemble_size=m, gshard_loss_weight=0.25)
    clean_router.build(x.shape)
    clean_router.kernel.assign(to_numpy(router.kernel))
    _, clean_metrics = clean_router(x, training=False)
    assert np.abs(to_numpy(clean_metrics["gshard_loss"]).reshape(2, m)
                  - expected_gshard).max() > 1e-6
    np.testing.assert_allclose(
        metrics["auxiliary_loss"].reshape(2, m),
        0.5 * expected_importance + 0.25 * expected_gshard
        + 0.125 * metrics["load_loss"].reshape(2, m), rtol=1e-5)


def dropout_layer(rate, hidden=32):
    # No router noise and room for every token: the routing is the same in
    # training and inference, only the experts' dropout differs.
    layer = MoeMlp(4, 64, 32, capacity_factor=4.0, noise_std=0.0,
                   dropout_rate=rate, dispatcher="einsum", seed=5)
    layer.build((None, None, hidden))
    return layer


def test_moe_dropout_only_in_training(rng):
    x = rng.normal(size=(2, 16, 32)).astype("float32")
    layer = dropout_layer(0.5)
    plain = dropout_layer(0.0)
    plain.set_weights(layer.get_weights())
    eval_out = to_numpy(layer(x, training=False))
    np.testing.assert_allclose(eval_out, to_numpy(plain(x, training=False)),
                               atol=1e-6)
    np.testing.assert_allclose(to_numpy(plain(x, training=True)), eval_out,
                               atol=1e-6)
    assert np.abs(to_numpy(layer(x, training=True)) - eval_out).max() > 1e-3


def test_moe_dropout_is_vit_jax_mlp_dropout(rng):
    """K = 1, no token dropped: each output element is gate x the expert
    output, so the dropout after the second Dense zeroes a fraction `rate`
    of the elements; the dropout after the GELU makes the others differ
    from the inference output / (1 - rate); inverted scaling keeps the
    mean."""
    rate = 0.3
    x = rng.normal(size=(4, 16, 32)).astype("float32")
    layer = dropout_layer(rate)
    eval_out = to_numpy(layer(x, training=False)).astype("float64")
    assert (np.abs(eval_out) > 1e-7).all()
    draws = np.stack([to_numpy(layer(x, training=True)) for _ in range(48)])
    zero = draws == 0.0
    assert abs(zero.mean() - rate) < 0.03
    scaled = eval_out / (1 - rate)
    same_as_output_dropout_only = np.isclose(draws, scaled, rtol=1e-4,
                                             atol=1e-6) & ~zero
    assert same_as_output_dropout_only.mean() < 0.05
    mean = draws.astype("float64").mean(0)
    error = np.abs(mean - eval_out).mean() / np.abs(eval_out).mean()
    assert error < 0.15, error


def test_backbone_moe_dropout_rate_reaches_the_experts(rng):
    kwargs = tiny_backbone_kwargs(router_noise_std=0.0, capacity_factor=4.0,
                                  seed=2)
    x = rng.normal(size=(2, 16, 16, 3)).astype("float32")
    dense = keras_e3.E3ViTBackbone(**kwargs)
    moe = keras_e3.E3ViTBackbone(**kwargs, moe_dropout_rate=0.5)
    moe.set_weights(dense.get_weights())
    assert moe.get_config()["moe_dropout_rate"] == 0.5
    ref = to_numpy(dense(x, training=False)["pooled_output"])
    np.testing.assert_allclose(
        to_numpy(dense(x, training=True)["pooled_output"]), ref, atol=1e-5)
    np.testing.assert_allclose(
        to_numpy(moe(x, training=False)["pooled_output"]), ref, atol=1e-5)
    assert np.abs(to_numpy(moe(x, training=True)["pooled_output"])
                  - ref).max() > 1e-3


def test_vmoe_config_moe_dropout_defaults_to_the_encoders():
    config = copy.deepcopy(load_fixture("vmoe_tiny_drop")["config"])
    config["encoder"]["dropout_rate"] = 0.1
    config["encoder"]["moe"].pop("dropout_rate", None)
    kwargs = backbone_kwargs_from_vmoe(config)[0]
    assert kwargs["dropout_rate"] == 0.1
    assert kwargs["moe_dropout_rate"] == 0.1
    config["encoder"]["moe"]["dropout_rate"] = 0.2
    assert backbone_kwargs_from_vmoe(config)[0]["moe_dropout_rate"] == 0.2
