"""keras_e3 vs an independent float64 NumPy vmoe reference, beyond fixtures.

The golden fixtures only cover E=4, K in {1, 2}, M in {1, 2}, the "token"
classifier with a pre-logits layer and no batch priority. Here the NumPy
re-implementation of the official forward pass (tests/vmoe_reference.py) is
first checked against every golden fixture, then used as the oracle for other
configurations: more experts, K=3, M=3/4, batch-prioritized routing, token
dropping, "gap" pooling without pre-logits, MoE in the first / every block,
3 heads, non-square images.
"""

import json

import keras
import numpy as np
import pytest

import keras_e3
from conftest import FIXTURE_NAMES
from conftest import fixture_dir
from vmoe_reference import capacity_of
from vmoe_reference import reference_forward
from vmoe_reference import random_params
from vmoe_reference import route_group

ATOL = 1e-5
BATCH = 4


def _fixture(name):
    # conftest's lookup: KERAS_E3_FIXTURES, else ../shared/fixtures/vmoe.
    return fixture_dir(name)


# --------------------------------------------------------------------------
# The reference itself against the official outputs.
# --------------------------------------------------------------------------

@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_reference_matches_fixtures(name):
    path = _fixture(name)
    config = json.loads((path / "config.json").read_text())
    with np.load(path / "params.npz") as data:
        params = {k: data[k] for k in data.files}
    logits, info = reference_forward(config, params,
                                     np.load(path / "inputs.npy"),
                                     return_info=True)
    expected = np.load(path / "logits.npy")
    assert logits.shape == expected.shape
    err = float(np.max(np.abs(logits - expected)))
    assert err < ATOL, f"{name}: reference off by {err:.3g}"
    # Routing decisions: identical dispatch masks.
    if (path / "intermediates.npz").exists() and info:
        with np.load(path / "intermediates.npz") as inter:
            blocks = config["encoder"]["moe"]["layers"]
            for block, block_info in zip(blocks, info):
                key = f"Encoder/encoderblock_{block}/Moe/Router/__call__/1"
                mask = inter[key].astype(bool)
                mine = (block_info["slots"][..., None]
                        == np.arange(mask.shape[-1]))
                np.testing.assert_array_equal(mine, mask)


def test_reference_routing_matches_router_cases():
    path = _fixture("") / "router_functions.npz"
    if not path.exists():
        pytest.skip(f"golden fixtures not found at {path} "
                    "(set KERAS_E3_FIXTURES)")
    with np.load(path) as cases:
        for c in range(6):
            s, e, k, cf, bpr = cases[f"case{c}/config"]
            s, e, k = int(s), int(e), int(k)
            mask = cases[f"case{c}/dispatch_mask"].astype(bool)
            cap = capacity_of(s, e, k, float(cf))
            assert cap == mask.shape[-1]
            slots, _ = route_group(cases[f"case{c}/gates"].astype(np.float64),
                                   k, cap, bool(bpr))
            np.testing.assert_array_equal(
                slots[..., None] == np.arange(cap), mask, err_msg=f"case{c}")


# --------------------------------------------------------------------------
# Configurations the fixtures do not cover.
# --------------------------------------------------------------------------

