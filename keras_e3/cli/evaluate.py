"""`keras-e3 evaluate`: a model's report on a dataset (see
`keras_e3.evaluation.report`), as JSON and PNG plots; or several models'
robustness under distribution shift (`keras_e3.evaluation.robustness`).

    keras-e3 evaluate --preset P --data D [--ood-data D2] --out DIR
                      [--batch-size 64] [--num-bins 15] [--max-examples N]
    keras-e3 evaluate P1 [P2 ...] --data D --corruptions all|NAME,...
                      [--severities 1,3,5] [--corruption-seed 0] --out DIR
    keras-e3 evaluate P1 [P2 ...] --shift-dataset NAME [--data-dir DIR]
                      --out DIR

Robustness mode (`--corruptions` and/or `--shift-dataset`; presets as
arguments or repeated `--preset`): every preset is evaluated on the same
corrupted raw images of `--data` (ImageNet-C's corruptions,
`keras_e3.data.corrupt`, each preset converting them with its own
converter) and/or on the shifted test sets named (tensorflow-datasets
names: `imagenet_a`, `imagenet2012_corrupted/fog_3`, `cifar10_1`, ...;
`keras_e3.data.shift`). It writes `robustness.json` (the rows per preset,
their per-severity summary and the mCE: against AlexNet's published
ImageNet-C errors, and against the first preset), `robustness.csv` (one
row per preset x corruption x severity x model output), `shift.json` /
`shift.csv` for shifted sets, and `corruptions.png` (accuracy, NLL and ECE
against severity, one box per severity over the corruptions, the presets
side by side).

Datasets (`--data`, see `keras_e3.data.load_dataset`): "digits" (the
test split of scikit-learn's digits, as the `*_tiny_digits` presets) or a
folder of class sub-folders of images, named after the model's classes
(`model.class_names`; class indices "0", "1", ... for a model without
names): sub-folders 0/ 1/ 7/ are classes 0, 1 and 7, and a sub-folder the
model has no class of is an error listing both. Every image goes through
the model's converter (`model.preprocessor`), so the report's metrics are
those of `model.predict` on the same files. `--ood-data` (see
`keras_e3.data.ood`): "noise", "digits-inverted", "digits-rotated" or a
folder (its labels are ignored).
"""

import os

from keras_e3.data import load_dataset
from keras_e3.data.ood import check_dataset_spec
from keras_e3.data.ood import load_ood_dataset
from keras_e3.evaluation.report import REPORT_FILE
from keras_e3.evaluation.report import check_labels
from keras_e3.evaluation.report import evaluate
from keras_e3.evaluation.report import summary
from keras_e3.models import E3ViT


def add_parser(commands):
    """Adds the `evaluate` command to argparse sub-parsers."""
    parser = commands.add_parser(
        "evaluate", help="accuracy, NLL, ECE, Brier, OOD detection and "
                         "FLOPs per member and ensemble; a JSON report and "
                         "plots")
    parser.add_argument("presets", nargs="*", metavar="PRESET",
                        help="presets to compare (robustness mode)")
    parser.add_argument("--preset", action="append", default=[],
                        help="preset name, preset directory or "
                             "hf://owner/repo (repeatable)")
    parser.add_argument("--corruptions", default=None,
                        help='robustness: "all", "benchmark" (ImageNet-C\'s '
                             "15) or comma-separated corruption names")
    parser.add_argument("--severities", default="1,2,3,4,5",
                        help="robustness: comma-separated severities 1-5")
    parser.add_argument("--corruption-seed", type=int, default=0,
                        help="seed of the random corruptions")
    parser.add_argument("--shift-dataset", action="append", default=[],
                        help="robustness: a shifted test set by its "
                             "tensorflow-datasets name (repeatable)")
    parser.add_argument("--data-dir", default=None,
                        help="tensorflow-datasets' data directory")
    parser.add_argument("--data", default=None,
                        help='"digits" or a folder of class sub-folders '
                             "named after the model's classes")
    parser.add_argument("--ood-data", default=None,
                        help='out-of-distribution data: "noise", '
                             '"digits-inverted", "digits-rotated" or a '
                             "folder of images (labels ignored)")
    parser.add_argument("--out", required=True,
                        help="output folder (report.json and PNG plots)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-bins", type=int, default=15,
                        help="calibration bins (ECE, reliability diagram)")
    parser.add_argument("--max-examples", type=int, default=None,
                        help="evaluate only the first N examples (and N OOD "
                             "examples)")
    parser.add_argument("--no-plots", action="store_true",
                        help="write the report only")
    return parser


