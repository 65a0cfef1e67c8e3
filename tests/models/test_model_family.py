"""The rest of vmoe's model family against the official code: MAP head,
qk-norm attention, sincos2d position embeddings (vit_tiny_map_sincos)."""

import numpy as np
import pytest

import keras_e3
from conftest import assert_close
from conftest import fixture_model
from conftest import load_fixture
from conftest import official_logits
from conftest import official_moe_calls
from conftest import tiny_backbone_kwargs
from conftest import to_numpy
from keras_e3.conversion.vmoe import VmoeConversionError
from keras_e3.conversion.vmoe import backbone_kwargs_from_vmoe
from keras_e3.conversion.vmoe import vmoe_variable_map

ATOL = 1e-5



def built_and_round_tripped(kwargs, images):
    """A backbone of `kwargs` and its pooled output on `images`, checked
    equal (1e-6) to that of its config's clone with the same weights."""
    backbone = keras_e3.E3ViTBackbone(**kwargs)
    out = to_numpy(backbone(images)["pooled_output"])
    clone = keras_e3.E3ViTBackbone.from_config(backbone.get_config())
    clone.set_weights(backbone.get_weights())
    np.testing.assert_allclose(to_numpy(clone(images)["pooled_output"]), out,
                               atol=1e-6)
    return backbone, out


def test_map_sincos_qknorm_logits():
    model, fx = fixture_model("vit_tiny_map_sincos")
    backbone = model.backbone
    assert backbone.classifier == "map"
    assert backbone.position_embedding == "sincos2d"
    assert backbone.attention_qk_norm
    assert_close(official_logits(model, fx["inputs"]), fx["logits"],
                 what="logits")


def test_map_sincos_qknorm_intermediates():
    model, fx = fixture_model("vit_tiny_map_sincos")
    ref = fx["intermediates"]
    got = model.backbone.compute_intermediates(fx["inputs"])
    for i in range(fx["config"]["encoder"]["num_layers"]):
        key = f"Encoder/encoderblock_{i}/__call__/0"
        if key in ref:
            assert_close(got[f"encoderblock_{i}"], ref[key],
                         what=f"encoderblock_{i}")
    assert_close(got["encoder_norm"], ref["Encoder/encoder_norm/__call__/0"],
                 what="encoder_norm")
    assert_close(got["pre_logits"], ref["pre_logits/__call__/0"],
                 what="pre_logits (MAP head, then Dense)")


def test_qk_norm_on_official_inputs():
    """The normalised queries and keys of one block, fed the official
    LayerNorm output."""
    model, fx = fixture_model("vit_tiny_map_sincos")
    ref = fx["intermediates"]
    attention = model.backbone.get_layer("encoderblock_1").attention
    x = ref["Encoder/encoderblock_1/LayerNorm_0/__call__/0"]
    query = attention.query_ln(attention._query_dense(x))
    key = attention.key_ln(attention._key_dense(x))
    p = "Encoder/encoderblock_1/SelfAttention/"
    assert_close(query, ref[p + "query_ln/__call__/0"], what="query_ln")
    assert_close(key, ref[p + "key_ln/__call__/0"], what="key_ln")
    assert_close(attention(x, x), ref[p + "__call__/0"], what="attention")


def test_conversion_names_every_official_parameter():
    model, fx = fixture_model("vit_tiny_map_sincos")
    with np.load(fx["params"]) as params:
        names = set(params.files)
    assert set(vmoe_variable_map(model)) == names
    assert "Encoder/posembed_input/pos_embedding" not in names
    assert len(model.backbone.embedding.weights) == 2  # conv only


def test_sincos2d_table_rows_and_columns():
    """A 2x3 grid: the first quarter depends on the column only, the third
    on the row only, with vmoe's frequencies."""
    from keras_e3.layers.embedding import sincos2d_position_embedding

    table = sincos2d_position_embedding((2, 3), 16)
    assert table.shape == (6, 16) and table.dtype == np.float32
    omega = 1.0 / 10000.0 ** (np.arange(4) / 3.0)
    for token in range(6):
        row, col = divmod(token, 3)
        expected = np.concatenate([np.sin(col * omega), np.cos(col * omega),
                                   np.sin(row * omega), np.cos(row * omega)])
        np.testing.assert_allclose(table[token], expected, atol=1e-7)


@pytest.mark.parametrize("classifier,position_embedding", [
    ("token", "sincos2d"), ("gap", "none"), ("map", "learned")])
