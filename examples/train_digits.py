"""Train the shipped `*_tiny_digits` presets: a dense ViT, a V-MoE and an E³
of the same size on scikit-learn's handwritten digits, with the same budget.

    KERAS_BACKEND=jax python examples/train_digits.py [--out-dir DIR]
        [--models e3,vit,vmoe] [--epochs N] [--no-save]

Data: `keras_e3.data.digits.load_digits_splits` (8x8 digits upsampled
bilinearly to 32x32, values in [-1, 1]; a fixed stratified 75/25 split,
seed 0: 1,347 training and 450 test images). Augmentation: small random
translations and rotations (Keras preprocessing layers), redrawn every epoch.

The three models share the transformer (32x32 images, 8x8 patches: 16
tokens + a class token, width 48, 4 blocks, 4 heads, MLP 96) and the
training recipe (AdamW, peak learning rate 2e-3, linear warm-up over 5% of
the steps then cosine decay, weight decay 0.05, global-norm clipping 1.0,
80 epochs of 21 batches of 64, seed 0, the same augmented batches). The
V-MoE and the E³ replace the MLPs of the last 2 odd blocks (1 and 3) by 4
experts (capacity factor 2): the V-MoE routes each token to K=2 of them;
the E³ has 2 members (2 experts each), K=1, i.e. the same number of expert
calls per image.

Each model is evaluated on the held-out split (accuracy, NLL, ECE with 15
equal-width bins, Brier; per member and for the ensemble, whose
probabilities are the mean of the members' softmaxes) and saved as a preset
(`model.save_to_preset`) in `--out-dir/<name>/` with the metrics
in its metadata.json. A JSON summary is printed at the end.

JAX is the fastest backend on CPU (the training step is XLA-compiled).
"""

import argparse
import json
import math
import os
import time

import keras
import numpy as np

import keras_e3
from keras_e3.data.digits import NUM_CLASSES
from keras_e3.data.digits import digits_preprocessor
from keras_e3.data.digits import load_digits_splits
from keras_e3.data.digits import split_fingerprint
from keras_e3.metrics import evaluate_predictions

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           os.pardir, "presets")

IMAGE_SIZE = 32
NUM_CHANNELS = 1
TEST_FRACTION = 0.25
SPLIT_SEED = 0

COMMON = dict(image_size=IMAGE_SIZE, patch_size=8, num_channels=NUM_CHANNELS,
              hidden_dim=48, num_layers=4, num_heads=4, mlp_dim=96,
              classifier="token", dropout_rate=0.0)
MOE = dict(num_experts=4, moe_layers=(1, 3), capacity_factor=2.0)
MODELS = {
    "vit_tiny_digits": dict(COMMON),
    "vmoe_tiny_digits": dict(COMMON, **MOE, num_selected_experts=2),
    "e3_tiny_digits": dict(COMMON, **MOE, num_selected_experts=1,
                           ensemble_size=2),
}
SHORT = {"vit": "vit_tiny_digits", "vmoe": "vmoe_tiny_digits",
         "e3": "e3_tiny_digits"}


class AugmentedDigits(keras.utils.PyDataset):
    """Shuffled full batches of randomly shifted / rotated digits; the
    augmentation is redrawn for the whole training set every epoch."""

    def __init__(self, x, y, batch_size, seed, translation=0.1,
                 rotation=10.0):
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size
        self.rng = np.random.default_rng(seed)
        # The background is -1 (pixel value 0): fill with it.
        fill = dict(fill_mode="constant", fill_value=-1.0)
        self.augment = keras.Sequential([
            keras.layers.RandomTranslation(translation, translation,
                                           seed=seed, **fill),
            keras.layers.RandomRotation(rotation / 360.0, seed=seed + 1,
                                        **fill),
        ])
        self.on_epoch_end()

    def __len__(self):
        return len(self.x) // self.batch_size  # full batches: one shape

    def on_epoch_end(self):
        order = self.rng.permutation(len(self.x))
        images = self.augment(self.x[order], training=True)
        self.epoch_x = np.asarray(keras.ops.convert_to_numpy(images),
                                  dtype=np.float32)
        self.epoch_y = self.y[order]

    def __getitem__(self, index):
        batch = slice(index * self.batch_size, (index + 1) * self.batch_size)
        return self.epoch_x[batch], self.epoch_y[batch]


