"""Experts Choice routing (vmoe's `NoisyTopItemsPerExpertRouter`,
arXiv 2202.09368): every expert takes the C tokens of its group with the
largest gate for it; a token may be taken by 0 to E experts.

Notation as in `keras_e3.layers.dispatch`: G groups, S tokens per group, E
experts, C capacity (tokens taken per expert and group).

`top_items_per_expert` selects; `ExpertsChoiceGatherDispatcher` moves the
tokens with index gathers and scatter-adds (no [G, S, E, C] tensor), and
`make_experts_choice_dispatcher` builds the einsum reference
(`EinsumDispatcher` on the dense one-hot tensors) where the layout
(`dispatch_plan`) is "einsum". `ExpertsChoiceRouter.route` returns the
dispatcher and its metrics (the router contract of
`keras_e3.layers.dispatch`).
"""

import math

import keras
from keras import ops

from keras_e3.layers.dispatch import DispatchOptions
from keras_e3.layers.dispatch import Dispatcher
from keras_e3.layers.dispatch import EinsumDispatcher
from keras_e3.layers.dispatch import expert_buffers
from keras_e3.layers.dispatch import group_buffers
from keras_e3.layers.dispatch import resolve_dispatcher


def top_items_per_expert(gates, capacity, valid=None):
    """The tokens each expert takes.

    Args:
        gates: [G, S, E] routing weights (softmax of the router logits).
        capacity: C, tokens per expert and group (<= S).
        valid: optional [G, S] boolean mask of real (not padding) tokens;
            padding is never taken while real tokens are left.

    Returns:
        (token_index [G, E, C], token_gate [G, E, C], taken [G, E, C]):
        the tokens taken by each expert, by decreasing gate (ties: lower
        token first, as `jax.lax.top_k`), their gates, and whether the
        choice is a real token (False only where a group has fewer than C
        real tokens).
    """
    scores = ops.transpose(gates, (0, 2, 1))  # [G, E, S]
    if valid is not None:  # gates are in [0, 1]: padding scores -1
        scores = ops.where(ops.expand_dims(valid, 1), scores,
                           ops.full_like(scores, -1.0))
    token_gate, token_index = ops.top_k(scores, capacity)
    if valid is None:
        taken = ops.ones_like(token_index, dtype="bool")
    else:
        taken = token_gate >= 0
        token_gate = ops.where(taken, token_gate, ops.zeros_like(token_gate))
    return token_index, token_gate, taken


def scatter_to_tokens(values, token_index, group_size):
    """Sums values [G, E, C, ...] onto their tokens: [G, S, ...] (a
    segment sum over the flat token ids g*S + s; differentiable)."""
    shape = ops.shape(token_index)
    groups = shape[0]
    offset = ops.reshape(ops.arange(groups, dtype="int32") * group_size,
                         (-1, 1, 1))
    ids = ops.reshape(ops.cast(token_index, "int32") + offset, (-1,))
    trailing = tuple(values.shape[3:])
    flat = ops.reshape(values, (-1, *trailing))
    out = ops.segment_sum(flat, ids, num_segments=groups * group_size)
    return ops.reshape(out, (groups, group_size, *trailing))


def experts_per_token(token_index, taken, group_size):
    """[G, S] int32: how many experts took each token."""
    return scatter_to_tokens(ops.cast(taken, "int32"), token_index,
                             group_size)


