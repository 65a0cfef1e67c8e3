"""Token dispatch for sparse MoE layers: top-K experts per token with capacity.

Notation (as in vmoe): G groups, S tokens per group, E experts, K selected
experts per token, C capacity (buffer slots per expert and group).

`top_experts_per_item` computes where each (token, choice) lands in its
expert's buffer, following vmoe's algorithm exactly: all top-1 choices are
served before any top-2 choice; within a rank, earlier tokens win, or, with
batch-prioritized routing (BPR), tokens with a larger top gate win. Choices
that land beyond the capacity are dropped.

`EinsumDispatcher` is the readable reference implementation: dense
dispatch/combine tensors [G, S, E, C] applied with einsums, O(S·E·C) memory
and FLOPs per group just to move tokens. `GatherDispatcher` moves the same
tokens with index gathers (and their scatter-add gradients): O(S·K) routing
state, no [G, S, E, C] tensor, same capacity, same dropped tokens, same
combine weights. `TiledDispatcher` is the gather path without the empty
capacity slots: the kept tokens sorted by expert in tiles, run through the
experts tile by tile (`keras_e3.layers.expert_tiles`); `BucketDispatcher`
runs each expert on its own rows at one of a few static row counts.

The router contract: every router's `route(x, valid, training, options)`
returns `(dispatcher, metrics)`, the dispatcher a `Dispatcher` (the
abstract interface below) whose `layout` names how the experts' rows are
stored. `dispatch_plan` is the one function that decides that layout
(backend, training, inspection, distribution, expert dropout, shapes);
`MoeMlp.call` is route -> dispatch -> experts -> combine, whatever the
router.
"""

import abc
import dataclasses
import math

from keras import ops

from keras_e3.layers.portable_ops import one_hot
from keras_e3.layers.portable_ops import scatter
from keras_e3.layers.portable_ops import top_k

DISPATCHERS = ("einsum", "gather", "auto")
# Rows per tile of TiledDispatcher: large enough for efficient matmuls,
# small against the tokens of a routing group per expert.
TILE_SIZE = 128


def default_tile_size():
    """`TILE_SIZE` where the experts run tile by tile in a compiled loop
    (JAX); 1 on PyTorch, whose eager experts run each expert once on all
    its rows (`expert_tiles`), so that no row is padding."""
    import keras

    return 1 if keras.backend.backend() == "torch" else TILE_SIZE


CEIL_OR_ROUND = ("ceil", "round")


def compute_capacity(group_size, num_experts, num_selected_experts,
                     capacity_factor, multiple_of=4, ceil_or_round="ceil"):
    """Slots per expert and group, rounded as vmoe's `compute_capacity`.

    capacity = ceil(group_size * K * capacity_factor / E) (or Python's
    `round`, half to even, with `ceil_or_round="round"`), then rounded up
    to a multiple of `multiple_of` (4 in vmoe; None, 0 or 1: no rounding).

    Args:
        group_size: S, tokens per routing group.
        num_experts: E.
        num_selected_experts: K.
        capacity_factor: slack over an even split.
        multiple_of: round up to a multiple of this.
        ceil_or_round: "ceil" or "round".

    Returns:
        The capacity C, an int >= 1.

    Example:

    ```python
    from keras_e3.layers import compute_capacity

    assert compute_capacity(400, 8, 1, 1.0) == 52  # ceil(50) -> 52
    assert compute_capacity(400, 8, 2, 1.05, multiple_of=1) == 105
    ```
    """
    if ceil_or_round not in CEIL_OR_ROUND:
        raise ValueError(f"capacity_ceil_or_round must be one of "
                         f"{CEIL_OR_ROUND}; got {ceil_or_round!r}.")
    num_tokens = group_size * num_selected_experts
    ratio = num_tokens * capacity_factor / num_experts
    capacity = int(math.ceil(ratio) if ceil_or_round == "ceil"
                   else round(ratio))
    if capacity < 1:
        raise ValueError(
            f"group_size={group_size}, num_experts={num_experts}, "
            f"num_selected_experts={num_selected_experts} and "
            f"capacity_factor={capacity_factor} give capacity={capacity}; "
            "it must be >= 1.")
    if multiple_of and multiple_of > 0:
        capacity += (-capacity) % multiple_of
    return capacity


