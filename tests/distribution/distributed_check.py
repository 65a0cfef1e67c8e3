"""Distributed models on simulated CPU devices, against one device.

Run by tests/test_distribution.py in a subprocess (device counts must be set
before the backend starts, and the rest of the suite keeps one device):

    python tests/distributed_check.py jax FIXTURES_DIR OUT_JSON
        8 devices: keras.distribution expert and data parallelism,
        sharded save/load, the vmoe expert-sharded checkpoint
    python tests/distributed_check.py tensorflow FIXTURES_DIR OUT_JSON
        2 devices: tf.distribute.MirroredStrategy data parallelism

Writes a JSON report of measured differences and variable shardings; the
test asserts on it.
"""

import os
import sys

BACKEND = sys.argv[1]
os.environ["KERAS_BACKEND"] = BACKEND
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8")
if BACKEND == "tensorflow":
    import tensorflow as tf

    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0],
        [tf.config.LogicalDeviceConfiguration()] * 2)

import json  # noqa: E402
import tempfile  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_e3  # noqa: E402
from keras_e3 import distribution as e3_dist  # noqa: E402

# Tiny models with 8 experts: an E³ (M=2, K=1) and a V-MoE (K=2, BPR), with
# capacities small enough that tokens are dropped, 2 routing groups per
# batch of 8 images (17 tokens each); an Experts Choice and a Soft MoE
# model of the same size.
TINY = dict(image_size=32, patch_size=8, hidden_dim=32, num_layers=4,
            num_heads=2, mlp_dim=64, num_experts=8, moe_layers=(1, 3),
            representation_size=32, seed=1)
CONFIGS = {
    "e3": dict(TINY, ensemble_size=2, num_selected_experts=1,
               capacity_factor=1.0, group_size=4 * 17 * 2),
    "vmoe": dict(TINY, num_selected_experts=2, capacity_factor=1.0,
                 batch_priority=True, group_size=4 * 17),
    # Experts Choice: each expert takes its top 12 of a group's 68 tokens
    # (some tokens are taken by no expert), router noise in training.
    "experts_choice": dict(TINY, router="experts_choice", capacity_factor=1.0,
                           group_size=4 * 17),
    # Soft MoE: one image a group, 2 slots per expert, bf16 dispatch.
    "soft": dict(TINY, router="soft", num_slots=2, group_size=17),
}
MESHES = ((2, 4), (1, 8))
BATCH = 8


def build(config, weights=None):
    keras.utils.set_random_seed(0)
    model = keras_e3.E3ViT(keras_e3.E3ViTBackbone(**config), num_classes=10)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    if weights is not None:
        model.set_weights(weights)
    return model


def random_weights(model, seed):
    """Every weight random (the zero-initialised head would hide the
    backbone's gradients in a one-step comparison)."""
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 0.2, w.shape).astype(w.dtype)
            for w in model.get_weights()]


def max_diff(a, b):
    return float(max(np.max(np.abs(np.asarray(x) - np.asarray(y)))
                     for x, y in zip(a, b)))


def train_step(model, images, labels):
    history = model.fit(images, labels, batch_size=BATCH, epochs=1,
                        shuffle=False, verbose=0)
    return history.history["loss"][0], model.get_weights()


def single_device(config, images, labels):
    """Random weights, and with them on one device: the logits, and the
    loss and weights of one training step."""
    weights = random_weights(build(config), seed=1)
    model = build(config, weights)
    logits = np.asarray(model.predict(images, verbose=0))
    return weights, (logits, *train_step(model, images, labels))


def differences(model, images, labels, reference):
    """The forward pass and one training step of `model` against the
    single-device `reference`."""
    logits, loss, trained = reference
    out = np.asarray(model.predict(images, verbose=0))
    step_loss, step_weights = train_step(model, images, labels)
    return {"forward_max_diff": float(np.max(np.abs(out - logits))),
            "loss_diff": abs(step_loss - loss),
            "train_step_max_diff": max_diff(step_weights, trained)}


def check_tf_mirrored(config, images, labels):
    """One forward and one training step under MirroredStrategy (2 CPU
    replicas, one routing group each) against one device."""
    weights, reference = single_device(config, images, labels)
    strategy = e3_dist.tf_data_parallel()
    with strategy.scope():
        model = build(config, weights)
    return dict(differences(model, images, labels, reference),
                replicas=strategy.num_replicas_in_sync)


