"""The experts' MLP over rows sorted by expert, one tile at a time.

`TiledDispatcher` lays the kept tokens out as [num_tiles * tile, H] rows,
each tile belonging to one expert, the used tiles first. `expert_tiles`
runs tile i through expert tile_expert[i] (a [tile, H] x [H, F] matmul,
GELU, [tile, F] x [F, H]) and skips the unused tiles, so the work follows
the routed tokens instead of E x capacity slots.

With `differentiable=True` the loop has a hand-written backward pass that
is a second loop over the same tiles, accumulating each tile's weight
gradients into its expert's slice only; autodiff of the forward loop would
carry (and add) the gradient of every expert's weights at every tile. The
forward pass then keeps the pre-activations [rows, F] for the backward.

`approximate` (every function here): True for Flax's tanh GELU (vmoe's
experts), False for the exact erf GELU (experts upcycled from timm or
keras-hub ViTs).
"""

import math

import keras
from keras import ops

_GELU_C = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def gelu(x, approximate=True):
    """GELU: Flax's default nn.gelu, the tanh approximation (vmoe's MLPs),
    or with `approximate=False` the exact x Φ(x) (PyTorch's nn.GELU).

    On JAX its gradient is written out (`gelu_grad` of the pre-activation,
    recomputed in the backward pass): autodiff keeps the tanh (or erf) of
    the forward pass too, one more [rows, F] tensor per MLP, and XLA
    computes the forward pass in two loop fusions instead of one. ViT S/32
    training step (JAX, batch 32, one profile each): the dense MLPs'
    forward 299 -> 274 ms, backward 502 -> 475 ms (PERFORMANCE.md, "Third
    round")."""
    if keras.backend.backend() == "jax":
        return (_gelu_tanh if approximate else _gelu_erf)(x)
    return keras.activations.gelu(x, approximate=approximate)


def _gelu_with_gradient(approximate):
    @ops.custom_gradient
    def forward(x):
        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            return upstream * gelu_grad(x, approximate)
        return keras.activations.gelu(x, approximate=approximate), grad
    return forward


_gelu_tanh = _gelu_with_gradient(True)
_gelu_erf = _gelu_with_gradient(False)


def gelu_grad(x, approximate=True):
    """d gelu / dx. Tanh form: 0.5 (1 + t) + 0.5 x (1 - t²) c (1 + 3 a x²),
    t = tanh(c (x + a x³)), c = sqrt(2 / pi), a = 0.044715. Exact form:
    Φ(x) + x φ(x) = 0.5 (1 + erf(x / √2)) + x exp(-x² / 2) / √(2π)."""
    if not approximate:
        return 0.5 * (1.0 + ops.erf(x * _INV_SQRT_2)) + x * ops.exp(
            -0.5 * x * x) * _INV_SQRT_2PI
    t = ops.tanh(_GELU_C * (x + 0.044715 * x * x * x))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _GELU_C * (
        1.0 + 3 * 0.044715 * x * x)


def expert_mlp(rows, kernel_0, bias_0, kernel_1, bias_1, approximate=True):
    """One expert's MLP on rows [N, H] (its unstacked weights), or every
    expert's on [E, N, H] (stacked weights, biases [E, 1, ...])."""
    return _mlp_forward(rows, kernel_0, bias_0, kernel_1, bias_1,
                        approximate)[0]


def _mlp_forward(rows, kernel_0, bias_0, kernel_1, bias_1, approximate):
    """`expert_mlp` and the pre-activations [..., F] its backward pass
    needs: (y, pre)."""
    pre = ops.matmul(rows, kernel_0) + bias_0
    return ops.matmul(gelu(pre, approximate), kernel_1) + bias_1, pre


