"""`keras-e3 predict`: the top classes of image files, with the ensemble's
probabilities and the members' disagreement.

Each file goes through the preset's converter (`model.preprocessor`: the
same as `model.predict(path)`); grayscale models take RGB, RGBA and
palette files (the converter's channel rule). A file that cannot be read
or converted is reported (an "error" entry in the JSON, an "error:" line
in the text) and the others are still predicted; the exit status is then
1.
"""

import json

import numpy as np

from keras_e3.data.folder import convert_file
from keras_e3.data.folder import as_converter
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
    return 1 if any("error" in r for r in results) else 0


def predict(preset, paths, top_k=5, batch_size=32):
    """Predictions for image files, in the order of `paths`.

    Args:
        preset: a preset name, directory or hf:// handle (or an `E3ViT`).
        paths: image files.
        top_k: classes listed per image.
        batch_size: images per forward pass.

    Returns:
        One dict per file: "image" (the path) and either "top_k" (the
        ensemble's top-k classes with probabilities), "members" (each
        member's top-1 class) and "disagreement" (the fraction of members
        whose top-1 differs from the ensemble's), or "error" (why the file
        could not be read or converted).
    """
    model = preset if isinstance(preset, E3ViT) else E3ViT.from_preset(preset)
    converter = as_converter(model, "keras-e3 predict")
    paths = [str(p) for p in paths]
    images, errors = {}, {}
    for i, path in enumerate(paths):
        try:
            images[i] = convert_file(converter, path)
        except ValueError as e:
            errors[i] = str(e)
    names = getattr(model, "class_names", None) or [
        str(i) for i in range(model.num_classes)]
    logits = {}
    if images:
        ok = sorted(images)
        batch = np.concatenate([images[i] for i in ok])
        logits = dict(zip(ok, model.predict_members(batch, batch_size)))
    results = []
    for i, path in enumerate(paths):
        if i in errors:
            results.append({"image": path, "error": errors[i]})
            continue
        member = logits[i]
        p = ensemble_probs(softmax(member[None]))[0]
        order = np.argsort(-p)[:top_k]
        members = member.argmax(-1)
        results.append({
            "image": path,
            "top_k": [{"class": names[c], "probability": float(p[c])}
                      for c in order],
            "members": [names[c] for c in members],
            "disagreement": float(np.mean(members != order[0])),
        })
    return results


def format_predictions(results):
    lines = []
    for r in results:
        if "error" in r:
            lines.append(f"{r['image']}: error: {r['error']}")
            continue
        top = ", ".join(f"{t['class']} {t['probability']:.3f}"
                        for t in r["top_k"])
        lines.append(f"{r['image']}: {top} | members: "
                     f"{' '.join(r['members'])} | disagreement "
                     f"{r['disagreement']:.2f}")
    return "\n".join(lines)
