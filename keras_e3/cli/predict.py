"""`keras-e3 predict`: the top classes of image files, with the ensemble's
probabilities and the members' disagreement."""

import json

import numpy as np

from keras_e3.data import load_images
from keras_e3.metrics import ensemble_probs
from keras_e3.metrics import softmax
from keras_e3.models import E3ViT


def add_parser(commands):
    parser = commands.add_parser(
        "predict", help="top-k classes of image files, with ensemble "
                        "probabilities and member disagreement")
    parser.add_argument("--preset", required=True)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--json", action="store_true",
                        help="print JSON instead of text")
    parser.add_argument("images", nargs="+")


def run_command(args, parser):
    results = predict(args.preset, args.images, top_k=args.top_k)
    print(json.dumps(results, indent=2) if args.json
          else format_predictions(results))


def predict(preset, paths, top_k=5, batch_size=32):
    """For each image: the ensemble's top-k classes with probabilities,
    each member's top-1 class, and member disagreement (the fraction of
    members whose top-1 differs from the ensemble's)."""
    model = E3ViT.from_preset(preset)
    # The preset's ImageConverter decodes the files (vmoe's pipeline for
    # official presets).
    images = (model.preprocessor(list(paths))
              if getattr(model, "preprocessor", None) is not None
              else load_images(paths, model.preprocessor_config))
    logits = model.predict_members(images, batch_size)
    probs = ensemble_probs(softmax(logits))
    names = getattr(model, "class_names", None) or [
        str(i) for i in range(model.num_classes)]
    results = []
    for path, p, member in zip(paths, probs, logits):
        order = np.argsort(-p)[:top_k]
        members = member.argmax(-1)
        results.append({
            "image": path,
            "top_k": [{"class": names[i], "probability": float(p[i])}
                      for i in order],
            "members": [names[i] for i in members],
            "disagreement": float(np.mean(members != order[0])),
        })
    return results


def format_predictions(results):
    lines = []
    for r in results:
        top = ", ".join(f"{t['class']} {t['probability']:.3f}"
                        for t in r["top_k"])
        lines.append(f"{r['image']}: {top} | members: "
                     f"{' '.join(r['members'])} | disagreement "
                     f"{r['disagreement']:.2f}")
    return "\n".join(lines)
