"""Inference and training speed (and memory on JAX) of the dispatch paths.

    KERAS_BACKEND=jax python benchmarks/dispatch_paths.py [--quick]
        [--out benchmarks/results/dispatch_paths_jax.json]

For the paper's S/32 shapes (224px, width 512, 8 layers, 8 heads, MLP
2048, 8 experts in the last 2 odd blocks; V-MoE K=2 cf 1.05, E³ M=2 K=1
cf 1.5), a dense ViT and a deep ensemble of two V-MoE S/32
(`de2_vmoe_s32`: independently initialised, prediction log mean softmax,
both members in one compiled call), an Experts Choice and a Soft MoE
S/32 (the same 8 experts in blocks 5 and 7; Experts Choice as vmoe's
Soft MoE project compares it: capacity factor 1.0, Python's round, no
multiple: C = 50 tokens per expert in a group of 8 images; Soft MoE as
vmoe's configs: one image a routing group, round(50 / 8) = 6 slots per
expert, one path: batched matmuls, dispatch and combine in bfloat16), at
batch 32 and 128, with routing groups of 8 images (the paper's configs)
and of the whole batch: per dispatch path, the median time of repeated
compiled calls (warm-up excluded; the paths of one model and group
setting timed interleaved) of inference and of a training step (SGD),
the model's useful FLOPs per image (keras_e3.flops, routed tokens; also
counted over every capacity slot), the useful GFLOP/s as a fraction of a
compiled fp32 matmul peak measured in the same run (at its start and at
its end; the higher of the two) and, on JAX, the compiled memory of both
calls (`memory_analysis()`: temp, argument, output bytes; peak = their
sum less donated buffers).

Routing: by default the routers are balanced on the benchmark images
(`--routing balanced`, see `_routing.py`), so that the experts' loads are
even, as a trained model's are, and the gather path is timed on the work
the useful FLOPs count; `kept_fraction` is the share of routed choices
within capacity (as initialised, `--routing initial`, a quarter of E³'s
and a third of V-MoE's are dropped, which the gather path skips).
Experts Choice and Soft MoE are balanced by construction (each expert
takes C tokens, or fills its P slots, of every group): their routers are
left as initialised and their rows have no `kept_fraction`.

Backends: JAX (`jax.jit`; the training step is Keras' own `train_step`,
compiled ahead of time with the state donated, as `fit` does),
TensorFlow (XLA, `jit_compile=True`; training with `train_on_batch`) and
PyTorch (eager; inference under `no_grad`). Prints JSON (and writes it
with --out). Not a test: timings depend on the machine; compare rows of
one run only.
"""

import argparse
import functools
import time

import keras
import numpy as np
from keras import ops

import keras_e3
from keras_e3.layers.dispatch import gather_layout as layer_layout
from _common import backend
from _common import block
from _common import compile_call
from _common import emit
from _common import emit_row
from _common import matmul_peak
from _common import run_info
from _common import set_dtype
from _common import timed_interleaved
from _routing import route

S32 = dict(image_size=224, patch_size=32, hidden_dim=512, num_layers=8,
           num_heads=8, mlp_dim=2048, representation_size=512)
VMOE_S32 = dict(S32, num_experts=8, moe_layers=(5, 7),
                num_selected_experts=2, capacity_factor=1.05)
E3_S32 = dict(S32, num_experts=8, moe_layers=(5, 7), num_selected_experts=1,
              ensemble_size=2, capacity_factor=1.5)
EC_S32 = dict(S32, num_experts=8, moe_layers=(5, 7), router="experts_choice",
              capacity_factor=1.0, capacity_ceil_or_round="round",
              capacity_multiple_of=1)
SOFT_S32 = dict(S32, num_experts=8, moe_layers=(5, 7), router="soft",
                capacity_factor=1.0)
