"""keras_e3.training: schedule, optimizer, freezing."""

import math

import keras
import numpy as np
import pytest
from conftest import tiny_backbone_kwargs
from conftest import to_numpy

import keras_e3
from keras_e3.training import WarmupCosineSchedule
from keras_e3.training import expert_layers
from keras_e3.training import freeze
from keras_e3.training import make_optimizer
from keras_e3.training import set_mixed_precision
from keras_e3.training import warmup_cosine_schedule


def closed_form(step, peak, total, warmup, end):
    if step < warmup:
        return peak * step / warmup
    p = min(1.0, (step - warmup) / (total - warmup))
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * p))


def test_warmup_cosine_values():
    peak, total, warmup, end = 0.1, 1000, 100, 1e-3
    schedule = warmup_cosine_schedule(peak, total, warmup, end)
    expected = {0: 0.0, 50: peak / 2, 100: peak, 550: (peak + end) / 2,
                1000: end, 5000: end}
    for step, value in expected.items():
        got = float(to_numpy(schedule(step)))
        assert got == pytest.approx(value, rel=1e-5, abs=1e-7), step
        assert got == pytest.approx(closed_form(step, peak, total, warmup,
                                                end), rel=1e-5, abs=1e-7)
    for step in (1, 99, 101, 300, 999):
        assert float(to_numpy(schedule(step))) == pytest.approx(
            closed_form(step, peak, total, warmup, end), rel=1e-5)
    no_warmup = warmup_cosine_schedule(0.5, 10)
    assert float(to_numpy(no_warmup(0))) == pytest.approx(0.5)


def test_old_schedule_configs_still_load():
    """Optimizers saved with the earlier WarmupCosineSchedule load, and the
    schedule gives the values of warmup_cosine_schedule."""
    saved = {"module": None, "class_name": "WarmupCosineSchedule",
             "registered_name": "keras_e3>WarmupCosineSchedule",
             "config": {"peak_lr": 0.1, "total_steps": 1000,
                        "warmup_steps": 100, "end_lr": 1e-3}}
    old = keras.saving.deserialize_keras_object(saved)
    assert isinstance(old, WarmupCosineSchedule)
    assert old.get_config() == saved["config"]
    new = warmup_cosine_schedule(0.1, 1000, 100, 1e-3)
    for step in (0, 50, 100, 550, 999, 5000):
        assert float(to_numpy(old(step))) == pytest.approx(
            float(to_numpy(new(step))), rel=1e-6)


def test_schedule_serialization_and_errors():
    schedule = warmup_cosine_schedule(0.03, 500, 50, 0.0)
    # Keras' own schedule, so saved optimizers need nothing of keras-e3.
    assert type(schedule) is keras.optimizers.schedules.CosineDecay
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(schedule))
    assert restored.get_config() == schedule.get_config()
    optimizer = make_optimizer("sgd", schedule)
    clone = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    lr = clone.get_config()["learning_rate"]
    assert lr["config"] == schedule.get_config()
    assert clone.global_clipnorm == 1.0
    with pytest.raises(ValueError, match="must exceed warmup_steps"):
        warmup_cosine_schedule(0.1, 10, 10)
    with pytest.raises(ValueError, match="must exceed warmup_steps"):
        WarmupCosineSchedule(0.1, 10, 10)
    with pytest.raises(ValueError, match="peak_lr must be positive"):
        warmup_cosine_schedule(0.0, 10)
    with pytest.raises(ValueError, match="end_lr"):
        warmup_cosine_schedule(0.1, 10, end_lr=0.2)


def test_make_optimizer():
    sgd = make_optimizer("sgd", 0.01)
    assert isinstance(sgd, keras.optimizers.SGD)
    assert sgd.global_clipnorm == 1.0 and sgd.momentum == 0.9
    adam = make_optimizer("Adam", 1e-3, global_clipnorm=None, beta_2=0.98)
    assert isinstance(adam, keras.optimizers.Adam)
    assert adam.global_clipnorm is None and adam.beta_2 == 0.98
    assert isinstance(make_optimizer("adamw"), keras.optimizers.AdamW)
    with pytest.raises(ValueError, match="Unknown optimizer 'lamb'"):
        make_optimizer("lamb")
    with pytest.raises(ValueError, match="global_clipnorm"):
        make_optimizer("sgd", global_clipnorm=0.0)


@pytest.fixture(scope="module")
def model():
    backbone = keras_e3.E3ViTBackbone(**tiny_backbone_kwargs(
        num_layers=3, moe_layers=(1, 2)))
    # Non-zero head so that gradients reach the backbone in one step.
    return keras_e3.E3ViT(backbone, num_classes=3,
                          head_kernel_initializer="glorot_uniform")


def _paths(variables):
    return {v.path for v in variables}


def test_freeze_counts(model):
    all_paths = _paths(model.weights)
    experts = expert_layers(model)
    assert len(experts) == 2
    expert_paths = _paths(w for layer in experts for w in layer.weights)
    assert len(expert_paths) == 2 * 4  # kernel_0, bias_0, kernel_1, bias_1

    freeze(model, "head")
    assert _paths(model.trainable_weights) == _paths(model.head.weights)
    assert len(model.trainable_weights) == 2
    assert len(model.non_trainable_weights) == len(all_paths) - 2

    freeze(model, "all_but_experts")
    assert _paths(model.trainable_weights) == all_paths - expert_paths
    assert _paths(model.non_trainable_weights) == expert_paths

    freeze(model, "all")
    assert _paths(model.trainable_weights) == all_paths
    with pytest.raises(ValueError, match="train must be one of"):
        freeze(model, "experts_only")
    dense = keras_e3.E3ViT(keras_e3.E3ViTBackbone(**tiny_backbone_kwargs(
        moe_layers=(), num_experts=0, ensemble_size=1)), num_classes=3)
    with pytest.raises(ValueError, match="no MoE layers|none"):
        freeze(dense, "all_but_experts")


@pytest.mark.parametrize("mode", ["head", "all_but_experts"])
def test_fit_step_updates_only_trainable(model, rng, mode):
    freeze(model, mode)
    model.compile(optimizer=make_optimizer("sgd", 0.1))
    trainable = _paths(model.trainable_weights)
    before = {v.path: to_numpy(v).copy() for v in model.weights}
    images = rng.normal(size=(4, 16, 16, 3)).astype("float32")
    labels = np.array([0, 1, 2, 1])
    model.fit(images, labels, batch_size=4, epochs=1, verbose=0)
    changed = {v.path for v in model.weights
               if not np.array_equal(before[v.path], to_numpy(v))}
    assert changed <= trainable, sorted(changed - trainable)
    assert _paths(model.head.weights) <= changed
    if mode == "all_but_experts":
        router = model.backbone.moe_blocks[0].mlp.router
        assert _paths(router.weights) & changed
        assert len(changed) > len(trainable) // 2
    freeze(model, "all")


def test_set_mixed_precision():
    previous = set_mixed_precision(True)
    try:
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
        set_mixed_precision(False)
        assert keras.mixed_precision.global_policy().name == "float32"
    finally:
        keras.mixed_precision.set_global_policy(previous)
