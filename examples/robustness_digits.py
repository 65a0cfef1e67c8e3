"""Small-scale robustness study on digits: E³ vs V-MoE vs a deep ensemble
of two V-MoEs (and the dense ViT) under ImageNet-C's corruptions.

    KERAS_BACKEND=jax python examples/robustness_digits.py [--epochs 40]
        [--seeds 0 1 2] [--severities 1 2 3 4 5] [--out PATH]

Models: for every seed s, the four models of `examples/reproduce_digits.py`
trained with its recipe (imported, not copied): ViT, V-MoE (K=2), E³ (M=2,
K=1) and the deep ensemble (DE) of the V-MoE and a second V-MoE trained
with seed s + 100. Each gets the shipped presets' converter
(`keras_e3.data.digits.digits_converter`: 8x8 or 32x32 uint8 digits ->
32x32 inputs in [-1, 1]).

Data: the 450 held-out digits (the presets' split), as uint8 images
(`to_uint8`: round(v * 255 / 16)), upsized to the models' 32 px by that
converter's own bilinear resampling (`digits_converter` with value range
0..255, rounded to uint8): the corruptions need 32 px or more, and at 32 px
the converter then passes the images through unchanged. Every corruption
of `keras_e3.data.corruption_names()` (ImageNet-C's 15 and its 4 extras) at
each severity, seed 0 (the same corrupted images for every model and
seed), is applied to those 32x32 uint8 images; the models see them through
their converter (`predict_members`): the rows of
`keras_e3.evaluation.evaluate_corruptions`, computed once per corrupted set
for all models (`metric_rows`).

Outputs: `benchmarks/results/robustness_digits.json` (every row of every
seed, and the summary), `benchmarks/results/robustness_digits.png`
(`keras_e3.evaluation.plots.corruption_boxes`, seed 0) and a Markdown table:
mean ± std over seeds of the clean and mean-over-corruptions accuracy,
NLL and ECE, the mean accuracy at severity 5, the mCE and relative mCE
with the V-MoE of the same seed as the baseline (1.0 = the V-MoE), and
MFLOPs per image (`keras_e3.count_flops`; the DE is the sum).
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reproduce_digits  # noqa: E402  (the four models and their recipe)
import train_digits  # noqa: E402

import keras_e3  # noqa: E402
from keras_e3.data.corruptions import corrupt  # noqa: E402
from keras_e3.data.corruptions import corruption_names  # noqa: E402
from keras_e3.data.digits import digits_converter  # noqa: E402
from keras_e3.data.digits import load_digits_raw  # noqa: E402
from keras_e3.data.digits import split_indices  # noqa: E402
from keras_e3.data.digits import to_uint8  # noqa: E402
from keras_e3.evaluation.robustness import mean_corruption_error  # noqa
from keras_e3.evaluation.robustness import metric_rows  # noqa: E402
from keras_e3.evaluation.robustness import summarize_corruptions  # noqa
from keras_e3.io_utils import write_json_atomic  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       os.pardir, "benchmarks", "results")
ROWS = ("ViT", "V-MoE", "E³", "DE (2×V-MoE)")


def test_images():
    """The 450 held-out digits as 32x32 uint8 images, and their labels."""
    images, labels = load_digits_raw()
    _, test = split_indices(train_digits.TEST_FRACTION,
                            train_digits.SPLIT_SEED)
    raw = to_uint8(images[test])[..., None]
    upsize = keras_e3.ImageConverter(
        image_size=train_digits.IMAGE_SIZE, num_channels=1,
        interpolation="bilinear", value_range=(0.0, 255.0))
    up = np.clip(np.round(upsize(raw)), 0, 255).astype(np.uint8)
    return up, np.asarray(labels[test])


def corrupted_sets(images, severities, seed=0):
    """{(corruption, severity): uint8 images}, the clean set as
    ("clean", 0)."""
    sets = {("clean", 0): images}
    for name in corruption_names():
        for severity in severities:
            sets[(name, severity)] = corrupt(images, name, severity,
                                             seed=seed)
    return sets


def models_of_seed(seed, epochs, data):
    args = argparse.Namespace(de_offset=100)
    trained = {}
    for key, name, s in (("vit", "vit_tiny_digits", seed),
                         ("vmoe", "vmoe_tiny_digits", seed),
                         ("e3", "e3_tiny_digits", seed),
                         ("vmoe_b", "vmoe_tiny_digits",
                          seed + args.de_offset)):
        model, _ = reproduce_digits.train(name, s, epochs, data)
        model.preprocessor = digits_converter(train_digits.IMAGE_SIZE, 1)
        trained[key] = model
    return {"ViT": keras_e3.DeepEnsemble([trained["vit"]]),
            "V-MoE": keras_e3.DeepEnsemble([trained["vmoe"]]),
            "E³": keras_e3.DeepEnsemble([trained["e3"]]),
            "DE (2×V-MoE)": keras_e3.DeepEnsemble([trained["vmoe"],
                                                   trained["vmoe_b"]])}


def evaluate_seed(ensembles, sets, labels):
    rows = {}
    for name, ensemble in ensembles.items():
        rows[name] = []
        for (corruption, severity), images in sets.items():
            logits = ensemble.predict_members(images, batch_size=450)
            rows[name] += metric_rows(logits, labels, corruption, severity)
    return rows


def seed_summary(rows, ensembles):
    out = {}
    for name, model_rows in rows.items():
        ensemble_rows = [r for r in model_rows if r["model"] == "ensemble"]
        clean = [r for r in ensemble_rows if r["severity"] == 0][0]
        shifted = [r for r in ensemble_rows if r["severity"] > 0]
        worst = [r for r in shifted if r["severity"] == 5]
        mce = mean_corruption_error(model_rows, rows["V-MoE"],
                                    corruptions="all")
        out[name] = {
            "clean_accuracy": clean["accuracy"], "clean_nll": clean["nll"],
            "clean_ece": clean["ece"],
            "corrupted_accuracy": float(np.mean([r["accuracy"]
                                                 for r in shifted])),
            "corrupted_nll": float(np.mean([r["nll"] for r in shifted])),
            "corrupted_ece": float(np.mean([r["ece"] for r in shifted])),
            "severity5_accuracy": float(np.mean([r["accuracy"]
                                                 for r in worst]))
            if worst else None,
            "mce_vs_vmoe": mce["mce"],
            "relative_mce_vs_vmoe": mce["relative_mce"],
            "mflops": sum(keras_e3.count_flops(m)["flops"]
                          for m in ensembles[name].models) / 1e6,
            "per_severity": summarize_corruptions(ensemble_rows),
        }
    return out


def rounded(value):
    """Floats rounded to 5 decimals (the JSON stays small)."""
    if isinstance(value, float):
        return round(value, 5)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def fmt(values, scale=1.0, digits=2, missing="–"):
    """"mean ± std" (sample std) of the values that are not None."""
    values = [v for v in values if v is not None]
    if not values:
        return missing
    mean = np.mean(values) * scale
    std = (np.std(values, ddof=1) * scale) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def table(per_seed):
    seeds = list(per_seed)
    lines = [
        f"Held-out digits (450 images, upsized to 32 px) under the 19 "
        f"corruptions; ensemble predictions; mean ± std over "
        f"{len(seeds)} seed(s). mCE: the V-MoE of the same seed = 1.",
        "",
        "| model | clean acc (%) | corrupted acc (%) | severity-5 acc (%) | "
        "clean NLL | corrupted NLL | clean ECE (%) | corrupted ECE (%) | "
        "mCE vs V-MoE | rel. mCE vs V-MoE | MFLOPs/image |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in ROWS:
        s = [per_seed[k]["summary"][name] for k in seeds]

        def col(key, scale=1.0, digits=2):
            return fmt([x[key] for x in s], scale, digits)

        lines.append(
            f"| {name} | {col('clean_accuracy', 100)} "
            f"| {col('corrupted_accuracy', 100)} "
            f"| {col('severity5_accuracy', 100)} "
            f"| {col('clean_nll', 1, 3)} | {col('corrupted_nll', 1, 3)} "
            f"| {col('clean_ece', 100)} | {col('corrupted_ece', 100)} "
            f"| {col('mce_vs_vmoe', 1, 3)} "
            f"| {col('relative_mce_vs_vmoe', 1, 3)} "
            f"| {s[0]['mflops']:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--severities", type=int, nargs="+",
                        default=[1, 2, 3, 4, 5])
    parser.add_argument("--out", default=os.path.join(
        RESULTS, "robustness_digits.json"))
    args = parser.parse_args(argv)

    import keras

    from keras_e3.data.digits import load_digits_splits
    from keras_e3.evaluation.plots import corruption_boxes

    started = time.perf_counter()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    data = load_digits_splits(train_digits.IMAGE_SIZE,
                              train_digits.NUM_CHANNELS,
                              train_digits.TEST_FRACTION,
                              train_digits.SPLIT_SEED)
    images, labels = test_images()
    sets = corrupted_sets(images, args.severities)
    print(f"{len(sets)} image sets ({time.perf_counter() - started:.0f} s)",
          flush=True)
    per_seed = {}
    for seed in args.seeds:
        ensembles = models_of_seed(seed, args.epochs, data)
        rows = evaluate_seed(ensembles, sets, labels)
        per_seed[str(seed)] = {"rows": rows,
                               "summary": seed_summary(rows, ensembles)}
        if seed == args.seeds[0]:
            corruption_boxes(rows, os.path.splitext(args.out)[0] + ".png")
        payload = {
            "description": "examples/robustness_digits.py: ViT, V-MoE, E³ "
                           "and a deep ensemble of 2 V-MoEs on held-out "
                           "digits under ImageNet-C's corruptions",
            "config": {"epochs": args.epochs, "seeds": args.seeds,
                       "severities": args.severities,
                       "corruptions": corruption_names(),
                       "corruption_seed": 0,
                       "backend": keras.backend.backend()},
            "per_seed": per_seed, "complete": seed == args.seeds[-1],
            "wall_seconds": round(time.perf_counter() - started, 1),
            "table_markdown": table(per_seed)}
        write_json_atomic(args.out, rounded(payload))
        print(f"seed {seed} done ({time.perf_counter() - started:.0f} s)",
              flush=True)
    print(table(per_seed))


if __name__ == "__main__":
    main()
