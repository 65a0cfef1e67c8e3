"""Router and dispatch against the official functions (router_functions.npz)
and their documented properties."""

import math

import numpy as np
import pytest
from keras import ops

from conftest import fixture_dir
from conftest import to_numpy
from keras_e3.layers import Router
from keras_e3.layers import compute_capacity
from keras_e3.layers import make_dispatcher
from keras_e3.layers import top_experts_per_item
from keras_e3.layers.router import gshard_loss
from keras_e3.layers.router import importance_loss
from keras_e3.layers.router import load_loss


def router_cases():
    path = fixture_dir("") / "router_functions.npz"
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    cases = []
    for i in range(6):
        case = {k.split("/", 1)[1]: v for k, v in arrays.items()
                if k.startswith(f"case{i}/")}
        s, e, k, cf, bpr = case["config"]
        case.update(S=int(s), E=int(e), K=int(k), cf=float(cf),
                    bpr=bool(bpr))
        cases.append(case)
    return cases


@pytest.mark.parametrize("index", range(6))
def test_dispatch_matches_official(index):
    case = router_cases()[index]
    capacity = compute_capacity(case["S"], case["E"], case["K"], case["cf"])
    assert capacity == case["dispatch_mask"].shape[-1]
    gates = ops.convert_to_tensor(case["gates"][None])
    dispatcher = make_dispatcher(gates, case["K"], capacity,
                                 batch_priority=case["bpr"])
    np.testing.assert_array_equal(to_numpy(dispatcher.dispatch_mask)[0],
                                  case["dispatch_mask"])
    np.testing.assert_allclose(to_numpy(dispatcher.combine_weights)[0],
                               case["combine_weights"], atol=1e-7)


@pytest.mark.parametrize("index", range(6))
def test_aux_losses_match_official(index):
    case = router_cases()[index]
    np.testing.assert_allclose(to_numpy(importance_loss(case["gates"])),
                               case["importance_loss"], rtol=1e-5)
    np.testing.assert_allclose(to_numpy(gshard_loss(case["gates"])),
                               case["gshard_loss"], rtol=1e-5)
    np.testing.assert_allclose(
        to_numpy(load_loss(case["logits"], case["logits_noisy"],
                           1.0 / case["E"], case["K"])),
        case["load_loss"], rtol=1e-5)


@pytest.mark.parametrize("tokens,experts,k,cf,expected", [
    (68, 4, 1, 2.0, 36), (68, 4, 1, 0.5, 12), (34, 4, 2, 0.5, 12),
    (20, 4, 1, 1.0, 8), (33, 8, 2, 1.25, 12), (16, 8, 1, 2.0, 4),
    (400, 8, 2, 1.05, 108)])
def test_capacity_rounding(tokens, experts, k, cf, expected):
    assert compute_capacity(tokens, experts, k, cf) == expected
    raw = math.ceil(tokens * k * cf / experts)
    assert expected % 4 == 0 and expected - raw in range(4)


def test_capacity_below_one_is_an_error():
    with pytest.raises(ValueError, match="capacity"):
        compute_capacity(16, 4, 1, 0.0)


def test_top1_choices_served_before_top2():
    # Tokens alternate between preferring expert 0 and expert 1, so top-1
    # and top-2 choices compete for the same buffers: rank by rank, the
    # top-1 choices take positions 0-1 of each expert and the top-2 choices
    # 2-3 (token by token, or top-2 first, would give other positions).
    gates = np.array([[0.6, 0.4], [0.3, 0.7], [0.8, 0.2], [0.45, 0.55]],
                     "float32")[None]
    expert, slot = top_experts_per_item(ops.convert_to_tensor(gates), 2)
    np.testing.assert_array_equal(to_numpy(expert)[0],
                                  [[0, 1], [1, 0], [0, 1], [1, 0]])
    np.testing.assert_array_equal(to_numpy(slot)[0],
                                  [[0, 2], [0, 2], [1, 3], [1, 3]])


