"""Soft MoE (vmoe's `vmoe.projects.soft_moe.router.SoftRouter`, arXiv
2308.00951): every expert has P slots; each slot takes a convex combination
of the group's tokens, and each token a convex combination of all slot
outputs. Dispatch and combine are batched matmuls.

Notation: G groups, S tokens per group, H features, E experts, P slots per
expert.
"""

import keras
from keras import ops

from keras_e3.layers.dispatch import DispatchOptions
from keras_e3.layers.dispatch import Dispatcher
from keras_e3.layers.dispatch import compute_capacity

NORMALIZE_EPSILON = 1e-6


def l2_normalize(x, axis):
    """x * rsqrt(sum(x^2) + 1e-6) along `axis` (vmoe's `normalize`)."""
    return x * ops.rsqrt(ops.sum(ops.square(x), axis=axis, keepdims=True)
                         + NORMALIZE_EPSILON)


def soft_moe_num_slots(group_size, num_experts, capacity_factor):
    """vmoe's slots per expert from a capacity factor:
    round(S * capacity_factor / E) (Python's round, half to even), no
    rounding to a multiple."""
    return compute_capacity(group_size, num_experts, 1, capacity_factor,
                            multiple_of=1, ceil_or_round="round")


def _masked_extremes(sim, eye):
    """min / max of a similarity matrix off its diagonal (the diagonal set
    to the off-diagonal maximum, as vmoe)."""
    masked = (1.0 - eye) * sim
    masked = masked + eye * ops.max(masked)
    return ops.min(masked), ops.max(masked)


def soft_moe_metrics(dispatch_weights, combine_weights, mu, similarity=True):
    """vmoe's SoftRouter metrics (scalars over all groups)."""
    g, m, n, p = dispatch_weights.shape
    groups = ops.shape(dispatch_weights)[0]
    metrics = {
        "auxiliary_loss": ops.zeros((), "float32"),
        "combine_weights_min_mean": ops.mean(
            ops.min(combine_weights, axis=(2, 3))),
        "combine_weights_max_mean": ops.mean(
            ops.max(combine_weights, axis=(2, 3))),
        "dispatch_weights_min_mean": ops.mean(
            ops.min(dispatch_weights, axis=1)),
        "dispatch_weights_max_mean": ops.mean(
            ops.max(dispatch_weights, axis=1)),
    }
    if not similarity:
        return metrics
    groups_f = ops.cast(groups, "float32")
    # Tokens' combine weights: [G, S, S].
    cw = ops.reshape(combine_weights, (-1, m, n * p))
    cw = cw * ops.rsqrt(ops.sum(ops.square(cw), axis=-1, keepdims=True)
                        + 1e-9)
    cw_sim = ops.einsum("gsk,gtk->gst", cw, cw)
    low, high = _masked_extremes(cw_sim, ops.eye(m)[None])
    metrics["combine_weights_similarity_min"] = low
    metrics["combine_weights_similarity_max"] = high
    metrics["combine_weights_similarity_mean"] = (
        (ops.sum(cw_sim) - groups_f * m) / (groups_f * m * (m - 1)))
    # Slots' dispatch weights: [G, E*P, E*P].
    dw = ops.reshape(dispatch_weights, (-1, m, n * p))
    dw = dw * ops.rsqrt(ops.sum(ops.square(dw), axis=1, keepdims=True)
                        + 1e-9)
    dw_sim = ops.einsum("gsk,gsl->gkl", dw, dw)
    low, high = _masked_extremes(dw_sim, ops.eye(n * p)[None])
    metrics["dispatch_weights_similarity_min"] = low
    metrics["dispatch_weights_similarity_max"] = high
    metrics["dispatch_weights_similarity_mean"] = (
        (ops.sum(dw_sim) - groups_f * n * p)
        / (groups_f * n * p * (n * p - 1)))
    # The slots' parameters: [E*P, E*P].
    mu = ops.reshape(mu, (-1, n * p))
    mu = mu * ops.rsqrt(ops.sum(ops.square(mu), axis=0, keepdims=True)
                        + 1e-9)
    mu_sim = ops.matmul(ops.transpose(mu), mu)
    low, high = _masked_extremes(mu_sim, ops.eye(n * p))
    metrics["mu_similarity_min"] = low
    metrics["mu_similarity_max"] = high
    metrics["mu_similarity_mean"] = (
        (ops.sum(mu_sim) - n * p) / (n * p * (n * p - 1)))
    return metrics


