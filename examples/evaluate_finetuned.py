"""Fine-tune a preset on k shots of the digits, then evaluate the result
the way the paper does: accuracy, NLL, ECE and Brier per member and for the
ensemble, OOD detection (digits vs rotated digits), FLOPs, and plots.

    python examples/evaluate_finetuned.py [--preset e3_tiny_digits]
        [--shots 10] [--epochs 5] [--out /tmp/keras_e3_evaluated]

The same from the shell:
    keras-e3 finetune --preset e3_tiny_digits --data digits --shots 10 \
        --epochs 5 --out /tmp/tuned
    keras-e3 evaluate --preset /tmp/tuned --data digits \
        --ood-data digits-rotated --out /tmp/report
"""

import argparse
import os

import keras_e3
from keras_e3.cli import main as keras_e3_cli

parser = argparse.ArgumentParser()
parser.add_argument("--preset", default="e3_tiny_digits")
parser.add_argument("--shots", type=int, default=10)
parser.add_argument("--epochs", type=int, default=5)
parser.add_argument("--out", default="/tmp/keras_e3_evaluated")
args = parser.parse_args()

tuned = os.path.join(args.out, "preset")
keras_e3.training.finetune(args.preset, "digits", tuned, shots=args.shots,
                           epochs=args.epochs, verbose=0)
keras_e3_cli(["evaluate", "--preset", tuned, "--data", "digits",
              "--ood-data", "digits-rotated",
              "--out", os.path.join(args.out, "report")])
