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
