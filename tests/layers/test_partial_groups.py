"""A last routing group that is only partly filled with real tokens (one
image alone, the short last batch of `predict`): its padding is never
dispatched, takes no capacity and is left out of the auxiliary losses, so
its real tokens are routed exactly as vmoe routes them in a group of the
full size. Expected values are computed in NumPy from the real tokens
only."""

import numpy as np
import pytest

from conftest import to_numpy
from keras_e3.layers import MoeMlp
from keras_e3.layers import Router
from keras_e3.layers import compute_capacity
from vmoe_reference import route_group

HIDDEN = 8
EXPERTS = 4


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def moe_layer(group_size, k=2, ensemble_size=1, capacity_factor=0.5,
              batch_priority=False, dispatcher="einsum", seed=0):
    layer = MoeMlp(EXPERTS, 16, group_size, num_selected_experts=k,
                   capacity_factor=capacity_factor,
                   batch_priority=batch_priority, ensemble_size=ensemble_size,
                   gshard_loss_weight=0.01, dispatcher=dispatcher)
    layer.build((None, None, HIDDEN))
    rng = np.random.default_rng(seed)
    kernel = 0.5 * rng.normal(size=tuple(layer.router.kernel.shape))
    # Feature 0 of every token is 1 (see `tokens`): a strong preference for
    # the first experts of each member, so that capacity binds.
    per = EXPERTS // ensemble_size
    kernel[0] = np.reshape(np.tile(np.linspace(2.0, -1.0, per),
                                   ensemble_size), kernel[0].shape)
    layer.router.kernel.assign(kernel.astype("float32"))
    return layer


def tokens(rng, sequences, length):
    x = rng.normal(size=(sequences, length, HIDDEN)).astype("float32")
    x[..., 0] = 1.0
    return x


def flat_copies(x, m):
    """[B*M, T, H] -> token copies in routing order [B, T, M] and their
    member index."""
    _, t, h = x.shape
    flat = x.reshape(-1, m, t, h).transpose(0, 2, 1, 3).reshape(-1, h)
    return flat, np.arange(len(flat)) % m


def numpy_gates(layer, copies, members):
    """[N, E] block-diagonal gates of token copies, from the router kernel."""
    m = layer.ensemble_size
    per = EXPERTS // m
    kernel = to_numpy(layer.router.kernel).astype("float64")
    kernel = kernel.reshape(HIDDEN, m, per)
    gates = np.zeros((len(copies), EXPERTS))
    for member in range(m):
        rows = members == member
        gates[rows, member * per:(member + 1) * per] = softmax(
            copies[rows].astype("float64") @ kernel[:, member])
    return gates


def expected_losses(gates, members, m):
    """importance and gshard losses [M] of one group's real copies."""
    per = EXPERTS // m
    importance, gshard = [], []
    for member in range(m):
        g = gates[members == member, member * per:(member + 1) * per]
        imp = g.sum(0)
        importance.append(imp.var() / imp.mean() ** 2)
        top1 = np.eye(per)[g.argmax(-1)]
        gshard.append(np.mean(g.mean(0) * top1.mean(0)) * per ** 2)
    return np.array(importance), np.array(gshard)


