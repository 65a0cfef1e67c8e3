"""Sparse mixture-of-experts MLP with routing groups (V-MoE and E³)."""

import dataclasses

import keras
import numpy as np
from keras import ops

from keras_e3.layers.dispatch import DISPATCHERS
from keras_e3.layers.dispatch import buckets_supported
from keras_e3.layers.dispatch import compute_capacity
from keras_e3.layers.dispatch import default_tile_size
from keras_e3.layers.dispatch import make_dispatcher
from keras_e3.layers.dispatch import tiles_supported
from keras_e3.layers.experts_choice import ExpertsChoiceRouter
from keras_e3.layers.experts_choice import make_experts_choice_dispatcher
from keras_e3.layers.mlp import ExpertsMlp
from keras_e3.layers.router import Router
from keras_e3.layers.soft_moe import SoftDispatcher
from keras_e3.layers.soft_moe import SoftRouter
from keras_e3.layers.soft_moe import soft_moe_metrics

ROUTERS = ("top_k", "experts_choice", "soft")
# Router noise std when not given: vmoe's defaults.
DEFAULT_NOISE_STD = {"top_k": 1.0, "experts_choice": 1.0, "soft": 0.0}


def resolve_router_options(router="top_k", num_selected_experts=None,
                           capacity_factor=None, num_slots=None,
                           ensemble_size=1, batch_priority=False,
                           noise_std=None):
    """Checks the router settings; returns (num_selected_experts,
    capacity_factor, noise_std) with the defaults of that router filled in.

    - "top_k": K defaults to 1, capacity_factor to 1.0; no num_slots.
    - "experts_choice": no K (each expert picks C tokens), capacity_factor
      defaults to 1.0; no num_slots, no batch_priority.
    - "soft": no K, no batch_priority; num_slots or capacity_factor, not
      both (neither: capacity_factor 1.0, vmoe's default).
    Experts Choice and Soft MoE do not combine with E³ (ensemble_size > 1):
    vmoe defines no partitioned version of them (its E³ router is top-K),
    so there is nothing to check such a model against.
    """
    if router not in ROUTERS:
        raise ValueError(f"router must be one of {ROUTERS}; got {router!r}.")
    if noise_std is None:
        noise_std = DEFAULT_NOISE_STD[router]
    if router == "top_k":
        if num_slots is not None:
            raise ValueError("num_slots is a Soft MoE setting "
                             '(router="soft"); top-K routing has a capacity '
                             "factor.")
        return (1 if num_selected_experts is None else num_selected_experts,
                1.0 if capacity_factor is None else capacity_factor,
                noise_std)
    if num_selected_experts is not None:
        raise ValueError(
            f"num_selected_experts={num_selected_experts} is for top-K "
            f'routing; router="{router}" selects no fixed number of experts '
            "per token (leave num_selected_experts unset).")
    if ensemble_size > 1:
        raise ValueError(
            f'router="{router}" does not combine with E³ ensembles '
            f"(ensemble_size={ensemble_size}): vmoe's E³ routes top-K within "
            "each member's experts, and defines no ensemble version of "
            'Experts Choice or Soft MoE. Use router="top_k".')
    if batch_priority:
        raise ValueError(f"batch_priority is for top-K routing, not "
                         f'router="{router}".')
    if router == "experts_choice":
        if num_slots is not None:
            raise ValueError("num_slots is a Soft MoE setting "
                             '(router="soft"); Experts Choice has a capacity '
                             "factor.")
        return None, 1.0 if capacity_factor is None else capacity_factor, \
            noise_std
    if num_slots is not None and capacity_factor is not None:
        raise ValueError(
            f"Soft MoE takes num_slots or capacity_factor, not both (got "
            f"num_slots={num_slots}, capacity_factor={capacity_factor}).")
    if num_slots is None and capacity_factor is None:
        capacity_factor = 1.0
    return None, capacity_factor, noise_std


DEFAULT_GROUP_IMAGES = 8


def default_group_size(tokens_per_image, ensemble_size=1, router="top_k"):
    """vmoe's default routing group: the token copies of 8 images, or of
    one image for Soft MoE (which mixes a group's tokens), as vmoe's Soft
    MoE configs."""
    images = 1 if router == "soft" else DEFAULT_GROUP_IMAGES
    return images * tokens_per_image * ensemble_size


