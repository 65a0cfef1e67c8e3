"""Documented constants and rules, each against an oracle that is not the
code under test (issue 31's mutation survivors): unsorted class names kept
in order by a preset, the few-shot bias feature of 100 (big_vision's),
15 ECE bins by default, router losses summed (not averaged) over MoE
blocks."""

import keras
import numpy as np
import pytest
from conftest import to_numpy

import keras_e3
from keras_e3.metrics import evaluate_predictions
from keras_e3.training.fewshot import fit_ridge_probe


def test_unsorted_class_names_keep_their_order_in_a_preset(tmp_path):
    keras.utils.set_random_seed(0)
    backbone = keras_e3.E3ViTBackbone(image_size=16, patch_size=8,
                                      hidden_dim=16, num_layers=1,
                                      num_heads=2, mlp_dim=16)
    names = ["zebra", "ant", "moose", "ant"]  # unsorted, and a duplicate
    model = keras_e3.E3ViT(backbone, num_classes=4, class_names=names,
                           preprocessor=keras_e3.ImageConverter(16))
    model.save_to_preset(str(tmp_path / "p"))
    again = keras_e3.E3ViT.from_preset(str(tmp_path / "p"))
    assert list(again.class_names) == names


@pytest.mark.single_backend
def test_fewshot_probe_uses_a_bias_feature_of_100():
    """The closed form with big_vision's constants written out here:
    features whitened with std + 1e-5, a constant feature of 100 appended,
    targets 2 * one_hot - 1, w = (X^T X + l2 I)^-1 X^T Y."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(30, 4))
    labels = rng.integers(0, 3, 30)
    probe = fit_ridge_probe(features, labels, num_classes=3, l2_reg=2.0)
    x = (features - features.mean(0)) / (features.std(0) + 1e-5)
    x = np.concatenate([x, np.full((30, 1), 100.0)], axis=1)
    y = 2.0 * np.eye(3)[labels] - 1.0
    w = np.linalg.solve(x.T @ x + 2.0 * np.eye(5), x.T @ y)
    np.testing.assert_allclose(probe["weights"], w, rtol=1e-10, atol=1e-12)


@pytest.mark.single_backend
def test_ece_uses_15_equal_width_bins_by_default():
    """ECE of `evaluate_predictions` called without `num_bins`, against 15
    equal-width confidence bins computed here (10 or 20 bins differ)."""
    rng = np.random.default_rng(3)
    logits = rng.normal(scale=2.0, size=(400, 1, 6))
    probs = np.exp(logits[:, 0]) / np.exp(logits[:, 0]).sum(-1,
                                                            keepdims=True)
    confidence, top = probs.max(-1), probs.argmax(-1)
    # right above 0.45 confidence, wrong below: the gap changes sign
    # across the confidence range, so the binning matters
    labels = np.where(confidence > 0.45, top, (top + 1) % 6)
    correct = top == labels

    def ece(bins):
        edges = np.linspace(0, 1, bins + 1)
        total = 0.0
        for lo, hi in zip(edges[:-1], edges[1:]):
            inside = (confidence > lo) & (confidence <= hi)
            if inside.any():
                total += inside.mean() * abs(correct[inside].mean()
                                             - confidence[inside].mean())
        return total

    got = evaluate_predictions(logits, labels)["ensemble/ece"]
    assert got == pytest.approx(ece(15), abs=1e-12)
    assert abs(ece(10) - ece(15)) > 1e-4 and abs(ece(20) - ece(15)) > 1e-4


def test_router_losses_are_summed_over_moe_blocks():
    """The `importance_loss` tracker of `evaluate` is the sum over the two
    MoE blocks of each block's importance loss (averaged over groups), the
    blocks' own metrics read from the backbone."""
    keras.utils.set_random_seed(1)
    backbone = keras_e3.E3ViTBackbone(
        image_size=16, patch_size=4, hidden_dim=16, num_layers=4,
        num_heads=2, mlp_dim=16, num_experts=4, moe_layers=(1, 3),
        num_selected_experts=1, capacity_factor=2.0, group_size=4)
    model = keras_e3.E3ViT(backbone, num_classes=3,
                           head_kernel_initializer="glorot_uniform")
    model.compile(optimizer="sgd")
    images = np.random.default_rng(2).uniform(-1, 1, (4, 16, 16, 3)).astype(
        "float32")
    labels = np.array([0, 1, 2, 0])
    logs = model.evaluate(images, labels, batch_size=4, verbose=0,
                          return_dict=True)
    _, metrics = backbone(images, return_router_metrics=True)
    per_block = [float(np.mean(to_numpy(m["importance_loss"])))
                 for m in metrics.values()]
    assert len(per_block) == 2 and abs(per_block[0] - per_block[1]) > 1e-4
    assert logs["importance_loss"] == pytest.approx(sum(per_block),
                                                    rel=1e-4)


def test_load_loss_uses_the_noise_std_divided_by_the_members_experts(
        monkeypatch):
    """vmoe's E³ router re-noises with noise_std / (E / M): with the noise
    draws set to zero, the load loss equals the formula written out here
    in NumPy with that std (the undivided std gives another value)."""
    from math import erf

    from keras_e3.layers import Router

    monkeypatch.setattr(keras.random, "normal",
                        lambda shape, dtype=None, seed=None, **kw:
                        keras.ops.zeros(shape, dtype=dtype))
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 6, 3)).astype("float32")
    router = Router(num_experts=4, num_selected_experts=1, ensemble_size=2,
                    noise_std=1.0)
    _, metrics = router(x, training=True)
    kernel = to_numpy(router.kernel).astype(np.float64)  # [H, M, E/M]

    def loss(std):
        out = np.zeros((2, 2))
        for m in range(2):
            logits = x[:, m::2].astype(np.float64) @ kernel[:, m]  # [G,3,2]
            threshold = logits.max(-1, keepdims=True)  # K = 1, no noise
            z = (threshold - logits) / std
            p = 1 - 0.5 * (1 + np.vectorize(erf)(z / np.sqrt(2)))
            p_mean = p.mean(1)  # over the member's tokens
            out[:, m] = p_mean.var(-1) / p_mean.mean(-1) ** 2
        return out

    got = to_numpy(metrics["load_loss"])
    np.testing.assert_allclose(got, loss(1.0 / 2), rtol=1e-4, atol=1e-7)
    assert np.abs(loss(1.0) - loss(0.5)).max() > 1e-3


@pytest.mark.parametrize("rule, capacity", [(None, 4), ("ceil", 4),
                                            ("round", 3)])
def test_capacity_rounding_changes_a_built_models_capacity(rule, capacity):
    """group_size 10, K 1, capacity factor 1.3, 4 experts: 3.25 slots,
    ceil -> 4 (the default, tested by leaving the argument out), round -> 3
    (no rounding to a multiple)."""
    kwargs = {} if rule is None else {"capacity_ceil_or_round": rule}
    backbone = keras_e3.E3ViTBackbone(
        image_size=16, patch_size=8, hidden_dim=8, num_layers=2,
        num_heads=2, mlp_dim=8, num_experts=4, moe_layers=(1,),
        num_selected_experts=1, capacity_factor=1.3, group_size=10,
        capacity_multiple_of=1, **kwargs)
    assert backbone.encoder_blocks[1].mlp.capacity == capacity
