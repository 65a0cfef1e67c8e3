"""Classify image files with a preset; print each member's and the
ensemble's prediction.

    python examples/classify_image.py [--preset e3_tiny_digits] IMAGE...

The default preset ships with the package: an E³ trained on scikit-learn's
8x8 digits (a light digit on a dark background, as in the data set). Any
preset works, e.g. a directory written by `keras-e3 finetune` or
`hf://owner/repo`.
"""

import argparse

import keras_e3

parser = argparse.ArgumentParser()
parser.add_argument("--preset", default="e3_tiny_digits")
parser.add_argument("images", nargs="+")
args = parser.parse_args()

model = keras_e3.E3ViT.from_preset(args.preset)
# predict decodes the files and converts them with the preset's converter
# (model.preprocessor); [B, M, C] member logits (M = 1 for a ViT / V-MoE).
member_logits = model.predict_members(args.images)
log_probs = keras_e3.ensemble_log_probs(member_logits)  # [B, C]
names = getattr(model, "class_names", None)
for path, logits in zip(args.images, member_logits):
    print(path)
    for line in keras_e3.evaluation.describe_members(logits, names):
        print("  " + line)
print("ensemble log-probabilities shape:", tuple(log_probs.shape))
