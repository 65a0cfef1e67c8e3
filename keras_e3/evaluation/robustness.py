"""Robustness under distribution shift: metrics under ImageNet-C's
corruptions, the mean corruption error, and their per-severity summary.

- `evaluate_corruptions(model, images, labels, ...)`: every corruption x
  severity (`keras_e3.data.corrupt`) of raw uint8 images, through the
  model's own preprocessing (`model.predict_members` on the corrupted raw
  images: the one pipeline), scored by `keras_e3.metrics.
  evaluate_predictions`: one row per corruption x severity x model output
  ("ensemble", "member_0", ...), plus the clean rows (corruption "clean",
  severity 0). Rows are plain dicts, ready for `pandas.DataFrame(rows)`.
- `mean_corruption_error(rows, baseline="alexnet")`: Hendrycks &
  Dietterich's CE and mCE (and their relative versions) against AlexNet's
  published ImageNet-C errors, or against the rows of another model.
- `summarize_corruptions(rows)`: accuracy, NLL, ECE and Brier averaged over
  the corruptions, per model output and severity.

Works for any model with `predict_members` (a dense ViT, V-MoE or E³
`E3ViT`, or a `keras_e3.DeepEnsemble`).
"""

import numpy as np

from keras_e3.data.corruptions import BENCHMARK_CORRUPTIONS
from keras_e3.data.corruptions import SEVERITIES
from keras_e3.data.corruptions import check_corruption
from keras_e3.data.corruptions import corrupt
from keras_e3.data.corruptions import corruption_names
from keras_e3.metrics import evaluate_predictions

METRICS = ("accuracy", "nll", "ece", "brier")
CLEAN = "clean"

# AlexNet's top-1 errors on ImageNet-C, per corruption, severities 1-5:
# Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common
# Corruptions and Perturbations", ICLR 2019, the errors their mCE divides
# by, as published with their code (github.com/hendrycks/robustness,
# ImageNet-C/test.py; their means per corruption are the "AlexNet CE"
# constants 0.886428, 0.894468, ... used across the literature).
ALEXNET_ERRORS = {
    "gaussian_noise": (0.69528, 0.82542, 0.93554, 0.98138, 0.99452),
    "shot_noise": (0.71224, 0.85108, 0.93574, 0.98182, 0.99146),
    "impulse_noise": (0.78374, 0.89808, 0.9487, 0.9872, 0.99548),
    "defocus_blur": (0.65624, 0.73202, 0.85036, 0.91364, 0.94714),
    "glass_blur": (0.64308, 0.75054, 0.88806, 0.91622, 0.93344),
    "motion_blur": (0.5843, 0.70048, 0.82108, 0.8975, 0.92638),
    "zoom_blur": (0.70008, 0.76992, 0.80784, 0.84198, 0.87198),
    "snow": (0.71726, 0.88392, 0.86468, 0.9187, 0.94952),
    "frost": (0.6139, 0.79734, 0.8879, 0.89942, 0.9343),
    "fog": (0.67474, 0.7605, 0.84378, 0.8726, 0.945),
    "brightness": (0.4514, 0.48502, 0.54048, 0.62166, 0.7244),
    "contrast": (0.64548, 0.7615, 0.88874, 0.9776, 0.9927),
    "elastic_transform": (0.52596, 0.70116, 0.55686, 0.64076, 0.80554),
    "pixelate": (0.52218, 0.5462, 0.73728, 0.87092, 0.91262),
    "jpeg_compression": (0.51002, 0.54718, 0.57294, 0.65458, 0.74778),
}
# AlexNet's clean ImageNet top-1 error, for the relative mCE: 43.5% (the
# same paper, Table 1).
ALEXNET_CLEAN_ERROR = 0.435


def resolve_corruptions(corruptions):
    """A list of corruption names from "all", "benchmark", "extra", one
    name, a comma-separated string of names, or a list of names."""
    if isinstance(corruptions, str):
        if corruptions in ("all", "benchmark", "extra"):
            return corruption_names(corruptions)
        corruptions = [c.strip() for c in corruptions.split(",") if
                       c.strip()]
    names = list(corruptions)
    if not names:
        raise ValueError("No corruptions given.")
    for name in names:
        check_corruption(name)
    if len(set(names)) != len(names):
        raise ValueError(f"A corruption is given twice in {names}.")
    return names


def resolve_severities(severities):
    """A sorted tuple of severities 1-5 from ints or "1,3,5"."""
    if isinstance(severities, str):
        try:
            severities = [int(s) for s in severities.split(",") if s.strip()]
        except ValueError as e:
            raise ValueError(f"severities must be integers 1-5 separated by"
                             f" commas; got {severities!r}.") from e
    severities = [severities] if isinstance(severities, int) else \
        list(severities)
    if not severities:
        raise ValueError("No severities given.")
    for s in severities:
        if isinstance(s, bool) or s not in SEVERITIES:
            raise ValueError(f"severities must be integers 1-5; got {s!r}.")
    return tuple(sorted(set(int(s) for s in severities)))


