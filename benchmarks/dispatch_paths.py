"""Inference and training speed of the dispatch paths, side by side.

    KERAS_BACKEND=jax python benchmarks/dispatch_paths.py [--quick]
        [--out benchmarks/results/dispatch_paths_jax.json]

For the paper's S/32 shapes (224px, width 512, 8 layers, 8 heads, MLP
2048, 8 experts in the last 2 odd blocks; V-MoE K=2 cf 1.05, E³ M=2 K=1
cf 1.5) and a dense ViT, at batch 32 and 128, with routing groups of 8
images (the paper's configs) and of the whole batch: the median time of
repeated jit-compiled calls (warm-up excluded) per dispatch path, the
model's own FLOPs per image (keras_e3.flops) and the useful GFLOP/s as a
fraction of a jit-compiled fp32 matmul peak measured in the same run.
Prints JSON (and writes it with --out). Not a test: timings depend on the
machine; compare rows of one run only.
"""

import argparse
import json
import os
import platform
import statistics
import time

import keras
import numpy as np

import keras_e3
from keras_e3.io_utils import write_json_atomic

S32 = dict(image_size=224, patch_size=32, hidden_dim=512, num_layers=8,
           num_heads=8, mlp_dim=2048, representation_size=512)
MODELS = {
    "vit_s32": dict(S32),
    "vmoe_s32": dict(S32, num_experts=8, moe_layers=(5, 7),
                     num_selected_experts=2, capacity_factor=1.05),
    "e3_s32": dict(S32, num_experts=8, moe_layers=(5, 7),
                   num_selected_experts=1, ensemble_size=2,
                   capacity_factor=1.5),
}


def timed(fn, repeats):
    fn()  # warm-up (compilation)
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak(repeats):
    """GFLOP/s of a jit-compiled fp32 2048^3 matmul on this backend."""
    n = 2048
    a = keras.random.normal((n, n))
    b = keras.random.normal((n, n))
    if keras.backend.backend() == "jax":
        import jax

        f = jax.jit(lambda x, y: x @ y)
        run = lambda: f(a, b).block_until_ready()  # noqa: E731
    elif keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        f = tf.function(lambda x, y: x @ y, jit_compile=True)
        run = lambda: f(a, b).numpy()  # noqa: E731
    else:
        run = lambda: keras.ops.convert_to_numpy(a @ b)  # noqa: E731
    return 2 * n ** 3 / timed(run, repeats) / 1e9


def predict_fn(model, images):
    """A compiled inference call that returns when the result is ready."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        state = [v.value for v in model.trainable_variables], \
            [v.value for v in model.non_trainable_variables]
        f = jax.jit(lambda t, n, x: model.stateless_call(t, n, x)[0])
        return lambda: f(*state, images).block_until_ready()
    if backend == "tensorflow":
        import tensorflow as tf

        f = tf.function(lambda x: model(x, training=False), jit_compile=True)
        return lambda: f(images).numpy()
    return lambda: keras.ops.convert_to_numpy(model(images, training=False))


def train_fn(model, images, labels):
    model.compile(optimizer=keras.optimizers.SGD(1e-3), metrics=None,
                  jit_compile=keras.backend.backend() != "torch")
    return lambda: model.train_on_batch(images, labels)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true",
                        help="batch 32 only, inference only, 3 repeats")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dispatchers", nargs="+",
                        default=["einsum", "gather"])
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else args.repeats
    batches = (32,) if args.quick else (32, 128)
    rng = np.random.default_rng(0)
    rows = []
    peak = matmul_peak(repeats)
    for batch in batches:
        images = rng.uniform(-1, 1, (batch, 224, 224, 3)).astype("float32")
        labels = rng.integers(0, 1000, batch)
        for name, config in MODELS.items():
            moe = bool(config.get("num_experts"))
            group_images = (8, batch) if moe else (None,)
            for images_per_group in group_images:
                for dispatcher in (args.dispatchers if moe else ["-"]):
                    kwargs = dict(config)
                    if moe:
                        tokens = 50 * kwargs.get("ensemble_size", 1)
                        kwargs.update(dispatcher=dispatcher,
                                      group_size=images_per_group * tokens)
                    keras.utils.set_random_seed(0)
                    model = keras_e3.E3ViT(keras_e3.E3ViTBackbone(**kwargs),
                                           num_classes=1000)
                    counts = keras_e3.count_flops(model)
                    useful = counts["flops"] / 1e9
                    row = dict(model=name, batch=batch,
                               images_per_group=images_per_group,
                               dispatcher=dispatcher,
                               gflops_per_image=round(useful, 3))
                    seconds = timed(predict_fn(model, images), repeats)
                    row.update(
                        infer_ms=round(1e3 * seconds, 1),
                        infer_images_per_s=round(batch / seconds, 1),
                        infer_useful_gflops_per_s=round(
                            useful * batch / seconds, 1),
                        infer_peak_fraction=round(
                            useful * batch / seconds / peak, 3))
                    if not args.quick:
                        seconds = timed(train_fn(model, images, labels),
                                        max(2, repeats // 2))
                        row.update(train_ms=round(1e3 * seconds, 1),
                                   train_images_per_s=round(
                                       batch / seconds, 1))
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    result = {
        "backend": keras.backend.backend(),
        "keras": keras.version(), "machine": platform.machine(),
        "cpus": os.cpu_count(), "matmul_peak_gflops_per_s": round(peak, 1),
        "repeats": repeats, "rows": rows,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)),
                    exist_ok=True)
        write_json_atomic(args.out, result)
    return result


if __name__ == "__main__":
    main()
