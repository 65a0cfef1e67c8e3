"""`keras-e3 evaluate`: a model's report on a dataset (see
`keras_e3.evaluation.report`), as JSON and PNG plots.

    keras-e3 evaluate --preset P --data D [--ood-data D2] --out DIR
                      [--batch-size 64] [--num-bins 15] [--max-examples N]

Datasets (`--data`, see `keras_e3.data.load_dataset`): "digits" (the
test split of scikit-learn's digits, as the `*_tiny_digits` presets) or a
folder of class sub-folders of images. `--ood-data` (see
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
    parser.add_argument("--preset", required=True,
                        help="preset name, preset directory or "
                             "hf://owner/repo")
    parser.add_argument("--data", required=True,
                        help='"digits" or a folder of class sub-folders')
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
    batch_size = _positive(getattr(args, "batch_size", 64), "--batch-size")
    num_bins = _positive(getattr(args, "num_bins", 15), "--num-bins")
    max_examples = getattr(args, "max_examples", None)
    if max_examples is not None:
        max_examples = _positive(max_examples, "--max-examples")
    ood_spec = getattr(args, "ood_data", None)
    check_dataset_spec(args.data, "--data", ood=False)
    if ood_spec is not None:
        check_dataset_spec(ood_spec, "--ood-data", ood=True)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out!r} exists and is not a folder.")

    model = E3ViT.from_preset(args.preset)
    preprocessor = getattr(model, "preprocessor_config", None) or {}
    images, labels, class_names = load_dataset(args.data, preprocessor,
                                               split="test")
    if max_examples is not None:
        images, labels = images[:max_examples], labels[:max_examples]
    check_labels(labels, model.num_classes, args.data)
    ood_images = None
    if ood_spec is not None:
        ood_images = load_ood_dataset(ood_spec, preprocessor, images)
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


def _positive(value, name):
    if value is None or int(value) != value or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}.")
    return int(value)


def run_command(args, parser):
    return run(args)
