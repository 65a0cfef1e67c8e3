"""E3ViTBackbone: a dense ViT, a V-MoE or an E³, depending on its config."""

import dataclasses

import keras
from keras import ops

from keras_e3.layers.embedding import PatchAndPositionEmbedding
from keras_e3.layers.encoder_block import LAYER_NORM_EPSILON
from keras_e3.layers.encoder_block import EncoderBlock
from keras_e3.layers.ensemble import EnsembleTile
from keras_e3.layers.map_head import MapHead
from keras_e3.layers.moe import check_num_experts
from keras_e3.layers.moe import MoeSettings
from keras_e3.layers.router import check_experts
from keras_e3.models.preset_mixin import PresetMixin

CLASSIFIERS = ("token", "gap", "map")
# Keywords of Keras' own base classes that the models pass on (`dtype` is
# an explicit argument of each); any other unknown keyword is a TypeError.
KERAS_BASE_KWARGS = ("name", "trainable")
# Keywords of other libraries' vision models, and what to pass instead.
KEYWORD_HINTS = {
    "image_shape": "image_size=(height, width) and num_channels=C",
    "input_shape": "image_size=(height, width) and num_channels=C",
    "activation": ("nothing: the model returns logits; predict_ensemble "
                   "gives the ensemble's log-probabilities (exp() for "
                   "probabilities)"),
    "classifier_activation": ("nothing: the model returns logits; "
                              "predict_ensemble gives the ensemble's "
                              "log-probabilities"),
    "include_rescaling": ("preprocessor=keras_e3.ImageConverter(...) on "
                          "the E3ViT task"),
}


# The backbone's architecture settings and their defaults, written once:
# `E3ViTBackbone`'s signature reads them, and so does `backbone_settings`
# (the FLOP counter's way to a full config without building a model). The
# MoE settings' defaults are `MoeSettings`'s, but for `num_experts` (0: a
# dense ViT).
ARCHITECTURE_DEFAULTS = dict(
    image_size=224, patch_size=32, num_channels=3, hidden_dim=512,
    num_layers=8, num_heads=8, mlp_dim=2048, dropout_rate=0.0,
    attention_dropout_rate=0.0, classifier="token", representation_size=None,
    position_embedding="learned", sincos2d_temperature=10000.0,
    attention_qk_norm=False, num_experts=0, moe_layers=(),
    gelu_approximate=True, final_norm="sequence")
_A = ARCHITECTURE_DEFAULTS
_M = MoeSettings


def backbone_settings(config):
    """A full backbone config from some of its arguments, resolved as
    `E3ViTBackbone` resolves it, without building anything.

    Args:
        config: a dict of `E3ViTBackbone` arguments (`name`, `trainable`
            and `dtype` are ignored; unknown names raise a ValueError).

    Returns:
        (architecture, moe): the architecture settings with their defaults
        (`ARCHITECTURE_DEFAULTS`, `moe_layers` a sorted list), and the
        `MoeSettings` with the router's defaults resolved (`group_size`
        still None where it was not given: it depends on the tokens per
        image).

    Example:

    >>> architecture, moe = backbone_settings({"num_experts": 8,
    ...                                        "moe_layers": [1, 3]})
    >>> architecture["hidden_dim"], moe.num_selected_experts
    (512, 1)
    """
    config = {k: v for k, v in config.items()
              if k not in ("name", "trainable", "dtype")}
    moe_names = set(MoeSettings.backbone_names().values())
    unknown = sorted(set(config) - set(ARCHITECTURE_DEFAULTS) - moe_names)
    if unknown:
        raise ValueError(f"Unknown backbone arguments {unknown}.")
    architecture = {k: config.get(k, v)
                    for k, v in ARCHITECTURE_DEFAULTS.items()}
    architecture["moe_layers"] = sorted(
        int(i) for i in (architecture["moe_layers"] or ()))
    moe = MoeSettings.from_backbone(
        dict(config, num_experts=architecture["num_experts"])).resolved()
    return architecture, moe