def _config(*, experts=4, k=1, members=1, cf=1.0, bpr=False, layers=(1,),
            num_layers=2, group_images=2, image_size=32, patch=8, hidden=32,
            heads=2, mlp=64, classifier="token", representation_size=32,
            num_classes=10):
    ih, iw = (image_size, image_size) if isinstance(image_size, int) \
        else image_size
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    tokens = (ih // ph) * (iw // pw) + (classifier == "token")
    moe = {"layers": list(layers), "num_experts": experts,
           "group_size": group_images * tokens * members,
           "router": {"num_selected_experts": k, "noise_std": 1.0,
                      "importance_loss_weight": 0.005,
                      "load_loss_weight": 0.005,
                      "dispatcher": {"name": "einsum", "bfloat16": False,
                                     "capacity_factor": cf,
                                     "batch_priority": bpr}}}
    if members > 1:
        moe["ensemble_size"] = members
    return {
        "name": ("VisionTransformerMoeEnsemble" if members > 1
                 else "VisionTransformerMoe"),
        "num_classes": num_classes,
        "patch_size": [ph, pw],
        "hidden_size": hidden,
        "classifier": classifier,
        "representation_size": representation_size,
        "head_bias_init": 0.0,
        "encoder": {"num_layers": num_layers, "num_heads": heads,
                    "mlp_dim": mlp, "dropout_rate": 0.0,
                    "attention_dropout_rate": 0.0, "moe": moe},
        "image_size": (image_size if isinstance(image_size, int)
                       else list(image_size)),
    }


# name -> (config, whether the reference drops tokens with these params:
# the random routers are unbalanced, so even cf=1.0 drops some).
CONFIGS = {
    "vmoe_e8_k2_cf1": (_config(experts=8, k=2, cf=1.0), True),
    "vmoe_e8_k2_cf4_nodrop": (_config(experts=8, k=2, cf=4.0), False),
    "vmoe_e8_k1_cf0.5_bpr": (
        _config(experts=8, k=1, cf=0.5, bpr=True, group_images=4), True),
    "vmoe_e6_k3_cf0.75_bpr": (
        _config(experts=6, k=3, cf=0.75, bpr=True, group_images=1), True),
    "vmoe_e8_k2_cf0.5_noprio": (
        _config(experts=8, k=2, cf=0.5, group_images=1, layers=(0, 1)), True),
    "e3_e8_m2_k2_cf0.5": (_config(experts=8, members=2, k=2, cf=0.5), True),
    "e3_e8_m4_k1_cf1_bpr": (
        _config(experts=8, members=4, k=1, cf=1.0, bpr=True,
                group_images=1), True),
    "e3_e6_m3_k2_cf1.25": (
        _config(experts=6, members=3, k=2, cf=1.25, group_images=4), False),
    "e3_e6_m3_k1_cf0.5_bpr": (
        _config(experts=6, members=3, k=1, cf=0.5, bpr=True,
                group_images=2), True),
    "vmoe_gap_norep": (
        _config(experts=4, k=1, cf=1.0, classifier="gap",
                representation_size=None), True),
    "e3_gap_norep_first_block": (
        _config(experts=4, members=2, k=1, cf=0.75, classifier="gap",
                representation_size=None, layers=(0,), num_layers=3), True),
    "e3_every_block": (
        _config(experts=4, members=2, k=1, cf=1.0, layers=(0, 1, 2),
                num_layers=3, group_images=1), True),
    "vmoe_every_block_bpr": (
        _config(experts=4, k=2, cf=0.75, bpr=True, layers=(0, 1, 2),
                num_layers=3, group_images=4), True),
    "vmoe_hidden24_3heads": (
        _config(experts=4, k=2, cf=1.0, hidden=24, heads=3, mlp=48,
                representation_size=16, layers=(0, 2), num_layers=4,
                bpr=True), True),
    "e3_nonsquare_16x24": (
        _config(experts=4, members=2, k=2, cf=1.0, image_size=(16, 24),
                group_images=2), False),
    "vmoe_nonsquare_16x24_patch8x4": (
        _config(experts=4, k=1, cf=0.5, image_size=(16, 24), patch=(8, 4),
                group_images=1, classifier="gap", num_classes=5), True),
}


def _case(name):
    config, must_drop = CONFIGS[name]
    seed = sum(map(ord, name))
    image_size = config["image_size"]
    params = random_params(config, image_size, config["num_classes"], seed)
    ih, iw = ((image_size, image_size) if isinstance(image_size, int)
              else image_size)
    images = np.random.default_rng(seed + 1).standard_normal(
        (BATCH, ih, iw, 3)).astype(np.float32)
    return config, params, images, must_drop


def test_configs_are_not_fixture_configs():
    for name, (config, _) in CONFIGS.items():
        moe = config["encoder"]["moe"]
        router = moe["router"]
        fixture_like = (
            moe["num_experts"] == 4
            and router["num_selected_experts"] in (1, 2)
            and moe.get("ensemble_size", 1) in (1, 2)
            and config["classifier"] == "token"
            and config["representation_size"] == 32
            and not router["dispatcher"]["batch_priority"]
            and moe["layers"] == [1, 3]
            and config["image_size"] == 32 and config["hidden_size"] == 32)
        assert not fixture_like, name


def test_reference_drops_tokens():
    """The small-capacity configs really exercise token dropping."""
    total = 0
    for name in CONFIGS:
        config, params, images, must_drop = _case(name)
        _, info = reference_forward(config, params, images, return_info=True)
        dropped = sum(i["dropped"] for i in info)
        total += dropped
        if must_drop:
            assert dropped > 0, f"{name}: expected dropped tokens"
        else:
            assert dropped == 0, f"{name}: expected no dropped tokens"
    assert total > 0


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_keras_matches_reference(name):
    config, params, images, _ = _case(name)
    expected, info = reference_forward(config, params, images,
                                       return_info=True)
    model = keras_e3.E3ViT.from_vmoe(config, params)
    members = config["encoder"]["moe"].get("ensemble_size", 1)
    if keras.backend.backend() == "jax":
        # One XLA compilation of the whole forward: much faster on JAX than
        # compiling every eager op for each new configuration.
        got = model.predict(images, batch_size=BATCH, verbose=0)
    else:
        got = keras.ops.convert_to_numpy(model(images))
    got = np.asarray(got)
    if members > 1:
        assert got.shape == (BATCH, members, config["num_classes"])
    else:
        assert got.shape == (BATCH, config["num_classes"])
    got = got.reshape(-1, got.shape[-1])
    assert got.shape == expected.shape
    err = float(np.max(np.abs(got - expected)))
    drops = [i["dropped"] for i in info]
    assert err <= ATOL, (f"{name}: max abs error {err:.3g} "
                         f"(|logits| <= {np.abs(expected).max():.2f}, "
                         f"dropped per MoE block {drops})")