def test_family_config_round_trip(classifier, position_embedding, rng):
    kwargs = tiny_backbone_kwargs(classifier=classifier,
                                  position_embedding=position_embedding,
                                  attention_qk_norm=True, ensemble_size=1,
                                  num_experts=2, group_size=8)
    images = rng.normal(size=(2, 16, 16, 3)).astype("float32")
    backbone, out = built_and_round_tripped(kwargs, images)
    has_pos = any("position_embedding" in w.path for w in backbone.weights)
    assert has_pos == (position_embedding == "learned")


def test_sincos2d_hidden_size_not_multiple_of_4():
    with pytest.raises(ValueError, match="multiple of 4"):
        keras_e3.E3ViTBackbone(**tiny_backbone_kwargs(
            hidden_dim=18, num_heads=2, position_embedding="sincos2d"))


def test_unknown_position_embedding_and_classifier():
    with pytest.raises(ValueError, match="position_embedding"):
        keras_e3.E3ViTBackbone(**tiny_backbone_kwargs(
            position_embedding="rope"))
    with pytest.raises(ValueError, match="classifier"):
        keras_e3.E3ViTBackbone(**tiny_backbone_kwargs(classifier="cls"))


def test_conversion_of_the_options():
    fx = load_fixture("vit_tiny_map_sincos")
    config = dict(fx["config"])
    kwargs, _, _ = backbone_kwargs_from_vmoe(config)
    assert kwargs["classifier"] == "map"
    assert kwargs["position_embedding"] == "sincos2d"
    assert kwargs["attention_qk_norm"] is True
    encoder = dict(config["encoder"], position_emb={
        "name": "sincos2d", "temperature": 100.0})
    kwargs, _, _ = backbone_kwargs_from_vmoe(dict(config, encoder=encoder))
    assert kwargs["sincos2d_temperature"] == 100.0
    encoder = dict(config["encoder"], position_emb={"name": "none"})
    kwargs, _, _ = backbone_kwargs_from_vmoe(dict(config, encoder=encoder))
    assert kwargs["position_embedding"] == "none"
    encoder = dict(config["encoder"], position_emb={"name": "rope"})
    with pytest.raises(VmoeConversionError, match="rope"):
        backbone_kwargs_from_vmoe(dict(config, encoder=encoder))


# === Experts Choice and Soft MoE ===

ROUTER_FIXTURES = ["experts_choice_tiny", "soft_moe_tiny"]


@pytest.mark.parametrize("name", ROUTER_FIXTURES)
def test_router_fixture_logits(name):
    model, fx = fixture_model(name)
    expected = {"experts_choice_tiny": "experts_choice",
                "soft_moe_tiny": "soft"}[name]
    assert model.backbone.router == expected
    assert_close(official_logits(model, fx["inputs"]), fx["logits"],
                 what="logits")


def check_moe_layers(name, check_routing):
    """Each MoE layer of fixture `name` fed the official input: its output,
    expert outputs and every router metric (1e-6), and `check_routing`
    (routing, official intermediates, the layer's vmoe prefix) for the
    router's own weights."""
    metrics = fixture_model(name)[1]["metrics"]
    for block, prefix, y, routing, ref in official_moe_calls(name):
        assert_close(y, ref[f"{prefix}/__call__/0"], what=f"{block} output")
        assert_close(routing["expert_outputs"],
                     ref[f"{prefix}/Mlp/__call__/0"], what=f"{block} experts")
        check_routing(routing, ref, prefix)
        for key, expected in metrics.items():
            if key.startswith(block + "/"):
                actual = to_numpy(routing[key[len(block) + 1:]])
                if expected.ndim == 0:  # e.g. auxiliary_loss, 0 in vmoe
                    actual = actual.mean()
                assert_close(actual.astype("float32"),
                             expected.astype("float32"), atol=1e-6, what=key)


def test_experts_choice_layer_on_official_inputs():
    """Experts Choice: dispatch mask (exact), combine weights and gates
    (1e-6), besides `check_moe_layers`' checks."""
    def check_routing(routing, ref, prefix):
        np.testing.assert_array_equal(
            to_numpy(routing["dispatch_mask"]),
            ref[f"{prefix}/Router/__call__/1"].astype(bool))
        assert_close(routing["combine_weights"],
                     ref[f"{prefix}/Router/__call__/0"], atol=1e-6,
                     what=f"{prefix} combine weights")
        assert_close(routing["gates"], ref[f"{prefix}/Router/gates"],
                     atol=1e-6, what=f"{prefix} gates")

    check_moe_layers("experts_choice_tiny", check_routing)