def experts_choice_metrics(token_index, token_gate, taken, num_experts,
                           group_size, valid=None):
    """vmoe's Experts Choice metrics, one value per group ([G]):
    `num_experts_per_item_min/max`, `min/max_selected_gate` and
    `ratio_processed_items_by_at_least_{t}_experts` for t = 1, 2, 4, ...
    <= E and t = E; plus `auxiliary_loss` (0: Experts Choice has none)."""
    counts = experts_per_token(token_index, taken, group_size)
    big = 2 ** 30
    if valid is None:
        real = ops.ones_like(counts, dtype="bool")
    else:
        real = valid
    num_real = ops.sum(ops.cast(real, "float32"), axis=1)
    gate = ops.cast(token_gate, "float32")
    inf = ops.full_like(gate, float("inf"))
    metrics = {
        "num_experts_per_item_min": ops.min(
            ops.where(real, counts, ops.full_like(counts, big)), axis=1),
        "num_experts_per_item_max": ops.max(
            ops.where(real, counts, ops.full_like(counts, -1)), axis=1),
        "min_selected_gate": ops.min(
            ops.reshape(ops.where(taken, gate, inf), (ops.shape(gate)[0], -1)),
            axis=1),
        "max_selected_gate": ops.max(
            ops.reshape(ops.where(taken, gate, -inf),
                        (ops.shape(gate)[0], -1)), axis=1),
    }
    powers = {2 ** i for i in range(int(math.log2(num_experts)) + 1)}
    thresholds = sorted(powers | {num_experts})
    for t in thresholds:
        hit = ops.logical_and(counts >= t, real)
        metrics[f"ratio_processed_items_by_at_least_{t}_experts"] = (
            ops.sum(ops.cast(hit, "float32"), axis=1) / num_real)
    metrics["auxiliary_loss"] = ops.zeros_like(num_real)
    return metrics


class ExpertsChoiceGatherDispatcher(Dispatcher):
    """Experts Choice without [G, S, E, C] tensors: `dispatch` gathers each
    expert's C tokens, `combine` scatter-adds each expert output, weighted
    by its gate, onto its token. The dense `dispatch_mask` /
    `combine_weights` of the einsum reference are computed only when asked
    for (`compute_intermediates`)."""

    layout = "buffers"

    def __init__(self, gates, token_index, token_gate, taken, dtype=None):
        self.gates = gates
        self.token_index = token_index  # [G, E, C]
        self.weights = token_gate * ops.cast(taken, token_gate.dtype)
        self.taken = taken
        self.dtype = dtype
        self.num_experts, self.capacity = token_index.shape[1:]

    def dispatch(self, x):
        dtype = x.dtype
        x = self._lowered(x)
        index = ops.reshape(self.token_index, (ops.shape(x)[0], -1, 1))
        y = ops.take_along_axis(x, index, axis=1)  # [G, E*C, H]
        y = y * ops.cast(ops.reshape(self.taken, (ops.shape(x)[0], -1, 1)),
                         y.dtype)
        return ops.cast(
            expert_buffers(y, self.num_experts, self.capacity), dtype)

    def combine(self, y):
        dtype = y.dtype
        y = group_buffers(self._lowered(y), self.num_experts, self.capacity)
        y = ops.cast(y, self.weights.dtype) * self.weights[..., None]
        out = scatter_to_tokens(y, self.token_index, self.group_size)
        return ops.cast(out, dtype)

    @property
    def group_size(self):
        return self.gates.shape[1]

    @property
    def dispatch_mask(self):
        return dense_dispatch_mask(self.token_index, self.taken,
                                   self.group_size)

    @property
    def combine_weights(self):
        return dense_combine_weights(self.gates, self.dispatch_mask)


def dense_dispatch_mask(token_index, taken, group_size):
    """[G, E, C] choices -> the einsum reference's [G, S, E, C] mask."""
    one_hot = ops.one_hot(token_index, group_size, dtype="int32")
    one_hot = one_hot * ops.cast(taken, "int32")[..., None]  # [G, E, C, S]
    return ops.transpose(one_hot, (0, 3, 1, 2)) > 0


def dense_combine_weights(gates, dispatch_mask):
    return gates[..., None] * ops.cast(dispatch_mask, gates.dtype)