def metric_rows(logits, labels, corruption, severity, num_bins=15):
    """Rows {"corruption", "severity", "model", accuracy, nll, ece, brier}
    of member logits [N, M, C] (or [N, C]): "ensemble", then each member
    ("member_0", ...)."""
    report = evaluate_predictions(logits, labels, num_bins=num_bins)
    outputs = ["ensemble"] + sorted(
        {k.split("/")[0] for k in report if k.startswith("member_")},
        key=lambda k: int(k.split("_")[1]))
    return [{"corruption": corruption, "severity": int(severity),
             "model": output,
             **{m: float(report[f"{output}/{m}"]) for m in METRICS}}
            for output in outputs]


def evaluate_corruptions(model, images, labels, corruptions="all",
                         severities=SEVERITIES, seed=0, batch_size=None,
                         num_bins=15, verbose=1):
    """Accuracy, NLL, ECE and Brier under every corruption and severity.

    Args:
        model: anything with `predict_members(images, batch_size)` taking
            raw images through its own preprocessing (an `E3ViT` with a
            converter, a `DeepEnsemble` of them).
        images: raw uint8 images [N, H, W, C] (or [N, H, W] gray), or a
            list of uint8 images of any sizes.
        labels: int labels [N].
        corruptions: "all" (19), "benchmark" (ImageNet-C's 15), "extra",
            a name, "a,b" or a list of names.
        severities: severities 1-5 (ints or "1,3,5").
        seed: the seed of the random corruptions (`keras_e3.data.corrupt`'s
            protocol; None: fresh randomness).
        batch_size: `predict_members`' batch size (None: Keras' default).
        num_bins: ECE bins (equal width).
        verbose: 1 shows a progress bar (one step per corruption x
            severity, and the clean pass).

    Returns:
        A list of dicts {"corruption", "severity", "model", "accuracy",
        "nll", "ece", "brier"}: the clean rows first (corruption "clean",
        severity 0), then corruption by corruption, severity by severity;
        "model" is "ensemble" or "member_<m>".

    Example:
    ```python
    import keras_e3
    from keras_e3 import data

    model = keras_e3.E3ViT.from_preset("e3_tiny_digits")
    images, labels, _ = data.load_raw_dataset("digits", split="test")
    images, labels = images[:16], labels[:16]

    from keras_e3 import evaluation

    rows = evaluation.evaluate_corruptions(model, images, labels,
                                           corruptions="contrast",
                                           severities=1, verbose=0)
    [(r["corruption"], r["severity"], r["model"]) for r in rows][:2]
    # [("clean", 0, "ensemble"), ("clean", 0, "member_0")]
    ```
    """
    import keras

    names = resolve_corruptions(corruptions)
    severities = resolve_severities(severities)
    labels = np.asarray(labels)
    if isinstance(images, (list, tuple)):
        images = [np.asarray(x) for x in images]
    else:
        images = np.asarray(images)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images and {len(labels)} labels.")
    if not hasattr(model, "predict_members"):
        raise TypeError("evaluate_corruptions needs a model with "
                        "predict_members (an E3ViT or a DeepEnsemble); got "
                        f"{type(model).__name__}.")
    progress = keras.utils.Progbar(1 + len(names) * len(severities),
                                   verbose=1 if verbose else 0,
                                   unit_name="evaluation")

    def predict(x):
        return model.predict_members(x, batch_size=batch_size)

    rows = metric_rows(predict(images), labels, CLEAN, 0, num_bins)
    progress.add(1)
    for name in names:
        for severity in severities:
            if isinstance(images, list):
                corrupted = [corrupt(x, name, severity,
                                     seed=_image_seed(seed, i))
                             for i, x in enumerate(images)]
            else:
                corrupted = corrupt(images, name, severity, seed=seed)
            rows += metric_rows(predict(corrupted), labels, name, severity,
                                num_bins)
            progress.add(1)
    return rows


def _image_seed(seed, index):
    """Images of a list are corrupted one call each: image i gets its own
    call seed (so that it is not image 0 of every call)."""
    if seed is None:
        return None
    return int(np.random.SeedSequence([int(seed), int(index)])
               .generate_state(1)[0])


def _errors(rows, model):
    """{corruption: {severity: top-1 error}} of `model`'s rows."""
    errors = {}
    for row in rows:
        if row.get("model", "ensemble") != model:
            continue
        errors.setdefault(row["corruption"], {})[int(row["severity"])] = \
            1.0 - float(row["accuracy"])
    if not errors:
        raise ValueError(f"No rows of model output {model!r}.")
    return errors


