"""Serve an exported E³ with plain TensorFlow: no keras_e3, no Keras.

First export a preset with its preprocessing (any machine with keras-e3):

    keras-e3 export e3_tiny_digits served --include-preprocessing

then, anywhere TensorFlow is installed:

    python examples/serve_saved_model.py served IMAGE.png... [--json]

The served function (`serve`) takes raw uint8 images [B, H, W, C] of the
preset's raw size (8x8x1 pixel values 0..16 for the digits preset) and
returns `member_logits` [B, M, C] and `ensemble_probabilities` [B, C]. The
images here are decoded with TensorFlow and resized to the served size if
they differ from it.
"""

import argparse
import json

import tensorflow as tf


def load(path, height, width, channels):
    image = tf.io.decode_image(tf.io.read_file(path), channels=channels,
                               expand_animations=False)
    if tuple(image.shape[:2]) != (height, width):
        image = tf.cast(tf.round(tf.image.resize(image, (height, width))),
                        tf.uint8)
    return image


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("saved_model")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--json", action="store_true",
                        help="print the outputs as JSON")
    args = parser.parse_args()

    loaded = tf.saved_model.load(args.saved_model)  # owns the variables
    serve = loaded.serve
    spec = serve.input_signature[0] if serve.input_signature else None
    if spec is None or spec.dtype != tf.uint8:
        raise SystemExit(f"{args.saved_model} does not take raw uint8 images:"
                         " export it with --include-preprocessing.")
    _, height, width, channels = spec.shape
    images = tf.stack([load(p, height, width, channels)
                       for p in args.images])
    outputs = serve(images)
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