def make_experts_choice_dispatcher(gates, capacity, valid=None,
                                   implementation="einsum", dtype=None):
    """Routes `gates` [G, S, E] Experts Choice style.

    Args:
        gates: [G, S, E] routing weights.
        capacity: C, tokens each expert takes per group (<= S).
        valid: optional [G, S] mask of real tokens.
        implementation: "einsum", "gather" or "auto".
        dtype: dtype of the data movements.

    Returns:
        (dispatcher, metrics): a `Dispatcher` and `experts_choice_metrics`.

    Example:

    ```python
    import numpy as np
    from keras_e3.layers.experts_choice import make_experts_choice_dispatcher

    gates = np.random.default_rng(0).dirichlet(np.ones(4), (2, 8))
    dispatcher, metrics = make_experts_choice_dispatcher(
        gates.astype("float32"), capacity=2, implementation="gather")
    dispatcher.dispatch(np.ones((2, 8, 3), "float32")).shape  # (4, 4, 3)
    ```
    """
    implementation = resolve_dispatcher(implementation)
    group_size, num_experts = gates.shape[1:]
    if capacity > group_size:
        raise ValueError(
            f"Experts Choice capacity {capacity} exceeds the group size "
            f"{group_size}: each expert takes C distinct tokens of its group. "
            "Lower capacity_factor or raise group_size.")
    token_index, token_gate, taken = top_items_per_expert(
        gates, capacity, valid)
    metrics = experts_choice_metrics(token_index, token_gate, taken,
                                     num_experts, group_size, valid)
    if implementation == "gather":
        return ExpertsChoiceGatherDispatcher(
            gates, token_index, token_gate, taken, dtype=dtype), metrics
    mask = dense_dispatch_mask(token_index, taken, group_size)
    return EinsumDispatcher(dense_combine_weights(gates, mask), mask,
                            dtype=dtype, gates=gates), metrics


@keras.saving.register_keras_serializable(package="keras_e3")
class ExpertsChoiceRouter(keras.layers.Layer):
    """Gates of vmoe's `NoisyTopItemsPerExpertRouter`: softmax(x @ kernel)
    over `num_experts` (kernel [H, E], no bias). In training with
    `noise_std > 0`, Gaussian noise of std `noise_std / E` is added to the
    logits first, as vmoe. No auxiliary loss.

    `call(x, valid=None, training=None)` takes x [G, S, H] and returns
    gates [G, S, E]; `route` (the router contract) returns the dispatcher
    of the selection (`make_experts_choice_dispatcher`) and its metrics.

    Example:

    ```python
    import numpy as np
    from keras_e3.layers.experts_choice import ExpertsChoiceRouter
    from keras_e3.layers.dispatch import DispatchOptions

    router = ExpertsChoiceRouter(4)
    x = np.ones((2, 8, 16), "float32")
    gates = router(x)  # [2, 8, 4]
    dispatcher, metrics = router.route(x, options=DispatchOptions(2))
    ```
    """

    def __init__(self, num_experts, noise_std=1.0,
                 kernel_initializer="lecun_normal", seed=None, **kwargs):
        super().__init__(**kwargs)
        self.num_experts = num_experts
        self.noise_std = noise_std
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        self.kernel = self.add_weight(
            name="kernel", shape=(input_shape[-1], self.num_experts),
            initializer=self.kernel_initializer)

    def call(self, x, valid=None, training=None):
        logits = ops.matmul(x, ops.cast(self.kernel, x.dtype))
        if training and self.noise_std > 0:
            logits = logits + (self.noise_std / self.num_experts) * \
                keras.random.normal(ops.shape(logits), dtype=logits.dtype,
                                    seed=self.seed_generator)
        return ops.softmax(logits, axis=-1)

    def route(self, x, valid=None, training=None, options=None):
        """The router contract: x [G, S, H] -> (dispatcher, metrics).

        `options` (a `DispatchOptions`): `capacity` (C), `layout` ("einsum"
        for the reference, else the gather buffers) and `dtype`.
        """
        options = options or DispatchOptions(capacity=x.shape[1])
        gates = self(x, valid=valid, training=training)
        implementation = "einsum" if options.layout == "einsum" else "gather"
        return make_experts_choice_dispatcher(
            gates, options.capacity, valid=valid,
            implementation=implementation, dtype=options.dtype)

    def get_config(self):
        config = super().get_config()
        config.update(num_experts=self.num_experts, noise_std=self.noise_std,
                      kernel_initializer=keras.initializers.serialize(
                          self.kernel_initializer),
                      seed=self.seed)
        return config
