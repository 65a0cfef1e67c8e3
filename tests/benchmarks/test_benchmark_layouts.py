"""benchmarks/inference_layouts.py: the layouts it sets and the shares and
gaps it reports."""

import os
import sys

import pytest
from conftest import tiny_backbone_kwargs

import keras_e3

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..",
                                "benchmarks"))
import inference_layouts  # noqa: E402


def test_add_shares_compares_each_row_with_its_batchs_dense_model():
    rows = [dict(batch=32, layout="-", infer_useful_gflops_per_s=90.0),
            dict(batch=32, layout="buckets", infer_useful_gflops_per_s=80.0),
            dict(batch=128, layout="tiles", infer_useful_gflops_per_s=60.0),
            dict(batch=128, layout="-", infer_useful_gflops_per_s=75.0)]
    inference_layouts.add_shares(rows, peak=100.0)
    assert [r["infer_share_of_peak"] for r in rows] == [0.9, 0.8, 0.6, 0.75]
    assert [r["share_gap_points"] for r in rows] == [0.0, 10.0, 15.0, 0.0]


@pytest.mark.single_backend
def test_with_layout_sets_every_moe_layer():
    backbone = keras_e3.E3ViTBackbone(**tiny_backbone_kwargs(
        num_layers=4, moe_layers=(1, 3)))
    model = keras_e3.E3ViT(backbone, num_classes=3)
    layers = [block.mlp for block in backbone.moe_blocks]
    assert len(layers) >= 2
    inference_layouts.with_layout([model], "tiles")
    assert not any(layer.row_buckets for layer in layers)
    inference_layouts.with_layout([model], "buckets")
    assert all(layer.row_buckets for layer in layers)


@pytest.mark.single_backend
def test_one_expert_per_member_twin_does_the_same_work_on_full_buffers():
    """The twin: one expert per member, whose capacity holds exactly that
    member's tokens of a group; the same FLOPs as the model but the
    router's (E outputs per token instead of M)."""
    config = tiny_backbone_kwargs(num_layers=4, moe_layers=(1, 3),
                                  num_experts=6, ensemble_size=3,
                                  group_size=21, capacity_factor=1.5)
    twin = inference_layouts.one_expert_per_member(config)
    backbone = keras_e3.E3ViTBackbone(**twin)
    for block in backbone.moe_blocks:
        assert block.mlp.num_experts == 3
        assert block.mlp.capacity * 3 == block.mlp.group_size
    counts = [keras_e3.count_flops(c, expert_tokens="routed")["breakdown"]
              for c in (config, twin)]
    assert counts[1]["router"] * 2 == counts[0]["router"]
    for part in ("attention", "mlp", "moe_experts", "head"):
        assert counts[1][part] == counts[0][part] > 0


def test_add_shares_compares_rows_of_one_run_with_its_dense_model():
    """The ViT on M times the batch, timed in the batch-32 run, is compared
    with that run's ViT; a batch-64 run keeps its own."""
    rows = [dict(batch=32, run_batch=32, layout="-",
                 infer_useful_gflops_per_s=90.0),
            dict(batch=64, run_batch=32, layout="-",
                 infer_useful_gflops_per_s=81.0),
            dict(batch=64, run_batch=64, layout="-",
                 infer_useful_gflops_per_s=85.0),
            dict(batch=64, run_batch=64, layout="buckets",
                 infer_useful_gflops_per_s=80.0)]
    inference_layouts.add_shares(rows, peak=100.0)
    assert [r["share_gap_points"] for r in rows] == [0.0, 9.0, 0.0, 5.0]
