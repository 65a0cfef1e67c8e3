"""Keras' overhead around the model on JAX: `fit`'s training step and
`predict_on_batch` against bare jitted functions on the same model.

    KERAS_BACKEND=jax python benchmarks/overhead.py [--quick]
        [--models vit_s32 vmoe_s32 e3_s32] [--batch 32] [--repeats 5]
        [--out benchmarks/results/overhead_jax.json]

For the S/32 models of `dispatch_paths.py` (dense ViT, V-MoE, E³; routing
groups of 8 images, the default dispatch path, routers balanced on the
benchmark images), in one process, calls interleaved (keras, bare,
keras, bare, ...; medians):

- training: `train_on_batch` after `compile(optimizer=SGD(1e-3))` with
  every other argument at its default (the paper's loss, the "auto"
  metrics: what `fit` runs each step, plus reading the logs back) versus a
  bare step: `jax.jit` of `value_and_grad` of the same loss (the compiled
  loss on `stateless_call`'s logits plus the routers' auxiliary losses)
  and an SGD update, state donated;
- inference: `predict_on_batch` versus `jax.jit(stateless_call)` (the
  logits, waited for).

`train_ratio` / `infer_ratio` = Keras' median ÷ the bare median (the
issue's target: at most 1.05). Prints JSON (and writes it with --out).
"""

import argparse
import functools
import statistics
import sys

import numpy as np

from _common import backend
from _common import emit
from _common import emit_row
from _common import run_info
from _common import set_dtype
from _common import timed_interleaved

MODEL_NAMES = ("vit_s32", "vmoe_s32", "e3_s32")
LEARNING_RATE = 1e-3
NUM_CLASSES = 1000
TINY = dict(image_size=32, patch_size=8, hidden_dim=32, num_layers=2,
            num_heads=2, mlp_dim=64, representation_size=32)


def sgd_step(model):
    """step(trainable, non_trainable, x, y) -> (loss, trainable,
    non_trainable): the bare training step, pure: `value_and_grad` of the
    compiled loss on `stateless_call`'s logits plus the routers'
    auxiliary losses (what `compute_loss` sums), then an SGD update."""
    import jax

    loss_fn = model.loss  # the compiled loss object (mean over the batch)

    def loss(trainable, non_trainable, x, y):
        logits, non_trainable, aux = model.stateless_call(
            trainable, non_trainable, x, training=True, return_losses=True)
        total = loss_fn(y, logits)
        if aux:
            total = total + sum(aux)
        return total, non_trainable

    def step(trainable, non_trainable, x, y):
        (value, non_trainable), grads = jax.value_and_grad(
            loss, has_aux=True)(trainable, non_trainable, x, y)
        trainable = jax.tree.map(lambda w, g: w - LEARNING_RATE * g,
                                 trainable, grads)
        return value, trainable, non_trainable
    return step


def bare_train_step(model, images, labels):
    """(run, compiled): run() is one bare jitted `sgd_step` of `model` on
    (images, labels), on its own copy of the weights (donated); compiled
    is the executable."""
    import jax

    state = [[v.value.copy() for v in model.trainable_variables],
             [v.value.copy() for v in model.non_trainable_variables]]
    call = jax.jit(sgd_step(model), donate_argnums=(0, 1)).lower(
        *state, images, labels).compile()

    def run():
        value, state[0], state[1] = call(*state, images, labels)
        jax.block_until_ready(value)
    return run, call


def bare_predict(model, images):
    """(run, compiled): run() is one jitted `stateless_call` (inference)
    of `model`, waited for; compiled is the executable."""
    import jax

    # Copies: Keras' predict function donates the model's own buffers.
    trainable = [v.value.copy() for v in model.trainable_variables]
    non_trainable = [v.value.copy() for v in model.non_trainable_variables]

    def fn(trainable, non_trainable, x):
        return model.stateless_call(trainable, non_trainable, x,
                                    training=False)[0]
    call = jax.jit(fn).lower(trainable, non_trainable, images).compile()
    return (lambda: jax.block_until_ready(call(trainable, non_trainable,
                                               images)), call)


def keras_compiled(model, part, images, labels):
    """The executable Keras compiles for `part` ("train": `train_step`,
    jitted with the state donated as `make_train_function` does;
    "infer": `predict_step` as `make_predict_function` wraps it), for its
    cost analysis (the model must be built and, for "train", compiled)."""
    import jax

    if part == "train":
        state = model._get_jax_state(
            trainable_variables=True, non_trainable_variables=True,
            optimizer_variables=True, metrics_variables=True,
            purge_model_variables=False)
        fn, data = model.train_step, (images, labels, None)
    else:
        state = ([v.value for v in model.trainable_variables],
                 [v.value for v in model.non_trainable_variables])

        def fn(state, data):
            outputs, non_trainable = model.predict_step(state, data)
            return outputs, (state[0], non_trainable)
        data = (images,)
    # Lowered and compiled only (never called): nothing is donated.
    return jax.jit(fn, donate_argnums=0).lower(state, data).compile()