def mean_corruption_error(rows, baseline="alexnet", model="ensemble",
                          baseline_model="ensemble",
                          corruptions="benchmark"):
    """Corruption errors (CE), their mean (mCE) and the relative versions.

    With E_{s,c} the top-1 error under corruption c at severity s and
    E_clean the clean error (from `evaluate_corruptions` rows):
    CE_c = sum_s E_{s,c} / sum_s E^base_{s,c}, and relative
    CE_c = sum_s (E_{s,c} - E_clean) / sum_s (E^base_{s,c} - E^base_clean)
    (Hendrycks & Dietterich, 2019); mCE and relative mCE average them over
    the corruptions (ImageNet-C's 15 by default; a relative CE whose
    baseline does not degrade is None and left out). Values are fractions
    (1.0 = the baseline's; papers print them x100).

    Args:
        rows: `evaluate_corruptions` rows.
        baseline: "alexnet" (AlexNet's published ImageNet-C errors,
            `ALEXNET_ERRORS`, and clean error 43.5%: meaningful for
            ImageNet-C itself) or the rows of another model (e.g. a deep
            ensemble or a dense ViT on the same images).
        model: which output of `rows` to score ("ensemble", "member_0").
        baseline_model: which output of the baseline's rows.
        corruptions: the corruptions averaged ("benchmark": ImageNet-C's
            15; or names). Every one, at every severity of the rows, must
            be in both.

    Returns:
        {"mce", "relative_mce", "ce": {c: CE_c}, "relative_ce": {...},
        "corruptions", "severities", "baseline"}.

    Example:
    ```python
    from keras_e3 import evaluation

    rows = [{"corruption": "clean", "severity": 0, "model": "ensemble",
             "accuracy": 0.9},
            {"corruption": "fog", "severity": 1, "model": "ensemble",
             "accuracy": 0.6}]
    base = [{"corruption": "clean", "severity": 0, "model": "ensemble",
             "accuracy": 0.8},
            {"corruption": "fog", "severity": 1, "model": "ensemble",
             "accuracy": 0.2}]
    out = evaluation.mean_corruption_error(rows, base, corruptions=["fog"])
    out["mce"], out["relative_mce"]  # 0.5, 0.5
    ```
    """
    ours = _errors(rows, model)
    if isinstance(baseline, str):
        if baseline != "alexnet":
            raise ValueError(f"baseline must be 'alexnet' or rows of another"
                             f" model; got {baseline!r}.")
        theirs = {c: dict(zip(SEVERITIES, e))
                  for c, e in ALEXNET_ERRORS.items()}
        theirs[CLEAN] = {0: ALEXNET_CLEAN_ERROR}
        baseline_name = "alexnet"
    else:
        theirs = _errors(baseline, baseline_model)
        baseline_name = "rows"
    names = (list(BENCHMARK_CORRUPTIONS) if corruptions == "benchmark"
             else resolve_corruptions(corruptions))
    missing = [c for c in names if c not in ours]
    if missing:
        raise ValueError(f"The rows have no {', '.join(missing)}: evaluate "
                         "those corruptions, or pass corruptions= the ones "
                         "evaluated.")
    severities = sorted({s for c in names for s in ours[c]})
    ce, relative = {}, {}
    for c in names:
        if c not in theirs or any(s not in theirs[c] for s in severities):
            raise ValueError(f"The baseline has no {c} at severities "
                             f"{severities}.")
        if sorted(ours[c]) != severities:
            raise ValueError(f"{c} is evaluated at severities "
                             f"{sorted(ours[c])}, the others at "
                             f"{severities}.")
        e = np.array([ours[c][s] for s in severities])
        b = np.array([theirs[c][s] for s in severities])
        ce[c] = float(e.sum() / b.sum())
        if CLEAN in ours and CLEAN in theirs:
            # None where the baseline does not degrade at all (0 / 0)
            degradation = (b - theirs[CLEAN][0]).sum()
            relative[c] = (float((e - ours[CLEAN][0]).sum() / degradation)
                           if degradation != 0 else None)
    defined = [v for v in relative.values() if v is not None]
    return {"mce": float(np.mean(list(ce.values()))),
            "relative_mce": float(np.mean(defined)) if defined else None,
            "ce": ce, "relative_ce": relative, "corruptions": names,
            "severities": severities, "baseline": baseline_name}