def top_experts_per_item(gates, num_selected_experts, batch_priority=False,
                         valid=None):
    """Buffer position of every (token, selected expert) pair.

    Args:
        gates: [G, S, E] routing weights (softmax of the router logits).
        num_selected_experts: K.
        batch_priority: use batch-prioritized routing.
        valid: optional [G, S] boolean mask; invalid (padding) tokens are
            never dispatched and take no capacity.

    Returns:
        (expert_index [G, S, K], buffer_index [G, S, K]): the chosen experts
        and each choice's 0-based position in that expert's buffer
        (-1 for padding tokens). A position >= capacity means dropped.

    Example:

    ```python
    import numpy as np
    from keras import ops
    from keras_e3.layers import top_experts_per_item

    gates = np.array([[[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]]], "float32")
    expert, position = top_experts_per_item(gates, 1)
    # Tokens 0 and 1 pick expert 0 (slots 0, 1), token 2 expert 1 (slot 0).
    assert ops.convert_to_numpy(position)[0, :, 0].tolist() == [0, 1, 0]
    ```
    """
    num_experts = gates.shape[-1]
    top_gates, expert_index = top_k(gates, num_selected_experts)
    if batch_priority:
        # Serve tokens by decreasing top-1 gate; the sort is stable, so ties
        # keep token order, as with jnp.argsort in vmoe.
        perm = ops.argsort(-top_gates[..., 0], axis=-1)
        expert_index = ops.take_along_axis(expert_index, perm[..., None],
                                           axis=1)
        if valid is not None:
            valid = ops.take_along_axis(valid, perm, axis=1)
    hot = one_hot(expert_index, num_experts, dtype="int32")
    if valid is not None:
        hot = hot * ops.cast(valid, "int32")[:, :, None, None]
    # [G, S, K, E] -> [G, K, S, E] -> [G, K*S, E]: rank-major order, so every
    # top-1 choice precedes every top-2 choice in the running count.
    hot = ops.transpose(hot, (0, 2, 1, 3))
    group_size = ops.shape(hot)[2]
    flat = ops.reshape(hot, (-1, num_selected_experts * group_size,
                             num_experts))
    position = ops.cumsum(flat, axis=1) * flat
    position = ops.reshape(position, (-1, num_selected_experts, group_size,
                                      num_experts))
    # [G, K, S, E] -> [G, S, K]: one non-zero entry per (token, choice).
    buffer_index = ops.sum(ops.transpose(position, (0, 2, 1, 3)), axis=-1) - 1
    if batch_priority:
        inv_perm = ops.argsort(perm, axis=-1)
        expert_index = ops.take_along_axis(expert_index, inv_perm[..., None],
                                           axis=1)
        buffer_index = ops.take_along_axis(buffer_index, inv_perm[..., None],
                                           axis=1)
    return expert_index, buffer_index


def expert_buffers(rows, num_experts, capacity):
    """Gathered rows [G, E*C, H], expert by expert and slot by slot in each
    group, as the experts' buffers [E, G*C, H] (group by group)."""
    hidden = rows.shape[-1]
    rows = ops.reshape(rows, (-1, num_experts, capacity, hidden))
    return ops.reshape(ops.transpose(rows, (1, 0, 2, 3)),
                       (num_experts, -1, hidden))


def group_buffers(buffers, num_experts, capacity):
    """The inverse layout: the experts' outputs [E, G*C, H] as
    [G, E, C, H]."""
    hidden = buffers.shape[-1]
    buffers = ops.reshape(buffers, (num_experts, -1, capacity, hidden))
    return ops.transpose(buffers, (1, 0, 2, 3))


LAYOUTS = ("einsum", "buffers", "tiles", "buckets", "soft")


