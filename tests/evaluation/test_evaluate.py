"""`keras-e3 evaluate`: the JSON report, the PNG plots and bad input."""

import argparse
import json
import os

import numpy as np
import pytest

from conftest import BACKEND
from conftest import ROOT
from keras_e3 import io_utils
from keras_e3.cli import evaluate as cli_evaluate
from keras_e3.data import ood
from keras_e3.data.digits import digits_converter
from keras_e3.evaluation import report as ev
from keras_e3.evaluation.routing import routing_stats

PRETRAINED = ROOT / "presets"
NUM_EXAMPLES = 48
METRICS = ("accuracy", "nll", "ece", "brier")
OOD_METRICS = ("auroc", "aupr", "fpr_at_95_tpr")
# The shipped digits presets' converter (8x8 uint8 digits -> 32x32 inputs).
DIGITS_PREPROCESSOR = digits_converter(32, 1)


def parse(*argv):
    parser = argparse.ArgumentParser()
    cli_evaluate.add_parser(parser.add_subparsers())
    return parser.parse_args(["evaluate", *argv])


def tiny_preset(path, ensemble_size=2, moe_layers=(1,), **router):
    """`router`: backbone settings replacing capacity_factor=1.0."""
    import keras_e3

    backbone = keras_e3.E3ViTBackbone(
        image_size=32, patch_size=8, num_channels=1, hidden_dim=16,
        num_layers=2, num_heads=2, mlp_dim=32,
        num_experts=4 if moe_layers else 0, moe_layers=moe_layers,
        ensemble_size=ensemble_size, seed=0,
        **(router or {"capacity_factor": 1.0}))
    model = keras_e3.E3ViT(backbone, num_classes=10)
    rng = np.random.default_rng(0)
    model.head.kernel.assign(
        rng.normal(size=model.head.kernel.shape).astype("float32"))
    model.save_to_preset(str(path), preprocessor=DIGITS_PREPROCESSOR)
    return str(path)


@pytest.fixture(scope="module")
def e3_preset(tmp_path_factory):
    """A tiny E³ (random weights, 4 experts in 2 partitions, K=1)."""
    return tiny_preset(tmp_path_factory.mktemp("e3") / "preset")


@pytest.fixture(scope="module")
def digits():
    from keras_e3.data import load_dataset

    images, labels, _ = load_dataset("digits", DIGITS_PREPROCESSOR)
    return images, labels


@pytest.fixture(scope="module")
def e3_run(e3_preset, tmp_path_factory):
    """The tiny E³ evaluated on digits with noise as OOD data."""
    preset = e3_preset
    out = tmp_path_factory.mktemp("e3_run") / "out"
    rc = cli_evaluate.run(parse("--preset", preset, "--data", "digits", "--ood-data",
                      "noise", "--out", str(out), "--batch-size", "16",
                      "--max-examples", str(NUM_EXAMPLES)))
    assert rc == 0
    report = json.loads((out / ev.REPORT_FILE).read_text())
    return preset, out, report


def _load(preset, **overrides):
    import keras_e3

    return keras_e3.E3ViT.from_preset(preset, **overrides)


def _assert_png(path):
    from PIL import Image

    assert path.is_file(), path
    assert path.stat().st_size > 5000, path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert min(image.size) > 200
        # Not a blank canvas.
        assert len(image.convert("L").getcolors(1 << 16) or range(999)) > 20


def test_report_has_every_metric_consistent_with_the_model(e3_run, digits):
    from keras_e3.metrics import evaluate_predictions

    preset, out, report = e3_run
    assert report["num_examples"] == NUM_EXAMPLES
    assert report["num_ood_examples"] == NUM_EXAMPLES
    assert report["ensemble_size"] == 2
    assert report["num_classes"] == 10
    assert report["class_names"] == [str(i) for i in range(10)]
    assert report["backend"] == BACKEND
    assert report["preset"] == preset
    assert report["dataset"] == "digits"
    assert report["ood_dataset"] == "noise"
    assert report["num_bins"] == 15
    metrics = report["metrics"]
    for prefix in ("ensemble", "member_0", "member_1"):
        for name in METRICS:
            assert f"{prefix}/{name}" in metrics
    for name in ("disagreement", "normalized_disagreement", "average_kl"):
        assert name in metrics
    model = _load(preset)
    images, labels = (a[:NUM_EXAMPLES] for a in digits)
    logits = np.asarray(model.predict(images, batch_size=16, verbose=0))
    expected = evaluate_predictions(logits, labels)
    assert set(metrics) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(metrics[key], value, rtol=1e-5,
                                   atol=1e-6, err_msg=key)
    # Cost from count_flops; routing of the one MoE block.
    from keras_e3.evaluation.flops import count_flops

    counts = count_flops(model)
    assert report["cost"]["flops"] == counts["flops"]
    assert report["cost"]["params"] == counts["params"] == model.count_params()
    assert set(report["routing"]) == {"encoderblock_1"}