# name: (backbone config, independently initialised members, routing
# groups measured). The deep ensemble is compared with E³ at the paper's
# groups of 8 images only; Soft MoE routes each image on its own ("image").
MODELS = {
    "vit_s32": (S32, 1, ("8", "batch")),
    "vmoe_s32": (VMOE_S32, 1, ("8", "batch")),
    "e3_s32": (E3_S32, 1, ("8", "batch")),
    "de2_vmoe_s32": (VMOE_S32, 2, ("8",)),
    "ec_s32": (EC_S32, 1, ("8", "batch")),
    "soft_s32": (SOFT_S32, 1, ("image",)),
}
# Soft MoE has one path (batched matmuls), whatever --dispatchers says.
SOFT_PATH = "matmul"
TOKENS_PER_IMAGE = 50  # (224 / 32)^2 patches + class token
NUM_CLASSES = 1000


def build(config, members, dispatcher, images_per_group):
    """The member models (seeds 0, 1, ...) of one benchmark row."""
    kwargs = dict(config)
    if kwargs.get("num_experts"):
        tokens = TOKENS_PER_IMAGE * kwargs.get("ensemble_size", 1)
        kwargs.update(dispatcher="auto" if dispatcher == SOFT_PATH
                      else dispatcher, group_size=images_per_group * tokens)
    models = []
    for seed in range(members):
        keras.utils.set_random_seed(seed)
        models.append(keras_e3.E3ViT(keras_e3.E3ViTBackbone(**kwargs),
                                     num_classes=NUM_CLASSES))
    return models