class Dispatcher(abc.ABC):
    """The interface every router's dispatcher implements.

    A router's `route` returns one with its metrics; `MoeMlp` then runs
    `combine(run_experts(experts, dispatch(tokens)))`.

    - `dispatch(x)`: tokens [G, S, H] -> the experts' rows in this
      dispatcher's `layout`: the capacity buffers [E, G*C, H] for
      "einsum", "buffers" and "soft" (C = slots per expert and group), or
      the kept tokens sorted by expert, [rows, H], for "tiles" and
      "buckets".
    - `run_experts(experts, rows)`: the `ExpertsMlp` on those rows (the one
      place that knows how a layout's rows reach the experts).
    - `combine(y)`: the experts' rows -> tokens [G, S, H].
    - `routing()`: the dense routing tensors for inspection
      (`return_routing=True`, where `dispatch_plan` always picks a
      buffers layout).

    `dtype` (e.g. "bfloat16") is the dtype of the data movements.

    Example:

    ```python
    import numpy as np
    from keras_e3.layers.dispatch import make_dispatcher

    gates = np.random.default_rng(0).dirichlet(np.ones(4), (2, 8))
    dispatcher = make_dispatcher(gates.astype("float32"), 1, capacity=4,
                                 implementation="gather")
    x = np.ones((2, 8, 3), "float32")
    rows = dispatcher.dispatch(x)  # [E, G*C, H] = [4, 8, 3]
    y = dispatcher.combine(rows)   # [G, S, H], each token times its gate
    ```
    """

    dtype = None
    layout = None

    def _lowered(self, x):
        return x if self.dtype is None else ops.cast(x, self.dtype)

    @abc.abstractmethod
    def dispatch(self, x):
        """Tokens [G, S, H] -> the experts' rows (see the class doc)."""

    @abc.abstractmethod
    def combine(self, y):
        """The experts' rows -> tokens [G, S, H]."""

    def run_experts(self, experts, x, training=None):
        """The experts on the rows `dispatch` made (buffers by default)."""
        return experts(x, training=training)

    def routing(self):
        """The dense routing tensors: the router's `gates` [G, S, E] and the
        einsum reference's `combine_weights` / `dispatch_mask`
        [G, S, E, C]."""
        return dict(gates=self.gates, combine_weights=self.combine_weights,
                    dispatch_mask=self.dispatch_mask)


class EinsumDispatcher(Dispatcher):
    """Reference dispatcher with dense [G, S, E, C] tensors.

    `dispatch` maps tokens [G, S, ...] to expert buffers [E, G*C, ...];
    `combine` maps expert outputs [E, G*C, ...] back to [G, S, ...], each
    token's outputs weighted by its (raw softmax) gates.
    With `dtype="bfloat16"` both data movements run in bfloat16, like
    vmoe's Bfloat16Dispatcher (the combine weights stay in their dtype).
    `gates` [G, S, E], if given, is reported by `routing()`.

    Args:
        combine_weights: [G, S, E, C] weight of each token's expert slots.
        dispatch_mask: [G, S, E, C] bool, where each token goes.
        dtype: dtype of the data movements (None: the inputs').
        gates: the router's gates, for inspection.

    Example:

    ```python
    import numpy as np
    from keras_e3.layers import EinsumDispatcher

    # One group of 2 tokens, 2 experts with 1 slot each: token s -> e = s.
    mask = np.eye(2, dtype=bool).reshape(1, 2, 2, 1)
    dispatcher = EinsumDispatcher(mask * 0.5, mask)
    x = np.ones((1, 2, 3), "float32")
    assert dispatcher.dispatch(x).shape == (2, 1, 3)  # [E, G*C, H]
    assert np.allclose(dispatcher.combine(dispatcher.dispatch(x)), 0.5)
    ```
    """

    layout = "einsum"

    def __init__(self, combine_weights, dispatch_mask, dtype=None,
                 gates=None):
        self.combine_weights = combine_weights  # [G, S, E, C]
        self.dispatch_mask = dispatch_mask  # [G, S, E, C] bool
        self.dtype = dtype
        self.gates = gates

    @property
    def capacity(self):
        return self.combine_weights.shape[-1]

    def dispatch(self, x):
        dtype = x.dtype
        x = self._lowered(x)
        mask = ops.cast(self.dispatch_mask, x.dtype)
        y = ops.einsum("gsec,gsh->egch", mask, x)
        y = ops.reshape(y, (y.shape[0], -1, y.shape[-1]))
        return ops.cast(y, dtype)

    def combine(self, y):
        dtype = y.dtype
        y = self._lowered(y)
        num_experts = y.shape[0]
        y = ops.reshape(y, (num_experts, -1, self.capacity, y.shape[-1]))
        y = ops.cast(y, self.combine_weights.dtype)
        out = ops.einsum("gsec,egch->gsh", self.combine_weights, y)
        return ops.cast(out, dtype)