def expert_axis_size(distribution=None):
    """How many devices the experts are split over under `distribution`
    (default: the active one); 1 when experts are not sharded."""
    distribution = distribution or keras.distribution.distribution()
    layout = None
    if isinstance(distribution, keras.distribution.ModelParallel):
        layout = distribution.get_tensor_layout("experts/kernel_0")
    if layout is None or layout.axes[0] is None:
        return 1
    mesh = layout.device_mesh
    return mesh.shape[mesh.axis_names.index(layout.axes[0])]


def check_num_experts(num_experts, distribution=None):
    """Raises a ValueError if the experts cannot be split evenly over the
    active distribution's expert axis."""
    size = expert_axis_size(distribution)
    if num_experts and num_experts % size:
        raise ValueError(
            f"num_experts={num_experts} cannot be sharded over an expert "
            f"axis of {size} devices: it must be a multiple of {size}.")


def ungroup(rows, num_tokens, tokens, ensemble_size=1):
    """Routing-group rows [G, S, ...] back to [B*M, T, ...] (row b*M + m is
    member m of image b): the inverse of the grouping `MoeMlp` routes, whose
    groups hold the token copies in [B, T, M] order, padding last.
    `num_tokens` (= B*T*M) drops the padding of a partial last group. Works
    on NumPy arrays (NumPy in, NumPy out) and on tensors."""
    xp = np if isinstance(rows, np.ndarray) else ops
    m, trailing = ensemble_size, tuple(rows.shape[2:])
    flat = xp.reshape(rows, (-1, *trailing))[:num_tokens]
    if m > 1:  # [B, T, M, ...] -> [B, M, T, ...]
        flat = xp.reshape(flat, (-1, tokens, m, *trailing))
        flat = xp.transpose(flat, (0, 2, 1, *range(3, 3 + len(trailing))))
    return xp.reshape(flat, (-1, tokens, *trailing))