def _mlp_backward(rows, pre, dy, kernel_0, kernel_1, approximate):
    """Gradients (rows, kernel_0, bias_0, kernel_1, bias_1) of one expert's
    MLP on rows [N, H] from dy [N, H] and its pre-activations.

    Products with the expert's kernels transposed inside the dot
    (contracting their last axis): XLA's CPU backend (YNNPACK) runs them as
    fast as on kernels transposed beforehand, and a step no longer
    transposes every expert's kernels, [E, H, F] and [E, F, H], at each
    call (4 copies of 32 MB, ~22 ms each, in the E³ S/32 training step;
    PERFORMANCE.md, "Third round")."""
    d_pre = ops.einsum("th,fh->tf", dy, kernel_1) * gelu_grad(pre,
                                                              approximate)
    return (ops.einsum("tf,hf->th", d_pre, kernel_0),
            ops.matmul(ops.transpose(rows), d_pre), ops.sum(d_pre, 0),
            ops.matmul(ops.transpose(gelu(pre, approximate)), dy),
            ops.sum(dy, 0))


def _expert(params, e):
    """Expert e's slices of the stacked [E, ...] weights."""
    return [_segment(w, e) for w in params]


def _segment(a, e):
    """a[e] of a stacked [E, ...] array, e a traced index."""
    return ops.squeeze(ops.slice(a, (e,) + (0,) * (len(a.shape) - 1),
                                 (1,) + tuple(a.shape[1:])), 0)


def _tile(x, i, tile_size):
    return ops.slice(x, (i * tile_size, 0), (tile_size, x.shape[-1]))


def _add_to_expert(total, e, update):
    start = (e,) + (0,) * (len(total.shape) - 1)
    current = ops.slice(total, start, (1,) + tuple(total.shape[1:]))
    return ops.slice_update(total, start, current + update[None])


def _forward(x, params, tile_expert, num_used, tile_size, keep_pre,
             approximate=True):
    """y [rows, H] (and the pre-activations [rows, F] if keep_pre)."""
    num_tiles = x.shape[0] // tile_size
    mlp_dim = params[0].shape[-1]

    def run(i):
        return _mlp_forward(_tile(x, i, tile_size),
                            *_expert(params, tile_expert[i]), approximate)

    def skip():
        return (ops.zeros((tile_size, x.shape[-1]), x.dtype),
                ops.zeros((tile_size, mlp_dim), x.dtype))

    def body(i, carry):
        y, pre = ops.cond(i < num_used, lambda: run(i), skip)
        start = (i * tile_size, 0)
        if keep_pre:
            return (ops.slice_update(carry[0], start, y),
                    ops.slice_update(carry[1], start, pre))
        return (ops.slice_update(carry[0], start, y),)

    init = (ops.zeros_like(x),)
    if keep_pre:
        init += (ops.zeros((x.shape[0], mlp_dim), x.dtype),)
    return ops.fori_loop(0, num_tiles, body, init)


def _backward(dy, x, pre, params, tile_expert, num_used, tile_size,
              approximate=True):
    """Gradients (x, kernel_0, bias_0, kernel_1, bias_1) from dy [rows, H]."""
    num_tiles = x.shape[0] // tile_size
    kernels = [params[0], params[2]]

    def run(i, e):
        return _mlp_backward(*(_tile(a, i, tile_size) for a in (x, pre, dy)),
                             *_expert(kernels, e), approximate)

    def skip():
        return tuple(ops.zeros((tile_size,) + tuple(w.shape[1:]), x.dtype)
                     if n == 0 else ops.zeros(w.shape[1:], w.dtype)
                     for n, w in enumerate((x,) + tuple(params)))

    def body(i, grads):
        e = tile_expert[i]
        tile_grads = ops.cond(i < num_used, lambda: run(i, e), skip)
        dx = ops.slice_update(grads[0], (i * tile_size, 0), tile_grads[0])
        return (dx,) + tuple(_add_to_expert(total, e, update) for total, update
                             in zip(grads[1:], tile_grads[1:]))

    init = (ops.zeros_like(x),) + tuple(ops.zeros_like(w) for w in params)
    return ops.fori_loop(0, num_tiles, body, init)