class GatherDispatcher(Dispatcher):
    """Index-based dispatcher: the einsum reference's results without its
    dense [G, S, E, C] tensors.

    Each kept (token, choice) gets a flat slot e*C + position in its group's
    buffer; dropped choices point at a spare slot E*C that holds zeros.
    `dispatch` gathers every slot's token (an empty slot gathers a zero
    row), `combine` gathers each token's K slots and weights them by the
    (raw softmax) gates. The dense `combine_weights` / `dispatch_mask` of the
    reference are available as properties, computed only when asked for
    (`compute_intermediates`).
    """

    layout = "buffers"

    def __init__(self, gates, expert_index, buffer_index, capacity,
                 dtype=None):
        self.gates = gates
        self.dtype = dtype
        self._capacity = capacity
        self.num_experts = num_experts = gates.shape[-1]
        num_slots = num_experts * capacity
        keep = ops.logical_and(buffer_index >= 0, buffer_index < capacity)
        # [G, S, K]: the flat slot of each choice (num_slots when dropped).
        self.slot = ops.where(keep, expert_index * capacity + buffer_index,
                              num_slots)
        self.weights = ops.take_along_axis(gates, expert_index, axis=2) * \
            ops.cast(keep, gates.dtype)
        shape = ops.shape(self.slot)
        groups, group_size = shape[0], shape[1]
        # The token of every slot, by scattering (token + 1) into the slots;
        # only the spare slot can receive several (dropped) choices.
        rows = ops.broadcast_to(
            ops.reshape(ops.arange(groups, dtype="int32"), (-1, 1, 1)), shape)
        tokens = ops.broadcast_to(
            ops.reshape(ops.arange(group_size, dtype="int32") + 1,
                        (1, -1, 1)), shape)
        indices = ops.reshape(ops.stack(
            [rows, ops.cast(self.slot, "int32")], axis=-1), (-1, 2))
        owner = scatter(indices, ops.reshape(tokens, (-1,)),
                        (groups, num_slots + 1))[:, :num_slots] - 1
        # Empty slots read row `group_size`, a zero row appended to x.
        self.source = ops.where(owner < 0, group_size, owner)

    @property
    def capacity(self):
        return self._capacity

    def dispatch(self, x):
        dtype = x.dtype
        x = self._lowered(x)
        x = ops.concatenate([x, ops.zeros_like(x[:, :1])], axis=1)
        y = ops.take_along_axis(x, self.source[..., None], axis=1)
        return ops.cast(
            expert_buffers(y, self.num_experts, self.capacity), dtype)

    def combine(self, y):
        dtype = y.dtype
        y = self._lowered(y)
        hidden = y.shape[-1]
        y = ops.reshape(group_buffers(y, self.num_experts, self.capacity),
                        (-1, self.num_experts * self.capacity, hidden))
        y = ops.concatenate([y, ops.zeros_like(y[:, :1])], axis=1)
        y = ops.cast(y, self.weights.dtype)
        k = self.slot.shape[-1]
        flat_slot = ops.reshape(self.slot, (ops.shape(self.slot)[0], -1))
        picked = ops.take_along_axis(y, flat_slot[..., None], axis=1)
        picked = ops.reshape(picked, (ops.shape(self.slot)[0], -1, k, hidden))
        out = ops.sum(picked * self.weights[..., None], axis=2)
        return ops.cast(out, dtype)

    @property
    def dispatch_mask(self):
        num_slots = self.num_experts * self.capacity
        chosen = ops.sum(one_hot(self.slot, num_slots + 1,
                                 dtype="int32"), axis=2)[..., :num_slots]
        shape = ops.shape(chosen)
        return ops.reshape(chosen > 0, (shape[0], shape[1], self.num_experts,
                                        self.capacity))

    @property
    def combine_weights(self):
        return self.gates[..., None] * ops.cast(self.dispatch_mask,
                                                self.gates.dtype)


