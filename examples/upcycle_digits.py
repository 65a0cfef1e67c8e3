"""Sparse upcycling on digits: the shipped dense `vit_tiny_digits` upcycled
into an E³ and fine-tuned, against the same E³ trained from scratch.

    KERAS_BACKEND=jax python examples/upcycle_digits.py [--seeds 0 1 2]
        [--scratch-epochs 40] [--finetune-epochs 10] [--out PATH]

* Upcycled: `keras_e3.upcycle(E3ViT.from_preset("vit_tiny_digits"),
  num_experts=4, moe_layers=(1, 3), num_selected_experts=1,
  ensemble_size=2, capacity_factor=2.0, seed=s)`: the `e3_tiny_digits`
  architecture, each expert a copy of the trained dense MLP, fresh routers
  (seed s); then fine-tuned with the presets' recipe
  (`examples/train_digits.py`: AdamW, warm-up then cosine decay, weight
  decay 0.05, clipping 1.0, the same augmentation, batches of 64, seed s)
  for `--finetune-epochs` epochs at a 4x lower peak learning rate (5e-4).
* From scratch: `e3_tiny_digits`' config trained with the same recipe
  (peak 2e-3) for `--scratch-epochs` epochs, seed s.

Both are evaluated on the 450 held-out digits (the presets' split) before
training and after every epoch: accuracy, NLL and ECE (15 bins) of the
ensemble. The table gives the final numbers and the optimizer steps each
needed to first reach 95% and 97% held-out accuracy (mean ± std over the
seeds), and the steps spent on the dense model before upcycling (the
shipped ViT's 80 epochs of 21 batches: 1,680) are stated beside them.
Raw numbers: `benchmarks/results/upcycle_digits.json`.
"""

import argparse
import os
import sys
import time


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import robustness_digits  # noqa: E402  (its table formatting)
import train_digits  # noqa: E402  (the recipe and the model configs)

import keras_e3  # noqa: E402
from keras_e3.data.digits import load_digits_splits  # noqa: E402
from keras_e3.io_utils import write_json_atomic  # noqa: E402
from keras_e3.metrics import evaluate_predictions  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       os.pardir, "benchmarks", "results")
E3_SETTINGS = dict(num_experts=4, moe_layers=(1, 3), num_selected_experts=1,
                   ensemble_size=2, capacity_factor=2.0)
DENSE_PRETRAINING_STEPS = 80 * 21  # vit_tiny_digits' training
THRESHOLDS = (0.95, 0.97)


def held_out(model, test):
    report = evaluate_predictions(model.predict(test[0], batch_size=450,
                                                verbose=0), test[1])
    return {k: float(report[f"ensemble/{k}"])
            for k in ("accuracy", "nll", "ece")}


def train(model, data, epochs, lr, seed):
    """Fits `model` with the presets' recipe; held-out metrics before
    training and after each epoch, with the step count."""
    import keras

    train_set, test = data
    batches = train_digits.AugmentedDigits(*train_set, 64, seed)
    steps = epochs * len(batches)
    model.compile(optimizer=train_digits.make_optimizer(steps, lr, 0.05,
                                                        0.05))
    curve = [dict(step=0, **held_out(model, test))]

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            curve.append(dict(step=(epoch + 1) * len(batches),
                              **held_out(model, test)))

    start = time.perf_counter()
    model.fit(batches, epochs=epochs, verbose=0, callbacks=[Record()])
    return curve, time.perf_counter() - start


def first_step(curve, threshold):
    for point in curve:
        if point["accuracy"] >= threshold:
            return point["step"]
    return None


def run_seed(seed, args, data):
    import keras

    keras.utils.set_random_seed(seed)
    dense = keras_e3.E3ViT.from_preset("vit_tiny_digits")
    upcycled = keras_e3.upcycle(dense, seed=seed, **E3_SETTINGS)
    up_curve, up_seconds = train(upcycled, data, args.finetune_epochs, 5e-4,
                                 seed)
    keras.utils.set_random_seed(seed)
    scratch = train_digits.build(train_digits.MODELS["e3_tiny_digits"], seed)
    sc_curve, sc_seconds = train(scratch, data, args.scratch_epochs, 2e-3,
                                 seed)
    out = {}
    for name, curve, seconds in (("upcycled", up_curve, up_seconds),
                                 ("scratch", sc_curve, sc_seconds)):
        out[name] = {"curve": curve, "final": curve[-1],
                     "train_seconds": round(seconds, 1),
                     **{f"steps_to_{int(t * 100)}": first_step(curve, t)
                        for t in THRESHOLDS}}
    print(f"seed {seed}: upcycled {out['upcycled']['final']}, scratch "
          f"{out['scratch']['final']}", flush=True)
    return out


def fmt(values, scale=1.0, digits=2):
    return robustness_digits.fmt(values, scale, digits, missing="not reached")


def table(per_seed, args):
    lines = [
        f"Held-out digits (450 images), ensemble of the E³'s 2 members; mean"
        f" ± std over {len(per_seed)} seed(s). The upcycled E³ starts from "
        f"the shipped dense ViT ({DENSE_PRETRAINING_STEPS:,} steps of "
        f"pre-training not counted below).",
        "",
        "| E³ | epochs | accuracy at step 0 (%) | final accuracy (%) | "
        "final NLL | final ECE (%) | steps to 95% | steps to 97% |",
        "|---|---|---|---|---|---|---|---|"]
    for name, epochs in (("upcycled from vit_tiny_digits",
                          args.finetune_epochs),
                         ("from scratch", args.scratch_epochs)):
        key = "upcycled" if name.startswith("upcycled") else "scratch"
        runs = [per_seed[s][key] for s in per_seed]
        lines.append(
            f"| {name} | {epochs} "
            f"| {fmt([r['curve'][0]['accuracy'] for r in runs], 100)} "
            f"| {fmt([r['final']['accuracy'] for r in runs], 100)} "
            f"| {fmt([r['final']['nll'] for r in runs], 1, 3)} "
            f"| {fmt([r['final']['ece'] for r in runs], 100)} "
            f"| {fmt([r['steps_to_95'] for r in runs], 1, 0)} "
            f"| {fmt([r['steps_to_97'] for r in runs], 1, 0)} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--scratch-epochs", type=int, default=40)
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--out", default=os.path.join(
        RESULTS, "upcycle_digits.json"))
    args = parser.parse_args(argv)

    import keras

    started = time.perf_counter()
    train_set, test = load_digits_splits(
        train_digits.IMAGE_SIZE, train_digits.NUM_CHANNELS,
        train_digits.TEST_FRACTION, train_digits.SPLIT_SEED)
    per_seed = {}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    for seed in args.seeds:
        per_seed[str(seed)] = run_seed(seed, args, (train_set, test))
        write_json_atomic(args.out, {
            "description": "examples/upcycle_digits.py: vit_tiny_digits "
                           "upcycled into an E³ and fine-tuned, vs the E³ "
                           "from scratch",
            "config": {**vars(args), "e3": {k: list(v) if isinstance(
                v, tuple) else v for k, v in E3_SETTINGS.items()},
                "backend": keras.backend.backend()},
            "per_seed": per_seed, "complete": seed == args.seeds[-1],
            "wall_seconds": round(time.perf_counter() - started, 1),
            "table_markdown": table(per_seed, args)})
    print(table(per_seed, args))


if __name__ == "__main__":
    main()