def _grouped_eager(x, params, tile_expert, num_used, tile_size,
                   approximate=True):
    """`_forward` in eager mode (PyTorch): the tiles of one expert are
    contiguous, so each expert runs once, on all its rows in one product,
    whatever the tile size; the unused rows are zeros. Shapes may depend on
    the routing here: nothing is compiled."""
    num_used = int(ops.convert_to_numpy(num_used))
    counts = ops.convert_to_numpy(ops.bincount(
        tile_expert[:num_used], minlength=params[0].shape[0]))
    outputs, start = [], 0
    for e, tiles in enumerate(counts.tolist()):
        if not tiles:
            continue
        rows = x[start * tile_size:(start + tiles) * tile_size]
        outputs.append(expert_mlp(rows, *_expert(params, e),
                                  approximate=approximate))
        start += tiles
    outputs.append(ops.zeros((x.shape[0] - start * tile_size, x.shape[-1]),
                             x.dtype))
    return ops.concatenate(outputs, axis=0)


def _padded(a, rows):
    """a [n, ...] with zero rows appended up to `rows`."""
    return ops.pad(a, ((0, rows - a.shape[0]),) + ((0, 0),) * (a.ndim - 1))


# The training step's loops over at most this many experts are unrolled
# (benchmarks/expert_loop.py, one MoE layer's gradient at S/32's width, two
# runs: unrolled, 1.08-1.23x faster at E = 4 and 8; 0.93-1.02x at E = 16
# and 32, whose compile time it doubles to quadruples).
UNROLL_UP_TO = 8


def _loop_over_experts(sizes, rows_per_expert, branch, inputs, init,
                       training=False):
    """For each expert e: the outputs of `branch(B_e)` on (each of
    `inputs`' [E, ...] slices at e, ...), B_e the smallest of `sizes` that
    holds rows_per_expert[e], written at e into the [E, ...] arrays that
    `init()` returns (the branches' outputs, zero-filled).

    `training` (the training step's two loops: the forward pass that keeps
    the pre-activations, and the backward pass), with at most
    `UNROLL_UP_TO` experts: unrolled, one switch per expert on static
    slices and the results stacked once, which saves the loop's dynamic
    slices, in-place updates and zero fills (V-MoE S/32's training step
    1.02-1.06x, PERFORMANCE.md "Seventh round"). Inference keeps the loop:
    unrolled, E³ inference ran slower (0.95-0.98x) with three times the
    page faults.
    """
    limits = ops.convert_to_tensor(list(sizes[:-1]), "int32")
    branches = [branch(size) for size in sizes]

    def outputs_at(e, slices):
        index = ops.sum(ops.cast(limits < rows_per_expert[e], "int32"))
        return ops.switch(index, branches, *slices)

    num_experts = inputs[0].shape[0]
    if training and num_experts <= UNROLL_UP_TO:
        outputs = [outputs_at(e, [a[e] for a in inputs])
                   for e in range(num_experts)]
        return tuple(ops.stack([out[k] for out in outputs], axis=0)
                     for k in range(len(outputs[0])))

    def body(e, carry):
        outputs = outputs_at(e, [_segment(a, e) for a in inputs])
        return tuple(ops.slice_update(total, (e,) + (0,) * (total.ndim - 1),
                                      out[None])
                     for total, out in zip(carry, outputs))

    return ops.fori_loop(0, num_experts, body, tuple(init()))


def _segments_forward(x, params, rows_per_expert, sizes, keep_pre,
                      approximate=True):
    """y [E, bound, H] (and the pre-activations [E, bound, F] if
    keep_pre)."""
    num_experts, bound, hidden = x.shape
    mlp_dim = params[0].shape[-1]

    def branch(size):
        def run(rows, *weights):
            if size == 0:
                outputs = (ops.zeros((bound, hidden), rows.dtype),
                           ops.zeros((bound, mlp_dim), rows.dtype))
            else:
                outputs = tuple(_padded(a, bound) for a in _mlp_forward(
                    rows[:size], *weights, approximate))
            return outputs if keep_pre else outputs[:1]
        return run

    def init():
        if keep_pre:
            return [ops.zeros_like(x),
                    ops.zeros((num_experts, bound, mlp_dim), x.dtype)]
        return [ops.zeros_like(x)]

    return _loop_over_experts(sizes, rows_per_expert, branch,
                              [x] + list(params), init, training=keep_pre)