def check_keywords(cls_name, kwargs):
    """A TypeError naming every keyword `cls_name` does not take (Keras'
    base-class keywords `KERAS_BASE_KWARGS` are fine), with what to pass
    instead where another library's keyword is recognised."""
    unknown = sorted(set(kwargs) - set(KERAS_BASE_KWARGS))
    if not unknown:
        return
    hints = "".join(f" For {k!r} pass {KEYWORD_HINTS[k]}." for k in unknown
                    if k in KEYWORD_HINTS)
    raise TypeError(f"{cls_name}() got unexpected keyword argument(s) "
                    f"{unknown}.{hints}")


@keras.saving.register_keras_serializable(package="keras_e3")
class E3ViTBackbone(PresetMixin, keras.Model):
    """Vision Transformer with optional sparse MoE MLPs and E³ ensembling.

    - Dense ViT: `moe_layers=()` (or `num_experts=0`).
    - V-MoE: `moe_layers` lists the 0-based blocks whose MLP is a mixture
      of `num_experts` experts, each token routed to its top
      `num_selected_experts` experts with `capacity_factor`.
    - E³: additionally `ensemble_size` M > 1. The tokens are tiled M times
      just before the first MoE block, and copy m is routed only among the
      experts of partition m (experts m*E/M ... (m+1)*E/M - 1).

    Args:
        image_size, patch_size: int or (height, width).
        num_channels: image channels (channels last).
        hidden_dim, num_layers, num_heads, mlp_dim: transformer sizes.
        dropout_rate, attention_dropout_rate: dropout rates.
        classifier: "token" (class token), "gap" (global average pool) or
            "map" (multihead attention pooling, vmoe's `MapHead`: a learned
            probe attends to the tokens, then a residual MLP of `mlp_dim`).
        position_embedding: "learned" (a weight, class token included),
            "sincos2d" (vmoe's fixed 2-D sin-cos table on the patch tokens;
            hidden_dim a multiple of 4) or "none".
        sincos2d_temperature: temperature of the "sincos2d" table.
        attention_qk_norm: LayerNorm (no bias) on each head's queries and
            keys, in the encoder blocks and the MAP head (vmoe's
            `attention_qk_norm`).
        representation_size: if set, a Dense + tanh "pre-logits" layer of
            this size on the pooled features (vmoe's `pre_logits`).
        num_experts, moe_layers, num_selected_experts (K), ensemble_size (M),
        capacity_factor, batch_priority (BPR): the MoE / E³ setup.
        group_size: tokens per routing group, counting the M copies (vmoe's
            `group_size`). Default: the tokens of 8 images.
        router_noise_std: router noise in training: std noise_std / (E/M)
            on the logits for top-K and Experts Choice (default 1.0),
            noise_std for Soft MoE (default 0.0), as vmoe.
        router: "top_k" (V-MoE, E³), "experts_choice" (each expert takes
            its top-C tokens of a group; `capacity_factor`,
            `capacity_ceil_or_round`, `capacity_multiple_of`) or "soft"
            (Soft MoE: `num_slots` per expert, or `capacity_factor`, not
            both; default group: one image). Neither takes
            `num_selected_experts`, nor combines with `ensemble_size` > 1
            (vmoe defines no such model). Neither adds an auxiliary loss.
        num_slots: Soft MoE slots per expert.
        capacity_ceil_or_round, capacity_multiple_of: vmoe's capacity
            rounding: "ceil" or "round" (half to even), then up to a
            multiple of `capacity_multiple_of` (4; 1 for none).
        importance_loss_weight, load_loss_weight, gshard_loss_weight:
            weights of the auxiliary losses (added with `add_loss`).
        moe_dropout_rate: dropout inside the experts.
        dispatcher: how tokens reach the experts: "auto" (default: the
            gather fast path, on every backend),
            "gather", or "einsum" (the readable dense reference). All
            give the same outputs and gradients to fp32 rounding (see
            `keras_e3.layers.dispatch`).
        dispatch_dtype: e.g. "bfloat16" to move tokens in bfloat16. Soft
            MoE always dispatches in bfloat16 as vmoe, unless "float32"
            (then not vmoe bit for bit: ~1e-4 on the logits).
        seed: seed of the router noise.

    Outputs a dict: `sequence_output` [B*M, T, hidden_dim] (after the final
    LayerNorm) and `pooled_output` [B*M, D] (pooled, then pre-logits), with
    row b*M + m for member m of image b (M = 1 for ViT and V-MoE).

    The MoE arguments are resolved once into a `MoeSettings`
    (`moe_settings`, the one each MoE block gets); their defaults are
    `MoeSettings`'s.

    Example:

    ```python
    import numpy as np
    import keras_e3

    # A tiny E³: 4 experts in block 1, two members of 2 experts each.
    backbone = keras_e3.E3ViTBackbone(
        image_size=16, patch_size=8, hidden_dim=16, num_layers=2,
        num_heads=2, mlp_dim=32, num_experts=4, moe_layers=(1,),
        ensemble_size=2)
    out = backbone(np.zeros((3, 16, 16, 3), "float32"))
    assert tuple(out["pooled_output"].shape) == (6, 16)  # [B*M, D]
    assert backbone.moe_settings.group_size == 8 * 5 * 2  # 8 images
    ```
    """

    def __init__(self, image_size=_A["image_size"],
                 patch_size=_A["patch_size"],
                 num_channels=_A["num_channels"],
                 hidden_dim=_A["hidden_dim"], num_layers=_A["num_layers"],
                 num_heads=_A["num_heads"], mlp_dim=_A["mlp_dim"],
                 dropout_rate=_A["dropout_rate"],
                 attention_dropout_rate=_A["attention_dropout_rate"],
                 classifier=_A["classifier"],
                 representation_size=_A["representation_size"],
                 position_embedding=_A["position_embedding"],
                 sincos2d_temperature=_A["sincos2d_temperature"],
                 attention_qk_norm=_A["attention_qk_norm"],
                 num_experts=_A["num_experts"], moe_layers=_A["moe_layers"],
                 num_selected_experts=_M.num_selected_experts,
                 ensemble_size=_M.ensemble_size,
                 capacity_factor=_M.capacity_factor,
                 group_size=_M.group_size, batch_priority=_M.batch_priority,
                 router_noise_std=_M.noise_std,
                 importance_loss_weight=_M.importance_loss_weight,
                 load_loss_weight=_M.load_loss_weight,
                 gshard_loss_weight=_M.gshard_loss_weight,
                 moe_dropout_rate=_M.dropout_rate,
                 dispatcher=_M.dispatcher, dispatch_dtype=_M.dispatch_dtype,
                 seed=_M.seed, router=_M.router, num_slots=_M.num_slots,
                 capacity_ceil_or_round=_M.capacity_ceil_or_round,
                 capacity_multiple_of=_M.capacity_multiple_of,
                 gelu_approximate=_A["gelu_approximate"],
                 final_norm=_A["final_norm"], dtype=None, **kwargs):
        check_keywords(type(self).__name__, kwargs)
        moe_layers = sorted(int(i) for i in (moe_layers or ()))
        # The MoE arguments, typed, with the router's defaults resolved.
        moe = MoeSettings.from_backbone(locals()).resolved()
        validate_config(num_layers, classifier, num_experts, moe_layers,
                        moe.num_selected_experts or 1, ensemble_size)
        check_dense_variant(classifier, final_norm)
        if moe_layers:  # experts split evenly over a distribution's devices
            check_num_experts(num_experts)
        # === Layers ===
        embedding = PatchAndPositionEmbedding(
            image_size, patch_size, hidden_dim, num_channels,
            use_class_token=classifier == "token",
            position_embedding=position_embedding,
            sincos2d_temperature=sincos2d_temperature, dtype=dtype,
            name="embedding")
        # The MoE settings, resolved once: each MoE block gets them (its
        # seed offset by its index).
        moe = moe.resolved(embedding.num_tokens)
        blocks = []
        for i in range(num_layers):
            block_moe = None
            if i in moe_layers:
                block_moe = dataclasses.replace(
                    moe, seed=None if moe.seed is None else moe.seed + i)
            blocks.append(EncoderBlock(
                num_heads, mlp_dim, dropout_rate, attention_dropout_rate,
                moe=block_moe, attention_qk_norm=attention_qk_norm,
                gelu_approximate=gelu_approximate,
                dtype=dtype, name=f"encoderblock_{i}"))
        layers = dict(
            embedding=embedding,
            dropout=keras.layers.Dropout(dropout_rate, dtype=dtype,
                                         name="embedding_dropout"),
            tile=(EnsembleTile(ensemble_size, dtype=dtype, name="ensemble_tile")
                  if ensemble_size > 1 else None),
            first_moe=moe_layers[0] if moe_layers else None,
            blocks=blocks,
            norm=keras.layers.LayerNormalization(
                epsilon=LAYER_NORM_EPSILON, dtype=dtype, name="encoder_norm"),
            pre_logits=(keras.layers.Dense(representation_size, dtype=dtype,
                                           name="pre_logits")
                        if representation_size else None),
            classifier=classifier,
            final_norm=final_norm,
            map_head=(MapHead(num_heads, mlp_dim, qk_norm=attention_qk_norm,
                              gelu_approximate=gelu_approximate,
                              dtype=dtype, name="map_head")
                      if classifier == "map" else None),
        )
        # === Functional model ===
        image_hw = embedding.image_size
        inputs = keras.Input((*image_hw, num_channels), name="images")
        outputs = _forward(layers, inputs)
        super().__init__(inputs=inputs, outputs=outputs, dtype=dtype,
                         **kwargs)
        self._layers_by_role = layers
        # The embedding layer checks images with clearer messages.
        self.input_spec = None
        self.embedding = embedding
        self.encoder_blocks = blocks
        # === Config ===
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.dropout_rate = dropout_rate
        self.attention_dropout_rate = attention_dropout_rate
        self.classifier = classifier
        self.representation_size = representation_size
        self.position_embedding = position_embedding
        self.sincos2d_temperature = sincos2d_temperature
        self.attention_qk_norm = attention_qk_norm
        self.moe_layers = moe_layers
        # The resolved MoE settings (group_size: the one the blocks use).
        self.moe_settings = moe
        for name, value in moe.backbone_kwargs().items():
            setattr(self, name, value)
        self.group_size = group_size  # as given: None follows image_size
        self.gelu_approximate = bool(gelu_approximate)
        self.final_norm = final_norm

    def call(self, inputs, training=None, mask=None,
             return_router_metrics=False):
        """The outputs dict; with `return_router_metrics=True`, (outputs,
        {MoE block name: its router's metrics}), the statistics the MoE
        layers return (`MoeMlp.call(..., return_metrics=True)`): for
        top-K routers `importance_loss`, `gshard_loss`, `auxiliary_loss`
        and, in training, `load_loss`, each [groups, M]."""
        # Before Keras' own input standardisation, whose rank errors print
        # the whole tensor.
        self.embedding.check_images(inputs.shape)
        if not return_router_metrics:
            return super().call(inputs, training=training, mask=mask)
        metrics = {}
        outputs = _forward(self._layers_by_role, inputs, training=training,
                           router_metrics=metrics)
        return outputs, metrics

    @property
    def moe_blocks(self):
        return [b for b in self.encoder_blocks if b.is_moe]

    def compute_intermediates(self, images, training=False):
        """Runs the model eagerly and returns every intermediate output.

        Returns a dict with `patches` (conv output [B, h, w, D]),
        `embeddings` (tokens after class token + position embedding),
        `encoderblock_{i}` (each block's output), `routing/encoderblock_{i}`
        (for MoE blocks: gates [G, S, E], combine_weights and dispatch_mask
        [G, S, E, C], expert_outputs [E, G*C, D], and the auxiliary losses
        [G, M]), `encoder_norm`, `sequence_output` and `pooled_output`.
        """
        collected = {}
        outputs = _forward(self._layers_by_role,
                           ops.convert_to_tensor(images), training=training,
                           collect=collected)
        collected.update(outputs)
        return collected

    def get_config(self):
        config = {"name": self.name, "trainable": self.trainable}
        config.update(
            image_size=self.image_size, patch_size=self.patch_size,
            num_channels=self.num_channels, hidden_dim=self.hidden_dim,
            num_layers=self.num_layers, num_heads=self.num_heads,
            mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate,
            attention_dropout_rate=self.attention_dropout_rate,
            classifier=self.classifier,
            representation_size=self.representation_size,
            position_embedding=self.position_embedding,
            sincos2d_temperature=self.sincos2d_temperature,
            attention_qk_norm=self.attention_qk_norm,
            moe_layers=list(self.moe_layers),
            **{name: getattr(self, name)
               for name in MoeSettings.backbone_names().values()},
            gelu_approximate=self.gelu_approximate,
            final_norm=self.final_norm,
            # The layers' policy: a functional Model keeps float32 for itself.
            dtype=keras.dtype_policies.serialize(self.embedding.dtype_policy),
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config.get("dtype"), dict):
            config["dtype"] = keras.dtype_policies.deserialize(config["dtype"])
        return cls(**config)