def gather_layout(model, batch):
    """How the gather path's MoE layers run their experts at inference for
    this batch: "buckets" (`BucketDispatcher`), "tiles"
    (`TiledDispatcher`) or "buffers"."""
    layouts = set()
    for moe_block in model.backbone.moe_blocks:
        mlp = moe_block.mlp
        groups = -(-batch * mlp.ensemble_size * TOKENS_PER_IMAGE
                   // mlp.group_size)
        layouts.add(layer_layout(
            groups, mlp.group_size, mlp.num_experts,
            mlp.num_selected_experts, mlp.capacity,
            mlp.expert_tile_size(training=False),
            mlp.expert_row_buckets(training=False)))
    return "/".join(sorted(layouts))


def routing(models, images, mode):
    """Routers of one row's models ({dispatcher: models}) as `mode` says
    ("balanced": centred on the row's images, see `_routing`; "initial":
    as initialised), the same for every dispatch path (set on the gather
    path's models, the cheapest to run eagerly, and copied to the others),
    and the fraction of routed choices the experts keep (the members'
    mean), or None for a dense model."""
    source = models.get("gather") or next(iter(models.values()))
    if source[0].backbone.router != "top_k":
        return None  # balanced by construction (see the module doc)
    kept = [route(model, images, balance=mode == "balanced")
            for model in source]
    for paths in models.values():
        for model, reference in zip(paths, source):
            if model is not reference:
                model.set_weights(reference.get_weights())
    return None if kept[0] is None else round(float(np.mean(kept)), 4)


def prediction(logits):
    """A single model's logits; an ensemble's (E³ members and/or several
    models) log mean softmax [B, C]."""
    if len(logits) == 1 and len(logits[0].shape) == 2:
        return logits[0]
    members = [ops.reshape(x, (x.shape[0], -1, NUM_CLASSES)) for x in logits]
    return keras_e3.ensemble_log_probs(ops.concatenate(members, axis=1))


def inference_call(models, images):
    """(run, memory): run() predicts `images` in one compiled call."""
    if backend() == "jax":
        states = [([v.value for v in m.trainable_variables],
                   [v.value for v in m.non_trainable_variables])
                  for m in models]

        def fn(states, x):
            return prediction([m.stateless_call(t, n, x)[0]
                               for m, (t, n) in zip(models, states)])
        args = (states, images)
    else:
        def fn(x):
            return prediction([m(x, training=False) for m in models])
        args = (images,)
    call, memory = compile_call(fn, *args)
    return lambda: block(call(*args)), memory


def train_call(models, images, labels):
    """(run, memory): run() is one SGD training step of every model."""
    for model in models:
        model.compile(optimizer=keras.optimizers.SGD(1e-3), metrics=None,
                      jit_compile=backend() != "torch")
    if backend() != "jax":
        return lambda: [m.train_on_batch(images, labels)
                        for m in models], None
    data = (images, labels, None)
    states = []
    for model in models:
        model._symbolic_build(data_batch=data)  # loss and optimizer state
        # Copies: the donated buffers must not be the model's own.
        states.append(tuple([v.value.copy() for v in variables] for variables
                            in (model.trainable_variables,
                                model.non_trainable_variables,
                                model.optimizer.variables,
                                model.metrics_variables)))

    def fn(states, data):
        return [m.train_step(s, data)[1] for m, s in zip(models, states)]
    call, memory = compile_call(fn, states, data, donate_argnums=0)

    def run():
        states[:] = block(call(states, data))
    return run, memory


def measure(make_calls, repeats, prefix, batch):
    """Timing (and memory) fields of compiled calls, {key: (fields,
    seconds)}, keys of the fields prefixed: `_ms` (median), `_setup_s`
    (building and compiling the call, then the warm-up call; on TensorFlow
    and PyTorch the compilation or tracing happens in the warm-up call).
    `make_calls` maps keys to functions returning (run, memory); every
    call is built first, then they are timed interleaved."""
    runs, memory, build = {}, {}, {}
    for key, make_call in make_calls.items():
        start = time.perf_counter()
        runs[key], memory[key] = make_call()
        build[key] = time.perf_counter() - start
    out = {}
    for key, (seconds, first) in timed_interleaved(runs, repeats).items():
        fields = {f"{prefix}_ms": round(1e3 * seconds, 1),
                  f"{prefix}_images_per_s": round(batch / seconds, 1),
                  f"{prefix}_setup_s": round(build[key] + first, 1)}
        for name, value in (memory[key] or {}).items():
            fields[f"{prefix}_{name}_bytes"] = value
        out[key] = fields, seconds
    return out


def group_settings(config, model_groups, args, batch):
    """(images per group, "8" or "batch") of the rows of one model."""
    if not config.get("num_experts"):
        return [(None, "-")]
    if model_groups == ("image",):
        return [(1, "image")]
    wanted = [g for g in args.groups if g in model_groups]
    return sorted({(8 if g == "8" else batch, g) for g in wanted})


def rows_for(name, batch, images, labels, args):
    """The rows of one model at one batch: per routing-group setting, one
    row per dispatch path, the paths' calls timed interleaved."""
    config, members, model_groups = MODELS[name]
    moe = bool(config.get("num_experts"))
    train = batch in args.train_batches and name in args.train_models
    for images_per_group, label in group_settings(config, model_groups, args,
                                                  batch):
        models, rows = {}, {}
        paths = ([SOFT_PATH] if config.get("router") == "soft"
                 else args.dispatchers if moe else ["-"])
        for dispatcher in paths:
            models[dispatcher] = build(config, members, dispatcher,
                                       images_per_group)
            # Useful work: every routed token through its K experts once
            # (the 3.7 GFLOPs/img for E³); `..._capacity` counts
            # every capacity slot, empty ones included.
            useful, slots = (sum(keras_e3.count_flops(
                m, expert_tokens=tokens)["flops"]
                for m in models[dispatcher]) / 1e9
                for tokens in ("routed", "capacity"))
            rows[dispatcher] = dict(
                model=name, batch=batch, members=members,
                images_per_group=images_per_group, dispatcher=dispatcher,
                gflops_per_image=round(useful, 3),
                gflops_per_image_capacity=round(slots, 3))
            if dispatcher == "gather" and not config.get("router"):
                rows[dispatcher]["gather_layout"] = gather_layout(
                    models[dispatcher][0], batch)
        kept = routing(models, images, args.routing)
        if kept is not None:
            for row in rows.values():
                row["kept_fraction"] = kept
        timings = measure(
            {d: functools.partial(inference_call, m, images)
             for d, m in models.items()}, args.repeats, "infer", batch)
        for dispatcher, (fields, seconds) in timings.items():
            row = rows[dispatcher]
            row.update(fields)
            row["infer_useful_gflops_per_s"] = round(
                row["gflops_per_image"] * batch / seconds, 1)
        if train and label in ("-", "image", *args.train_groups):
            timings = measure(
                {d: functools.partial(train_call, m, images, labels)
                 for d, m in models.items()},
                args.train_repeats, "train", batch)
            for dispatcher, (fields, _) in timings.items():
                rows[dispatcher].update(fields)
        elif args.train_memory and backend() == "jax":
            for dispatcher, m in models.items():
                _, memory = train_call(m, images, labels)
                rows[dispatcher].update(
                    {f"train_{k}_bytes": v for k, v in memory.items()})
        for row in rows.values():
            emit_row(row)
            yield row


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: batch 8 (one group of 8 images), "
                        "inference and training, 1 repeat")
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--groups", nargs="+", default=["8", "batch"],
                        choices=["8", "batch"],
                        help="routing groups of 8 images and/or the batch")
    parser.add_argument("--models", nargs="+", default=list(MODELS),
                        choices=list(MODELS))
    parser.add_argument("--dispatchers", nargs="+",
                        default=["einsum", "gather"])
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed inference calls (median)")
    parser.add_argument("--train-repeats", type=int, default=3,
                        help="timed training steps (median)")
    parser.add_argument("--train-batches", type=int, nargs="*",
                        help="batches with a training step (default: all)")
    parser.add_argument("--train-groups", nargs="*", choices=["8", "batch"],
                        help="group settings with a training step "
                        "(default: --groups)")
    parser.add_argument("--train-models", nargs="*", choices=list(MODELS),
                        help="models with a training step (default: all)")
    parser.add_argument("--train-memory", action="store_true",
                        help="JAX: compile the training step of the rows "
                        "without a timed step too, for its memory")
    parser.add_argument("--routing", choices=["balanced", "initial"],
                        default="balanced",
                        help="routers centred on the benchmark images, so "
                        "that the experts' loads are even as after "
                        "training (default), or as initialised (a quarter "
                        "to a third of the choices dropped)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"],
                        default="float32", help="bfloat16: the models in "
                        "Keras' mixed_bfloat16 policy, the peak a bf16 "
                        "matmul (for a GPU or TPU)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.groups = [8], ["8"]
        args.repeats = args.train_repeats = 1
    for name, default in (("train_batches", args.batches),
                          ("train_groups", args.groups),
                          ("train_models", args.models)):
        if getattr(args, name) is None:
            setattr(args, name, default)
    return args


