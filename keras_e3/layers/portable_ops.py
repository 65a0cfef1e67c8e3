"""`top_k` and `one_hot` written with ops that every export format reads;
`scatter` without Keras' per-index Python loop on PyTorch.

The routing of an exported model runs outside Keras: in TensorFlow loading
a SavedModel, in ONNX Runtime, in the LiteRT interpreter. These two ops
give exactly the results of `keras.ops.top_k` / `keras.ops.one_hot`, with
lowerings the converters handle (see each function).
"""

from keras import ops


def top_k(x, k):
    """`ops.top_k` over the last axis: (values, int32 indices), ties to the
    lower index.

    On JAX, K rounds of argmax instead: JAX serialises `lax.top_k` (a CHLO
    op) as a StableHLO composite that the TensorFlow loading an exported
    SavedModel may not read yet (jax 0.10 -> TensorFlow 2.21: "failed to
    deserialize portable artifact"); argmax and max lower to plain
    reductions. Same values, same indices (both pick the lowest index among
    equal values).
    """
    import keras

    if keras.backend.backend() != "jax":
        return ops.top_k(x, k)
    values, indices = [], []
    for i in range(k):
        index = ops.cast(ops.argmax(x, axis=-1), "int32")
        values.append(ops.max(x, axis=-1))
        indices.append(index)
        if i + 1 < k:
            chosen = one_hot(index, x.shape[-1], dtype="bool")
            x = ops.where(chosen, ops.cast(float("-inf"), x.dtype), x)
    return ops.stack(values, axis=-1), ops.stack(indices, axis=-1)


def one_hot(indices, depth, dtype="float32"):
    """`ops.one_hot(indices, depth, dtype=dtype)` as a comparison with
    arange(depth) (what XLA makes of a one-hot anyway): tf2onnx converts
    TensorFlow's OneHot of a rank > 1 index into an invalid ONNX node."""
    import keras

    dtype_of_indices = keras.backend.standardize_dtype(indices.dtype)
    hot = ops.equal(ops.expand_dims(indices, -1),
                    ops.arange(depth, dtype=dtype_of_indices))
    return hot if dtype == "bool" else ops.cast(hot, dtype)


def scatter(indices, values, shape):
    """`ops.scatter(indices, values, shape)`: zeros of `shape` with
    `values` added at `indices` [N, index depth] (repeated indices add up).

    On PyTorch one `index_put_(..., accumulate=True)`: Keras' torch
    `scatter` adds the N values one by one in a Python loop (N = G·S·K
    routed choices per MoE layer, thousands of small tensor ops a call)."""
    import keras

    if keras.backend.backend() != "torch":
        return ops.scatter(indices, values, shape)
    import torch

    indices = ops.convert_to_tensor(indices)
    values = ops.convert_to_tensor(values)
    out = torch.zeros(tuple(shape), dtype=values.dtype,
                      device=values.device)
    index = tuple(indices.reshape(-1, indices.shape[-1]).long().unbind(-1))
    return out.index_put_(index, values.reshape(
        -1, *out.shape[indices.shape[-1]:]), accumulate=True)
