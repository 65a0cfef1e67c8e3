"""Few-shot transfer to an image folder, both ways: the closed-form linear
probe on pre-logit features (vmoe/big_vision's evaluator; per member and
for the ensemble), and fine-tuning a fresh head on k shots with model.fit.

    python examples/fewshot_image_folder.py FOLDER [--preset e3_tiny_digits]
        [--shots 1 5] [--epochs 10]

FOLDER holds one sub-folder of images per class. Without a FOLDER, a small
one is generated from the digits (classes 0-4, inverted colours) to show
the mechanics offline.
"""

import argparse
import json
import os
import tempfile

import keras
import numpy as np

import keras_e3
from keras_e3.data import load_image_folder
from keras_e3.data import sample_k_shot

parser = argparse.ArgumentParser()
parser.add_argument("folder", nargs="?")
parser.add_argument("--preset", default="e3_tiny_digits")
parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
parser.add_argument("--epochs", type=int, default=10)
args = parser.parse_args()

folder = args.folder
if folder is None:  # a stand-in data set: inverted digits 0-4 as PNG files
    from keras_e3.data.digits import load_digits_raw

    folder = tempfile.mkdtemp(prefix="keras_e3_fewshot_")
    images, labels = load_digits_raw()
    for i, (image, label) in enumerate(zip(images, labels)):
        if label < 5 and (labels[:i] == label).sum() < 40:
            os.makedirs(f"{folder}/digit_{label}", exist_ok=True)
            keras.utils.save_img(f"{folder}/digit_{label}/{i}.png",
                                 255 - np.round(image[..., None] * 255 / 16),
                                 scale=False)

model = keras_e3.E3ViT.from_preset(args.preset)
# The folder's sub-folders are new classes (class_names=None); every image
# goes through the preset's converter, as model.predict would convert it.
x, y, classes = load_image_folder(folder, model.preprocessor)
test = np.setdiff1d(np.arange(len(y)), sample_k_shot(y, max(args.shots)))
probe = keras_e3.fewshot.fewshot_evaluate(model, (x, y), (x[test], y[test]),
                         shots=args.shots, seeds=(0,))
print("linear probe:", json.dumps(probe["results"], indent=1, default=float))
for k in args.shots:
    out = tempfile.mkdtemp(prefix=f"keras_e3_{k}shot_")
    summary = keras_e3.training.finetune(args.preset, folder, out, shots=k,
                       epochs=args.epochs, train="all", verbose=0)
    print(f"fine-tuned on {k} shot(s) of {len(classes)} classes: held-out "
          f"accuracy {summary['held_out']['ensemble/accuracy']:.3f} "
          f"({summary['held_out']['num_examples']} images) -> {out}")
