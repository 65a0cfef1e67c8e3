"""Fine-tuning a preset on a new task (`keras-e3 finetune`)."""

import math
import os
import time

import keras
import numpy as np

from keras_e3.data import from_arrays
from keras_e3.data import load_dataset
from keras_e3.data import sample_k_shot
from keras_e3.data.folder import BUILTIN_DATASETS
from keras_e3.data.folder import folder_class_names
from keras_e3.io_utils import json_safe
from keras_e3.metrics import evaluate_predictions
from keras_e3.models import E3ViT
from keras_e3.training.recipe import TRAIN_MODES
from keras_e3.training.recipe import freeze
from keras_e3.training.recipe import make_optimizer
from keras_e3.training.recipe import warmup_cosine_schedule


def finetune(preset, data, out, shots=None, epochs=10, batch_size=32,
             learning_rate=0.01, optimizer="sgd", train="all",
             warmup_fraction=0.1, seed=0, verbose=1):
    """Fine-tunes `preset` on `data` and writes the result to `out`.

    The model gets a new head with one class per data class: the folder's
    sorted sub-folder names are the new classes (class 0 is the first name;
    saved as the preset's `class_names`), whatever the preset's own classes
    are. Every image goes through the preset's converter
    (`model.preprocessor`, the same as `predict`), and the new preset saves
    that same converter. With `shots`, k examples per class are sampled
    (seeded) and the rest is the held-out set. Training follows the
    paper's recipe (momentum SGD, linear warm-up then cosine decay,
    gradients clipped to a global norm of 1). `out` is written atomically
    at the end, with the summary as `finetune.json` inside it (the Keras
    backend included): an interrupted run leaves the previous `out` (or
    none), never a partial preset.

    Args:
        preset: a preset name or directory (`E3ViT.from_preset`).
        data: "digits" or a folder of class sub-folders (see
            `keras_e3.data.load_dataset`).
        out: the preset directory to write.
        shots: examples per class to train on (None: the whole train set).
        epochs: training epochs.
        batch_size: images per step.
        learning_rate: the peak learning rate.
        optimizer: "sgd", "adam" or "adamw" (`make_optimizer`).
        train: which weights to train (`freeze`: "head", "all",
            "all_but_experts").
        warmup_fraction: the fraction of the steps spent warming up.
        seed: seed of the sampling, the head and the shuffling.
        verbose: Keras' verbosity.

    Returns:
        The summary dict (also written as `out/finetune.json`).

    Example:
    ```python
    from keras_e3 import training

    summary = training.finetune("vit_tiny_digits", "digits", "my_digits",
                                shots=2, epochs=1, train="head", verbose=0)
    sorted(summary)
    ```
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError("epochs and batch_size must be >= 1.")
    if train not in TRAIN_MODES:
        raise ValueError(f"train must be one of {TRAIN_MODES}; got {train!r}.")
    started = time.time()
    keras.utils.set_random_seed(seed)
    class_names = dataset_class_names(data)
    # The preset is resolved and loaded once: its backbone and its
    # converter carry over, under a new head.
    source = E3ViT.from_preset(preset, num_classes=len(class_names))
    converter = source.preprocessor
    x, y, class_names = load_dataset(data, converter, split="train")
    held_out = None
    if data == "digits":
        x_test, y_test, _ = load_dataset(data, converter, split="test")
        held_out = (x_test, y_test)
    if shots:
        chosen = sample_k_shot(y, shots, seed=seed)
        rest = np.setdiff1d(np.arange(len(y)), chosen)
        if held_out is None and len(rest):
            held_out = (x[rest], y[rest])
        x, y = x[chosen], y[chosen]
    model = E3ViT(source.backbone, num_classes=len(class_names),
                  preprocessor=converter)
    model.class_names = list(class_names)
    freeze(model, train)
    steps = epochs * math.ceil(len(y) / batch_size)
    schedule = warmup_cosine_schedule(
        learning_rate, steps, warmup_steps=min(int(warmup_fraction * steps),
                                               steps - 1))
    model.compile(optimizer=make_optimizer(optimizer, schedule))
    # x: the converter's outputs (model inputs), converted once.
    history = model.fit(from_arrays(x, y, batch_size=batch_size, shuffle=True,
                                    seed=seed, num_classes=len(class_names)),
                        epochs=epochs, verbose=verbose)
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


def dataset_class_names(data):
    """The classes of a `finetune` dataset spec, before loading it: the
    digits' "0" ... "9", or a folder's sorted sub-folder names."""
    if data in BUILTIN_DATASETS:
        return [str(i) for i in range(10)]
    if not os.path.isdir(os.fspath(data)):
        raise ValueError(f"Unknown dataset {data!r}: expected one of "
                         f"{BUILTIN_DATASETS} or a folder of class "
                         "sub-folders of images.")
    return folder_class_names(data)