@dataclasses.dataclass(frozen=True)
class MoeSettings:
    """The settings of a block's `MoeMlp` (all its arguments but `mlp_dim`),
    typed: what `E3ViTBackbone` hands to each MoE `EncoderBlock`, and what
    the block serialises (`get_config`, a plain dict)."""

    num_experts: int
    group_size: int
    num_selected_experts: int = None
    capacity_factor: float = None
    batch_priority: bool = False
    ensemble_size: int = 1
    noise_std: float = None
    importance_loss_weight: float = 0.005
    load_loss_weight: float = 0.005
    gshard_loss_weight: float = 0.0
    dropout_rate: float = 0.0
    dispatcher: str = "auto"
    dispatch_dtype: str = None
    seed: int = None
    router: str = "top_k"
    num_slots: int = None
    capacity_ceil_or_round: str = "ceil"
    capacity_multiple_of: int = 4

    @classmethod
    def from_config(cls, config):
        """From a `get_config` dict (or an instance, returned as it is)."""
        if isinstance(config, cls):
            return config
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - names)
        if unknown:
            raise ValueError(f"Unknown MoE settings {unknown}; expected some "
                             f"of {sorted(names)}.")
        return cls(**config)

    def get_config(self):
        """A JSON-able dict; the router-specific settings only where they
        differ from the top-K router's defaults (as older configs hold)."""
        config = dataclasses.asdict(self)
        if self.router == "top_k" and self.num_slots is None:
            del config["router"], config["num_slots"]
        if (self.capacity_ceil_or_round, self.capacity_multiple_of) == (
                "ceil", 4):
            del config["capacity_ceil_or_round"]
            del config["capacity_multiple_of"]
        return config


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
    capacity_factor / E) (or Python's round with `capacity_ceil_or_round=
    "round"`) rounded up to a multiple of `capacity_multiple_of` (4).

    `router` chooses the routing (`resolve_router_options` has the rules):
    "top_k" (V-MoE / E³, `Router`), "experts_choice" (each expert takes
    its top-C tokens, `ExpertsChoiceRouter`; C from the capacity factor
    with K = 1) or "soft" (Soft MoE, `SoftRouter`: `num_slots` slots per
    expert, or round(group_size * capacity_factor / E); dispatch and
    combine in bfloat16 as vmoe unless `dispatch_dtype="float32"`).
    Experts Choice and Soft MoE add no auxiliary loss.
    """

    def __init__(self, num_experts, mlp_dim, group_size,
                 num_selected_experts=None, capacity_factor=None,
                 batch_priority=False, ensemble_size=1, noise_std=None,
                 importance_loss_weight=0.005, load_loss_weight=0.005,
                 gshard_loss_weight=0.0, dropout_rate=0.0,
                 dispatcher="auto", dispatch_dtype=None, seed=None,
                 router="top_k", num_slots=None,
                 capacity_ceil_or_round="ceil", capacity_multiple_of=4,
                 **kwargs):
        super().__init__(**kwargs)
        num_selected_experts, capacity_factor, noise_std = \
            resolve_router_options(router, num_selected_experts,
                                   capacity_factor, num_slots, ensemble_size,
                                   batch_priority, noise_std)
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
        self.tile_size = default_tile_size()
        # Inference on the gather path runs the experts at a few static row
        # counts where the backend supports it (BucketDispatcher); False:
        # tiles or buffers, as in training. Not in the config either.
        self.row_buckets = True
        self.router_type = router
        self.num_slots = num_slots
        self.capacity_ceil_or_round = capacity_ceil_or_round
        self.capacity_multiple_of = capacity_multiple_of
        self.noise_std = noise_std
        self.importance_loss_weight = importance_loss_weight
        self.load_loss_weight = load_loss_weight
        self.gshard_loss_weight = gshard_loss_weight
        self.seed = seed
        if router == "soft":
            self.router = SoftRouter(
                num_experts, group_size, num_slots=num_slots,
                capacity_factor=capacity_factor, noise_std=noise_std,
                seed=seed, dtype=self.dtype_policy, name="router")
            self.capacity = self.router.num_slots
        else:
            self.capacity = compute_capacity(
                group_size, num_experts, num_selected_experts or 1,
                capacity_factor, multiple_of=capacity_multiple_of,
                ceil_or_round=capacity_ceil_or_round)
        if router == "experts_choice":
            if self.capacity > group_size:
                raise ValueError(
                    f"Experts Choice capacity {self.capacity} (from "
                    f"capacity_factor={capacity_factor}, group_size="
                    f"{group_size}, {num_experts} experts) exceeds the group "
                    "size: each expert takes C distinct tokens of its group.")
            self.router = ExpertsChoiceRouter(
                num_experts, noise_std=noise_std, seed=seed,
                dtype=self.dtype_policy, name="router")
        elif router == "top_k":
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

    def call(self, x, training=None, return_routing=False,
             return_metrics=False):
        """x [B*M, T, H] -> y of the same shape.

        `return_metrics=True`: (y, metrics), the router's statistics of
        this call (top-K: `importance_loss`, `gshard_loss`,
        `auxiliary_loss` and, in training, `load_loss`, each [G, M];
        Experts Choice and Soft MoE: vmoe's metrics of those routers).
        `return_routing=True` (eager inspection): (y, routing), the metrics
        plus the gates, dispatch and combine weights and expert outputs.
        """
        if self.router_type == "experts_choice":
            path = self._call_experts_choice
        elif self.router_type == "soft":
            path = self._call_soft
        else:
            path = self._call_top_k
        y, metrics, routing = path(x, training, return_routing)
        if return_routing:
            return y, dict(metrics, **routing)
        return (y, metrics) if return_metrics else y

    def _call_top_k(self, x, training, return_routing):
        groups, valid, num_tokens = self._to_groups(x)
        gates, metrics = self.router(groups, valid=valid, training=training)
        dispatcher = make_dispatcher(
            gates, self.num_selected_experts, self.capacity,
            batch_priority=self.batch_priority, valid=valid,
            implementation=self.dispatcher, dtype=self.dispatch_dtype,
            tile_size=self.expert_tile_size(training, return_routing),
            row_buckets=self.expert_row_buckets(training, return_routing))
        expert_outputs = dispatcher.run_experts(
            self.experts, dispatcher.dispatch(groups), training=training)
        y = dispatcher.combine(expert_outputs)
        y = ungroup(y, num_tokens, x.shape[1], self.ensemble_size)
        return y, metrics, _dispatch_routing(return_routing, gates, valid,
                                             dispatcher, expert_outputs)

    def _call_experts_choice(self, x, training, return_routing):
        groups, valid, num_tokens = self._to_groups(x)
        gates = self.router(groups, valid=valid, training=training)
        implementation = self.dispatcher
        if keras.distribution.distribution():
            implementation = "einsum"  # the expert-parallel layouts
        dispatcher, metrics = make_experts_choice_dispatcher(
            gates, self.capacity, valid=valid, implementation=implementation,
            dtype=self.dispatch_dtype)
        expert_outputs = dispatcher.run_experts(
            self.experts, dispatcher.dispatch(groups), training=training)
        y = ungroup(dispatcher.combine(expert_outputs), num_tokens, x.shape[1],
                    self.ensemble_size)
        return y, metrics, _dispatch_routing(return_routing, gates, valid,
                                             dispatcher, expert_outputs)

    def _call_soft(self, x, training, return_routing):
        groups, valid, num_tokens = self._to_groups(x)
        dispatch, combine, mu = self.router(groups, valid=valid,
                                            training=training)
        dtype = self.dispatch_dtype or "bfloat16"
        dispatcher = SoftDispatcher(dispatch, combine, dtype=dtype)
        expert_outputs = self.experts(dispatcher.dispatch(groups),
                                      training=training)
        y = ungroup(dispatcher.combine(expert_outputs), num_tokens, x.shape[1],
                    self.ensemble_size)
        # The token-similarity statistics are [G, S, S]: only for inspection.
        metrics = soft_moe_metrics(dispatch, combine, mu,
                                   similarity=bool(return_routing))
        routing = {}
        if return_routing:
            routing = dict(valid=valid, expert_outputs=expert_outputs,
                           dispatch_weights=dispatch, combine_weights=combine)
        return y, metrics, routing

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

    def expert_row_buckets(self, training=None, return_routing=False):
        """Whether the gather path's experts run at a few static row counts
        (`BucketDispatcher`, used where that saves rows: `buckets_pay`):
        for inference, without the routing intermediates or an
        expert-parallel layout, on the backends that run it well
        (`buckets_supported`)."""
        return bool(self.row_buckets and not training and not return_routing
                    and not keras.distribution.distribution()
                    and buckets_supported())

    def compute_output_spec(self, x, training=None, return_routing=False,
                            return_metrics=False):
        if return_routing or return_metrics:
            raise ValueError("return_routing and return_metrics are for "
                             "calls on tensors, not symbolic inputs.")
        return keras.KerasTensor(x.shape, dtype=self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_experts=self.num_experts, mlp_dim=self.mlp_dim,
            group_size=self.group_size,
            num_selected_experts=self.num_selected_experts,
            capacity_factor=self.capacity_factor,
            batch_priority=self.batch_priority,
            ensemble_size=self.ensemble_size, noise_std=self.noise_std,
            importance_loss_weight=self.importance_loss_weight,
            load_loss_weight=self.load_loss_weight,
            gshard_loss_weight=self.gshard_loss_weight,
            dropout_rate=self.dropout_rate, dispatcher=self.dispatcher,
            dispatch_dtype=self.dispatch_dtype, seed=self.seed)
        if self.router_type != "top_k":
            config.update(router=self.router_type, num_slots=self.num_slots)
        if (self.capacity_ceil_or_round, self.capacity_multiple_of) != (
                "ceil", 4):
            config.update(capacity_ceil_or_round=self.capacity_ceil_or_round,
                          capacity_multiple_of=self.capacity_multiple_of)
        return config


def _dispatch_routing(return_routing, gates, valid, dispatcher,
                      expert_outputs):
    """The routing intermediates of the dispatching routers (top-K and
    Experts Choice), when asked for."""
    if not return_routing:
        return {}
    return dict(gates=gates, valid=valid, expert_outputs=expert_outputs,
                combine_weights=dispatcher.combine_weights,
                dispatch_mask=dispatcher.dispatch_mask)
