"""Noisy top-K router (V-MoE) with E³'s partitioned (ensemble) routing."""

import keras
from keras import ops

from keras_e3.layers.dispatch import DispatchOptions
from keras_e3.layers.dispatch import top_k_dispatcher
from keras_e3.layers.portable_ops import one_hot


def check_experts(num_experts, num_selected_experts, ensemble_size):
    """The E³ partition rule, the one place it is checked: `ensemble_size`
    M >= 1 divides `num_experts` E into equal partitions, and each token
    copy picks K (`num_selected_experts`) experts of its own partition:
    1 <= K <= E / M."""
    if ensemble_size < 1:
        raise ValueError(f"ensemble_size must be >= 1; got {ensemble_size}.")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1; got {num_experts}.")
    if num_experts % ensemble_size:
        raise ValueError(f"ensemble_size={ensemble_size} must divide "
                         f"num_experts={num_experts}: E³ partitions the "
                         f"experts into ensemble_size equal groups.")
    per_member = num_experts // ensemble_size
    if not 1 <= num_selected_experts <= per_member:
        raise ValueError(
            f"num_selected_experts (K) = {num_selected_experts} must be "
            f"between 1 and the experts per ensemble member "
            f"({num_experts} / {ensemble_size} = {per_member}).")


def importance_loss(gates, valid=None):
    """(std / mean)^2 over experts of the summed gates. gates [..., S, E]."""
    if valid is not None:
        gates = gates * ops.cast(valid, gates.dtype)[..., None]
    importance = ops.sum(gates, axis=-2)
    return ops.var(importance, axis=-1) / ops.mean(importance, axis=-1) ** 2


def load_loss(logits, logits_noisy, noise_std, num_selected_experts,
              valid=None):
    """vmoe's load loss: how evenly experts would be picked under re-noising.

    For each token the threshold is its K-th largest noisy logit;
    p(token, expert) = 1 - Phi((threshold - clean logit) / noise_std) and the
    loss is (std / mean)^2 over experts of p averaged over (valid) tokens.
    logits, logits_noisy: [..., S, E].
    """
    threshold = ops.top_k(logits_noisy, num_selected_experts)[0][..., -1:]
    z = (threshold - logits) / noise_std
    p = 1.0 - 0.5 * (1.0 + ops.erf(z / ops.sqrt(2.0)))
    if valid is None:
        p_mean = ops.mean(p, axis=-2)
    else:
        w = ops.cast(valid, p.dtype)[..., None]
        p_mean = ops.sum(p * w, axis=-2) / ops.sum(w, axis=-2)
    return ops.var(p_mean, axis=-1) / ops.mean(p_mean, axis=-1) ** 2


def gshard_loss(gates, valid=None):
    """GShard's auxiliary loss (mean gate x fraction of top-1), times E^2."""
    num_experts = gates.shape[-1]
    top1 = one_hot(ops.argmax(gates, axis=-1), num_experts,
                       dtype=gates.dtype)
    if valid is None:
        mean_gates = ops.mean(gates, axis=-2)
        mean_top1 = ops.mean(top1, axis=-2)
    else:
        w = ops.cast(valid, gates.dtype)[..., None]
        count = ops.sum(w, axis=-2)
        mean_gates = ops.sum(gates * w, axis=-2) / count
        mean_top1 = ops.sum(top1 * w, axis=-2) / count
    return ops.mean(mean_top1 * mean_gates, axis=-1) * num_experts ** 2


