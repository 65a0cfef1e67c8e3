
from conftest import BACKEND
from conftest import run_cli


def test_demo_evaluates_the_shipped_e3_and_classifies_an_image(tmp_path):
    import keras
    import numpy as np

    from keras_e3.data.digits import load_digits_raw

    images, labels = load_digits_raw()
    image = tmp_path / "seven.png"
    seven = int(np.flatnonzero(labels == 7)[0])
    keras.utils.save_img(image, np.round(images[seven][..., None] * 255 / 16),
                         scale=False)
    result = run_cli("demo", "--image", str(image))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("e3_tiny_digits: E³ with 4 experts in 2 "
                               "partitions")
    assert f"backend {BACKEND}" in lines[0]
    assert lines[1].startswith("held-out digits: 450 images")
    rows = {line.split()[0] + (line.split()[1] if line.startswith("member")
                               else ""): line for line in lines[3:6]}
    assert set(rows) == {"ensemble", "member0", "member1"}
    accuracy = float(rows["ensemble"].split()[1])
    assert accuracy >= 0.95
    assert lines[6] == f"{image}:"
    # the preset's class names (its card's "digits" label set)
    assert lines[7].strip().startswith("member 0: ")
    assert lines[9].strip().startswith("ensemble: 7 ")


def test_demo_missing_image_is_a_clear_error():
    result = run_cli("demo", "--image", "no/such/file.png")
    assert result.returncode == 2
    assert "no such image file: no/such/file.png" in result.stderr


def test_evaluate_command_reports_soft_moe_routing(tmp_path):
    """`keras-e3 evaluate` on a tiny Soft MoE preset: each expert's mean
    combine weight in the report and the summary (the plots are checked
    in process, tests/evaluation/test_evaluate.py)."""
    import json

    import keras_e3

    backbone = keras_e3.E3ViTBackbone(
        image_size=32, patch_size=8, num_channels=1, hidden_dim=16,
        num_layers=2, num_heads=2, mlp_dim=32, num_experts=4,
        moe_layers=(1,), router="soft", num_slots=2, seed=0)
    preset = tmp_path / "soft"
    keras_e3.E3ViT(backbone, num_classes=10).save_to_preset(
        str(preset), preprocessor={"image_size": [32, 32], "num_channels": 1,
                                   "value_range": [-1.0, 1.0],
                                   "source_range": [0.0, 16.0]})
    out = tmp_path / "out"
    result = run_cli("evaluate", "--preset", str(preset), "--data", "digits",
                     "--out", str(out), "--max-examples", "8",
                     "--batch-size", "8", "--no-plots")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    layer = report["routing"]["encoderblock_1"]
    assert layer["router"] == "soft"
    assert abs(sum(layer["expert_load"]) - 1.0) < 1e-6
    assert 0.25 <= layer["mean_top_expert_weight"] <= 1.0
    assert "encoderblock_1: expert weight [" in result.stdout
    assert "top expert weight" in result.stdout
