"""MoeSettings: the typed MoE settings the backbone hands to each block."""

import json

import pytest

import keras_e3
from keras_e3.layers import EncoderBlock
from keras_e3.layers import MoeSettings


def test_backbone_hands_typed_settings_that_round_trip():
    backbone = keras_e3.E3ViTBackbone(
        image_size=16, patch_size=8, hidden_dim=16, num_layers=3,
        num_heads=2, mlp_dim=32, num_experts=4, moe_layers=(1, 2),
        ensemble_size=2, capacity_factor=1.5, seed=3)
    first, second = (b.moe for b in backbone.moe_blocks)
    assert isinstance(first, MoeSettings)
    assert (first.seed, second.seed) == (4, 5)  # seed + block index
    assert (first.num_experts, first.ensemble_size, first.capacity_factor,
            first.group_size) == (4, 2, 1.5, 8 * 5 * 2)
    config = backbone.encoder_blocks[1].get_config()
    json.dumps(config)  # plain JSON, no objects
    # Top-K blocks keep the keys older configs hold.
    assert "router" not in config["moe"]
    assert "capacity_multiple_of" not in config["moe"]
    assert EncoderBlock.from_config(config).moe == first


def test_router_settings_are_kept_where_they_differ():
    settings = MoeSettings(num_experts=4, group_size=16, router="soft",
                           num_slots=2, capacity_multiple_of=1)
    config = settings.get_config()
    assert config["router"] == "soft" and config["num_slots"] == 2
    assert config["capacity_multiple_of"] == 1
    assert MoeSettings.from_config(config) == settings


def test_unknown_settings_are_named():
    with pytest.raises(ValueError, match=r"Unknown MoE settings \['bogus'\]"):
        EncoderBlock(2, 32, moe={"num_experts": 4, "group_size": 8,
                                 "bogus": 1})


# The documented MoE defaults (E3ViTBackbone's docstring and README),
# written out here as the oracle; every place that takes the settings must
# agree with them and with `MoeSettings`, the one place they are written.
DOCUMENTED_DEFAULTS = dict(
    num_selected_experts=None, capacity_factor=None, batch_priority=False,
    ensemble_size=1, noise_std=None, importance_loss_weight=0.005,
    load_loss_weight=0.005, gshard_loss_weight=0.0, dropout_rate=0.0,
    dispatcher="auto", dispatch_dtype=None, seed=None, router="top_k",
    num_slots=None, capacity_ceil_or_round="ceil", capacity_multiple_of=4,
    group_size=None)


def _defaults(function):
    import inspect

    return {name: p.default
            for name, p in inspect.signature(function).parameters.items()
            if p.default is not inspect.Parameter.empty}


@pytest.mark.single_backend
def test_settings_defaults_are_written_once():
    import dataclasses

    from keras_e3.layers import MoeMlp

    fields = {f.name: f.default for f in dataclasses.fields(MoeSettings)
              if f.name != "num_experts"}
    assert fields == DOCUMENTED_DEFAULTS
    mlp = _defaults(MoeMlp.__init__)
    assert {k: mlp[k] for k in fields if k != "group_size"} == {
        k: v for k, v in fields.items() if k != "group_size"}
    backbone = _defaults(keras_e3.E3ViTBackbone.__init__)
    names = MoeSettings.backbone_names()
    assert {k: backbone[names[k]] for k in fields} == fields
    assert backbone["num_experts"] == 0  # a dense ViT


@pytest.mark.single_backend
def test_the_flop_counter_reads_no_signature():
    import inspect

    from keras_e3.evaluation import flops

    source = inspect.getsource(flops)
    assert "signature" not in source and "import inspect" not in source


@pytest.mark.single_backend
def test_runtime_overrides_come_from_the_settings():
    from keras_e3.presets.loader import RUNTIME_OVERRIDES

    assert RUNTIME_OVERRIDES == {
        "capacity_factor", "group_size", "batch_priority", "dropout_rate",
        "attention_dropout_rate", "moe_dropout_rate", "router_noise_std",
        "dispatcher", "dispatch_dtype", "importance_loss_weight",
        "load_loss_weight", "gshard_loss_weight", "seed"}


@pytest.mark.single_backend
@pytest.mark.parametrize("router,settings,expected", [
    # vmoe's rules, worked out by hand: tokens per image 50, E = 8.
    # top-K: group 8 images = 400, K = 1, C = ceil(400 / 8) = 50 -> 52.
    ("top_k", {}, dict(group_size=400, num_selected_experts=1,
                       capacity_factor=1.0, noise_std=1.0, capacity=52)),
    # E3 M = 2: group 8 * 50 * 2 = 800 copies, K = 2: 800*2/8 = 200.
    ("top_k", {"ensemble_size": 2, "num_selected_experts": 2},
     dict(group_size=800, num_selected_experts=2, capacity_factor=1.0,
          noise_std=1.0, capacity=200)),
    # Experts Choice: C = ceil(400 * 1.5 / 8) = 75 -> 76.
    ("experts_choice", {"capacity_factor": 1.5},
     dict(group_size=400, num_selected_experts=None, capacity_factor=1.5,
          noise_std=1.0, capacity=76)),
    # Soft MoE: one image, round(50 / 8) = 6 slots, noise 0.
    ("soft", {}, dict(group_size=50, num_selected_experts=None,
                      capacity_factor=1.0, noise_std=0.0, capacity=6)),
    ("soft", {"num_slots": 3}, dict(group_size=50, capacity_factor=None,
                                    capacity=3)),
])
def test_resolved_settings(router, settings, expected):
    resolved = MoeSettings(num_experts=8, router=router,
                           **settings).resolved(50)
    for name, value in expected.items():
        assert getattr(resolved, name) == value, name
    assert resolved.resolved(50) == resolved  # idempotent


def test_backbone_blocks_and_counter_share_the_resolved_settings():
    from keras_e3.evaluation import count_flops
    from keras_e3.evaluation import count_flops_from_config

    config = dict(image_size=16, patch_size=8, hidden_dim=16, num_layers=2,
                  num_heads=2, mlp_dim=32, num_experts=4, moe_layers=(1,),
                  router="soft", seed=7)
    backbone = keras_e3.E3ViTBackbone(**config)
    block = backbone.moe_blocks[0]
    assert block.moe == dataclasses_replace(backbone.moe_settings, seed=8)
    assert block.mlp.capacity == backbone.moe_settings.capacity == 1
    assert backbone.group_size is None  # as given, in the config
    assert backbone.get_config()["router_noise_std"] == 0.0  # resolved
    assert count_flops(backbone) == count_flops_from_config(**config)


def dataclasses_replace(settings, **changes):
    import dataclasses

    return dataclasses.replace(settings, **changes)