def _forward(layers, images, training=None, collect=None,
             router_metrics=None):
    """The backbone's computation, shared by the functional graph,
    `compute_intermediates` (which passes a `collect` dict) and calls with
    `return_router_metrics` (a `router_metrics` dict, filled with each MoE
    block's router metrics)."""
    record = collect if collect is not None else {}
    if collect is not None:
        x, record["patches"] = layers["embedding"](images, return_patches=True)
    else:
        x = layers["embedding"](images)
    record["embeddings"] = x
    x = layers["dropout"](x, training=training)
    for i, block in enumerate(layers["blocks"]):
        if i == layers["first_moe"] and layers["tile"] is not None:
            x = layers["tile"](x)
        if collect is not None:
            x, routing = block(x, training=training, return_routing=True)
            if routing is not None:
                record[f"routing/{block.name}"] = routing
        elif router_metrics is not None:
            x, metrics = block(x, training=training, return_metrics=True)
            if metrics is not None:
                router_metrics[block.name] = metrics
        else:
            x = block(x, training=training)
        record[block.name] = x
    if layers["final_norm"] == "pooled":  # timm's fc_norm: pool, then norm
        sequence = x
        pooled = record["encoder_norm"] = layers["norm"](ops.mean(x, axis=1))
    else:
        sequence = record["encoder_norm"] = layers["norm"](x)
    if layers["final_norm"] == "pooled":
        pass  # pooled above
    elif layers["classifier"] == "token":
        pooled = sequence[:, 0]
    elif layers["classifier"] == "map":
        pooled = layers["map_head"](sequence)
    else:
        pooled = ops.mean(sequence, axis=1)
    if layers["pre_logits"] is not None:
        pooled = layers["pre_logits"](pooled)
        record["pre_logits"] = pooled  # before the tanh, as in vmoe
        pooled = ops.tanh(pooled)
    return {"sequence_output": sequence, "pooled_output": pooled}