@pytest.mark.parametrize("dispatcher", ["einsum", "gather"])
def test_experts_choice_paths_agree(dispatcher):
    """The gather path (no [G, S, E, C] tensor) and the einsum reference
    give the official outputs, with padding in the last group."""
    model, fx = fixture_model("experts_choice_tiny")
    block = "encoderblock_1"
    moe = model.backbone.get_layer(block).mlp
    x = fx["intermediates"][f"Encoder/{block}/LayerNorm_1/__call__/0"]
    old = moe.dispatcher
    moe.dispatcher = dispatcher
    try:
        y = to_numpy(moe(x))
        y3 = to_numpy(moe(x[:3]))  # 51 tokens: a padded second group
    finally:
        moe.dispatcher = old
    assert_close(y, fx["intermediates"][f"Encoder/{block}/Moe/__call__/0"],
                 what=dispatcher)
    # The first group (images 0 and 1) is routed as before.
    assert_close(y3[:2], y[:2], atol=1e-6, what="first group, padded batch")


def test_soft_moe_layer_on_official_inputs():
    """Soft MoE: combine and dispatch weights (1e-6), besides
    `check_moe_layers`' checks."""
    def check_routing(routing, ref, prefix):
        assert_close(routing["combine_weights"],
                     ref[f"{prefix}/Router/__call__/0"], atol=1e-6,
                     what=f"{prefix} combine weights")
        assert_close(routing["dispatch_weights"],
                     ref[f"{prefix}/Router/__call__/1"], atol=1e-6,
                     what=f"{prefix} dispatch weights")

    check_moe_layers("soft_moe_tiny", check_routing)


def test_soft_moe_float32_dispatch_is_not_vmoe():
    """vmoe runs Soft MoE's dispatch/combine in bfloat16; float32 differs
    by more than 1e-5 (and stays close)."""
    model, fx = fixture_model("soft_moe_tiny")
    ref = fx["intermediates"]
    block = "encoderblock_3"
    moe = model.backbone.get_layer(block).mlp
    x = ref[f"Encoder/{block}/LayerNorm_1/__call__/0"]
    expected = ref[f"Encoder/{block}/Moe/__call__/0"]
    moe.dispatch_dtype = "float32"
    try:
        err = np.abs(to_numpy(moe(x)) - expected).max()
    finally:
        moe.dispatch_dtype = None
    assert 1e-5 < err < 1e-2, err
    assert np.abs(to_numpy(moe(x)) - expected).max() <= ATOL


@pytest.mark.parametrize("name", ROUTER_FIXTURES)
def test_router_fixture_training_step(name):
    from test_train_step import loss_and_grads

    fx = load_fixture(name)
    ref = fx["train_step"]
    model = keras_e3.E3ViT.from_vmoe(fx["config"], fx["params"])
    assert not model.backbone.losses or all(
        float(to_numpy(v)) == 0.0 for v in model.backbone.losses)
    main, aux, grads = loss_and_grads(model, fx["inputs"], ref["labels"])
    np.testing.assert_allclose(to_numpy(main), ref["main_loss"], atol=1e-5)
    assert float(to_numpy(aux)) == float(ref["auxiliary_loss"]) == 0.0
    by_variable = {id(v): g for v, g in zip(model.trainable_variables, grads)}
    names = vmoe_variable_map(model)
    assert len(names) == len(model.trainable_variables)
    global_sq = 0.0
    for official, variable in names.items():
        grad = to_numpy(by_variable[id(variable)])
        expected = ref[f"grad/{official}"]
        assert grad.shape == expected.shape, official
        err = float(np.abs(grad - expected).max())
        assert err <= 1e-5, f"{official}: gradient max abs error {err:.3g}"
        global_sq += float((grad.astype("float64") ** 2).sum())
    np.testing.assert_allclose(np.sqrt(global_sq), ref["grad_global_norm"],
                               rtol=1e-5)


@pytest.mark.parametrize("overrides,match", [
    ({"router": "soft", "num_slots": 2, "capacity_factor": 1.0},
     "num_slots or capacity_factor, not both"),
    ({"router": "experts_choice", "num_selected_experts": 1},
     "num_selected_experts=1 is for top-K"),
    ({"router": "soft", "num_selected_experts": 2},
     "num_selected_experts=2 is for top-K"),
    ({"router": "experts_choice", "ensemble_size": 2},
     "does not combine with E³"),
    ({"router": "soft", "ensemble_size": 2}, "does not combine with E³"),
    ({"router": "experts_choice", "batch_priority": True},
     "batch_priority is for top-K"),
    ({"router": "top_k", "num_slots": 4}, "num_slots is a Soft MoE"),
    ({"router": "hash"}, "router must be one of"),
    ({"router": "experts_choice", "capacity_factor": 8.0},
     "exceeds the group size"),
    ({"capacity_ceil_or_round": "floor"}, "capacity_ceil_or_round"),
])
def test_router_setting_errors(overrides, match):
    kwargs = tiny_backbone_kwargs(ensemble_size=1, num_selected_experts=None)
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=match):
        keras_e3.E3ViTBackbone(**kwargs)


