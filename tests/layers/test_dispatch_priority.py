"""Service order of top-K dispatch: every top-1 choice before any top-2
choice (rank by rank), within a rank in token order, or by decreasing top
gate with batch-prioritized routing (vmoe's `get_top_experts_per_item_
dispatcher`, as documented in the fixtures' README).

The cases are built so that serving the choices token by token
(interleaved), or the ranks in reverse order, gives other dispatch masks:
each case checks that against an oracle before it checks the layer.
"""

import numpy as np
import pytest
from keras import ops

from conftest import to_numpy
from keras_e3.layers import make_dispatcher
from vmoe_reference import route_group


def oracle_mask(gates, k, capacity, batch_priority, order="rank"):
    """Dispatch mask [S, E, C] of one group, choices served in `order`:
    "rank" (vmoe: all top-1 choices, then all top-2, ...), "token" (each
    token's K choices together) or "reversed" (the last rank first)."""
    s, e = gates.shape
    choices = np.argsort(-gates, axis=1, kind="stable")[:, :k]
    tokens = np.arange(s)
    if batch_priority:
        tokens = np.argsort(-gates.max(axis=1), kind="stable")
    ranks = range(k)
    if order == "reversed":
        ranks = reversed(range(k))
    if order == "token":
        served = [(t, r) for t in tokens for r in range(k)]
    else:
        served = [(t, r) for r in ranks for t in tokens]
    filled = np.zeros(e, int)
    mask = np.zeros((s, e, capacity), bool)
    for t, r in served:
        expert = choices[t, r]
        if filled[expert] < capacity:
            mask[t, expert, filled[expert]] = True
        filled[expert] += 1
    return mask


def layer_mask(gates, k, capacity, batch_priority, implementation):
    dispatcher = make_dispatcher(
        ops.convert_to_tensor(gates[None]), k, capacity,
        batch_priority=batch_priority, implementation=implementation)
    return to_numpy(dispatcher.dispatch_mask)[0].astype(bool)


# Two experts, K = 2, capacity 2: the four tokens' top-1 choices fill both
# buffers, so no top-2 choice is served; token by token, tokens 0 and 1
# take both experts each and tokens 2 and 3 get nothing; top-2 first, every
# token lands at its second choice only. With batch priority the order is
# tokens 2 (0.8), 1 (0.7), 0 (0.6), 3 (0.55).
HAND_GATES = np.array([[0.6, 0.4], [0.3, 0.7], [0.8, 0.2], [0.45, 0.55]],
                      "float32")
# (token, expert, position) of every served choice.
HAND_EXPECTED = {
    False: [(0, 0, 0), (1, 1, 0), (2, 0, 1), (3, 1, 1)],
    True: [(2, 0, 0), (1, 1, 0), (0, 0, 1), (3, 1, 1)],
}


def random_gates(seed, s=12, e=4):
    rng = np.random.default_rng(seed)
    # Unbalanced: experts 0 and 1 are popular, so capacity binds.
    logits = rng.normal(size=(s, e)) + np.array([1.5, 1.0, 0.0, -0.5])[:e]
    gates = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return gates.astype("float32")


@pytest.mark.parametrize("implementation", ["einsum", "gather"])
@pytest.mark.parametrize("batch_priority", [False, True])
def test_top1_choices_before_top2_hand_case(implementation, batch_priority):
    expected = np.zeros((4, 2, 2), bool)
    for t, e, c in HAND_EXPECTED[batch_priority]:
        expected[t, e, c] = True
    np.testing.assert_array_equal(
        oracle_mask(HAND_GATES, 2, 2, batch_priority), expected)
    for order in ("token", "reversed"):  # the case discriminates
        assert (oracle_mask(HAND_GATES, 2, 2, batch_priority, order)
                != expected).any()
    np.testing.assert_array_equal(
        layer_mask(HAND_GATES, 2, 2, batch_priority, implementation),
        expected)


@pytest.mark.parametrize("implementation", ["einsum", "gather"])
@pytest.mark.parametrize("batch_priority", [False, True])
@pytest.mark.parametrize("k,capacity", [(2, 4), (2, 5), (3, 6)])
def test_service_order_random_cases(implementation, batch_priority, k,
                                    capacity):
    for seed in range(3):
        gates = random_gates(seed)
        expected = oracle_mask(gates, k, capacity, batch_priority)
        # The independent NumPy reference of the official forward agrees.
        slots, _ = route_group(gates.astype("float64"), k, capacity,
                               batch_priority)
        positions = np.where(expected.any(-1), expected.argmax(-1), -1)
        np.testing.assert_array_equal(positions, slots)
        for order in ("token", "reversed"):
            assert (oracle_mask(gates, k, capacity, batch_priority, order)
                    != expected).any(), (seed, order)
        np.testing.assert_array_equal(
            layer_mask(gates, k, capacity, batch_priority, implementation),
            expected, err_msg=f"seed {seed}")


@pytest.mark.parametrize("implementation", ["einsum", "gather"])
def test_batch_priority_changes_who_is_served(implementation):
    """Capacity 1 per expert: without batch priority the first token of
    each expert wins, with it the most confident one."""
    plain = layer_mask(HAND_GATES, 1, 1, False, implementation)
    bpr = layer_mask(HAND_GATES, 1, 1, True, implementation)
    assert plain[:, :, 0].nonzero()[0].tolist() == [0, 1]
    assert sorted(bpr[:, :, 0].nonzero()[0].tolist()) == [1, 2]