@pytest.mark.parametrize("ensemble_size", [1, 2])
def test_padding_is_left_out_of_the_auxiliary_losses(rng, ensemble_size):
    m, length, group = ensemble_size, 6, 8
    layer = moe_layer(group, k=1, ensemble_size=m)
    x = np.repeat(tokens(rng, 3, length), m, axis=0)  # [B*M, T, H]
    _, routing = layer(x, return_routing=True)
    copies, members = flat_copies(x, m)
    num = len(copies)
    assert num % group  # the last group is partial
    groups = -(-num // group)
    valid = to_numpy(routing["valid"])
    assert valid.shape == (groups, group) and valid.sum() == num
    importance = to_numpy(routing["importance_loss"]).reshape(groups, m)
    gshard = to_numpy(routing["gshard_loss"]).reshape(groups, m)
    aux = to_numpy(routing["auxiliary_loss"]).reshape(groups, m)
    gates = numpy_gates(layer, copies, members)
    for g in range(groups):
        rows = slice(g * group, min((g + 1) * group, num))
        imp, gsh = expected_losses(gates[rows], members[rows], m)
        np.testing.assert_allclose(importance[g], imp, rtol=1e-5,
                                   err_msg=f"group {g}")
        np.testing.assert_allclose(gshard[g], gsh, rtol=1e-5,
                                   err_msg=f"group {g}")
        np.testing.assert_allclose(aux[g], 0.005 * imp + 0.01 * gsh,
                                   rtol=1e-5, err_msg=f"group {g}")
    # The padding (zero tokens, uniform gates) would change them.
    padded = np.concatenate([copies[(groups - 1) * group:],
                             np.zeros((groups * group - num, HIDDEN))])
    padded_members = np.arange(group) % m
    imp, gsh = expected_losses(numpy_gates(layer, padded, padded_members),
                               padded_members, m)
    assert np.abs(imp - importance[-1]).max() > 1e-3
    assert np.abs(gsh - gshard[-1]).max() > 1e-3


@pytest.mark.parametrize("ensemble_size", [1, 2])
def test_padding_content_never_changes_the_training_losses(rng,
                                                           ensemble_size):
    """With noise (training) the load loss too ignores the padding: two
    routers with the same seed draw the same noise, so what sits in the
    padding rows must not matter."""
    m, group, real = ensemble_size, 12, 6
    x = rng.normal(size=(1, group, HIDDEN)).astype("float32")
    other = x.copy()
    other[:, real:] = 5.0 * rng.normal(size=(1, group - real, HIDDEN))
    valid = (np.arange(group) < real)[None]
    kernel = rng.normal(size=(HIDDEN, EXPERTS) if m == 1 else
                        (HIDDEN, m, EXPERTS // m)).astype("float32")

    def losses(inputs, mask):
        router = Router(EXPERTS, num_selected_experts=1, ensemble_size=m,
                        gshard_loss_weight=0.01, seed=7)
        router.build((None, group, HIDDEN))
        router.kernel.assign(kernel)
        _, metrics = router(inputs, valid=mask, training=True)
        return {k: to_numpy(v) for k, v in metrics.items()}

    zeros = x.copy()
    zeros[:, real:] = 0.0
    base = losses(zeros, valid)
    changed = losses(other, valid)
    assert set(base) >= {"importance_loss", "load_loss", "gshard_loss",
                         "auxiliary_loss"}
    for key in base:
        np.testing.assert_allclose(changed[key], base[key], rtol=1e-5,
                                   err_msg=key)
    # Counted, the padding would change every loss.
    counted = losses(other, None)
    for key in ("importance_loss", "load_loss", "gshard_loss"):
        assert np.abs(counted[key] - base[key]).max() > 1e-4, key


def dispatched(mask):
    """[S, E, C] dispatch mask -> [S, E] buffer position or -1."""
    return np.where(mask.any(-1), mask.argmax(-1), -1)


@pytest.mark.parametrize("dispatcher", ["einsum", "gather"])
@pytest.mark.parametrize("ensemble_size,batch_priority",
                         [(1, False), (1, True), (2, False)])
def test_real_tokens_of_a_partial_group_keep_a_full_groups_capacity(
        rng, dispatcher, ensemble_size, batch_priority):
    m, length, k = ensemble_size, 8, 2 // ensemble_size
    group = 32 * m  # 4 images
    layer = moe_layer(group, k=k, ensemble_size=m,
                      batch_priority=batch_priority, dispatcher=dispatcher)
    capacity = compute_capacity(group, EXPERTS, k, 0.5)
    x = np.repeat(tokens(rng, group // (length * m), length), m, axis=0)
    real = length * m  # the last image alone: part of a group
    _, alone = layer(x[-m:], return_routing=True)
    _, full = layer(x, return_routing=True)
    alone_mask = to_numpy(alone["dispatch_mask"]).astype(bool)
    full_mask = to_numpy(full["dispatch_mask"]).astype(bool)
    assert alone_mask.shape == full_mask.shape == (1, group, EXPERTS,
                                                   capacity)
    alone_slots = dispatched(alone_mask[0])
    assert (alone_slots[real:] == -1).all()  # padding is never dispatched
    # Exactly vmoe's routing of the real tokens with the full capacity.
    copies, members = flat_copies(x[-m:], m)
    gates = numpy_gates(layer, copies, members)
    expected, dropped = route_group(gates, k, capacity, batch_priority)
    np.testing.assert_array_equal(alone_slots[:real], expected)
    # Never dropped more than in a full group, where the other images
    # compete for the same capacity (and are served first): every choice
    # kept there is kept alone too.
    kept_full = dispatched(full_mask[0])[group - real:] >= 0
    kept_alone = alone_slots[:real] >= 0
    assert not (kept_full & ~kept_alone).any()
    # The case is one where that matters: the full group drops more of
    # these tokens, and a capacity sized for the real tokens only would
    # drop more of them too.
    assert kept_full.sum() < kept_alone.sum()
    small = compute_capacity(real, EXPERTS, k, 0.5)
    assert small < capacity
    _, dropped_small = route_group(gates, k, small, batch_priority)
    assert dropped_small > dropped