class SortedDispatcher(Dispatcher):
    """The kept tokens sorted by expert in one [num_rows, ...] array: expert
    e's rows start at `starts[e]`, group by group, in buffer order. The
    layouts differ in where each expert's rows start (`_layout`).

    Same capacity, same dropped tokens, same combine weights as the other
    paths: only the order in which the kept tokens are stored differs.
    """

    def __init__(self, gates, expert_index, buffer_index, capacity,
                 dtype=None):
        self.gates = gates
        self.dtype = dtype
        self.num_experts = num_experts = gates.shape[-1]
        groups, group_size, k = expert_index.shape
        keep = ops.logical_and(buffer_index >= 0, buffer_index < capacity)
        chosen = one_hot(expert_index, num_experts, dtype="int32") * \
            ops.cast(keep, "int32")[..., None]
        counts = ops.sum(chosen, axis=(1, 2))  # [G, E] kept per group
        group_offset = ops.cumsum(counts, axis=0) - counts
        self.rows_per_expert = ops.sum(counts, axis=0)
        starts, num_rows = self._layout(groups, group_size, k, capacity)
        # [G, S, K]: the row of each kept choice (num_rows when dropped).
        offset = ops.sum(chosen * (starts + group_offset)[:, None, None, :],
                         axis=-1)
        self.row = ops.where(keep, offset + buffer_index, num_rows)
        self.weights = ops.take_along_axis(gates, expert_index, axis=2) * \
            ops.cast(keep, gates.dtype)
        # The token of every row, as in GatherDispatcher: empty rows read
        # the zero row appended after the G·S tokens.
        num_tokens = groups * group_size
        tokens = ops.broadcast_to(ops.reshape(
            ops.arange(num_tokens, dtype="int32") + 1,
            (groups, group_size, 1)), ops.shape(self.row))
        owner = scatter(
            ops.reshape(ops.cast(self.row, "int32"), (-1, 1)),
            ops.reshape(tokens, (-1,)), (num_rows + 1,))[:num_rows] - 1
        self.source = ops.where(owner < 0, num_tokens, owner)

    @abc.abstractmethod
    def _layout(self, groups, group_size, k, capacity):
        """(starts [E]: each expert's first row, num_rows: static)."""

    def routing(self):
        raise ValueError(
            f"The {self.layout!r} layout has no dense routing tensors: "
            "inspection runs on the capacity buffers (dispatch_plan).")

    def dispatch(self, x):
        """[G, S, H] tokens -> [num_rows, H] rows."""
        dtype = x.dtype
        x = self._lowered(x)
        x = ops.reshape(x, (-1, x.shape[-1]))
        x = ops.concatenate([x, ops.zeros_like(x[:1])], axis=0)
        return ops.cast(ops.take(x, self.source, axis=0), dtype)

    def combine(self, y):
        """[num_rows, H] rows -> [G, S, H] tokens."""
        dtype = y.dtype
        y = self._lowered(y)
        y = ops.concatenate([y, ops.zeros_like(y[:1])], axis=0)
        y = ops.cast(y, self.weights.dtype)
        picked = ops.take(y, self.row, axis=0)  # [G, S, K, H]
        out = ops.sum(picked * self.weights[..., None], axis=2)
        return ops.cast(out, dtype)


class TiledDispatcher(SortedDispatcher):
    """The gather path without the empty capacity slots: each expert's rows
    padded to a whole number of tiles, so that the experts run tile by
    tile (`ExpertsMlp.call_tiles`) on about G·S·K + E·tile_size rows
    instead of E·G·C. Used by `MoeMlp` when it stores fewer rows than the
    capacity buffers (`tiles_pay`) on the backends that run it well
    (`tiles_supported`).
    """

    layout = "tiles"

    def __init__(self, gates, expert_index, buffer_index, capacity,
                 tile_size, dtype=None):
        self.tile_size = tile_size
        super().__init__(gates, expert_index, buffer_index, capacity, dtype)

    def _layout(self, groups, group_size, k, capacity):
        tile = self.tile_size
        self.num_tiles = num_tiles = tile_count(
            groups, group_size, self.num_experts, k, capacity, tile)
        padded = (self.rows_per_expert + tile - 1) // tile * tile
        ends = ops.cumsum(padded)
        # The expert of every tile; tiles past `num_used_tiles` are unused.
        tile_starts = ops.arange(num_tiles, dtype="int32") * tile
        self.tile_expert = ops.minimum(ops.sum(ops.cast(
            ends[None, :] <= tile_starts[:, None], "int32"), axis=1),
            self.num_experts - 1)
        self.num_used_tiles = ends[-1] // tile
        return ends - padded, num_tiles * tile

    def run_experts(self, experts, x, training=None):
        return experts.call_tiles(x, self.tile_expert, self.num_used_tiles,
                                  self.tile_size, training=training)


