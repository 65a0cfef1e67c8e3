"""Fine-tune a preset on k shots per class of the digits and compare the
held-out metrics before and after.

    python examples/finetune_digits.py [--preset vit_tiny_digits] [--shots 5]
        [--epochs 5] [--out /tmp/keras_e3_finetuned]

The same thing from the shell:
    keras-e3 finetune --preset vit_tiny_digits --data digits --shots 5 \
        --epochs 5 --out /tmp/keras_e3_finetuned
"""

import argparse
import json

import keras_e3
from keras_e3.data.digits import load_digits_splits
from keras_e3.metrics import evaluate_predictions

parser = argparse.ArgumentParser()
parser.add_argument("--preset", default="vit_tiny_digits")
parser.add_argument("--shots", type=int, default=5)
parser.add_argument("--epochs", type=int, default=5)
parser.add_argument("--out", default="/tmp/keras_e3_finetuned")
args = parser.parse_args()

_, (x_test, y_test) = load_digits_splits()
before = evaluate_predictions(
    keras_e3.E3ViT.from_preset(args.preset).predict_members(x_test), y_test)
summary = keras_e3.training.finetune(
    args.preset, "digits", args.out, shots=args.shots, epochs=args.epochs,
    verbose=0)
after = summary["held_out"]
print(json.dumps({
    "preset": args.preset, "shots": args.shots, "epochs": args.epochs,
    "before": {k: round(before[k], 4) for k in
               ("ensemble/accuracy", "ensemble/nll", "ensemble/ece")},
    "after": {k: round(after[k], 4) for k in
              ("ensemble/accuracy", "ensemble/nll", "ensemble/ece")},
    "out": args.out}, indent=2))
