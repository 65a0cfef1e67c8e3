"""Serve an exported E³ with plain TensorFlow: no keras_e3, no Keras.

First export a preset with its preprocessing (any machine with keras-e3):

    keras-e3 export e3_tiny_digits served --include-preprocessing

then, anywhere TensorFlow is installed:

    python examples/serve_saved_model.py served IMAGE.png... [--json]

The SavedModel serves two functions, both through the preset's own
ImageConverter (for the digits preset: 1 channel, bilinear resize to
32x32, 0..255 -> [-1, 1]):

- `serve(images)`: raw uint8 images [B, H, W, C] of any height and width
  (a batch of equal-size images; C the model's channels, 1 for the digits);
- `serve_encoded(encoded)`: a batch of encoded image files, tf.string [B]
  (PNG, JPEG, GIF, BMP, any sizes), each decoded and converted on its own.

Each returns `member_logits` [B, M, C] and `ensemble_probabilities` [B, C].
This script feeds each file's bytes, as they are, to `serve_encoded`: no
resizing or cropping here, the served graph does what `model.predict` does.
"""

import argparse
import json

import tensorflow as tf


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("saved_model")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--json", action="store_true",
                        help="print the outputs as JSON")
    args = parser.parse_args()

    loaded = tf.saved_model.load(args.saved_model)  # owns the variables
    if not hasattr(loaded, "serve_encoded"):
        raise SystemExit(f"{args.saved_model} does not take encoded images:"
                         " export it with --include-preprocessing.")
    encoded = tf.constant([tf.io.read_file(p).numpy() for p in args.images])
    outputs = loaded.serve_encoded(encoded)
    logits = outputs["member_logits"].numpy()
    probs = outputs["ensemble_probabilities"].numpy()
    if args.json:
        print(json.dumps({"member_logits": logits.tolist(),
                          "ensemble_probabilities": probs.tolist()}))
        return
    for path, member_logits, p in zip(args.images, logits, probs):
        members = ", ".join(f"member {m}: class {int(row.argmax())}"
                            for m, row in enumerate(member_logits))
        print(f"{path}: ensemble class {int(p.argmax())} "
              f"(p={p.max():.3f}); {members}")


if __name__ == "__main__":
    main()