def run(args):
    """Runs `keras-e3 evaluate` with parsed `args`; returns 0.

    Raises ValueError (or `PresetError`, a ValueError) for bad input.
    """
    presets = list(getattr(args, "presets", None) or []) + list(
        _as_list(getattr(args, "preset", None)))
    if not presets:
        raise ValueError("Name a preset (--preset P, or presets as "
                         "arguments).")
    if getattr(args, "corruptions", None) or getattr(args, "shift_dataset",
                                                     None):
        return run_robustness(args, presets)
    if len(presets) > 1:
        raise ValueError("Several presets are compared in robustness mode "
                         "only (--corruptions or --shift-dataset); the "
                         "report takes one preset.")
    if getattr(args, "data", None) is None:
        raise ValueError("--data is required (digits or a folder).")
    args.preset = presets[0]
    batch_size, num_bins, max_examples = _sizes(args)
    ood_spec = getattr(args, "ood_data", None)
    check_dataset_spec(args.data, "--data", ood=False)
    if ood_spec is not None:
        check_dataset_spec(ood_spec, "--ood-data", ood=True)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out!r} exists and is not a folder.")

    model = E3ViT.from_preset(args.preset)
    names = model_class_names(model)
    images, labels, class_names = load_dataset(
        args.data, model, split="test", class_names=names)
    if max_examples is not None:
        images, labels = images[:max_examples], labels[:max_examples]
    check_labels(labels, model.num_classes, args.data)
    ood_images = None
    if ood_spec is not None:
        ood_images = load_ood_dataset(ood_spec, model, images)
        if max_examples is not None:
            ood_images = ood_images[:max_examples]
    report = evaluate(
        model, images, labels, ood_images=ood_images, out_dir=args.out,
        class_names=class_names, plots=not getattr(args, "no_plots", False),
        batch_size=batch_size, num_bins=num_bins,
        info={"preset": os.fspath(args.preset), "dataset": args.data,
              "ood_dataset": ood_spec})
    print(summary(report))
    print(f"report: {os.path.join(args.out, REPORT_FILE)}")
    return 0


def _as_list(value):
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


ROBUSTNESS_FILE = "robustness.json"
SHIFT_FILE = "shift.json"
METRIC_COLUMNS = ("accuracy", "nll", "ece", "brier")