FINAL_NORMS = ("sequence", "pooled")


def check_dense_variant(classifier, final_norm):
    """Checks the settings that dense checkpoints of other libraries need:
    `final_norm="pooled"` (timm's `fc_norm`: the encoder's last LayerNorm
    applied to the mean of the tokens, not to each token; GAP only) and
    `gelu_approximate=False` (the exact GELU, in MLPs and experts)."""
    if final_norm not in FINAL_NORMS:
        raise ValueError(f"final_norm must be one of {FINAL_NORMS}; got "
                         f"{final_norm!r}.")
    if final_norm == "pooled" and classifier != "gap":
        raise ValueError("final_norm='pooled' (the norm after pooling) needs "
                         f"classifier='gap'; got classifier={classifier!r}.")


def validate_config(num_layers, classifier, num_experts, moe_layers,
                    num_selected_experts, ensemble_size):
    """Checks a backbone's layout settings (also used by the FLOP counter,
    which counts models it does not build)."""
    if classifier not in CLASSIFIERS:
        raise ValueError(f"classifier must be one of {CLASSIFIERS}; "
                         f"got {classifier!r}.")
    bad = [i for i in moe_layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"moe_layers {bad} out of range: blocks are numbered "
                         f"0 to {num_layers - 1} (num_layers={num_layers}).")
    if ensemble_size < 1:
        raise ValueError(f"ensemble_size must be >= 1; got {ensemble_size}.")
    if not moe_layers:
        if ensemble_size > 1:
            raise ValueError("ensemble_size > 1 (E³) needs MoE layers: set "
                             "moe_layers and num_experts.")
        return
    if num_experts < 1:
        raise ValueError(f"moe_layers={moe_layers} needs num_experts >= 1; "
                         f"got {num_experts}.")
    check_experts(num_experts, num_selected_experts, ensemble_size)
