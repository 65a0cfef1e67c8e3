"""Fine-tuning a preset on a new task (`keras-e3 finetune`), and
prediction on image files (`keras-e3 predict`)."""

import math
import os
import time

import numpy as np

from keras_e3.io_utils import json_safe

def finetune(preset, data, out, shots=None, epochs=10, batch_size=32,
             learning_rate=0.01, optimizer="sgd", train="all",
             warmup_fraction=0.1, seed=0, verbose=1):
    """Fine-tunes `preset` on `data` and writes the result to `out`.

    `data` is "digits" or a folder of class sub-folders (see
    `keras_e3.data.load_dataset`); with `shots`, k examples per class are
    sampled (seeded) and the rest is the held-out set. The new head has one
    class per data class. Training follows the paper's recipe (momentum
    SGD, linear warm-up then cosine decay, gradients clipped to a global
    norm of 1). `out` is written atomically at the end, with the summary
    as `finetune.json` inside it: an interrupted run leaves the previous
    `out` (or none), never a partial preset. Returns the summary.
    """
    import keras

    from keras_e3.data import from_arrays
    from keras_e3.data import load_dataset
    from keras_e3.data import sample_k_shot
    from keras_e3.metrics import evaluate_predictions
    from keras_e3.models import E3ViT
    from keras_e3.preset_loader import load_preprocessor
    from keras_e3.training import TRAIN_MODES
    from keras_e3.training import freeze
    from keras_e3.training import make_optimizer
    from keras_e3.training import warmup_cosine_schedule

    if epochs < 1 or batch_size < 1:
        raise ValueError("epochs and batch_size must be >= 1.")
    if train not in TRAIN_MODES:
        raise ValueError(f"train must be one of {TRAIN_MODES}; got {train!r}.")
    started = time.time()
    keras.utils.set_random_seed(seed)
    preprocessor = load_preprocessor(preset)
    x, y, class_names = load_dataset(data, preprocessor, split="train")
    held_out = None
    if data == "digits":
        x_test, y_test, _ = load_dataset(data, preprocessor, split="test")
        held_out = (x_test, y_test)
    if shots:
        chosen = sample_k_shot(y, shots, seed=seed)
        rest = np.setdiff1d(np.arange(len(y)), chosen)
        if held_out is None and len(rest):
            held_out = (x[rest], y[rest])
        x, y = x[chosen], y[chosen]
    model = E3ViT.from_preset(preset, num_classes=len(class_names))
    model.class_names = list(class_names)
    freeze(model, train)
    steps = epochs * math.ceil(len(y) / batch_size)
    schedule = warmup_cosine_schedule(
        learning_rate, steps, warmup_steps=min(int(warmup_fraction * steps),
                                               steps - 1))
    model.compile(optimizer=make_optimizer(optimizer, schedule))
    history = model.fit(from_arrays(x, y, batch_size=batch_size, shuffle=True,
                                    seed=seed), epochs=epochs, verbose=verbose)
    summary = {
        "preset": os.fspath(preset), "data": os.fspath(data),
        "shots": shots, "num_train": int(len(y)),
        "classes": list(class_names), "epochs": epochs,
        "batch_size": batch_size, "learning_rate": learning_rate,
        "optimizer": optimizer, "train": train, "seed": seed,
        "backend": keras.backend.backend(),
        "history": {k: [float(v) for v in vs]
                    for k, vs in history.history.items()},
    }
    if held_out is not None:
        logits = model.predict_members(held_out[0], batch_size)
        report = evaluate_predictions(logits, held_out[1])
        summary["held_out"] = {"num_examples": int(len(held_out[1])),
                               **json_safe(report)}
    summary["seconds"] = round(time.time() - started, 1)
    model.save_to_preset(out, extra_metadata={"finetune": {
        k: summary[k] for k in ("preset", "data", "shots", "epochs",
                                "seed")}},
        extra_files={"finetune.json": summary})
    return summary


def predict(preset, paths, top_k=5, batch_size=32):
    """For each image: the ensemble's top-k classes with probabilities,
    each member's top-1 class, and member disagreement (the fraction of
    members whose top-1 differs from the ensemble's)."""
    from keras_e3.data import load_images
    from keras_e3.metrics import ensemble_probs
    from keras_e3.metrics import softmax
    from keras_e3.models import E3ViT

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


__all__ = ["finetune", "predict", "format_predictions"]
