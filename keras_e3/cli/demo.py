"""`keras-e3 demo`: the shipped E³ on held-out digits.

Loads the `e3_tiny_digits` preset (shipped inside the package, no network),
evaluates it on the held-out split of scikit-learn's digits and prints
accuracy, NLL and ECE for each ensemble member and for the ensemble; with
an image file, also prints each member's and the ensemble's prediction.
Both are `model.predict` on raw images (the 8x8 uint8 digits, the file),
converted by the preset's own converter (`model.preprocessor`). The first
line names the Keras backend.
"""

import os
import time

import keras

from keras_e3.data.folder import digits_images
from keras_e3.evaluation.report import describe_members
from keras_e3.metrics import evaluate_predictions
from keras_e3.models import E3ViT

DEFAULT_PRESET = "e3_tiny_digits"


def metrics_table(report, ensemble_size):
    rows = [("ensemble", "ensemble")] + [
        (f"member {m}", f"member_{m}") for m in range(ensemble_size)]
    lines = [f"{'':10s} {'accuracy':>9s} {'NLL':>7s} {'ECE':>7s}"]
    for label, key in rows:
        lines.append(f"{label:10s} {report[key + '/accuracy']:9.4f} "
                     f"{report[key + '/nll']:7.4f} {report[key + '/ece']:7.4f}")
    return lines


def add_parser(commands):
    parser = commands.add_parser(
        "demo", help="the shipped E³ on held-out digits: accuracy, NLL and "
                     "ECE per member and for the ensemble (offline)")
    parser.add_argument("--preset", default=DEFAULT_PRESET)
    parser.add_argument("--image", help="also classify this image file")


def run_command(args, parser):
    if args.image and not os.path.isfile(args.image):
        parser.exit(2, f"keras-e3 demo: no such image file: {args.image}\n")
    run(args.image, preset=args.preset)


def run(image_path=None, preset=DEFAULT_PRESET):
    """Evaluates `preset` on the held-out digits and prints the table (and
    the predictions for `image_path`); returns the metrics."""
    started = time.time()
    model = E3ViT.from_preset(preset)
    backbone = model.backbone
    # The raw held-out digits; predict converts them (model.preprocessor).
    x_test, y_test = digits_images("test", model)
    logits = model.predict_members(x_test, batch_size=128)
    report = evaluate_predictions(logits, y_test)
    print(f"{preset}: E³ with {backbone.num_experts} experts in "
          f"{backbone.ensemble_size} partitions, K="
          f"{backbone.num_selected_experts}, MoE blocks "
          f"{tuple(backbone.moe_layers)}, {model.count_params():,} "
          f"parameters; backend {keras.backend.backend()}")
    print(f"held-out digits: {len(y_test)} images (ECE: 15 equal-width "
          "bins)")
    for line in metrics_table(report, backbone.ensemble_size):
        print(line)
    if image_path:
        names = getattr(model, "class_names", None) or [
            f"digit {i}" for i in range(model.num_classes)]
        image_logits = model.predict_members(image_path)
        print(f"{image_path}:")
        for line in describe_members(image_logits[0], names):
            print("  " + line)
    print(f"done in {time.time() - started:.1f} s")
    return report
