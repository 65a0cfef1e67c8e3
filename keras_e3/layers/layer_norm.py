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

    On PyTorch (eager), and for `rms_scaling` or other axes, Keras' own
    (`F.layer_norm`, one fused kernel, on PyTorch).
    """

    def call(self, inputs):
        if (self.rms_scaling or keras.backend.backend() == "torch"
                or list(self.axis) not in ([-1], [len(inputs.shape) - 1])):
            return super().call(inputs)
        dtype = keras.backend.result_type(inputs.dtype, "float32")
        x = ops.cast(inputs, dtype)
        # Reduced to [..., ] and reshaped to [..., 1] as Flax does:
        # keepdims=True gives XLA a [..., 1] layout to copy in the backward
        # pass, and it then recomputes the residual stream's gradient in
        # each of its consumers instead of once.
        mean = ops.mean(x, axis=-1)
        mean2 = ops.mean(ops.square(x), axis=-1)
        var = ops.maximum(0.0, mean2 - ops.square(mean))
        stats_shape = tuple(ops.shape(x)[:-1]) + (1,)
        mul = ops.reshape(ops.rsqrt(var + self.epsilon), stats_shape)
        if self.gamma is not None:
            mul = mul * ops.cast(self.gamma, dtype)
        y = (x - ops.reshape(mean, stats_shape)) * mul
        if self.beta is not None:
            y = y + ops.cast(self.beta, dtype)
        return ops.cast(y, self.compute_dtype)
