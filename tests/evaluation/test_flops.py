"""keras_e3.flops: published ViT figures, the paper's E³ / deep-ensemble
ratio, params against Keras, and MACs against XLA's own count on JAX."""

import math
import re

import numpy as np
import pytest

import keras_e3
from keras_e3.evaluation import flops
from conftest import BACKEND
from conftest import tiny_backbone_kwargs

VIT_B16 = dict(image_size=224, patch_size=16, hidden_dim=768, num_layers=12,
               num_heads=12, mlp_dim=3072, num_classes=1000)
# timm's ViT-S (12 layers, 384 wide), not vmoe's 8-layer "S".
VIT_S32 = dict(image_size=224, patch_size=32, hidden_dim=384, num_layers=12,
               num_heads=6, mlp_dim=1536, num_classes=1000)
# vmoe's S/32 (configs/eee_paper/eee_s32_last2_*): 8 layers, 512 wide.
VMOE_S32 = dict(image_size=224, patch_size=32, hidden_dim=512, num_layers=8,
                num_heads=8, mlp_dim=2048, representation_size=512,
                num_classes=1000, num_experts=8, moe_layers=(5, 7),
                capacity_factor=1.5)
E3_S32 = dict(VMOE_S32, num_selected_experts=1, ensemble_size=2)


@pytest.mark.single_backend
def test_published_vit_figures():
    b16 = flops.count_flops_from_config(**VIT_B16)
    s32 = flops.count_flops_from_config(**VIT_S32)
    # timm: vit_base_patch16_224 17.6 GMACs / 86.6 M params,
    # vit_small_patch32_224 1.1 GMACs / 22.9 M params.
    assert b16["macs"] / 1e9 == pytest.approx(17.6, abs=0.05)
    assert s32["macs"] / 1e9 == pytest.approx(1.1, abs=0.05)
    assert b16["params"] / 1e6 == pytest.approx(86.6, abs=0.05)
    assert s32["params"] / 1e6 == pytest.approx(22.9, abs=0.05)
    assert b16["flops"] == 2 * b16["macs"]
    assert sum(b16["breakdown"].values()) == b16["macs"]
    # By hand: 196 patches x 16^2 x 3 x 768; 197 tokens.
    assert b16["breakdown"]["embedding"] == 196 * 16 * 16 * 3 * 768
    assert b16["breakdown"]["attention"] == 12 * (
        197 * 4 * 768**2 + 2 * 197**2 * 768)
    assert b16["breakdown"]["head"] == 768 * 1000


@pytest.mark.single_backend
def test_e3_costs_less_than_a_deep_ensemble():
    e3 = flops.count_flops_from_config(**E3_S32)
    vmoe_k1 = flops.count_flops_from_config(**VMOE_S32)
    vmoe_k2 = flops.count_flops_from_config(**VMOE_S32,
                                            num_selected_experts=2)
    de = flops.deep_ensemble_flops(VMOE_S32, 2)
    assert de["flops"] == 2 * vmoe_k1["flops"]
    assert de["params"] == 2 * vmoe_k1["params"]
    # E³ runs blocks 0-4 once and blocks 5-7 (+ head) twice: ~30 % fewer
    # FLOPs than two V-MoE S/32 (K=1), ~42 % fewer than two with K=2.
    ratio = flops.flops_ratio(e3, de)
    assert 0.65 < ratio < 0.75
    assert flops.flops_ratio(e3, flops.deep_ensemble_flops(
        vmoe_k2, 2)) < 0.6
    # Same parameters as one V-MoE (the router kernel is only reshaped).
    assert e3["params"] == vmoe_k1["params"]
    # Larger models spend more blocks before the tiling: L/16, last 2 of 24.
    l16 = dict(VMOE_S32, patch_size=16, hidden_dim=1024, num_layers=24,
               num_heads=16, mlp_dim=4096, representation_size=1024,
               moe_layers=(21, 23))
    ratio_l16 = flops.flops_ratio(dict(l16, ensemble_size=2),
                                  flops.deep_ensemble_flops(l16, 2))
    assert 0.55 < ratio_l16 < 0.6  # "up to 45 % fewer FLOPs"
    # Expert compute: with capacity the buffers' empty slots count too.
    routed = flops.count_flops_from_config(**E3_S32, expert_tokens="routed")
    tiled_tokens = 2 * 2 * 50  # 2 MoE layers x M x T
    assert routed["breakdown"]["moe_experts"] == (
        tiled_tokens * 2 * 512 * 2048)
    assert e3["breakdown"]["moe_experts"] >= 1.5 * routed["breakdown"][
        "moe_experts"]