def main(argv=None):
    args = parse(argv)
    rng = np.random.default_rng(0)
    dtype = set_dtype(args.dtype)
    peak_start = matmul_peak(max(5, args.repeats), dtype)
    rows = []
    for batch in args.batches:
        images = ops.convert_to_tensor(
            rng.uniform(-1, 1, (batch, 224, 224, 3)).astype("float32"))
        labels = ops.convert_to_tensor(rng.integers(0, NUM_CLASSES, batch))
        for name in args.models:
            rows += rows_for(name, batch, images, labels, args)
    # The peak is measured again at the end and the higher of the two is
    # the reference: a slow moment during one measurement must not inflate
    # the useful-FLOP shares.
    peak_end = matmul_peak(max(5, args.repeats), dtype)
    peak = max(peak_start, peak_end)
    for row in rows:
        row["infer_peak_fraction"] = round(
            row["infer_useful_gflops_per_s"] / peak, 3)
    result = run_info(
        benchmark="dispatch_paths", quick=args.quick,
        matmul_peak_gflops_per_s=round(peak, 1),
        matmul_peak_start_gflops_per_s=round(peak_start, 1),
        matmul_peak_end_gflops_per_s=round(peak_end, 1), repeats=args.repeats,
        routing=args.routing,
        train_repeats=args.train_repeats, train_batches=args.train_batches,
        train_groups=args.train_groups, train_models=args.train_models,
        memory="compiled memory_analysis" if backend() == "jax"
        else "not measured on this backend", rows=rows)
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