def expert_shards(model):
    """{path: (sharding spec, shape of device 0's shard)} for expert weights."""
    specs = e3_dist.variable_shardings(model)
    return {v.path: [specs[v.path],
                     list(v.value.addressable_shards[0].data.shape)]
            for v in model.variables if "/experts/" in v.path}


def check_config(config, images, labels):
    weights, reference = single_device(config, images, labels)
    distributions = {f"expert_parallel_{b}x{e}": (
        lambda b=b, e=e: e3_dist.expert_parallel(batch=b, expert=e))
        for b, e in MESHES}
    distributions["data_parallel_8"] = e3_dist.data_parallel
    report = {}
    for name, make in distributions.items():
        with make().scope():
            model = build(config, weights)
            shards = expert_shards(model)
            report[name] = dict(differences(model, images, labels, reference),
                                expert_shards=shards)
    return report


def check_sharded_save(config, images):
    """Save under a 2x4 mesh in shards, load under 1x8 and on one device."""
    weights = random_weights(build(config), seed=2)
    preset = os.path.join(tempfile.mkdtemp(), "preset")
    with e3_dist.expert_parallel(batch=2, expert=4).scope():
        model = build(config, weights)
        saved = np.asarray(model.predict(images, verbose=0))
        model.save_to_preset(preset, max_shard_size=0.0002)
        saved_weights = model.get_weights()
    with e3_dist.expert_parallel(batch=1, expert=8).scope():
        loaded = keras_e3.E3ViT.from_preset(preset)
        on_mesh = np.asarray(loaded.predict(images, verbose=0))
        shards = expert_shards(loaded)
        identical = all(np.array_equal(a, b) for a, b in
                        zip(loaded.get_weights(), saved_weights))
    single = keras_e3.E3ViT.from_preset(preset)
    on_one = np.asarray(single.predict(images, verbose=0))
    return {
        "files": sorted(os.listdir(preset)),
        "loaded_weights_identical": identical,
        "loaded_1x8_max_diff": float(np.max(np.abs(on_mesh - saved))),
        "loaded_single_max_diff": float(np.max(np.abs(on_one - saved))),
        "loaded_expert_shards": shards,
    }


def check_vmoe_checkpoint(fixtures):
    """The fixture's checkpoint saved with experts over 4 devices, loaded
    into a model whose experts are split over 2 (and batch over 4)."""
    path = os.path.join(fixtures, "eee_tiny_nodrop")
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    prefix = os.path.join(path, "checkpoint",
                          config["checkpoint_prefix_expert_sharded"])
    images = np.load(os.path.join(path, "inputs.npy"))
    expected = np.load(os.path.join(path, "logits.npy"))
    with e3_dist.expert_parallel(batch=4, expert=2).scope():
        model = keras_e3.E3ViT.from_vmoe(config, prefix)
        logits = np.asarray(model.predict(images, batch_size=len(images),
                                          verbose=0))
        shards = expert_shards(model)
    return {"logits_max_diff": float(np.max(np.abs(
        logits.reshape(expected.shape) - expected))),
        "expert_shards": shards}


def check_errors():
    errors = {}
    try:
        e3_dist.device_mesh(batch=3)
    except ValueError as e:
        errors["mesh"] = str(e)
    try:
        with e3_dist.expert_parallel(batch=1, expert=8).scope():
            keras_e3.E3ViTBackbone(**dict(TINY, num_experts=4))
    except ValueError as e:
        errors["experts"] = str(e)
    return errors


def main(fixtures, out):
    rng = np.random.default_rng(0)
    # Model-ready images (vmoe scales pixels to [-1, 1]).
    images = rng.uniform(-1, 1, size=(BATCH, 32, 32, 3)).astype("float32")
    labels = np.arange(BATCH) % 10
    if BACKEND == "tensorflow":
        # Without router noise: each replica draws its own noise (from the
        # same seed), which a single device cannot reproduce.
        config = dict(CONFIGS["e3"], router_noise_std=0.0)
        report = {"e3": check_tf_mirrored(config, images, labels)}
        with open(out, "w") as f:
            json.dump(report, f, indent=1)
        return
    import jax

    report = {"devices": len(jax.devices())}
    for name, config in CONFIGS.items():
        report[name] = check_config(config, images, labels)
    report["sharded_save"] = check_sharded_save(CONFIGS["e3"], images)
    report["vmoe_checkpoint"] = check_vmoe_checkpoint(fixtures)
    report["errors"] = check_errors()
    with open(out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[2:4])