@pytest.mark.single_backend
def test_batch_size_counts_padded_groups():
    kwargs = tiny_backbone_kwargs()  # 5 tokens x M=2, group_size 20
    amortised = flops.count_flops_from_config(**kwargs)
    one = flops.count_flops_from_config(**kwargs, batch_size=1)
    two = flops.count_flops_from_config(**kwargs, batch_size=2)
    # One image (10 copies) pads its group to 20: twice the expert buffers
    # of the amortised count; two images fill exactly one group.
    assert one["breakdown"]["moe_experts"] == (
        2 * amortised["breakdown"]["moe_experts"])
    assert two["macs"] == amortised["macs"]
    assert amortised["breakdown"]["dispatch"] > 0
    assert flops.count_flops_from_config(
        **kwargs, include_dispatch=True)["macs"] == (
        amortised["macs"] + amortised["breakdown"]["dispatch"])


@pytest.mark.single_backend
def test_errors():
    with pytest.raises(ValueError, match="Unknown backbone arguments"):
        flops.count_flops_from_config(hiden_dim=3)
    with pytest.raises(ValueError, match="expert_tokens"):
        flops.count_flops_from_config(expert_tokens="all")
    with pytest.raises(ValueError, match="divisible"):
        flops.count_flops_from_config(image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="count_flops expects"):
        flops.count_flops(object())
    with pytest.raises(ValueError, match="num_models"):
        flops.deep_ensemble_flops(VIT_S32, 0)


def tiny_model(**overrides):
    backbone = keras_e3.E3ViTBackbone(**tiny_backbone_kwargs(**overrides))
    return keras_e3.E3ViT(backbone, num_classes=10)


@pytest.mark.parametrize("overrides", [
    {}, {"moe_layers": (), "ensemble_size": 1, "classifier": "gap",
         "representation_size": None}])
def test_params_match_keras(overrides):
    model = tiny_model(**overrides)
    counts = flops.count_flops(model)
    assert counts["params"] == model.count_params()
    assert counts["macs"] == flops.count_flops(
        dict(model.backbone.get_config(), num_classes=10))["macs"]
    assert flops.count_flops(model.backbone)["breakdown"]["head"] == (
        16 * 2 * 16 if "representation_size" not in overrides else 0)


def _shape(text):
    return [int(s) for s in text.split("x")[:-1]]


def hlo_matmul_macs(hlo):
    """MACs of every dot_general and convolution in StableHLO text."""
    total = 0
    typed = r": \(tensor<([0-9x]+\w+)>, tensor<([0-9x]+\w+)>\) -> " \
            r"tensor<([0-9x]+\w+)>"
    for line in hlo.splitlines():
        if "stablehlo.dot_general" in line:
            lhs, _, out = re.search(typed, line).groups()
            dims = re.search(r"contracting_dims = \[([\d, ]*)\]", line)
            contract = [int(i) for i in dims.group(1).split(",")]
            total += math.prod(_shape(out)) * math.prod(
                _shape(lhs)[i] for i in contract)
        elif "stablehlo.convolution" in line:
            _, kernel, out = re.search(typed, line).groups()
            kernel = _shape(kernel)  # HWIO
            total += math.prod(_shape(out)) * math.prod(kernel[:-1])
    return total


@pytest.mark.skipif(BACKEND != "jax", reason="XLA cost analysis on JAX")
@pytest.mark.parametrize("dispatcher", ["einsum", "gather"])
@pytest.mark.parametrize("overrides,batch", [
    ({}, 3),  # E³: 30 token copies -> 2 routing groups, the last padded
    ({"ensemble_size": 1, "num_selected_experts": 2, "hidden_dim": 32,
      "mlp_dim": 128, "moe_layers": (0, 1)}, 4),  # V-MoE, K=2
])
def test_macs_match_xla(overrides, batch, dispatcher):
    import jax

    model = tiny_model(dispatcher=dispatcher, **overrides)
    # The capacity layouts: JAX's row buckets compile one branch per row
    # count, each with its own matmuls, of which one runs (at most the
    # capacity slots counted here).
    for block in model.backbone.moe_blocks:
        block.mlp.row_buckets = False
    images = np.zeros((batch, 16, 16, 3), "float32")
    trainable = [v.value for v in model.trainable_variables]
    other = [v.value for v in model.non_trainable_variables]

    def forward(trainable, other, images):
        return model.stateless_call(trainable, other, images)[0]

    lowered = jax.jit(forward).lower(trainable, other, images)
    counts = flops.count_flops(model, batch_size=batch,
                               include_dispatch=dispatcher == "einsum")
    # Exact: every matmul XLA is asked to run, the einsum path's dispatch
    # included (the gather path has none).
    assert hlo_matmul_macs(lowered.as_text()) == pytest.approx(
        counts["macs"] * batch, rel=1e-12)
    # XLA's total also counts elementwise ops (bias, GELU, softmax, norms,
    # routing): at most 25 % more on these tiny models.
    xla = lowered.compile().cost_analysis()
    xla = xla[0] if isinstance(xla, (list, tuple)) else xla
    ratio = xla["flops"] / (counts["flops"] * batch)
    assert 1.0 <= ratio < 1.25
