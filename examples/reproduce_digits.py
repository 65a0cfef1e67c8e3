"""Small-scale reproduction of the E³ paper's comparison on digits.

    KERAS_BACKEND=jax python examples/reproduce_digits.py [--epochs 40]
        [--seeds 0 1 2] [--de-offset 100] [--out PATH]

For every seed s this trains, with the recipe of `examples/train_digits.py`
(imported from it, not copied: same model configs, same AdamW + warm-up +
cosine schedule, same augmentation, same batches for the same seed):

* ViT    - the dense `vit_tiny_digits` config, seed s;
* V-MoE  - `vmoe_tiny_digits` (4 experts, K=2, in blocks 1 and 3), seed s;
* E³     - `e3_tiny_digits` (2 members x 2 experts, K=1), seed s;
* DE     - a deep ensemble of 2 V-MoEs: the V-MoE above (seed s) and one
           more V-MoE trained with seed s + `--de-offset` (default 100).
           It therefore costs 2x the V-MoE's training and inference.

Every model gets the same budget (`--epochs` epochs of 21 batches of 64).
The shipped presets were trained for 80 epochs; the default here is 40 so
that 3 seeds x 4 trainings finish in about 15-20 minutes on a busy 2-core
CPU. Use `--epochs 80` to match the presets' budget.

Evaluation, on the held-out split of `load_digits_splits` (seed 0, 450
images; one image is 0.22 accuracy points):

* in-distribution: accuracy, NLL, ECE (15 equal-width bins) and Brier of
  the ensemble prediction (mean of the members' softmaxes), and the mean
  over members of the same metrics for the E³ and the DE;
* OOD detection AUROC, in = the held-out digits, out = (a) the same images
  rotated by 90 degrees (`np.rot90` of the 32x32 images, which equals
  rotating the 8x8 digits before the symmetric bilinear upsampling) and
  (b) 450 images of i.i.d. uniform noise in [-1, 1] (fixed seed, the same
  for every model). Scores: maximum softmax probability (MSP, all models),
  predictive entropy (all models) and the members' mutual information
  (E³ and DE only, the models with several members);
* GFLOPs per image from `keras_e3.count_flops` (analytic, matmuls
  only, expert buffers at full capacity, routing groups amortised; the DE
  is the sum over its 2 V-MoEs).

It prints a Markdown table (mean +- sample standard deviation over seeds)
and writes every raw number to `benchmarks/results/reproduce_digits.json`
(atomically; rewritten after every seed, so an interrupted run keeps the
finished seeds).
"""

import argparse
import math
import os
import sys
import time
from types import SimpleNamespace

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import train_digits  # noqa: E402  (the recipe and the model configs)

import keras_e3  # noqa: E402
from keras_e3.metrics import auroc  # noqa: E402
from keras_e3.metrics import entropy_score  # noqa: E402
from keras_e3.metrics import evaluate_predictions  # noqa: E402
from keras_e3.metrics import msp_score  # noqa: E402
from keras_e3.metrics import mutual_information_score  # noqa: E402
from keras_e3.metrics import softmax  # noqa: E402
from keras_e3.data.digits import load_digits_splits  # noqa: E402
from keras_e3.io_utils import json_safe  # noqa: E402
from keras_e3.io_utils import write_json_atomic  # noqa: E402

DEFAULT_OUT = os.path.normpath(os.path.join(
    HERE, os.pardir, "benchmarks", "results", "reproduce_digits.json"))
ROWS = ("ViT", "V-MoE", "E³", "DE (2×V-MoE)")
NOISE_SEED = 1234
METRICS = ("accuracy", "nll", "ece", "brier")


def ood_sets(x_test, noise_seed=NOISE_SEED):
    rotated = np.ascontiguousarray(np.rot90(x_test, k=1, axes=(1, 2)))
    rng = np.random.default_rng(noise_seed)
    noise = rng.uniform(-1.0, 1.0, size=x_test.shape).astype(np.float32)
    return {"rot90": rotated, "noise": noise}


