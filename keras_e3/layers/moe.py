"""Sparse mixture-of-experts MLP with routing groups (V-MoE and E³)."""

import dataclasses

import keras
import numpy as np
from keras import ops

from keras_e3.layers.dispatch import DISPATCHERS
from keras_e3.layers.dispatch import DispatchOptions
from keras_e3.layers.dispatch import compute_capacity
from keras_e3.layers.dispatch import default_tile_size
from keras_e3.layers.dispatch import dispatch_plan
from keras_e3.layers.experts_choice import ExpertsChoiceRouter
from keras_e3.layers.mlp import ExpertsMlp
from keras_e3.layers.router import Router
from keras_e3.layers.soft_moe import SoftRouter
from keras_e3.layers.soft_moe import soft_moe_num_slots

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
    """How many devices the experts are split over.

    Args:
        distribution: a `keras.distribution` (default: the active one).

    Returns:
        The size of the experts' mesh axis; 1 when they are not sharded.

    Example:

    ```python
    from keras_e3.layers.moe import expert_axis_size

    assert expert_axis_size() == 1  # no distribution active
    ```
    """
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
    distribution's expert axis.

    Args:
        num_experts: E.
        distribution: a `keras.distribution` (default: the active one).

    Example:

    ```python
    from keras_e3.layers.moe import check_num_experts

    check_num_experts(8)  # fine: no distribution shards the experts
    ```
    """
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


def _runtime(default):
    """A setting that a preset may be loaded with without changing its
    weights (`keras_e3.presets.loader.RUNTIME_OVERRIDES`)."""
    return dataclasses.field(default=default, metadata={"runtime": True})


@dataclasses.dataclass(frozen=True)
class MoeSettings:
    """The settings of a MoE block's `MoeMlp` (all its arguments but
    `mlp_dim`), typed, with their defaults: the one place they are
    written.

    `E3ViTBackbone` resolves them once (`from_backbone(...).resolved(
    tokens)`) and hands each MoE `EncoderBlock` a copy; `MoeMlp`, the
    preset loader (`runtime_backbone_names`), the vmoe conversion and the
    FLOP counter read them from here. The backbone names two of them
    differently (`BACKBONE_NAMES`: `router_noise_std`, `moe_dropout_rate`).
    `get_config` is the plain dict a block serialises.

    Args:
        num_experts: E.
        group_size: token copies per routing group (None: the default of
            `default_group_size`, resolved with the tokens per image).
        num_selected_experts, capacity_factor, noise_std: None for the
            router's default (`resolve_router_options`).
        batch_priority, ensemble_size, importance_loss_weight,
        load_loss_weight, gshard_loss_weight, dropout_rate, dispatcher,
        dispatch_dtype, seed, router, num_slots, capacity_ceil_or_round,
        capacity_multiple_of: as `MoeMlp`.

    Example:

    ```python
    from keras_e3.layers import MoeSettings

    settings = MoeSettings(num_experts=8, router="soft").resolved(50)
    # Soft MoE: one image per group, round(50 / 8) = 6 slots per expert.
    assert (settings.group_size, settings.capacity) == (50, 6)
    assert MoeSettings.from_config(settings.get_config()) == settings
    ```
    """

    num_experts: int
    group_size: int = _runtime(None)
    num_selected_experts: int = None
    capacity_factor: float = _runtime(None)
    batch_priority: bool = _runtime(False)
    ensemble_size: int = 1
    noise_std: float = _runtime(None)
    importance_loss_weight: float = _runtime(0.005)
    load_loss_weight: float = _runtime(0.005)
    gshard_loss_weight: float = _runtime(0.0)
    dropout_rate: float = _runtime(0.0)
    dispatcher: str = _runtime("auto")
    dispatch_dtype: str = _runtime(None)
    seed: int = _runtime(None)
    router: str = "top_k"
    num_slots: int = None
    capacity_ceil_or_round: str = "ceil"
    capacity_multiple_of: int = 4

    # E3ViTBackbone's names for the settings it names differently.
    BACKBONE_NAMES = {"noise_std": "router_noise_std",
                      "dropout_rate": "moe_dropout_rate"}

    @classmethod
    def backbone_names(cls):
        """{setting: the `E3ViTBackbone` argument that carries it}."""
        return {f.name: cls.BACKBONE_NAMES.get(f.name, f.name)
                for f in dataclasses.fields(cls)}

    @classmethod
    def runtime_backbone_names(cls):
        """The backbone arguments of the settings that leave the weights
        as they are (a preset may be loaded with other values)."""
        names = cls.backbone_names()
        return frozenset(names[f.name] for f in dataclasses.fields(cls)
                         if f.metadata.get("runtime"))

    @classmethod
    def from_backbone(cls, config):
        """The settings among `E3ViTBackbone` arguments (a dict; the
        others are ignored, missing ones take their defaults)."""
        return cls(**{name: config[arg]
                      for name, arg in cls.backbone_names().items()
                      if arg in config})

    def backbone_kwargs(self):
        """These settings as `E3ViTBackbone` arguments."""
        return {arg: getattr(self, name)
                for name, arg in self.backbone_names().items()}

    def resolved(self, tokens_per_image=None):
        """The settings with the router's defaults filled in and checked
        (`resolve_router_options`), and, given `tokens_per_image`, the
        default routing group (`default_group_size`). Idempotent."""
        k, capacity_factor, noise_std = resolve_router_options(
            self.router, self.num_selected_experts, self.capacity_factor,
            self.num_slots, self.ensemble_size, self.batch_priority,
            self.noise_std)
        group_size = self.group_size
        if group_size is None and tokens_per_image is not None:
            group_size = default_group_size(tokens_per_image,
                                            self.ensemble_size, self.router)
        return dataclasses.replace(
            self, num_selected_experts=k, capacity_factor=capacity_factor,
            noise_std=noise_std, group_size=group_size)

    @property
    def capacity(self):
        """Slots per expert and routing group of resolved settings: vmoe's
        `compute_capacity` for top-K (K choices a token) and Experts
        Choice (K = 1), the slots per expert for Soft MoE (`num_slots`, or
        round(group_size * capacity_factor / E))."""
        if self.router == "soft" and self.num_slots is not None:
            return self.num_slots
        if self.router == "soft":
            return soft_moe_num_slots(
                self.group_size, self.num_experts, self.capacity_factor)
        return compute_capacity(
            self.group_size, self.num_experts,
            self.num_selected_experts or 1, self.capacity_factor,
            multiple_of=self.capacity_multiple_of,
            ceil_or_round=self.capacity_ceil_or_round)

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


_D = MoeSettings  # the defaults of MoeMlp's arguments below


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

    The call is route -> dispatch -> experts -> combine for every router:
    the router's `route` returns a `Dispatcher` and its metrics, in the
    layout `dispatch_plan` chose (`keras_e3.layers.dispatch`).

    Args:
        num_experts: E.
        mlp_dim: hidden size of each expert's MLP.
        group_size: token copies per routing group.
        num_selected_experts, capacity_factor, batch_priority,
        ensemble_size, noise_std, importance_loss_weight, load_loss_weight,
        gshard_loss_weight, dropout_rate, dispatcher, dispatch_dtype, seed,
        router, num_slots, capacity_ceil_or_round, capacity_multiple_of:
            the `MoeSettings`, with its defaults.
        gelu_approximate: the experts' GELU: Flax's tanh approximation
            (True, vmoe) or the exact erf form (False: experts upcycled
            from timm or keras-hub ViTs).
        **kwargs: Keras' layer keywords (`name`, `dtype`, ...).

    Example:

    ```python
    import numpy as np
    from keras_e3.layers import MoeMlp

    layer = MoeMlp(num_experts=4, mlp_dim=32, group_size=16,
                   num_selected_experts=2)
    x = np.random.default_rng(0).normal(size=(2, 8, 16)).astype("float32")
    y, metrics = layer(x, return_metrics=True)
    assert tuple(y.shape) == (2, 8, 16)
    assert "importance_loss" in metrics
    ```
    """

    def __init__(self, num_experts, mlp_dim, group_size,
                 num_selected_experts=_D.num_selected_experts,
                 capacity_factor=_D.capacity_factor,
                 batch_priority=_D.batch_priority,
                 ensemble_size=_D.ensemble_size, noise_std=_D.noise_std,
                 importance_loss_weight=_D.importance_loss_weight,
                 load_loss_weight=_D.load_loss_weight,
                 gshard_loss_weight=_D.gshard_loss_weight,
                 dropout_rate=_D.dropout_rate, dispatcher=_D.dispatcher,
                 dispatch_dtype=_D.dispatch_dtype, seed=_D.seed,
                 router=_D.router, num_slots=_D.num_slots,
                 capacity_ceil_or_round=_D.capacity_ceil_or_round,
                 capacity_multiple_of=_D.capacity_multiple_of,
                 gelu_approximate=True, **kwargs):
        arguments = dict(locals())
        super().__init__(**kwargs)
        # The arguments (all but mlp_dim), typed, router defaults resolved.
        settings = MoeSettings(**{
            name: arguments[name] for name in MoeSettings.backbone_names()
        }).resolved()
        self.settings = settings
        num_selected_experts = settings.num_selected_experts
        capacity_factor = settings.capacity_factor
        noise_std = settings.noise_std
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
        # The gather path runs each expert at one of a few static row counts
        # where the backend supports it (BucketDispatcher); False: tiles or
        # buffers. Not in the config either.
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
        self.capacity = settings.capacity
        if router == "soft":
            self.router = SoftRouter(
                num_experts, group_size, num_slots=num_slots,
                capacity_factor=capacity_factor, noise_std=noise_std,
                seed=seed, dtype=self.dtype_policy, name="router")
        elif router == "experts_choice":
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
        self.gelu_approximate = bool(gelu_approximate)
        self.experts = ExpertsMlp(num_experts, mlp_dim, dropout_rate,
                                  gelu_approximate=self.gelu_approximate,
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
        groups, valid, num_tokens = self._to_groups(x)
        plan = self.dispatch_plan(groups.shape[0], training, return_routing)
        dispatcher, metrics = self.router.route(
            groups, valid=valid, training=training,
            options=DispatchOptions(
                capacity=self.capacity, layout=plan.layout,
                batch_priority=self.batch_priority, dtype=self.dispatch_dtype,
                tile_size=plan.tile_size, inspect=bool(return_routing)))
        expert_outputs = dispatcher.run_experts(
            self.experts, dispatcher.dispatch(groups), training=training)
        y = ungroup(dispatcher.combine(expert_outputs), num_tokens,
                    x.shape[1], self.ensemble_size)
        if return_routing:
            return y, dict(metrics, valid=valid,
                           expert_outputs=expert_outputs,
                           **dispatcher.routing())
        return (y, metrics) if return_metrics else y

    def dispatch_plan(self, groups=None, training=None, return_routing=False):
        """This layer's `dispatch_plan` for a call on `groups` routing
        groups (None: unknown) under the active distribution."""
        return dispatch_plan(
            self.router_type, self.dispatcher, groups, self.group_size,
            self.num_experts, self.num_selected_experts or 1, self.capacity,
            training=bool(training), inspect=bool(return_routing),
            distributed=bool(keras.distribution.distribution()),
            expert_dropout=bool(self.dropout_rate), tile_size=self.tile_size,
            row_buckets=self.row_buckets)

    def expert_tile_size(self, training=None, return_routing=False):
        """The tile size `dispatch_plan` allows the gather path's experts
        (`TiledDispatcher`, used where tiles pay), or None for the capacity
        buffers."""
        return self.dispatch_plan(None, training, return_routing).tile_size

    def expert_row_buckets(self, training=None, return_routing=False):
        """Whether `dispatch_plan` allows the bucketed experts
        (`BucketDispatcher`, used where the routing groups are static)."""
        return self.dispatch_plan(None, training, return_routing).row_buckets

    def compute_output_spec(self, x, training=None, return_routing=False,
                            return_metrics=False):
        if return_routing or return_metrics:
            raise ValueError("return_routing and return_metrics are for "
                             "calls on tensors, not symbolic inputs.")
        return keras.KerasTensor(x.shape, dtype=self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config.update(mlp_dim=self.mlp_dim, **self.settings.get_config())
        if not self.gelu_approximate:
            config["gelu_approximate"] = False
        return config