def make_optimizer(steps, peak_lr, warmup_fraction, weight_decay):
    warmup = max(1, int(steps * warmup_fraction))
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0, decay_steps=steps - warmup, alpha=0.0,
        warmup_target=peak_lr, warmup_steps=warmup)
    return keras.optimizers.AdamW(learning_rate=schedule,
                                  weight_decay=weight_decay,
                                  global_clipnorm=1.0)


def build(config, seed):
    backbone = keras_e3.E3ViTBackbone(**config, seed=seed)
    return keras_e3.E3ViT(backbone, num_classes=NUM_CLASSES)


def rounded(metrics):
    return {k: (None if isinstance(v, float) and math.isnan(v)
                else round(float(v), 5)) for k, v in metrics.items()}


def train_one(name, args, train, test):
    keras.utils.set_random_seed(args.seed)
    model = build(MODELS[name], args.seed)
    data = AugmentedDigits(*train, args.batch_size, args.seed)
    steps = args.epochs * len(data)
    training = dict(epochs=args.epochs, batch_size=args.batch_size,
                    steps=steps, seed=args.seed,
                    optimizer="AdamW", peak_learning_rate=args.lr,
                    weight_decay=args.weight_decay, global_clipnorm=1.0,
                    schedule=f"linear warm-up ({args.warmup:g} of the steps) "
                             "then cosine decay to 0",
                    loss="EnsembleSoftmaxCrossEntropy + router aux losses",
                    augmentation="RandomTranslation(0.1, 0.1) + "
                                 "RandomRotation(10 degrees), fill -1",
                    backend=keras.backend.backend())
    model.compile(optimizer=make_optimizer(steps, args.lr, args.warmup,
                                           args.weight_decay))
    start = time.perf_counter()
    model.fit(data, epochs=args.epochs, verbose=args.verbose)
    train_seconds = time.perf_counter() - start
    logits = model.predict(test[0], batch_size=256, verbose=0)
    metrics = rounded(evaluate_predictions(logits, test[1], num_bins=15))
    training["train_seconds"] = round(train_seconds, 1)
    if not args.no_save:
        out = os.path.join(args.out_dir, name)
        model.save_to_preset(
            out, preprocessor=digits_preprocessor(IMAGE_SIZE, NUM_CHANNELS),
            extra_metadata={
                "dataset": "sklearn load_digits",
                "split": {"loader": "keras_e3.data.digits.load_digits_splits",
                          "test_fraction": TEST_FRACTION, "seed": SPLIT_SEED,
                          "train_size": int(len(train[1])),
                          "test_size": int(len(test[1])),
                          "stratified": True,
                          "test_indices_sha256": split_fingerprint(
                              TEST_FRACTION, SPLIT_SEED)},
                "metrics": {"split": "test", "ece_bins": 15, **metrics},
                "training": training})
        check_reload(out, model, test[0])
    return model, metrics, training


def check_reload(preset_dir, model, images):
    """The saved preset must predict exactly what the trained model does."""

    reloaded = keras_e3.E3ViT.from_preset(preset_dir)
    before = model.predict(images, batch_size=256, verbose=0)
    after = reloaded.predict(images, batch_size=256, verbose=0)
    if not np.array_equal(before, after):
        raise AssertionError(f"{preset_dir}: reloaded predictions differ "
                             f"(max {np.max(np.abs(before - after))})")


def preset_size(path):
    return sum(os.path.getsize(os.path.join(path, f))
               for f in os.listdir(path))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", default=os.path.normpath(DEFAULT_OUT))
    parser.add_argument("--models", default="vit,vmoe,e3",
                        help="comma-separated subset of vit, vmoe, e3")
    parser.add_argument("--epochs", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=float, default=0.05,
                        help="fraction of the steps spent warming up")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--verbose", type=int, default=2)
    args = parser.parse_args(argv)

    train, test = load_digits_splits(IMAGE_SIZE, NUM_CHANNELS, TEST_FRACTION,
                                     SPLIT_SEED)
    summary = {}
    for short in args.models.split(","):
        name = SHORT[short.strip()]
        model, metrics, training = train_one(name, args, train, test)
        row = {"parameters": model.count_params(),
               "train_seconds": training["train_seconds"], **metrics}
        if not args.no_save:
            row["preset_bytes"] = preset_size(os.path.join(args.out_dir,
                                                           name))
        summary[name] = row
        print(json.dumps({name: row}), flush=True)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