def evaluate(ensemble, test, ood):
    """All the numbers of one model (a DeepEnsemble of 1 or 2 E3ViTs)."""
    x, y = test
    logits = ensemble.predict_members(x, batch_size=256)  # [N, M, C]
    m = logits.shape[1]
    raw = evaluate_predictions(logits, y, num_bins=15)
    out = {f"ensemble_{k}": raw[f"ensemble/{k}"] for k in METRICS}
    for k in METRICS:
        out[f"member_mean_{k}"] = float(np.mean(
            [raw[f"member_{i}/{k}"] for i in range(m)]))
    out["members"] = {f"member_{i}": {k: raw[f"member_{i}/{k}"]
                                      for k in METRICS} for i in range(m)}
    if m > 1:
        for k in ("disagreement", "normalized_disagreement", "average_kl"):
            out[k] = raw[k]
    probs_in = softmax(logits)
    scorers = {"msp": msp_score, "entropy": entropy_score}
    if m > 1:
        scorers["mi"] = mutual_information_score
    for name, images in ood.items():
        probs_out = softmax(ensemble.predict_members(images, batch_size=256))
        for score, fn in scorers.items():
            out[f"auroc_{name}_{score}"] = auroc(fn(probs_in), fn(probs_out))
    counts = ensemble.flops()
    out["gflops"] = counts["flops"] / 1e9
    out["params"] = int(counts["params"])
    return out


def train(name, seed, epochs, data):
    """train_digits.train_one with its defaults, without saving a preset."""
    args = SimpleNamespace(epochs=epochs, batch_size=64, lr=2e-3,
                           warmup=0.05, weight_decay=0.05, seed=seed,
                           no_save=True, verbose=0, out_dir=None)
    model, _, training = train_digits.train_one(name, args, *data)
    print(f"  trained {name} seed {seed}: "
          f"{training['train_seconds']:.0f} s", flush=True)
    return model, training["train_seconds"]


def run_seed(seed, args, data, ood):
    models, seconds = {}, {}
    for key, name, s in (("vit", "vit_tiny_digits", seed),
                         ("vmoe", "vmoe_tiny_digits", seed),
                         ("e3", "e3_tiny_digits", seed),
                         ("vmoe_b", "vmoe_tiny_digits",
                          seed + args.de_offset)):
        models[key], seconds[key] = train(name, s, args.epochs, data)
    ensembles = {
        "ViT": (keras_e3.DeepEnsemble([models["vit"]]), seconds["vit"]),
        "V-MoE": (keras_e3.DeepEnsemble([models["vmoe"]]), seconds["vmoe"]),
        "E³": (keras_e3.DeepEnsemble([models["e3"]]), seconds["e3"]),
        "DE (2×V-MoE)": (keras_e3.DeepEnsemble([models["vmoe"],
                                                models["vmoe_b"]]),
                         seconds["vmoe"] + seconds["vmoe_b"]),
    }
    result = {}
    for row, (ensemble, train_seconds) in ensembles.items():
        result[row] = evaluate(ensemble, data[1], ood)
        result[row]["train_seconds"] = round(train_seconds, 1)
    return result


def mean_std(values):
    values = [v for v in values if v is not None and not (
        isinstance(v, float) and math.isnan(v))]
    if not values:
        return None, None
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return float(np.mean(values)), std


def summarize(per_seed):
    seeds = sorted(per_seed, key=int)
    summary = {}
    for row in ROWS:
        keys = [k for k, v in per_seed[seeds[0]][row].items()
                if isinstance(v, (int, float))]
        summary[row] = {}
        for k in keys:
            mean, std = mean_std([per_seed[s][row][k] for s in seeds])
            summary[row][k] = {"mean": mean, "std": std}
    return summary


def fmt(stat, scale=1.0, digits=2):
    if stat is None or stat["mean"] is None:
        return "–"
    return (f"{stat['mean'] * scale:.{digits}f} ± "
            f"{stat['std'] * scale:.{digits}f}")