class SoftDispatcher(Dispatcher):
    """Soft MoE's dispatch and combine as batched matmuls.

    `dispatch`: tokens [G, S, H] -> slots [E, G*P, H], each slot the
    `dispatch_weights`-weighted sum of its group's tokens. `combine`: slot
    outputs [E, G*P, H] -> tokens [G, S, H] weighted by `combine_weights`.
    Both weights are [G, S, E, P] and stay float32.

    `dtype="bfloat16"` (vmoe always wraps Soft MoE's dispatcher in its
    `Bfloat16Dispatcher`): the tokens and the expert outputs are rounded to
    bfloat16 before the (float32) matmuls, exactly as there, gradients
    included. `dtype=None` skips the rounding: not vmoe bit for bit (about
    1e-4 on the logits of the fixtures).
    """

    layout = "soft"

    def __init__(self, dispatch_weights, combine_weights, dtype="bfloat16"):
        self.dispatch_weights = dispatch_weights
        self.combine_weights = combine_weights
        self.dtype = dtype
        self.num_experts, self.num_slots = dispatch_weights.shape[2:]

    def _rounded(self, x):
        if self.dtype is None or self.dtype == "float32":
            return x
        return ops.cast(ops.cast(x, self.dtype), x.dtype)

    def dispatch(self, x):
        dtype = x.dtype
        g, s, n, p = self.dispatch_weights.shape
        hidden = x.shape[-1]
        weights = ops.reshape(self.dispatch_weights, (-1, s, n * p))
        x = ops.cast(self._rounded(x), weights.dtype)
        y = ops.matmul(ops.transpose(weights, (0, 2, 1)), x)  # [G, E*P, H]
        y = ops.reshape(y, (-1, n, p, hidden))
        y = ops.reshape(ops.transpose(y, (1, 0, 2, 3)), (n, -1, hidden))
        return ops.cast(y, dtype)

    def combine(self, y):
        dtype = y.dtype
        g, s, n, p = self.combine_weights.shape
        hidden = y.shape[-1]
        y = ops.cast(self._rounded(y), self.combine_weights.dtype)
        y = ops.transpose(ops.reshape(y, (n, -1, p, hidden)), (1, 0, 2, 3))
        y = ops.reshape(y, (-1, n * p, hidden))
        weights = ops.reshape(self.combine_weights, (-1, s, n * p))
        return ops.cast(ops.matmul(weights, y), dtype)  # [G, S, H]

    def routing(self):
        """The `dispatch_weights` and `combine_weights` [G, S, E, P]."""
        return dict(dispatch_weights=self.dispatch_weights,
                    combine_weights=self.combine_weights)


