"""benchmarks/_routing.py: the benchmarks' kept-choice count and router
balancing, checked against the model's own routing intermediates."""

import os
import sys

import numpy as np
import pytest
from conftest import tiny_backbone_kwargs
from conftest import to_numpy

import keras_e3

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..",
                                "benchmarks"))
import _routing  # noqa: E402

CASES = {
    "e3": dict(ensemble_size=2, num_selected_experts=1),
    "vmoe": dict(ensemble_size=1, num_selected_experts=2),
}


def first_router_input(model, images):
    """The first MoE layer's router input [G, S, H] for `images`."""
    seen = []

    def wrap(moe, router, own_call):
        def call(x, *args, **kwargs):
            seen.append(to_numpy(x))
            return own_call(x, *args, **kwargs)
        return call

    with _routing.intercepted_routers(model, wrap):
        model(images, training=False)
    return seen[0]


def skewed_model_and_images(case):
    """A tiny model whose first router prefers one expert per member for
    most tokens (a strong response to the mean router input, like an
    initialised router's to the benchmark's noise images), so that tokens
    overflow the capacity."""
    kwargs = tiny_backbone_kwargs(num_layers=4, moe_layers=(1, 3),
                                  capacity_factor=1.0, **CASES[case])
    model = keras_e3.E3ViT(keras_e3.E3ViTBackbone(**kwargs), num_classes=5)
    images = np.random.default_rng(0).uniform(
        -1, 1, (8, 16, 16, 3)).astype("float32")
    x = first_router_input(model, images)
    router = model.backbone.moe_blocks[0].mlp.router
    members, hidden = router.ensemble_size, x.shape[-1]
    kernel = to_numpy(router.kernel).reshape(hidden, members, -1)
    for m in range(members):
        mean = x.reshape(-1, members, hidden)[:, m].mean(axis=0)
        # Top-1 (and top-2) the same experts for most tokens.
        kernel[:, m, 0] += 20.0 * mean / (mean @ mean)
        kernel[:, m, 1] += 10.0 * mean / (mean @ mean)
    router.kernel.assign(kernel.reshape(router.kernel.shape))
    return model, images


def routing_intermediates(model, images):
    found = model.backbone.compute_intermediates(images)
    return [found[f"routing/{block.name}"]
            for block in model.backbone.moe_blocks]


def test_centred_kernel_has_no_mean_response(rng):
    hidden, members, experts = 6, 2, 3
    x = (rng.standard_normal((4, 10, hidden)) + 3.0).astype("float32")
    kernel = rng.standard_normal((hidden, members, experts)).astype(
        "float32")
    centred = _routing.centred_kernel(kernel, x, members)
    assert centred.shape == kernel.shape and centred.dtype == kernel.dtype
    tokens = x.reshape(-1, members, hidden)
    for m in range(members):
        mean = tokens[:, m].mean(axis=0)
        assert np.abs(mean @ centred[:, m]).max() < 1e-4
        # Only the mean direction changed: the rest of the kernel is kept.
        other = rng.standard_normal(hidden)
        other -= mean * (other @ mean) / (mean @ mean)
        np.testing.assert_allclose(other @ centred[:, m],
                                   other @ kernel[:, m], atol=1e-4)


@pytest.mark.parametrize("case", sorted(CASES))
def test_route_counts_the_kept_choices(case):
    model, images = skewed_model_and_images(case)
    k = model.backbone.num_selected_experts
    kept = _routing.route(model, images)
    masks = [to_numpy(r["dispatch_mask"])
             for r in routing_intermediates(model, images)]
    routed = sum(mask.shape[0] * mask.shape[1] * k for mask in masks)
    assert kept == pytest.approx(sum(mask.sum() for mask in masks) / routed)
    assert kept < 1  # the skewed inputs do overflow the capacity
    for block in model.backbone.moe_blocks:
        assert "call" not in vars(block.mlp.router)


@pytest.mark.parametrize("case", sorted(CASES))
def test_balanced_routers_have_even_mean_logits(case):
    model, images = skewed_model_and_images(case)
    before = [to_numpy(w) for w in model.get_weights()]
    initial = _routing.route(model, images)
    balanced = _routing.route(model, images, balance=True)
    assert balanced > initial
    assert balanced == _routing.route(model, images)  # the model is balanced
    routers = {id(b.mlp.router.kernel) for b in model.backbone.moe_blocks}
    for variable, old in zip(model.weights, before):
        changed = not np.array_equal(to_numpy(variable), old)
        assert changed == (id(variable) in routers), variable.path
    # Zero mean response: every member's tokens have, on average, the same
    # logit for each of that member's experts (log gates differ from the
    # logits by a per-token constant). Checked on the model's own gates,
    # layer after layer (each router was centred on the tokens of the
    # balanced layers before it).
    members = model.backbone.ensemble_size
    for routing in routing_intermediates(model, images):
        gates = to_numpy(routing["gates"])
        groups, size, experts = gates.shape
        per_member = experts // members
        gates = gates.reshape(groups, size // members, members, members,
                              per_member)
        for m in range(members):
            mean_log = np.log(gates[:, :, m, m]).mean(axis=(0, 1))
            np.testing.assert_allclose(mean_log, mean_log[0], atol=1e-4)
