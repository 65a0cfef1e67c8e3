"""Sparse mixture-of-experts MLP with routing groups (V-MoE and E³)."""

import keras
from keras import ops

from keras_e3.layers.dispatch import DISPATCHERS
from keras_e3.layers.dispatch import TILE_SIZE
from keras_e3.layers.dispatch import compute_capacity
from keras_e3.layers.dispatch import make_dispatcher
from keras_e3.layers.dispatch import tiles_supported
from keras_e3.layers.mlp import ExpertsMlp
from keras_e3.layers.router import Router


@keras.saving.register_keras_serializable(package="keras_e3")
class MoeMlp(keras.layers.Layer):
    """A V-MoE / E³ MoE layer: route tokens, run experts, combine outputs.

    Input and output: [B*M, T, H] (for E³, row b*M + m is member m of image
    b, as produced by `EnsembleTile`).

    Routing groups (as vmoe): the tokens of the whole batch are laid out in
    one sequence and cut into groups of `group_size` tokens that are routed
    independently (capacity competition happens inside a group). For E³
    (`ensemble_size` M > 1) tokens are first ordered [B, T, M], so a group
    holds all M copies of its tokens; `group_size` counts token copies and
    must be a multiple of M.

    A batch whose token count is not a multiple of `group_size` (one image,
    the last batch of `predict`) is not an error: the last group is filled
    up with padding tokens that are never dispatched, take no capacity and
    are left out of the auxiliary losses. Its real tokens therefore compete
    for the capacity of a full group.

    Capacity per expert and group is vmoe's: ceil(group_size * K *
    capacity_factor / E) rounded up to a multiple of 4.
    """

    def __init__(self, num_experts, mlp_dim, group_size,
                 num_selected_experts=1, capacity_factor=1.0,
                 batch_priority=False, ensemble_size=1, noise_std=1.0,
                 importance_loss_weight=0.005, load_loss_weight=0.005,
                 gshard_loss_weight=0.0, dropout_rate=0.0,
                 dispatcher="auto", dispatch_dtype=None, seed=None,
                 **kwargs):
        super().__init__(**kwargs)
        if dispatcher not in DISPATCHERS:
            raise ValueError(f"Unknown dispatcher {dispatcher!r}; expected "
                             f"one of {DISPATCHERS}.")
        if group_size < 1 or group_size % ensemble_size:
            raise ValueError(
                f"group_size={group_size} must be a positive multiple of "
                f"ensemble_size={ensemble_size} (it counts token copies).")
        self.num_experts = num_experts
        self.mlp_dim = mlp_dim
        self.group_size = group_size
        self.num_selected_experts = num_selected_experts
        self.capacity_factor = capacity_factor
        self.batch_priority = batch_priority
        self.ensemble_size = ensemble_size
        self.dropout_rate = dropout_rate
        self.dispatcher = dispatcher
        self.dispatch_dtype = dispatch_dtype
        # Rows per tile of the gather path's experts (TiledDispatcher); not
        # in the config: an execution detail the results do not depend on.
        self.tile_size = TILE_SIZE
        self.capacity = compute_capacity(group_size, num_experts,
                                         num_selected_experts, capacity_factor)
        self.router = Router(
            num_experts, num_selected_experts=num_selected_experts,
            ensemble_size=ensemble_size, noise_std=noise_std,
            importance_loss_weight=importance_loss_weight,
            load_loss_weight=load_loss_weight,
            gshard_loss_weight=gshard_loss_weight, seed=seed,
            dtype=self.dtype_policy, name="router")
        self.experts = ExpertsMlp(num_experts, mlp_dim, dropout_rate,
                                  dtype=self.dtype_policy, name="experts")

    def build(self, input_shape):
        hidden = input_shape[-1]
        self.router.build((None, self.group_size, hidden))
        self.experts.build((self.num_experts, None, hidden))

    def _to_groups(self, x):
        """[B*M, T, H] -> groups [G, S, H], valid mask or None, token count."""
        m, tokens, hidden = self.ensemble_size, x.shape[1], x.shape[2]
        if m > 1:  # [B, M, T, H] -> [B, T, M, H]
            x = ops.transpose(ops.reshape(x, (-1, m, tokens, hidden)),
                              (0, 2, 1, 3))
        flat = ops.reshape(x, (-1, hidden))
        num_tokens = ops.shape(flat)[0]
        # The group count and the padding are written so that they also
        # hold for a symbolic batch size (a SavedModel export with a
        # dynamic batch: JAX's shape polymorphism, TensorFlow's None): the
        # padded length is num_groups * group_size by construction, so the
        # reshape below never has to prove a divisibility.
        size = self.group_size
        num_groups = (num_tokens + size - 1) // size
        pad = num_groups * size - num_tokens
        valid = None
        if not isinstance(pad, int) or pad:
            flat = ops.concatenate(
                [flat, ops.zeros((pad, hidden), dtype=flat.dtype)], axis=0)
            valid = ops.reshape(
                ops.arange(num_groups * size) < num_tokens, (-1, size))
        groups = ops.reshape(flat, (num_groups, size, hidden))
        return groups, valid, num_tokens

    def _from_groups(self, y, num_tokens, tokens):
        m, hidden = self.ensemble_size, y.shape[-1]
        y = ops.reshape(y, (-1, hidden))[:num_tokens]
        if m > 1:  # [B, T, M, H] -> [B, M, T, H]
            y = ops.transpose(ops.reshape(y, (-1, tokens, m, hidden)),
                              (0, 2, 1, 3))
        return ops.reshape(y, (-1, tokens, hidden))

    def call(self, x, training=None, return_routing=False):
        groups, valid, num_tokens = self._to_groups(x)
        gates, metrics = self.router(groups, valid=valid, training=training)
        dispatcher = make_dispatcher(
            gates, self.num_selected_experts, self.capacity,
            batch_priority=self.batch_priority, valid=valid,
            implementation=self.dispatcher, dtype=self.dispatch_dtype,
            tile_size=self.expert_tile_size(training, return_routing))
        expert_outputs = dispatcher.run_experts(
            self.experts, dispatcher.dispatch(groups), training=training)
        y = dispatcher.combine(expert_outputs)
        y = self._from_groups(y, num_tokens, x.shape[1])
        if not return_routing:
            return y
        routing = dict(metrics, gates=gates, valid=valid,
                       expert_outputs=expert_outputs,
                       combine_weights=dispatcher.combine_weights,
                       dispatch_mask=dispatcher.dispatch_mask)
        return y, routing

    def expert_tile_size(self, training=None, return_routing=False):
        """Tiles for the gather path's experts (`TiledDispatcher`, used where
        they store fewer rows: `tiles_pay`), or None for the capacity
        buffers, which the routing intermediates, the expert-parallel
        layouts, the experts' dropout and some backends (`tiles_supported`)
        need."""
        if (return_routing or keras.distribution.distribution()
                or (training and self.dropout_rate)
                or not tiles_supported(training)):
            return None
        return self.tile_size

    def compute_output_spec(self, x, training=None, return_routing=False):
        if return_routing:
            raise ValueError("return_routing=True is for eager inspection.")
        return keras.KerasTensor(x.shape, dtype=self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        router = self.router
        config.update(
            num_experts=self.num_experts, mlp_dim=self.mlp_dim,
            group_size=self.group_size,
            num_selected_experts=self.num_selected_experts,
            capacity_factor=self.capacity_factor,
            batch_priority=self.batch_priority,
            ensemble_size=self.ensemble_size, noise_std=router.noise_std,
            importance_loss_weight=router.importance_loss_weight,
            load_loss_weight=router.load_loss_weight,
            gshard_loss_weight=router.gshard_loss_weight,
            dropout_rate=self.dropout_rate, dispatcher=self.dispatcher,
            dispatch_dtype=self.dispatch_dtype, seed=router.seed)
        return config