@keras.saving.register_keras_serializable(package="keras_e3")
class SoftRouter(keras.layers.Layer):
    """vmoe's SoftRouter: dispatch and combine weights of Soft MoE.

    Tokens x [G, S, H] and the slot parameters `mu` [H, E, P] are
    L2-normalised over H (x * rsqrt(sum x^2 + 1e-6)); the learned scalar
    `scale` multiplies whichever of the two is smaller (x if G*S*H <
    H*E*P, as vmoe; mu when the number of groups is not known when
    tracing); logits [G, S, E, P] = einsum(x, mu), plus Gaussian noise of
    std `noise_std` in training. Dispatch weights: softmax over the S
    tokens (padding tokens excluded); combine weights: softmax over all
    E*P slots. No auxiliary loss.

    P is `num_slots`, or `round(group_size * capacity_factor / E)`.

    `call` returns (dispatch [G, S, E, P], combine [G, S, E, P], mu);
    `route` (the router contract) returns (a `SoftDispatcher`, metrics).

    Example:

    ```python
    import numpy as np
    from keras_e3.layers.soft_moe import SoftRouter

    router = SoftRouter(num_experts=4, group_size=8, num_slots=2)
    dispatcher, metrics = router.route(np.ones((2, 8, 16), "float32"))
    dispatcher.dispatch(np.ones((2, 8, 16), "float32")).shape  # (4, 4, 16)
    ```
    """

    def __init__(self, num_experts, group_size, num_slots=None,
                 capacity_factor=None, noise_std=0.0,
                 mu_initializer="lecun_normal", seed=None, **kwargs):
        super().__init__(**kwargs)
        if num_slots is not None and capacity_factor is not None:
            raise ValueError(
                f"Soft MoE takes num_slots or capacity_factor, not both "
                f"(got num_slots={num_slots}, "
                f"capacity_factor={capacity_factor}).")
        self.num_experts = num_experts
        self.group_size = group_size
        self.capacity_factor = capacity_factor
        if num_slots is None:
            num_slots = soft_moe_num_slots(
                group_size, num_experts,
                1.0 if capacity_factor is None else capacity_factor)
        elif num_slots < 1:
            raise ValueError(f"num_slots must be >= 1; got {num_slots}.")
        self.num_slots = int(num_slots)
        self.noise_std = noise_std
        self.mu_initializer = keras.initializers.get(mu_initializer)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        self.mu = self.add_weight(
            name="mu", shape=(input_shape[-1], self.num_experts,
                              self.num_slots),
            initializer=self.mu_initializer)
        self.scale = self.add_weight(name="scale", shape=(),
                                     initializer="ones")

    def call(self, x, valid=None, training=None):
        x = l2_normalize(x, axis=-1)
        mu = l2_normalize(ops.cast(self.mu, x.dtype), axis=0)
        scale = ops.cast(self.scale, x.dtype)
        groups = x.shape[0]
        if groups is not None and groups * x.shape[1] < \
                self.num_experts * self.num_slots:
            x = x * scale
        else:
            mu = mu * scale
        logits = ops.einsum("gsh,hep->gsep", x, mu)
        if training and self.noise_std > 0:
            logits = logits + self.noise_std * keras.random.normal(
                ops.shape(logits), dtype=logits.dtype,
                seed=self.seed_generator)
        shape = ops.shape(logits)
        flat = ops.reshape(logits, (shape[0], shape[1], -1))
        combine = ops.reshape(ops.softmax(flat, axis=-1), shape)
        if valid is not None:
            logits = ops.where(valid[:, :, None, None], logits,
                               ops.full_like(logits, -1e9))
        dispatch = ops.softmax(logits, axis=1)
        return dispatch, combine, mu

    def route(self, x, valid=None, training=None, options=None):
        """The router contract: x [G, S, H] -> (dispatcher, metrics).

        `options.dtype` rounds the data movements (default bfloat16, as
        vmoe; "float32": no rounding); `options.inspect` adds the token
        and slot similarity statistics ([G, S, S] intermediates).
        """
        options = options or DispatchOptions(capacity=self.num_slots,
                                             layout="soft")
        dispatch, combine, mu = self(x, valid=valid, training=training)
        dispatcher = SoftDispatcher(dispatch, combine,
                                    dtype=options.dtype or "bfloat16")
        metrics = soft_moe_metrics(dispatch, combine, mu,
                                   similarity=bool(options.inspect))
        return dispatcher, metrics

    def get_config(self):
        config = super().get_config()
        config.update(num_experts=self.num_experts,
                      group_size=self.group_size, num_slots=self.num_slots,
                      noise_std=self.noise_std,
                      mu_initializer=keras.initializers.serialize(
                          self.mu_initializer),
                      seed=self.seed)
        return config
