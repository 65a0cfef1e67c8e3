"""Train an E³ on the digits with its experts sharded over 8 devices.

    python examples/train_expert_parallel.py [--batch-axis 1]
        [--expert-axis 8] [--epochs 3] [--train-size 0] [--out DIR]

An E³ with 8 experts (M=2 partitions of 4, K=1) in 2 MoE blocks is built
under `keras_e3.distribution.expert_parallel`: each device holds
8 / expert-axis experts of every MoE block, the batch is split over the
batch axis, and `model.fit` runs as usual (XLA moves the tokens between
devices). Prints a JSON summary: the mesh, where the expert kernels live,
the training loss, the held-out metrics; `--out` saves the model as a preset
with sharded weight files, loadable on any mesh or on one device.

Without enough accelerators the script simulates the devices on the CPU
(XLA_FLAGS=--xla_force_host_platform_device_count=N, set before JAX starts).
On several hosts, call `keras.distribution.initialize()` on each first (see
the README's "Scale-out" section). JAX backend only; on TensorFlow use
`keras_e3.distribution.tf_data_parallel()` (a MirroredStrategy).
"""

import argparse
import json
import os
import time

parser = argparse.ArgumentParser()
parser.add_argument("--batch-axis", type=int, default=1)
parser.add_argument("--expert-axis", type=int, default=8)
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument("--train-size", type=int, default=0,
                    help="use only this many training images (0: all)")
parser.add_argument("--out", default=None,
                    help="save the trained model as a sharded preset here")
args = parser.parse_args()

num_devices = args.batch_axis * args.expert_axis
os.environ["KERAS_BACKEND"] = "jax"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count="
                           f"{num_devices}")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_e3  # noqa: E402
from keras_e3 import distribution as e3_dist  # noqa: E402
from keras_e3.data.digits import load_digits_splits  # noqa: E402
from keras_e3.metrics import evaluate_predictions  # noqa: E402


def whole_batches(x, y, batch_size):
    """Every batch must split evenly over the mesh's batch axis."""
    n = len(x) - len(x) % batch_size
    return x[:n], y[:n]


(x_train, y_train), (x_test, y_test) = load_digits_splits()
if args.train_size:
    x_train, y_train = x_train[:args.train_size], y_train[:args.train_size]
x_train, y_train = whole_batches(x_train, y_train, args.batch_size)
x_test, y_test = whole_batches(x_test, y_test, args.batch_size)

keras.utils.set_random_seed(0)
distribution = e3_dist.expert_parallel(batch=args.batch_axis,
                                       expert=args.expert_axis,
                                       devices=keras.distribution.list_devices()
                                       [:num_devices])
with distribution.scope():
    backbone = keras_e3.E3ViTBackbone(
        image_size=32, patch_size=8, num_channels=1, hidden_dim=64,
        num_layers=4, num_heads=4, mlp_dim=128, representation_size=64,
        num_experts=8, moe_layers=(1, 3), ensemble_size=2,
        num_selected_experts=1, capacity_factor=1.5, seed=0)
    model = keras_e3.E3ViT(backbone, num_classes=10)
    model.compile(optimizer=keras.optimizers.AdamW(
        2e-3, weight_decay=1e-4, global_clipnorm=1.0))
    start = time.perf_counter()
    history = model.fit(x_train, y_train, batch_size=args.batch_size,
                        epochs=args.epochs, verbose=0)
    seconds = time.perf_counter() - start
    member_logits = model.predict_members(x_test,
                                          batch_size=args.batch_size)
    kernel = backbone.moe_blocks[0].mlp.experts.kernel_0
    sharding = e3_dist.variable_shardings(model)[kernel.path]
    local_experts = kernel.value.addressable_shards[0].data.shape[0]
    if args.out:
        model.save_to_preset(args.out, max_shard_size=0.0005)

metrics = evaluate_predictions(np.asarray(member_logits), y_test)
print(json.dumps({
    "devices": num_devices,
    "mesh": {"batch": args.batch_axis, "expert": args.expert_axis},
    "expert_kernel": {"path": kernel.path, "sharding": sharding,
                      "experts_per_device": local_experts},
    "train_images": len(x_train), "epochs": args.epochs,
    "train_seconds": round(seconds, 1),
    "loss": [round(v, 4) for v in history.history["loss"]],
    "held_out": {k: round(metrics[k], 4) for k in
                 ("ensemble/accuracy", "ensemble/nll", "ensemble/ece")},
    "preset": args.out}, indent=2))