def _segments_backward(dy, x, pre, params, rows_per_expert, sizes,
                       approximate=True):
    """Gradients (x, kernel_0, bias_0, kernel_1, bias_1) from dy
    [E, bound, H]: each expert's from its first B_e rows (the rows past
    its own are zeros in x and dy: they add nothing)."""
    bound = x.shape[1]

    def branch(size):
        def run(x_e, pre_e, dy_e, kernel_0, kernel_1):
            if size == 0:
                return (ops.zeros_like(x_e), ops.zeros_like(kernel_0),
                        ops.zeros(kernel_0.shape[-1:], x_e.dtype),
                        ops.zeros_like(kernel_1),
                        ops.zeros(kernel_1.shape[-1:], x_e.dtype))
            d_rows, *d_weights = _mlp_backward(
                x_e[:size], pre_e[:size], dy_e[:size], kernel_0, kernel_1,
                approximate)
            return (_padded(d_rows, bound), *d_weights)
        return run

    def init():
        return [ops.zeros_like(x)] + [ops.zeros_like(w) for w in params]

    return _loop_over_experts(sizes, rows_per_expert, branch,
                              [x, pre, dy, params[0], params[2]], init,
                              training=True)


def expert_segments(x, params, rows_per_expert, sizes, differentiable=False,
                    approximate=True):
    """Each expert on the first rows of its own segment.

    x [E, bound, H]: expert e's rows at the start of x[e], rows_per_expert
    [E] of them. A loop over the experts; expert e runs on its first B_e
    rows, B_e the smallest of `sizes` (static, ascending, the last `bound`)
    that is at least rows_per_expert[e]: one compiled branch per size, so
    each product follows its expert's load. Rows past B_e are zeros.
    params: the stacked (kernel_0 [E, H, F], bias_0 [E, F], kernel_1
    [E, F, H], bias_1 [E, H]).

    With `differentiable=True` the loop has a hand-written backward pass, a
    second loop over the experts on the same rows (the gradient of a switch
    would carry every branch's intermediates); the forward pass then keeps
    the pre-activations [E, bound, F].
    """
    params = [ops.cast(getattr(w, "value", w), x.dtype) for w in params]
    if not differentiable:
        return _segments_forward(x, params, rows_per_expert, sizes,
                                 keep_pre=False, approximate=approximate)[0]

    @ops.custom_gradient
    def run(x, kernel_0, bias_0, kernel_1, bias_1):
        weights = (kernel_0, bias_0, kernel_1, bias_1)
        y, pre = _segments_forward(x, weights, rows_per_expert, sizes,
                                   keep_pre=True, approximate=approximate)

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            return _segments_backward(upstream, x, pre, weights,
                                      rows_per_expert, sizes, approximate)

        return y, grad

    return run(x, *params)


def expert_tiles(x, params, tile_expert, num_used, tile_size,
                 differentiable=False, approximate=True):
    """Rows [num_tiles * tile_size, H] through their experts.

    params: the stacked (kernel_0 [E, H, F], bias_0 [E, F],
    kernel_1 [E, F, H], bias_1 [E, H]); tile_expert [num_tiles] int;
    num_used: the number of used tiles (the rest are left at zero).
    """
    # Plain tensors in the compute dtype, not variables (TensorFlow's custom
    # gradient would otherwise want the variables' gradients separately).
    params = [ops.cast(getattr(w, "value", w), x.dtype) for w in params]
    if not differentiable and keras.backend.backend() == "torch":
        return _grouped_eager(x, params, tile_expert, num_used, tile_size,
                              approximate)
    if not differentiable:
        return _forward(x, params, tile_expert, num_used, tile_size,
                        keep_pre=False, approximate=approximate)[0]

    @ops.custom_gradient
    def run(x, kernel_0, bias_0, kernel_1, bias_1):
        weights = (kernel_0, bias_0, kernel_1, bias_1)
        y, pre = _forward(x, weights, tile_expert, num_used, tile_size,
                          keep_pre=True, approximate=approximate)

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            return _backward(upstream, x, pre, weights, tile_expert,
                             num_used, tile_size, approximate)

        return y, grad

    return run(x, *params)