def table(summary, num_seeds):
    lines = [
        f"In-distribution (held-out digits, 450 images) and OOD AUROC; "
        f"mean ± std over {num_seeds} seed(s).",
        "",
        "| Model | Acc (%) | NLL | ECE (%) | Brier | AUROC rot90 MSP (%) | "
        "AUROC noise MSP (%) | AUROC rot90 MI (%) | AUROC noise MI (%) | "
        "GFLOPs/img | Params |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in ROWS:
        s = summary[row]
        lines.append(
            f"| {row} | {fmt(s['ensemble_accuracy'], 100)} "
            f"| {fmt(s['ensemble_nll'], 1, 3)} "
            f"| {fmt(s['ensemble_ece'], 100)} "
            f"| {fmt(s['ensemble_brier'], 1, 3)} "
            f"| {fmt(s['auroc_rot90_msp'], 100, 1)} "
            f"| {fmt(s['auroc_noise_msp'], 100, 1)} "
            f"| {fmt(s.get('auroc_rot90_mi'), 100, 1)} "
            f"| {fmt(s.get('auroc_noise_mi'), 100, 1)} "
            f"| {s['gflops']['mean']:.4f} | {int(s['params']['mean']):,} |")
    lines += [
        "",
        "Mean over members (E³: its 2 members; DE: its 2 V-MoEs), entropy "
        "AUROC, diversity and training time:",
        "",
        "| Model | member Acc (%) | member NLL | member ECE (%) | "
        "member Brier | AUROC rot90 entropy (%) | AUROC noise entropy (%) | "
        "disagreement (%) | train s |",
        "|---|---|---|---|---|---|---|---|---|"]
    for row in ROWS:
        s = summary[row]
        lines.append(
            f"| {row} | {fmt(s['member_mean_accuracy'], 100)} "
            f"| {fmt(s['member_mean_nll'], 1, 3)} "
            f"| {fmt(s['member_mean_ece'], 100)} "
            f"| {fmt(s['member_mean_brier'], 1, 3)} "
            f"| {fmt(s['auroc_rot90_entropy'], 100, 1)} "
            f"| {fmt(s['auroc_noise_entropy'], 100, 1)} "
            f"| {fmt(s.get('disagreement'), 100)} "
            f"| {fmt(s['train_seconds'], 1, 0)} |")
    return "\n".join(lines)


def write_json(path, payload):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_json_atomic(path, payload)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=40,
                        help="epochs per model (the presets used 80)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--de-offset", type=int, default=100,
                        help="the DE's second V-MoE uses seed s + this")
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    import keras

    start = time.perf_counter()
    data = load_digits_splits(train_digits.IMAGE_SIZE,
                              train_digits.NUM_CHANNELS,
                              train_digits.TEST_FRACTION,
                              train_digits.SPLIT_SEED)
    ood = ood_sets(data[1][0])
    payload = {
        "description": "examples/reproduce_digits.py: ViT, V-MoE, E³ and a "
                       "deep ensemble of 2 V-MoEs on sklearn digits",
        "config": {
            "epochs": args.epochs, "seeds": args.seeds,
            "de_offset": args.de_offset,
            "de_members": "V-MoE seed s and V-MoE seed s + de_offset",
            "batch_size": 64, "peak_learning_rate": 2e-3, "warmup": 0.05,
            "weight_decay": 0.05,
            "models": {k: {kk: (list(vv) if isinstance(vv, tuple) else vv)
                           for kk, vv in v.items()}
                       for k, v in train_digits.MODELS.items()},
            "train_size": int(len(data[0][1])),
            "test_size": int(len(data[1][1])),
            "ece_bins": 15,
            "ood": {"rot90": "np.rot90 of the 32x32 held-out images",
                    "noise": f"uniform [-1, 1], numpy seed {NOISE_SEED}, "
                             f"{len(data[1][1])} images"},
            "std": "sample standard deviation (ddof=1) over seeds",
            "backend": keras.backend.backend(),
        },
        "per_seed": {}, "complete": False,
    }
    for seed in args.seeds:
        print(f"seed {seed}", flush=True)
        payload["per_seed"][str(seed)] = json_safe(
            run_seed(seed, args, data, ood))
        payload["summary"] = summarize(payload["per_seed"])
        payload["wall_seconds"] = round(time.perf_counter() - start, 1)
        write_json(args.out, payload)
    payload["complete"] = True
    payload["wall_seconds"] = round(time.perf_counter() - start, 1)
    text = table(payload["summary"], len(args.seeds))
    payload["table_markdown"] = text
    write_json(args.out, payload)
    print()
    print(text)
    print(f"\nwall time: {payload['wall_seconds']:.0f} s; raw numbers in "
          f"{args.out}")


if __name__ == "__main__":
    main()