@keras.saving.register_keras_serializable(package="keras_e3")
class Router(keras.layers.Layer):
    """Noisy top-K gating over `num_experts` experts, partitioned for E³.

    With `ensemble_size` M > 1 the experts are split into M consecutive
    partitions of E/M experts, and the tokens of each group are expected
    interleaved by member (group position s*M + m belongs to member m, as
    vmoe arranges them). Member m is gated with `kernel[:, m, :]` over its
    own partition only, so the [S, E] gates are block-diagonal.
    With M = 1 this is vmoe's NoisyTopExpertsPerItemRouter (kernel [H, E]).

    In training (and `noise_std > 0`), Gaussian noise of std
    `noise_std / (E / M)` is added to the logits; the returned gates are then
    the softmax of the noisy logits, while the importance loss uses the
    clean ones (as vmoe).

    `call(x, valid=None, training=None)` takes x [G, S, H] and returns
    (gates [G, S, E], metrics) where metrics holds `importance_loss`,
    `gshard_loss`, `auxiliary_loss` and, in training, `load_loss`, each
    [G, M]. The weighted mean auxiliary loss is added with `add_loss`; the
    metrics travel up as return values (`MoeMlp(..., return_metrics=True)`,
    the backbone's `return_router_metrics`), never as layer state.
    `route` (the router contract of `keras_e3.layers.dispatch`) returns
    (a `Dispatcher` of these gates, metrics).

    Args:
        num_experts: E.
        num_selected_experts: K, experts per token copy (<= E / M).
        ensemble_size: M, the E³ members (1: V-MoE).
        noise_std: training noise, std noise_std / (E / M) on the logits.
        importance_loss_weight, load_loss_weight, gshard_loss_weight:
            weights of the auxiliary losses in the added loss.
        kernel_initializer: the [H, E] (or [H, M, E/M]) kernel's.
        seed: seed of the noise.

    Example:

    ```python
    import numpy as np
    from keras_e3.layers import Router
    from keras_e3.layers.dispatch import DispatchOptions

    router = Router(num_experts=4, num_selected_experts=2)
    x = np.ones((2, 8, 16), "float32")
    gates, metrics = router(x)  # [2, 8, 4], {"importance_loss": [2, 1], ...}
    dispatcher, metrics = router.route(
        x, options=DispatchOptions(capacity=4, layout="buffers"))
    ```
    """

    def __init__(self, num_experts, num_selected_experts=1, ensemble_size=1,
                 noise_std=1.0, importance_loss_weight=0.005,
                 load_loss_weight=0.005, gshard_loss_weight=0.0,
                 kernel_initializer="lecun_normal", seed=None, **kwargs):
        super().__init__(**kwargs)
        check_experts(num_experts, num_selected_experts, ensemble_size)
        self.num_experts = num_experts
        self.num_selected_experts = num_selected_experts
        self.ensemble_size = ensemble_size
        self.noise_std = noise_std
        self.importance_loss_weight = importance_loss_weight
        self.load_loss_weight = load_loss_weight
        self.gshard_loss_weight = gshard_loss_weight
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    @property
    def experts_per_member(self):
        return self.num_experts // self.ensemble_size

    def build(self, input_shape):
        hidden = input_shape[-1]
        shape = ((hidden, self.num_experts) if self.ensemble_size == 1 else
                 (hidden, self.ensemble_size, self.experts_per_member))
        self.kernel = self.add_weight(
            name="kernel", shape=shape, initializer=self.kernel_initializer)

    def call(self, x, valid=None, training=None):
        m, e = self.ensemble_size, self.experts_per_member
        hidden = x.shape[-1]
        group_size = x.shape[1]
        if group_size is not None and group_size % m:
            raise ValueError(f"group_size={group_size} must be a multiple of "
                             f"ensemble_size={m}.")
        # [G, S, H] -> [G, S/M, M, H]; member-wise logits [G, S/M, M, E/M].
        # One matmul of every token against every member's experts, then
        # each token's own member's logits: an einsum batched over members
        # ("gsmh,hme->gmse") made XLA copy x transposed, member-major (2%
        # of E³ S/32 inference on CPU); the extra logits are M*E wide.
        xm = ops.reshape(x, (-1, group_size // m, m, hidden))
        kernel = ops.reshape(ops.cast(self.kernel, x.dtype), (hidden, m * e))
        logits = ops.reshape(ops.matmul(xm, kernel),
                             (-1, group_size // m, m, m, e))
        own = ops.cast(ops.eye(m), "bool")[None, None, :, :, None]
        logits = ops.sum(ops.where(own, logits, ops.zeros_like(logits)),
                         axis=3)
        logits = ops.transpose(logits, (0, 2, 1, 3))
        vm = None
        if valid is not None:
            vm = ops.transpose(ops.reshape(valid, (-1, group_size // m, m)),
                               (0, 2, 1))
        gates = ops.softmax(logits, axis=-1)
        metrics = {"importance_loss": importance_loss(gates, vm)}
        weighted = [(self.importance_loss_weight, metrics["importance_loss"])]
        if training and self.noise_std > 0:
            noise_std = self.noise_std / e
            noisy = logits + noise_std * keras.random.normal(
                ops.shape(logits), dtype=logits.dtype, seed=self.seed_generator)
            gates = ops.softmax(noisy, axis=-1)
            metrics["load_loss"] = load_loss(
                logits, noisy, noise_std, self.num_selected_experts, vm)
            weighted.append((self.load_loss_weight, metrics["load_loss"]))
        metrics["gshard_loss"] = gshard_loss(gates, vm)
        weighted.append((self.gshard_loss_weight, metrics["gshard_loss"]))
        aux = ops.zeros_like(metrics["importance_loss"])
        for weight, value in weighted:
            if weight > 0:
                aux = aux + weight * value
        # Every metric is [G, M], like vmoe's vmapped ensemble router.
        metrics["auxiliary_loss"] = aux
        self.add_loss(ops.mean(aux))
        # Block-diagonal gates: [G, M, S/M, E/M] -> [G, S/M, M, M, E/M]
        # (zero unless the two member axes agree) -> [G, S, E].
        gates = ops.transpose(gates, (0, 2, 1, 3))
        if m > 1:
            eye = ops.eye(m, dtype=gates.dtype)[:, :, None]
            gates = gates[:, :, :, None, :] * eye
        gates = ops.reshape(gates, (-1, group_size, self.num_experts))
        return gates, metrics

    def route(self, x, valid=None, training=None, options=None):
        """The router contract: x [G, S, H] -> (dispatcher, metrics).

        `options` (a `DispatchOptions`): `capacity`, `layout` (as
        `dispatch_plan` names it), `batch_priority`, `dtype`, `tile_size`.
        """
        options = options or DispatchOptions(capacity=x.shape[1])
        gates, metrics = self(x, valid=valid, training=training)
        dispatcher = top_k_dispatcher(
            gates, self.num_selected_experts, options.capacity,
            options.layout, batch_priority=options.batch_priority,
            valid=valid, dtype=options.dtype, tile_size=options.tile_size)
        return dispatcher, metrics

    def get_config(self):
        config = super().get_config()
        config.update(
            num_experts=self.num_experts,
            num_selected_experts=self.num_selected_experts,
            ensemble_size=self.ensemble_size,
            noise_std=self.noise_std,
            importance_loss_weight=self.importance_loss_weight,
            load_loss_weight=self.load_loss_weight,
            gshard_loss_weight=self.gshard_loss_weight,
            kernel_initializer=keras.initializers.serialize(
                self.kernel_initializer),
            seed=self.seed,
        )
        return config
