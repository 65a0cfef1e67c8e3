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
experts tile by tile (`keras_e3.layers.expert_tiles`), used by `MoeMlp`
where it stores fewer rows than the buffers (`tiles_pay`). `make_dispatcher`
is the one place that picks an implementation ("auto": see
`resolve_dispatcher`).
"""

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


class Dispatcher:
    """What every dispatcher does: `dispatch(x)` tokens [G, S, H] to the
    experts' input, `run_experts(experts, x)` the `ExpertsMlp` on it,
    `combine(y)` back to [G, S, H]. `dtype` (e.g. "bfloat16") is the dtype
    of the data movements."""

    dtype = None

    def _lowered(self, x):
        return x if self.dtype is None else ops.cast(x, self.dtype)

    def run_experts(self, experts, x, training=None):
        return experts(x, training=training)


class EinsumDispatcher(Dispatcher):
    """Reference dispatcher with dense [G, S, E, C] tensors.

    `dispatch` maps tokens [G, S, ...] to expert buffers [E, G*C, ...];
    `combine` maps expert outputs [E, G*C, ...] back to [G, S, ...], each
    token's outputs weighted by its (raw softmax) gates.
    With `dtype="bfloat16"` both data movements run in bfloat16, like
    vmoe's Bfloat16Dispatcher (the combine weights stay in their dtype).
    """

    def __init__(self, combine_weights, dispatch_mask, dtype=None):
        self.combine_weights = combine_weights  # [G, S, E, C]
        self.dispatch_mask = dispatch_mask  # [G, S, E, C] bool
        self.dtype = dtype

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

    def _layout(self, groups, group_size, k, capacity):
        """(starts [E]: each expert's first row, num_rows: static)."""
        raise NotImplementedError

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
    """The gather path for inference without most empty capacity slots and
    without a loop: each expert owns `rows_bound` rows (all it can keep),
    and the experts run as one batched product on the first B rows of
    each, B the smallest of a few static sizes (`row_buckets`) that holds
    the busiest expert's rows (`ExpertsMlp.call_buckets`: one compiled
    branch per size). With even loads that is about G·S·K rows, against
    E·G·C for the buffers and whole tiles of each expert for
    `TiledDispatcher`. Not for training: the gradient of a switch between
    branches carries every branch's intermediates.
    """

    def _layout(self, groups, group_size, k, capacity):
        self.rows_bound = bound = expert_rows_bound(groups, group_size,
                                                    capacity)
        self.buckets = row_buckets(groups * group_size * k / self.num_experts,
                                   bound)
        self.busiest = ops.max(self.rows_per_expert)
        return (ops.arange(self.num_experts, dtype="int32") * bound,
                self.num_experts * bound)

    def run_experts(self, experts, x, training=None):
        return experts.call_buckets(x, self.busiest, self.buckets,
                                    training=training)


def expert_rows_bound(groups, group_size, capacity):
    """The most rows one expert can keep: min(C, S) in each group (a
    token chooses an expert at most once)."""
    return groups * min(capacity, group_size)


def row_buckets(mean_rows, rows_bound, ratio=1.05, multiple_of=8):
    """The static row counts of `BucketDispatcher`'s branches: half the
    mean rows per expert, then from the mean up by `ratio` (the padding
    above the busiest expert's rows is then at most about 5%), and
    `rows_bound`; each rounded up to a multiple of `multiple_of` and at
    most `rows_bound`."""
    sizes = {rows_bound, mean_rows / 2}
    size = mean_rows
    while size < rows_bound:
        sizes.add(size)
        size *= ratio
    rounded = (-(-math.ceil(size) // multiple_of) * multiple_of
               for size in sizes)
    return sorted({max(1, min(rows_bound, size)) for size in rounded})


def buckets_pay(groups, group_size, num_experts, num_selected_experts,
                capacity, min_saving=0.1):
    """Whether `BucketDispatcher` can save at least `min_saving` of the
    capacity buffers' rows: with even loads it computes about G·S·K rows
    against E·G·min(C, S) (every row an expert can keep). Below that,
    its branches are not worth their compile time."""
    if not isinstance(groups, int):
        return False
    bound = num_experts * expert_rows_bound(groups, group_size, capacity)
    return groups * group_size * num_selected_experts <= \
        (1 - min_saving) * bound


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
    """'auto' -> the fastest path measured (benchmarks/dispatch_paths.py):
    gather, on every backend. On PyTorch it was slower than einsum while
    its experts ran tile by tile; they now run once per expert on its
    exact rows (`expert_tiles`), and E³ S/32's inference at batch 32 took
    1413 ms against einsum's 1868 (V-MoE S/32: 1209 vs 1239). Anything
    else is checked and returned."""
    if implementation not in DISPATCHERS:
        raise ValueError(f"Unknown dispatcher {implementation!r}; expected "
                         f"one of {DISPATCHERS}.")
    if implementation == "auto":
        return "gather"
    return implementation


def tiles_supported(training=False):
    """Whether this backend runs the tiled experts well. JAX (XLA) does,
    for inference and training. PyTorch (eager) does for inference; its
    training step, a Python loop over tiles forward and backward, measured
    2.4x slower than the einsum path (E³ S/32, batch 32), so it trains on
    the buffers. TensorFlow's XLA bridge compiles the tile loop with its
    inputs as compile-time constants, so a `jit_compile` function
    recompiles for every new batch (measured: 0.4 s per call of a small
    layer that takes 2 ms with the buffers), and it fails to compile the
    tiles' custom gradient (a `literal.cc` check failure aborts the
    process, TensorFlow 2.21); TensorFlow keeps the capacity buffers."""
    import keras

    backend = keras.backend.backend()
    return backend == "jax" or (backend == "torch" and not training)


def buckets_supported():
    """Whether this backend runs `BucketDispatcher` well: JAX, whose
    compiled switch runs one branch. PyTorch's eager experts already run
    each expert's exact rows (`TiledDispatcher` with tiles of one row);
    TensorFlow keeps the capacity buffers (see `tiles_supported`)."""
    import keras

    return keras.backend.backend() == "jax"


def gather_layout(groups, group_size, num_experts, num_selected_experts,
                  capacity, tile_size=None, row_buckets=False):
    """The gather path's layout of the experts' rows for these shapes:
    "buckets" (`BucketDispatcher`) with `row_buckets` where they pay, else
    "tiles" (`TiledDispatcher`) with `tile_size` where they pay, else
    "buffers" (`GatherDispatcher`, the capacity buffers)."""
    shape = (groups, group_size, num_experts, num_selected_experts, capacity)
    if row_buckets and buckets_pay(*shape):
        return "buckets"
    if tiles_pay(*shape, tile_size):
        return "tiles"
    return "buffers"


def make_dispatcher(gates, num_selected_experts, capacity,
                    batch_priority=False, valid=None, implementation="einsum",
                    dtype=None, tile_size=None, row_buckets=False):
    """Routes `gates` [G, S, E] and returns a dispatcher for the experts.

    With the gather path: `row_buckets=True` (for inference) runs the
    experts on each expert's rows at a few static sizes
    (`BucketDispatcher`) where that saves rows (`buckets_pay`); else
    `tile_size` lays the kept tokens out in tiles of this many rows sorted
    by expert (`TiledDispatcher`) when that stores fewer rows than the
    capacity buffers (`tiles_pay`); None or 0 keeps the capacity buffers.
    """
    implementation = resolve_dispatcher(implementation)
    expert_index, buffer_index = top_experts_per_item(
        gates, num_selected_experts, batch_priority, valid)
    if implementation == "gather":
        layout = gather_layout(*gates.shape, num_selected_experts, capacity,
                               tile_size, row_buckets)
        if layout == "buckets":
            return BucketDispatcher(gates, expert_index, buffer_index,
                                    capacity, dtype=dtype)
        if layout == "tiles":
            return TiledDispatcher(gates, expert_index, buffer_index,
                                   capacity, tile_size, dtype=dtype)
        return GatherDispatcher(gates, expert_index, buffer_index, capacity,
                                dtype=dtype)
    num_experts = gates.shape[-1]
    # [G, S, K] -> [G, S, E]: the buffer slot of each token at each expert
    # (-1 where the expert was not selected).
    chosen = one_hot(expert_index, num_experts, dtype="int32")
    slot = ops.sum(chosen * (buffer_index[..., None] + 1), axis=2) - 1
    dispatch_mask = ops.equal(slot[..., None],
                              ops.arange(capacity, dtype="int32"))
    combine_weights = gates[..., None] * ops.cast(dispatch_mask, gates.dtype)
    return EinsumDispatcher(combine_weights, dispatch_mask, dtype=dtype)