def test_batch_priority_serves_confident_tokens_first():
    gates = np.array([[0.5, 0.5], [0.9, 0.1], [0.7, 0.3], [0.9, 0.1]],
                     "float32")[None]
    _, slot = top_experts_per_item(ops.convert_to_tensor(gates), 1,
                                   batch_priority=True)
    # Order by top gate 0.9, 0.9 (ties keep token order), 0.7, 0.5.
    np.testing.assert_array_equal(to_numpy(slot)[0, :, 0], [3, 0, 2, 1])
    _, slot = top_experts_per_item(ops.convert_to_tensor(gates), 1)
    np.testing.assert_array_equal(to_numpy(slot)[0, :, 0], [0, 1, 2, 3])


def test_padding_tokens_take_no_capacity(rng):
    gates = rng.dirichlet(np.ones(4), size=(1, 12)).astype("float32")
    valid = np.arange(12) % 3 != 1  # every third token is padding
    _, slot = top_experts_per_item(ops.convert_to_tensor(gates), 2,
                                   valid=ops.convert_to_tensor(valid[None]))
    _, slot_real = top_experts_per_item(
        ops.convert_to_tensor(gates[:, valid]), 2)
    slot = to_numpy(slot)[0]
    np.testing.assert_array_equal(slot[valid], to_numpy(slot_real)[0])
    np.testing.assert_array_equal(slot[~valid], -1)


def test_ensemble_router_is_block_diagonal(rng):
    router = Router(num_experts=6, num_selected_experts=2, ensemble_size=3)
    x = rng.normal(size=(2, 12, 8)).astype("float32")
    gates, metrics = router(x)
    assert tuple(router.kernel.shape) == (8, 3, 2)
    gates = to_numpy(gates).reshape(2, 4, 3, 3, 2)  # [G, S/M, M, M', E/M]
    for m in range(3):
        for other in range(3):
            block = gates[:, :, m, other]
            if m == other:
                np.testing.assert_allclose(block.sum(-1), 1.0, rtol=1e-6)
            else:
                assert not block.any()
    assert to_numpy(metrics["importance_loss"]).shape == (2, 3)


def test_router_noise_only_in_training(rng):
    router = Router(num_experts=4, num_selected_experts=1, seed=1)
    x = rng.normal(size=(1, 16, 8)).astype("float32")
    eval_1, m_eval = router(x, training=False)
    eval_2, _ = router(x, training=False)
    train_1, m_train = router(x, training=True)
    train_2, _ = router(x, training=True)
    np.testing.assert_array_equal(to_numpy(eval_1), to_numpy(eval_2))
    assert "load_loss" not in m_eval and "load_loss" in m_train
    assert np.abs(to_numpy(train_1) - to_numpy(eval_1)).max() > 1e-4
    assert np.abs(to_numpy(train_1) - to_numpy(train_2)).max() > 1e-4
    # The importance loss always uses the clean gates.
    np.testing.assert_allclose(to_numpy(m_train["importance_loss"]),
                               to_numpy(m_eval["importance_loss"]), rtol=1e-6)


def test_noise_std_is_per_member_expert_count(rng):
    """std = noise_std / (E / M): measured on the logits' perturbation."""
    router = Router(num_experts=8, ensemble_size=2, noise_std=2.0, seed=3)
    router.build((None, 4000, 4))
    router.kernel.assign(np.zeros(router.kernel.shape, "float32"))
    x = np.ones((1, 4000, 4), "float32")
    gates, _ = router(x, training=True)
    # Zero logits: log(gates) - mean(log(gates)) is the centred noise.
    g = to_numpy(gates).reshape(1, 2000, 2, 2, 4)
    own = np.stack([g[:, :, m, m] for m in range(2)], axis=2)
    logs = np.log(own)
    centred = logs - logs.mean(-1, keepdims=True)
    std = centred.std() * math.sqrt(4 / 3)  # undo centring over 4 experts
    assert abs(std - 2.0 / 4) < 0.02