def test_ood_metrics_for_every_score(e3_run):
    _, _, report = e3_run
    assert set(report["ood"]) == {"msp", "entropy", "max_logit",
                                  "mutual_information"}
    for values in report["ood"].values():
        assert set(values) == set(OOD_METRICS)
        assert all(0.0 <= v <= 1.0 for v in values.values())


def test_plots_are_valid_pngs(e3_run):
    _, out, report = e3_run
    assert report["plots"] == ev.PLOT_FILES
    assert report["skipped_plots"] == {}
    for name in report["plots"].values():
        _assert_png(out / name)
    leftovers = [f for f in os.listdir(out) if f.startswith(".")]
    assert not leftovers


def test_e3_routing_maps_tokens_to_their_member_partition(e3_preset,
                                                          digits):
    """Each member's tokens go to its own experts, [image, member, token]
    is laid out right (permuting the images permutes the routing), and
    the loads count every dispatched token copy."""
    images = digits[0][:16]
    # capacity 4x: no drops, so each token's expert is its own choice.
    model = _load(e3_preset, capacity_factor=4.0)
    stats = routing_stats(model, images, batch_size=8)
    layer = stats["layers"]["encoderblock_1"]
    top = layer["top_expert"]  # [N, M, T]
    assert top.shape == (16, 2, 17)
    assert layer["dropped_fraction"] == 0.0
    assert np.all(top // 2 == np.arange(2)[None, :, None])
    # K=1, no drops: each member's loads sum to one.
    load = np.asarray(layer["expert_load"])
    np.testing.assert_allclose([load[:2].sum(), load[2:].sum()], [1.0, 1.0])
    assert layer["expert_member"] == [0, 0, 1, 1]
    order = np.r_[8:16, 0:8][::-1]
    permuted = routing_stats(model, images[order], batch_size=8)
    np.testing.assert_array_equal(
        permuted["layers"]["encoderblock_1"]["top_expert"], top[order])


def test_dropped_tokens_are_reported(e3_preset, digits):
    model = _load(e3_preset, capacity_factor=0.25)
    images = digits[0][:16]
    layer = routing_stats(model, images)["layers"]["encoderblock_1"]
    assert layer["dropped_fraction"] > 0.3
    np.testing.assert_allclose(np.sum(layer["expert_load"]),
                               2 * (1 - layer["dropped_fraction"]))
    np.testing.assert_array_equal(layer["dropped"], layer["top_expert"] < 0)


# Experts Choice: one image (17 tokens) per routing group, each of the 4
# experts takes C = ceil(17 * 0.5 / 4) = 3 of them. Soft MoE: 2 slots per
# expert, one image per group (its default).
EC_ROUTER = dict(router="experts_choice", capacity_factor=0.5,
                 capacity_multiple_of=1, group_size=17)
SOFT_ROUTER = dict(router="soft", num_slots=2)


@pytest.fixture(scope="module")
def ec_preset(tmp_path_factory):
    return tiny_preset(tmp_path_factory.mktemp("ec") / "preset",
                       ensemble_size=1, **EC_ROUTER)


@pytest.fixture(scope="module")
def soft_preset(tmp_path_factory):
    return tiny_preset(tmp_path_factory.mktemp("soft") / "preset",
                       ensemble_size=1, **SOFT_ROUTER)


def test_experts_choice_tokens_taken_per_expert(ec_preset, digits):
    """Every expert takes its C tokens of each image; the tokens taken by
    no expert are counted, and the experts per token add up to the
    experts' loads; permuting the images permutes the routing (one image
    a routing group; one batch size: one XLA compilation on JAX)."""
    model = _load(ec_preset)
    images = digits[0][:12]
    stats = routing_stats(model, images, batch_size=6)
    layer = stats["layers"]["encoderblock_1"]
    assert layer["router"] == "experts_choice"
    np.testing.assert_allclose(layer["expert_load"], [3 / 17] * 4)
    assert layer["uniform_load"] == pytest.approx(3 / 17)
    hist = np.asarray(layer["experts_per_token"])
    assert hist.shape == (5,)
    assert hist.sum() == pytest.approx(1.0)
    # 4 experts x 3 tokens of 17: on average 12/17 experts per token.
    assert np.dot(np.arange(5), hist) == pytest.approx(12 / 17)
    assert layer["dropped_fraction"] == pytest.approx(hist[0])
    assert 0 < layer["dropped_fraction"] < 1
    top = layer["top_expert"]
    assert top.shape == (12, 1, 17)
    np.testing.assert_array_equal(layer["dropped"], top < 0)
    assert set(np.unique(top)) <= {-1, 0, 1, 2, 3}
    order = np.arange(12)[::-1]
    permuted = routing_stats(model, images[order], batch_size=6)
    np.testing.assert_array_equal(
        permuted["layers"]["encoderblock_1"]["top_expert"], top[order])


def test_soft_moe_weight_per_expert(soft_preset, digits):
    """A token's weight on an expert is its combine weight summed over the
    expert's slots: with the router's scale at 0 every slot weighs the
    same, so every expert gets 1/4 of every token."""
    model = _load(soft_preset)
    images = digits[0][:12]
    layer = routing_stats(model, images, batch_size=6)["layers"][
        "encoderblock_1"]
    assert layer["router"] == "soft"
    assert layer["dropped_fraction"] == 0.0
    assert not layer["dropped"].any()
    assert sum(layer["expert_load"]) == pytest.approx(1.0)
    assert layer["uniform_load"] == 0.25
    weight = layer["top_expert_weight"]
    assert weight.shape == (12, 1, 17)
    assert np.all((weight >= 0.25 - 1e-6) & (weight <= 1 + 1e-6))
    assert layer["mean_top_expert_weight"] == pytest.approx(weight.mean())
    order = np.arange(12)[::-1]
    permuted = routing_stats(model, images[order], batch_size=6)
    np.testing.assert_array_equal(
        permuted["layers"]["encoderblock_1"]["top_expert"],
        layer["top_expert"][order])
    router = model.backbone.moe_blocks[0].mlp.router
    router.scale.assign(0.0)
    uniform = routing_stats(model, images, batch_size=6)["layers"][
        "encoderblock_1"]
    np.testing.assert_allclose(uniform["expert_load"], [0.25] * 4,
                               atol=1e-6)
    np.testing.assert_allclose(uniform["top_expert_weight"], 0.25, atol=1e-6)


@pytest.mark.parametrize("router", ["experts_choice", "soft"])
def test_evaluate_report_and_plots_for_new_routers(router, ec_preset,
                                                   soft_preset, tmp_path,
                                                   capsys):
    preset = ec_preset if router == "experts_choice" else soft_preset
    out = tmp_path / "out"
    assert cli_evaluate.run(parse("--preset", preset, "--data", "digits",
                                  "--out", str(out), "--max-examples", "8",
                                  "--batch-size", "8")) == 0
    report = json.loads((out / ev.REPORT_FILE).read_text())
    layer = report["routing"]["encoderblock_1"]
    assert layer["router"] == router
    assert not set(layer) & {"top_expert", "dropped", "top_expert_weight"}
    assert ("experts_per_token" in layer) == (router == "experts_choice")
    assert ("mean_top_expert_weight" in layer) == (router == "soft")
    assert set(report["plots"]) == {"reliability", "member_metrics",
                                    "routing_maps", "expert_load"}
    for name in ("routing_maps", "expert_load"):
        _assert_png(out / report["plots"][name])
    printed = capsys.readouterr().out
    expected = ("taken by no expert" if router == "experts_choice"
                else "top expert weight")
    assert "encoderblock_1: " in printed and expected in printed


def test_dense_vit_skips_routing_plots(tmp_path, capsys):
    preset = tiny_preset(tmp_path / "vit", ensemble_size=1, moe_layers=())
    out = tmp_path / "out"
    assert cli_evaluate.run(parse("--preset", preset, "--data", "digits", "--out",
                        str(out), "--max-examples", "32",
                        "--batch-size", "32")) == 0
    report = json.loads((out / ev.REPORT_FILE).read_text())
    assert report["routing"] == {}
    assert set(report["plots"]) == {"reliability", "member_metrics"}
    assert set(report["skipped_plots"]) == {"routing_maps", "expert_load",
                                            "ood_scores"}
    assert "no MoE" in report["skipped_plots"]["routing_maps"]
    assert set(report["metrics"]) == {f"{p}/{m}" for p in ("ensemble",
                                                           "member_0")
                                      for m in METRICS}
    assert "ood" not in report
    for name in report["plots"].values():
        _assert_png(out / name)
    assert not (out / "routing_maps.png").exists()
    printed = capsys.readouterr().out
    assert f"report: {out / ev.REPORT_FILE}" in printed
    assert "routing_maps skipped" in printed


def test_python_api_without_output_folder(e3_preset, digits, tmp_path):
    model = _load(e3_preset)
    images, labels = (a[:16] for a in digits)
    ood = images[:, ::-1]
    report = ev.evaluate(model, images, labels, ood_images=ood, plots=False,
                         batch_size=16)
    assert report["plots"] == {}
    assert set(report["ood"]["msp"]) == set(OOD_METRICS)
    assert list(tmp_path.iterdir()) == []
    json.dumps(report, allow_nan=False)


@pytest.mark.single_backend
def test_ood_datasets(digits):
    x = np.linspace(-1, 1, 2 * 32 * 32, dtype=np.float32).reshape(2, 32, 32, 1)
    noise = ood.load_ood_dataset("noise", DIGITS_PREPROCESSOR, x)
    assert noise.shape == x.shape and noise.dtype == np.float32
    assert noise.min() >= -1 - 1e-6 and noise.max() <= 1 + 1e-6
    np.testing.assert_array_equal(
        noise, ood.load_ood_dataset("noise", DIGITS_PREPROCESSOR, x))
    images = digits[0]
    inverted = ood.load_ood_dataset("digits-inverted", DIGITS_PREPROCESSOR, x)
    np.testing.assert_allclose(inverted, -images, atol=1e-6)
    rotated = ood.load_ood_dataset("digits-rotated", DIGITS_PREPROCESSOR, x)
    np.testing.assert_allclose(rotated[0, :, :, 0],
                               np.rot90(images[0, :, :, 0]), atol=1e-6)


@pytest.mark.single_backend
def test_json_safe_and_atomic_write(tmp_path):
    data = io_utils.json_safe({"a": float("nan"), "b": np.float32(0.5),
                          "c": (np.int64(3), float("inf")),
                          "d": np.arange(2)})
    assert data == {"a": None, "b": 0.5, "c": [3, None], "d": [0, 1]}
    path = tmp_path / "r.json"
    io_utils.write_json_atomic(str(path), data)
    assert json.loads(path.read_text()) == data
    assert os.listdir(tmp_path) == ["r.json"]


@pytest.mark.single_backend
@pytest.mark.parametrize("argv, message", [
    (("--data", "mnist"), "--data: Unknown dataset 'mnist'"),
    (("--data", "./no/such/folder"), "No such folder './no/such/folder'"),
    (("--data", "digits", "--ood-data", "svhn"),
     "--ood-data: Unknown dataset 'svhn'"),
    (("--data", "digits", "--batch-size", "0"),
     "--batch-size must be a positive integer"),
    (("--data", "digits", "--num-bins", "-3"),
     "--num-bins must be a positive integer"),
])
def test_bad_input_is_a_clear_error(tmp_path, argv, message):
    args = parse("--preset", str(PRETRAINED / "no_such_preset"),
                 "--out", str(tmp_path / "out"), *argv)
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        cli_evaluate.run(args)
    assert not (tmp_path / "out").exists()


@pytest.mark.single_backend
def test_unknown_preset_is_a_clear_error(tmp_path):
    from keras_e3.presets.files import PresetError

    with pytest.raises(PresetError, match="Unknown preset 'no_such_preset'"):
        cli_evaluate.run(parse("--preset", "no_such_preset", "--data", "digits",
                     "--out", str(tmp_path / "out")))
    with pytest.raises(PresetError, match="No preset directory"):
        cli_evaluate.run(parse("--preset", str(tmp_path / "missing"), "--data",
                     "digits", "--out", str(tmp_path / "out")))


@pytest.mark.single_backend
def test_cli_evaluates_a_folder_dataset(e3_preset, tmp_path, capsys):
    """Through the `keras-e3` entry point (in process), on a folder of
    class sub-folders, with a folder as OOD data."""
    from PIL import Image

    from keras_e3.cli import main

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    for label in ("0", "1", "2"):
        (data / label).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 17, (8, 8), np.uint8)).save(
                data / label / f"{i}.png")
    out = tmp_path / "out"
    assert main(["evaluate", "--preset", e3_preset, "--data", str(data),
                 "--ood-data", str(data), "--out", str(out),
                 "--no-plots"]) == 0
    report = json.loads((out / ev.REPORT_FILE).read_text())
    assert report["num_examples"] == report["num_ood_examples"] == 12
    # sub-folders 0/ 1/ 2/ are the model's classes "0", "1", "2" of its 10
    assert report["class_names"] == [str(i) for i in range(10)]
    assert report["plots"] == {}
    assert f"report: {out / ev.REPORT_FILE}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--preset", e3_preset, "--data", "mnist", "--out",
              str(out)])
    assert exit_info.value.code == 1
    assert ("keras-e3 evaluate: --data: Unknown dataset 'mnist'"
            in capsys.readouterr().err)
