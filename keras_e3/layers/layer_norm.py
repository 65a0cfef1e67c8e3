"""LayerNorm computed as Flax's `nn.LayerNorm` (vmoe's every norm)."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_e3")
class LayerNorm(keras.layers.LayerNormalization):
    """`keras.layers.LayerNormalization` (same weights, names and config)
    over the last axis, computed as Flax's `nn.LayerNorm`: mean and mean of
    squares in one pass over x, var = max(0, E[x²] - E[x]²), then
    (x - mean) · rsqrt(var + eps) · gamma + beta.

    Keras' own computes the variance as mean((x - mean)²): a second pass
    over a materialised x - mean. In a compiled JAX training step of ViT
    S/32 that is one more [tokens, width] tensor written and read per norm,
    forward and backward (PERFORMANCE.md, "Side by side with the official
    code"). Flax's form is the one the official code computes, so it is also
    the closer of the two to it. Statistics in float32, as Keras'.

    On JAX, with both scale and offset, the gradient is written out
    (`_layer_norm`): two row reductions and one elementwise pass, keeping
    only x and the row statistics. On PyTorch (eager), and for
    `rms_scaling` or other axes, Keras' own (`F.layer_norm`, one fused
    kernel, on PyTorch).
    """

    def call(self, inputs):
        if (self.rms_scaling or keras.backend.backend() == "torch"
                or list(self.axis) not in ([-1], [len(inputs.shape) - 1])):
            return super().call(inputs)
        dtype = keras.backend.result_type(inputs.dtype, "float32")
        x = ops.cast(inputs, dtype)
        if (keras.backend.backend() == "jax" and self.gamma is not None
                and self.beta is not None):
            y = _layer_norm(x, ops.cast(self.gamma, dtype),
                            ops.cast(self.beta, dtype), self.epsilon)
            return ops.cast(y, self.compute_dtype)
        mean, mul = _statistics(x, self.epsilon)
        if self.gamma is not None:
            mul = mul * ops.cast(self.gamma, dtype)
        y = (x - mean) * mul
        if self.beta is not None:
            y = y + ops.cast(self.beta, dtype)
        return ops.cast(y, self.compute_dtype)


def _statistics(x, epsilon):
    """Flax's one-pass mean and 1 / std over the last axis, each [..., 1].

    Reduced to [...] and reshaped to [..., 1] as Flax does: keepdims=True
    gives XLA a [..., 1] layout to copy in the backward pass, and it then
    recomputes the residual stream's gradient in each of its consumers
    instead of once."""
    mean = ops.mean(x, axis=-1)
    mean2 = ops.mean(ops.square(x), axis=-1)
    var = ops.maximum(0.0, mean2 - ops.square(mean))
    stats_shape = tuple(ops.shape(x)[:-1]) + (1,)
    return (ops.reshape(mean, stats_shape),
            ops.reshape(ops.rsqrt(var + epsilon), stats_shape))


@ops.custom_gradient
def _layer_norm(x, gamma, beta, epsilon):
    """Flax's LayerNorm of x [..., N] with its gradient written out (JAX):
    with x̂ = (x - mean) / std and ĝ = g · gamma,
    dx = (ĝ - mean(ĝ) - x̂ · mean(ĝ · x̂)) / std, dgamma = Σ g · x̂,
    dbeta = Σ g, keeping only x and the two [..., 1] statistics for the
    backward pass.

    Autodiff of the forward pass keeps more for the backward pass, and XLA
    turns its reductions over x · gamma into matrix-vector products with
    gamma broadcast to the whole [..., N] tensor first: in the ViT S/32
    training step the 17 norms' forward passes took 65 ms, 23 ms written
    out (PERFORMANCE.md, "Third round"). The variance's clamp at 0
    (Flax's max(0, E[x²] - E[x]²)) is taken as not active, as it is for
    any row whose features are not all equal.
    """
    mean, rstd = _statistics(x, epsilon)
    y = (x - mean) * (rstd * gamma) + beta

    def grad(*args, upstream=None):
        if upstream is None:
            (upstream,) = args
        x_hat = (x - mean) * rstd
        g_hat = upstream * gamma
        a = ops.mean(g_hat, axis=-1, keepdims=True)
        b = ops.mean(g_hat * x_hat, axis=-1, keepdims=True)
        dx = rstd * (g_hat - a - x_hat * b)
        rows = tuple(range(len(x.shape) - 1))
        return (dx, ops.sum(upstream * x_hat, axis=rows),
                ops.sum(upstream, axis=rows), None)

    return y, grad