def test_capacity_rounding():
    """vmoe's compute_capacity: ceil or Python round (half to even), then
    up to the multiple."""
    from keras_e3.layers.dispatch import compute_capacity
    from keras_e3.layers.soft_moe import soft_moe_num_slots

    # 34 tokens, 4 experts, cf 1.0: 8.5 -> ceil 9 -> 12; round 8 -> 8.
    assert compute_capacity(34, 4, 1, 1.0) == 12
    assert compute_capacity(34, 4, 1, 1.0, ceil_or_round="round") == 8
    assert compute_capacity(34, 4, 1, 1.0, multiple_of=1) == 9
    # 10 tokens, 4 experts: 2.5 rounds to 2 (even), 14: 3.5 -> 4.
    assert compute_capacity(10, 4, 1, 1.0, 1, "round") == 2
    assert compute_capacity(14, 4, 1, 1.0, 1, "round") == 4
    assert soft_moe_num_slots(16, 4, 1.0) == 4
    assert soft_moe_num_slots(197, 128, 1.0) == 2


@pytest.mark.parametrize("router,extra", [
    ("experts_choice", {"capacity_ceil_or_round": "round",
                        "capacity_multiple_of": 1}),
    ("soft", {"num_slots": 3}),
])
def test_router_config_round_trip_and_fit(router, extra, rng):
    """get_config round-trips; `fit` trains with router noise and no
    auxiliary loss."""
    kwargs = tiny_backbone_kwargs(ensemble_size=1, num_selected_experts=None,
                                  router=router, router_noise_std=0.5,
                                  capacity_factor=None, group_size=10,
                                  classifier="gap",
                                  **extra)
    images = rng.normal(size=(3, 16, 16, 3)).astype("float32")
    backbone, out = built_and_round_tripped(kwargs, images)
    # Noise only in training.
    train = to_numpy(backbone(images, training=True)["pooled_output"])
    assert np.abs(train - out).max() > 1e-6
    model = keras_e3.E3ViT(backbone, num_classes=3)
    model.compile(optimizer="sgd")
    history = model.fit(images, np.array([0, 1, 2]), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert model.backbone.losses == [] or all(
        float(to_numpy(v)) == 0.0 for v in model.backbone.losses)


@pytest.mark.parametrize("name", ["vit_tiny_map_sincos", *ROUTER_FIXTURES])
def test_flops_counter_params_match_the_model(name):
    """The analytic counter knows the MAP head, qk-norm, sincos2d and both
    routers: its parameter count is the model's."""
    model, _ = fixture_model(name)
    counts = keras_e3.count_flops(model) if hasattr(
        keras_e3, "count_flops") else None
    if counts is None:
        from keras_e3.evaluation.flops import count_flops

        counts = count_flops(model)
    assert counts["params"] == sum(
        int(np.prod(w.shape)) for w in model.weights)
    assert counts["flops"] > 0


@pytest.mark.parametrize("name", ROUTER_FIXTURES)
def test_router_fixture_from_native_checkpoint(name, tmp_path):
    """from_vmoe reads the new routers' parameters (Soft MoE's scalar
    `scale` included) from a vmoe-format checkpoint, experts split in
    chunks over shards as an expert-sharded save."""
    from checkpoint_writer import write_checkpoint

    fx = load_fixture(name)
    with np.load(fx["params"]) as data:
        arrays = {k: data[k] for k in data.files}
    chunks = {k: 2 for k in arrays if "/Moe/Mlp/" in k}
    write_checkpoint(str(tmp_path / "ckpt"), arrays, chunks=chunks)
    model = keras_e3.E3ViT.from_vmoe(fx["config"], str(tmp_path / "ckpt"))
    assert_close(official_logits(model, fx["inputs"]), fx["logits"],
                 what="logits from the checkpoint")


def test_resize_sincos2d_backbone(rng):
    """A sincos2d model resized to another image size gets the table of
    the new grid (no weight to resample)."""
    from keras_e3.layers.embedding import sincos2d_position_embedding
    from keras_e3.presets.loader import resize_backbone

    backbone = keras_e3.E3ViTBackbone(**tiny_backbone_kwargs(
        position_embedding="sincos2d", classifier="gap", ensemble_size=1))
    resized = resize_backbone(backbone, 24)
    assert resized.embedding.grid_size == (3, 3)
    images = rng.normal(size=(1, 24, 24, 3)).astype("float32")
    got = to_numpy(resized.compute_intermediates(images)["embeddings"])
    patches = to_numpy(resized.embedding.embed_patches(images)).reshape(
        1, 9, -1)
    np.testing.assert_allclose(
        got, patches + sincos2d_position_embedding((3, 3), 16)[None],
        atol=1e-6)