def cost(compiled):
    """(FLOPs, bytes accessed) of a compiled executable: XLA's static
    count, independent of the machine's load."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0]
    return (float(analysis.get("flops", 0.0)),
            float(analysis.get("bytes accessed", 0.0)))


def compare(model, part, images, labels, repeats, costs=True):
    """Fields of one part ("infer" / "train") of one model: Keras' and
    the bare call's median ms, timed interleaved, their ratio and (costs)
    the ratios of the compiled programs' FLOPs and bytes accessed."""
    if part == "infer":
        keras_run = functools.partial(model.predict_on_batch, images)
        bare_run, bare = bare_predict(model, images)
    else:
        keras_run = functools.partial(model.train_on_batch, images, labels)
        keras_run()  # builds the loss, the metrics and the optimizer state
        bare_run, bare = bare_train_step(model, images, labels)
    timings = timed_interleaved({"keras": keras_run, "bare": bare_run},
                                repeats, stat=lambda times: times)
    (keras_s, bare_s), (keras_min, bare_min) = (
        [stat(timings[key][0]) for key in ("keras", "bare")]
        for stat in (statistics.median, min))
    fields = {f"{part}_keras_ms": round(1e3 * keras_s, 2),
              f"{part}_bare_ms": round(1e3 * bare_s, 2),
              f"{part}_ratio": round(keras_s / bare_s, 3),
              # The fastest calls: the least disturbed by other processes.
              f"{part}_keras_min_ms": round(1e3 * keras_min, 2),
              f"{part}_bare_min_ms": round(1e3 * bare_min, 2),
              f"{part}_min_ratio": round(keras_min / bare_min, 3)}
    if costs:
        (keras_flops, keras_bytes), (bare_flops, bare_bytes) = (
            cost(keras_compiled(model, part, images, labels)), cost(bare))
        fields.update({f"{part}_gflops": round(bare_flops / 1e9, 2),
                       f"{part}_flops_ratio": round(keras_flops
                                                    / bare_flops, 4),
                       f"{part}_bytes_ratio": round(keras_bytes
                                                    / bare_bytes, 4)})
    return fields


def tiny_model(name):
    """A tiny model of the kind of `name` (same routing settings, a
    32-pixel input, 2 layers of width 32), whose compiled calls take a few
    milliseconds: the time Keras adds around them is its per-call host
    work."""
    import keras

    import keras_e3
    from dispatch_paths import MODELS

    config = dict(MODELS[name][0], **TINY)
    if config.get("num_experts"):
        tokens = ((32 // 8) ** 2 + 1) * config.get("ensemble_size", 1)
        config.update(moe_layers=(1,), group_size=8 * tokens)
    keras.utils.set_random_seed(0)
    return keras_e3.E3ViT(keras_e3.E3ViTBackbone(**config),
                          num_classes=NUM_CLASSES)


def measure(name, images, labels, args):
    """One row: Keras vs bare for the S/32 model `name` (timed, and the
    compiled programs' costs) and the per-call host time Keras adds,
    measured on the tiny model of the same kind."""
    import keras
    from keras import ops

    from dispatch_paths import MODELS
    from dispatch_paths import build
    from _routing import route

    config, _, _ = MODELS[name]
    moe = bool(config.get("num_experts"))
    (model,) = build(config, 1, args.dispatcher if moe else None,
                     args.images_per_group)
    kept = route(model, images, balance=True)
    model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE))
    row = dict(model=name, batch=int(images.shape[0]),
               images_per_group=args.images_per_group if moe else None,
               dispatcher=args.dispatcher if moe else None,
               kept_fraction=None if kept is None else round(float(kept), 4))
    tiny = tiny_model(name)
    tiny.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE))
    rng = np.random.default_rng(1)
    tiny_images = ops.convert_to_tensor(rng.uniform(
        -1, 1, (8, 32, 32, 3)).astype("float32"))
    for part in args.parts:
        repeats = args.repeats if part == "infer" else args.train_repeats
        row.update(compare(model, part, images, labels, repeats))
        host = compare(tiny, part, tiny_images, labels[:8],
                       args.host_repeats, costs=False)
        # Keras' host time per call and the ratio it alone implies for
        # the S/32 model (its compiled program being the bare one's).
        extra = host[f"{part}_keras_ms"] - host[f"{part}_bare_ms"]
        row[f"{part}_host_ms"] = round(extra, 2)
        row[f"{part}_host_ratio"] = round(
            1 + extra / row[f"{part}_bare_ms"], 4)
    emit_row(row)
    return row


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: batch 8, one repeat")
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES),
                        choices=MODEL_NAMES)
    parser.add_argument("--parts", nargs="+", default=["infer", "train"],
                        choices=["infer", "train"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--images-per-group", type=int, default=8)
    parser.add_argument("--dispatcher", default="auto")
    parser.add_argument("--repeats", type=int, default=7,
                        help="timed inference calls of each (median)")
    parser.add_argument("--train-repeats", type=int, default=5,
                        help="timed training steps of each (median)")
    parser.add_argument("--host-repeats", type=int, default=30,
                        help="timed calls of each on the tiny model")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"],
                        default="float32",
                        help="bfloat16: Keras' mixed_bfloat16 policy")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.repeats, args.train_repeats = 8, 1, 1
        args.host_repeats = 3
    return args


def main(argv=None):
    args = parse(argv)
    if backend() != "jax":
        sys.exit("overhead.py compares Keras with bare jax.jit calls: run "
                 "it with KERAS_BACKEND=jax")
    from keras import ops

    set_dtype(args.dtype)
    rng = np.random.default_rng(0)
    images = ops.convert_to_tensor(
        rng.uniform(-1, 1, (args.batch, 224, 224, 3)).astype("float32"))
    labels = ops.convert_to_tensor(rng.integers(0, NUM_CLASSES, args.batch))
    rows = [measure(name, images, labels, args) for name in args.models]
    result = run_info(benchmark="overhead", quick=args.quick,
                      batch=args.batch, repeats=args.repeats,
                      train_repeats=args.train_repeats,
                      host_repeats=args.host_repeats,
                      learning_rate=LEARNING_RATE, rows=rows)
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