class BucketDispatcher(SortedDispatcher):
    """The gather path without most empty capacity slots, for inference
    and training: each expert owns a segment of `rows_bound` rows (all it can keep), its
    kept rows first, and runs on the first B_e rows of its segment, B_e the
    smallest of a few static sizes (`segment_sizes`) that holds its own
    rows (`ExpertsMlp.call_buckets`: a loop over the experts, one compiled
    branch per size). The work follows each expert's load, not the busiest
    expert's nor the capacity: about G·S·K rows plus E·step/2 of padding,
    against E·G·C for the buffers and whole tiles of each expert for
    `TiledDispatcher`. For training the loop has its own backward pass
    (`expert_segments`; autodiff of a switch would carry every branch's
    intermediates), so not with expert dropout.
    """

    layout = "buckets"

    def _layout(self, groups, group_size, k, capacity):
        self.rows_bound = bound = expert_rows_bound(groups, group_size,
                                                    capacity)
        self.buckets = segment_sizes(bound)
        return (ops.arange(self.num_experts, dtype="int32") * bound,
                self.num_experts * bound)

    def run_experts(self, experts, x, training=None):
        return experts.call_buckets(x, self.rows_per_expert, self.buckets,
                                    training=training)


def expert_rows_bound(groups, group_size, capacity):
    """The most rows one expert can keep: min(C, S) in each group (a
    token chooses an expert at most once)."""
    return groups * min(capacity, group_size)