def run_robustness(args, presets):
    """Robustness mode (module docstring); returns 0."""
    from keras_e3.data.folder import load_raw_dataset
    from keras_e3.data.shift import shift_dataset_info
    from keras_e3.evaluation.robustness import evaluate_corruptions
    from keras_e3.evaluation.robustness import evaluate_shift
    from keras_e3.evaluation.robustness import mean_corruption_error
    from keras_e3.evaluation.robustness import resolve_corruptions
    from keras_e3.evaluation.robustness import resolve_severities
    from keras_e3.evaluation.robustness import summarize_corruptions
    from keras_e3.io_utils import write_json_atomic

    batch_size, num_bins, max_examples = _sizes(args)
    corruptions = getattr(args, "corruptions", None)
    shifts = _as_list(getattr(args, "shift_dataset", None))
    if corruptions:  # bad names or severities fail before any work
        corruptions = resolve_corruptions(corruptions)
        severities = resolve_severities(getattr(args, "severities",
                                                "1,2,3,4,5"))
        if getattr(args, "data", None) is None:
            raise ValueError("--corruptions needs --data (the images to "
                             "corrupt: digits or a folder).")
        check_dataset_spec(args.data, "--data", ood=False)
    for name in shifts:
        shift_dataset_info(name)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out!r} exists and is not a folder.")
    os.makedirs(args.out, exist_ok=True)
    models = {}
    for preset in presets:
        key = os.fspath(preset)
        if key in models:
            raise ValueError(f"Preset {key!r} is given twice.")
        models[key] = E3ViT.from_preset(preset)
    written = []
    if corruptions:
        rows = {}
        for preset, model in models.items():
            images, labels, _ = load_raw_dataset(
                args.data, split="test",
                class_names=model_class_names(model))
            if max_examples is not None:
                images, labels = images[:max_examples], labels[:max_examples]
            check_labels(labels, model.num_classes, args.data)
            print(f"{preset}: {len(labels)} images x {len(corruptions)} "
                  f"corruptions x {len(severities)} severities")
            rows[preset] = evaluate_corruptions(
                model, images, labels, corruptions=corruptions,
                severities=severities, seed=args.corruption_seed,
                batch_size=batch_size, num_bins=num_bins)
        first = presets[0]
        summary = {}
        for preset, preset_rows in rows.items():
            summary[preset] = {
                "per_severity": summarize_corruptions(preset_rows),
                "mce_vs_first": _mce(mean_corruption_error, preset_rows,
                                     rows[first], corruptions),
                "mce_vs_alexnet": _mce(mean_corruption_error, preset_rows,
                                       "alexnet", corruptions)}
        write_json_atomic(os.path.join(args.out, ROBUSTNESS_FILE), {
            "data": args.data, "corruptions": corruptions,
            "severities": list(severities),
            "corruption_seed": args.corruption_seed, "presets": presets,
            "rows": rows, "summary": summary})
        _write_csv(os.path.join(args.out, "robustness.csv"), [
            {"preset": p, **r} for p, preset_rows in rows.items()
            for r in preset_rows],
            ("preset", "corruption", "severity", "model", *METRIC_COLUMNS))
        written += [ROBUSTNESS_FILE, "robustness.csv"]
        if not getattr(args, "no_plots", False):
            from keras_e3.evaluation.plots import corruption_boxes

            corruption_boxes(rows, os.path.join(args.out, "corruptions.png"))
            written.append("corruptions.png")
        for preset in presets:
            print(_robustness_line(preset, summary[preset]))
    if shifts:
        rows = {}
        for preset, model in models.items():
            rows[preset] = []
            for name in shifts:
                rows[preset] += evaluate_shift(
                    model, name, data_dir=getattr(args, "data_dir", None),
                    batch_size=batch_size, max_examples=max_examples,
                    num_bins=num_bins)
        write_json_atomic(os.path.join(args.out, SHIFT_FILE),
                          {"datasets": shifts, "presets": presets,
                           "rows": rows})
        _write_csv(os.path.join(args.out, "shift.csv"), [
            {"preset": p, **r} for p, preset_rows in rows.items()
            for r in preset_rows],
            ("preset", "dataset", "model", *METRIC_COLUMNS, "num_examples"))
        written += [SHIFT_FILE, "shift.csv"]
        for preset, preset_rows in rows.items():
            for row in preset_rows:
                if row["model"] == "ensemble":
                    print(f"{preset} on {row['dataset']}: accuracy "
                          f"{row['accuracy']:.4f}  NLL {row['nll']:.4f}  "
                          f"ECE {row['ece']:.4f}")
    print("wrote " + ", ".join(os.path.join(args.out, w) for w in written))
    return 0


def _mce(mean_corruption_error, rows, baseline, corruptions):
    """mCE over the evaluated corruptions; None where the baseline lacks
    one (AlexNet has ImageNet-C's 15 only)."""
    try:
        return mean_corruption_error(rows, baseline, corruptions=corruptions)
    except ValueError:
        return None


def _robustness_line(preset, summary):
    rows = [r for r in summary["per_severity"] if r["model"] == "ensemble"]
    clean = [r for r in rows if r["severity"] == 0]
    shifted = [r for r in rows if r["severity"] > 0]
    text = f"{preset}: clean accuracy {clean[0]['accuracy']:.4f}" if clean \
        else f"{preset}:"
    if shifted:
        text += ("; under corruption (mean over severities) accuracy "
                 f"{sum(r['accuracy'] for r in shifted) / len(shifted):.4f}"
                 f", NLL {sum(r['nll'] for r in shifted) / len(shifted):.4f}"
                 f", ECE {sum(r['ece'] for r in shifted) / len(shifted):.4f}")
    for key, label in (("mce_vs_first", "mCE vs the first preset"),
                       ("mce_vs_alexnet", "mCE vs AlexNet")):
        if summary.get(key):
            text += f"; {label} {summary[key]['mce']:.3f}"
    return text


def _write_csv(path, rows, columns):
    import csv

    from keras_e3.io_utils import atomic_path

    with atomic_path(path, suffix=".csv") as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(columns),
                                    extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    return path


def model_class_names(model):
    """The model's class names; "0", "1", ... for a model without names."""
    return list(getattr(model, "class_names", None) or [
        str(i) for i in range(model.num_classes)])


def _sizes(args):
    """(batch size, ECE bins, max examples or None), checked."""
    batch_size = _positive(getattr(args, "batch_size", 64), "--batch-size")
    num_bins = _positive(getattr(args, "num_bins", 15), "--num-bins")
    max_examples = getattr(args, "max_examples", None)
    if max_examples is not None:
        max_examples = _positive(max_examples, "--max-examples")
    return batch_size, num_bins, max_examples


def _positive(value, name):
    if value is None or int(value) != value or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}.")
    return int(value)


def run_command(args, parser):
    return run(args)