def summarize_corruptions(rows):
    """Accuracy, NLL, ECE and Brier averaged over the corruptions.

    Args:
        rows: `evaluate_corruptions` rows.

    Returns:
        One dict per model output and severity, {"model", "severity",
        "accuracy", "nll", "ece", "brier", "num_corruptions"}; severity 0 is
        the clean data (not averaged).

    Example:
    ```python
    from keras_e3 import evaluation

    rows = [{"corruption": c, "severity": 1, "model": "ensemble",
             "accuracy": a, "nll": 1.0, "ece": 0.1, "brier": 0.2}
            for c, a in (("fog", 0.5), ("snow", 0.7))]
    evaluation.summarize_corruptions(rows)[0]["accuracy"]  # 0.6
    ```
    """
    groups = {}
    for row in rows:
        groups.setdefault((row["model"], int(row["severity"])), []).append(
            row)
    out = []
    for (model, severity), group in sorted(
            groups.items(), key=lambda kv: (_output_order(kv[0][0]),
                                            kv[0][1])):
        out.append({"model": model, "severity": severity,
                    **{m: float(np.mean([r[m] for r in group]))
                       for m in METRICS if m in group[0]},
                    "num_corruptions": len(group)})
    return out


def _output_order(name):
    return -1 if name == "ensemble" else int(name.split("_")[-1])


def evaluate_shift(model, name, data_dir=None, batch_size=64,
                   max_examples=None, num_bins=15, download=False,
                   verbose=1):
    """Accuracy, NLL, ECE and Brier on a shifted test set, by its
    tensorflow-datasets name (`keras_e3.data.shift`).

    The raw images go through the model's own preprocessing
    (`predict_members`, `batch_size` images at a time). On ImageNet-A and
    ImageNet-R the logits are restricted to the dataset's 200 classes
    (`keras_e3.data.shift.class_subset`) before any metric, and the labels
    renumbered among them.

    Args:
        model: an `E3ViT` (with its converter) or a `DeepEnsemble`, with
            the dataset's label space (1,000 ILSVRC2012 classes, or
            CIFAR-10's 10).
        name: e.g. "imagenet_a", "imagenet2012_corrupted/fog_3",
            "cifar10_1".
        data_dir: tensorflow-datasets' data directory.
        batch_size: images per `predict_members` call.
        max_examples: the first N examples only.
        num_bins: ECE bins.
        download: let tensorflow-datasets download and prepare it.
        verbose: 1 shows a progress bar.

    Returns:
        Rows {"dataset", "model", "accuracy", "nll", "ece", "brier",
        "num_examples"} ("ensemble", then each member), with "corruption"
        and "severity" too for the corrupted sets (so that
        `mean_corruption_error` reads them).

    Example:
    ```python
    import tensorflow_datasets as tfds

    import keras_e3
    from keras_e3 import evaluation

    model = keras_e3.E3ViT.from_preset("e3_tiny_digits")  # 10 classes
    with tfds.testing.mock_data(num_examples=4):  # random data, no download
        rows = evaluation.evaluate_shift(model, "cifar10_1", verbose=0)
    rows[0]["model"], rows[0]["num_examples"]  # "ensemble", 4
    ```
    """
    import keras

    from keras_e3.data.shift import class_subset
    from keras_e3.data.shift import load_shift_dataset

    dataset, info = load_shift_dataset(name, data_dir=data_dir,
                                       max_examples=max_examples,
                                       download=download)
    num_classes = getattr(model, "num_classes", None)
    if num_classes != info["num_classes"]:
        raise ValueError(
            f"{name} is labelled with {info['label_set']}'s "
            f"{info['num_classes']} classes; the model predicts "
            f"{num_classes}.")
    progress = keras.utils.Progbar(None, verbose=1 if verbose else 0,
                                   unit_name="image")
    logits, labels, images = [], [], []

    def flush():
        logits.append(model.predict_members(images, batch_size=batch_size))
        progress.add(len(images))
        images.clear()

    for image, label in dataset.as_numpy_iterator():
        images.append(image)
        labels.append(int(label))
        if len(images) == batch_size:
            flush()
    if images:
        flush()
    if not labels:
        raise ValueError(f"{name} has no examples.")
    logits = np.concatenate(logits)
    labels = np.asarray(labels)
    if info["class_subset"]:
        subset = class_subset(info["class_subset"])
        position = np.searchsorted(subset, labels)
        outside = (position >= len(subset)) | (
            subset[np.minimum(position, len(subset) - 1)] != labels)
        if outside.any():
            raise ValueError(f"{name} has labels outside its "
                             f"{len(subset)} classes: "
                             f"{sorted(set(labels[outside].tolist()))[:5]}.")
        logits, labels = logits[..., subset], position
    rows = []
    for row in metric_rows(logits, labels, None, 0, num_bins):
        out = {"dataset": name, "model": row["model"],
               **{m: row[m] for m in METRICS},
               "num_examples": int(len(labels))}
        if "/" in name:
            corruption, _, severity = name.split("/", 1)[1].rpartition("_")
            out.update(corruption=corruption, severity=int(severity))
        rows.append(out)
    return rows