def segment_sizes(rows_bound, branches=16, multiple_of=8):
    """The static row counts `BucketDispatcher`'s experts run at: 0 (an
    expert with no rows computes nothing), then every multiple of a step
    (about `rows_bound` / `branches`, rounded up to a multiple of
    `multiple_of`) below `rows_bound`, and `rows_bound`. An expert's
    padding is under one step.

    Example:

    >>> segment_sizes(608)
    [0, 40, 80, 120, 160, 200, 240, 280, 320, 360, 400, 440, 480, 520, 560, 600, 608]
    >>> segment_sizes(13)
    [0, 8, 13]
    """
    step = -(-math.ceil(rows_bound / branches) // multiple_of) * multiple_of
    return [0] + list(range(step, rows_bound, step)) + [rows_bound]


def tile_count(groups, group_size, num_experts, num_selected_experts,
               capacity, tile_size):
    """Tiles that always hold the kept choices sorted by expert, each
    expert's rows padded to whole tiles: at most min(G·S·K, E·G·C) kept rows
    plus E·(tile_size - 1) rows of padding (the sum of the experts' tile
    counts is a whole number, hence the floor)."""
    kept = min(groups * group_size * num_selected_experts,
               num_experts * groups * capacity)
    return (kept + num_experts * (tile_size - 1)) // tile_size


def tiles_pay(groups, group_size, num_experts, num_selected_experts,
              capacity, tile_size):
    """Whether the tiled layout stores fewer rows than the capacity buffers
    (E·G·C): it does when the capacity factor leaves empty slots, and the
    more so the larger the routing groups; with capacity factor ~1 it
    does not."""
    if not isinstance(groups, int) or not tile_size:
        return False
    tiles = tile_count(groups, group_size, num_experts, num_selected_experts,
                       capacity, tile_size)
    return tiles * tile_size < num_experts * groups * capacity


def resolve_dispatcher(implementation):
    """The dispatcher implementation a setting names.

    Args:
        implementation: "auto", "gather" or "einsum".

    Returns:
        "gather" for "auto" (the faster path on every backend,
        PERFORMANCE.md), else `implementation`, checked.

    Example:

    >>> resolve_dispatcher("auto")
    'gather'
    """
    if implementation not in DISPATCHERS:
        raise ValueError(f"Unknown dispatcher {implementation!r}; expected "
                         f"one of {DISPATCHERS}.")
    if implementation == "auto":
        return "gather"
    return implementation


def tiles_supported(training=False, backend=None):
    """Whether `backend` (default: Keras' backend) runs the tiled experts
    well: JAX for inference and training, PyTorch for inference only (its
    training step is a Python loop over tiles); TensorFlow keeps the
    capacity buffers (its XLA bridge recompiles the tile loop for every
    batch and cannot compile the tiles' custom gradient). Measurements in
    PERFORMANCE.md ("Dispatch policy")."""
    import keras

    backend = backend or keras.backend.backend()
    return backend == "jax" or (backend == "torch" and not training)


def buckets_supported(backend=None):
    """Whether `backend` (default: Keras' backend) runs `BucketDispatcher`
    well: JAX, whose compiled switch runs one branch. PyTorch's eager
    experts already run each expert's exact rows (`TiledDispatcher` with
    tiles of one row); TensorFlow keeps the capacity buffers."""
    import keras

    return (backend or keras.backend.backend()) == "jax"


def gather_layout(groups, group_size, num_experts, num_selected_experts,
                  capacity, tile_size=None, row_buckets=False):
    """The gather path's layout of the experts' rows for these shapes:
    "buckets" (`BucketDispatcher`) with `row_buckets` where the number of
    groups is static (its segments' size depends on it; each expert's
    work follows its load, so at most the buffers' rows even when every
    expert is full), else "tiles" (`TiledDispatcher`) with `tile_size`
    where they pay, else "buffers" (`GatherDispatcher`, the capacity
    buffers)."""
    shape = (groups, group_size, num_experts, num_selected_experts, capacity)
    if row_buckets and isinstance(groups, int):
        return "buckets"
    if tiles_pay(*shape, tile_size):
        return "tiles"
    return "buffers"


@dataclasses.dataclass(frozen=True)
class DispatchPlan:
    """What `dispatch_plan` decided: the `layout` (one of `LAYOUTS`), and
    the tile size and row buckets the conditions allow (None / False where
    they do not; the layout uses them only where they pay)."""

    layout: str
    tile_size: int = None
    row_buckets: bool = False


def dispatch_plan(router="top_k", implementation="auto", groups=None,
                  group_size=None, num_experts=None, num_selected_experts=1,
                  capacity=None, training=False, inspect=False,
                  distributed=False, expert_dropout=False,
                  tile_size=TILE_SIZE, row_buckets=True, backend=None):
    """The dispatch policy: the one function that decides how a MoE layer's
    tokens reach its experts.

    Args:
        router: "top_k", "experts_choice" or "soft".
        implementation: the layer's `dispatcher` setting ("auto", "gather"
            or "einsum").
        groups, group_size, num_experts, num_selected_experts, capacity:
            the shapes (G, S, E, K, C); `groups` None or symbolic: unknown
            (then no layout that depends on it).
        training: a training call.
        inspect: the routing intermediates are asked for
            (`return_routing`): the capacity buffers.
        distributed: a `keras.distribution` is active (its expert-parallel
            layouts shard the capacity buffers).
        expert_dropout: the experts have dropout (no tiles in training).
        tile_size: rows per tile for the tiled layout (0/None: none).
        row_buckets: allow the bucketed layout (`BucketDispatcher`).
        backend: "jax", "tensorflow" or "torch" (default: Keras' backend).

    Returns:
        A `DispatchPlan`: the `layout` ("einsum", "buffers", "tiles",
        "buckets" or "soft") and the tile size / row buckets allowed.

    Example:

    >>> dispatch_plan("top_k", "auto", 4, 400, 8, 1, 76, backend="jax").layout
    'buckets'
    >>> dispatch_plan("top_k", "auto", 4, 400, 8, 1, 76,
    ...               backend="tensorflow").layout
    'buffers'
    >>> dispatch_plan("experts_choice", "auto", distributed=True).layout
    'einsum'
    """
    if router == "soft":  # dispatch and combine are the algorithm's matmuls
        return DispatchPlan("soft")
    implementation = resolve_dispatcher(implementation)
    if router == "experts_choice":
        # Under a distribution: the einsum path's expert-parallel layouts.
        if distributed or implementation == "einsum":
            return DispatchPlan("einsum")
        return DispatchPlan("buffers")
    plain = not inspect and not distributed
    tiles = tile_size if (plain and tile_size
                          and not (training and expert_dropout)
                          and tiles_supported(training, backend)) else None
    buckets = bool(plain and row_buckets
                   and not (training and expert_dropout)
                   and buckets_supported(backend))
    if implementation == "einsum":
        return DispatchPlan("einsum", tiles, buckets)
    layout = gather_layout(groups, group_size, num_experts,
                           num_selected_experts, capacity, tiles, buckets)
    return DispatchPlan(layout, tiles, buckets)


@dataclasses.dataclass(frozen=True)
class DispatchOptions:
    """What a router's `route` needs besides the tokens: the `capacity`
    (slots per expert and group), the `layout` `dispatch_plan` chose, and
    `batch_priority`, `dtype` (of the data movements), `tile_size` (the
    tiled layout's) and `inspect` (statistics for inspection, e.g. Soft
    MoE's similarities)."""

    capacity: int
    layout: str = "einsum"
    batch_priority: bool = False
    dtype: str = None
    tile_size: int = None
    inspect: bool = False


def make_dispatcher(gates, num_selected_experts, capacity,
                    batch_priority=False, valid=None, implementation="einsum",
                    dtype=None, tile_size=None, row_buckets=False):
    """Routes `gates` [G, S, E] top-K and returns a dispatcher for the
    experts (shapes alone decide the gather layout: `gather_layout`).

    Args:
        gates: [G, S, E] routing weights.
        num_selected_experts: K.
        capacity: C, slots per expert and group.
        batch_priority: batch-prioritized routing.
        valid: optional [G, S] mask of real tokens.
        implementation: "einsum", "gather" or "auto".
        dtype: dtype of the data movements (e.g. "bfloat16").
        tile_size: the tiled layout's rows per tile where it pays.
        row_buckets: the bucketed layout where the groups are static.

    Returns:
        A `Dispatcher`.

    Example:

    ```python
    import numpy as np
    from keras_e3.layers import make_dispatcher

    gates = np.full((1, 4, 2), 0.5, "float32")
    dispatcher = make_dispatcher(gates, 1, capacity=2)
    dispatcher.dispatch(np.ones((1, 4, 3), "float32")).shape  # (2, 2, 3)
    ```
    """
    implementation = resolve_dispatcher(implementation)
    layout = "einsum"
    if implementation == "gather":
        layout = gather_layout(*gates.shape, num_selected_experts, capacity,
                               tile_size, row_buckets)
    return top_k_dispatcher(gates, num_selected_experts, capacity, layout,
                            batch_priority, valid, dtype, tile_size)


def top_k_dispatcher(gates, num_selected_experts, capacity, layout,
                     batch_priority=False, valid=None, dtype=None,
                     tile_size=None):
    """The top-K `Dispatcher` of `layout` ("einsum", "buffers", "tiles" or
    "buckets", as `dispatch_plan` names it) for `gates` [G, S, E]."""
    expert_index, buffer_index = top_experts_per_item(
        gates, num_selected_experts, batch_priority, valid)
    if layout == "buckets":
        return BucketDispatcher(gates, expert_index, buffer_index,
                                capacity, dtype=dtype)
    if layout == "tiles":
        return TiledDispatcher(gates, expert_index, buffer_index,
                               capacity, tile_size, dtype=dtype)
    if layout == "buffers":
        return GatherDispatcher(gates, expert_index, buffer_index, capacity,
                                dtype=dtype)
    if layout != "einsum":
        raise ValueError(f"Unknown top-K layout {layout!r}; expected one of "
                         f"{LAYOUTS[:4]}.")
    num_experts = gates.shape[-1]
    # [G, S, K] -> [G, S, E]: the buffer slot of each token at each expert
    # (-1 where the expert was not selected).
    chosen = one_hot(expert_index, num_experts, dtype="int32")
    slot = ops.sum(chosen * (buffer_index[..., None] + 1), axis=2) - 1
    dispatch_mask = ops.equal(slot[..., None],
                              ops.arange(capacity, dtype="int32"))
    combine_weights = gates[..., None] * ops.cast(dispatch_mask, gates.dtype)
    return EinsumDispatcher(combine_weights, dispatch_mask, dtype=dtype,
                            gates=gates)
