"""Class names of the label sets the presets were trained on, and
`decode_predictions` (keras-hub style).

Label sets: "imagenet2012" (ILSVRC2012's 1,000 classes in
tensorflow-datasets' order, the sorted synset ids), "cifar100" (the 100
fine labels in the dataset's order) and "digits" ("0" ... "9"). Sources and
licences: `keras_e3/data/labels/README.md`.

>>> from keras_e3.data.labels import class_names
>>> class_names("imagenet2012")[0], class_names("cifar100")[0]
('tench', 'apple')
"""

import functools
from importlib import resources

import numpy as np

LABEL_SETS = ("imagenet2012", "cifar100", "digits")


@functools.lru_cache(maxsize=None)
def _lines(name):
    text = resources.files("keras_e3.data").joinpath(
        "labels", f"{name}.txt").read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines()
                 if line and not line.startswith("#"))


def _check(name):
    if name not in LABEL_SETS:
        raise ValueError(f"Unknown label set {name!r}; known: "
                         f"{', '.join(LABEL_SETS)}.")


def class_names(name, full=False):
    """The class names of label set `name`, in label order. ImageNet names
    are each synset's first WordNet lemma ("tench"), or with `full=True`
    all its lemmas ("tench, Tinca tinca")."""
    _check(name)
    if name == "digits":
        return [str(i) for i in range(10)]
    if name == "imagenet2012":
        lemmas = [line.split("\t", 1)[1] for line in _lines(name)]
        return lemmas if full else [s.split(",")[0].strip() for s in lemmas]
    return list(_lines(name))


def synsets(name="imagenet2012"):
    """The WordNet synset ids of an ImageNet label set, in label order."""
    if name != "imagenet2012":
        raise ValueError(f"{name!r} has no synset ids (imagenet2012 has).")
    return [line.split("\t", 1)[0] for line in _lines(name)]


def resolve_class_names(class_names_or_set, num_classes=None):
    """A list of names from a list, or from a label set's name."""
    if isinstance(class_names_or_set, str):
        names = class_names(class_names_or_set)
    else:
        names = [str(n) for n in class_names_or_set]
    if num_classes is not None and len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for predictions over "
                         f"{num_classes} classes.")
    return names


def decode_predictions(preds, class_names, top=5):
    """The `top` classes of each prediction, as a list (one per image) of
    [(class_name, probability), ...], most probable first.

    `preds`: probabilities [B, C] (or [C] for one image); log-probabilities
    (e.g. `E3ViT.predict_ensemble`'s) are recognised, rows whose
    exponentials sum to 1, and exponentiated. `class_names`: a list of C
    names or a label set's name ("imagenet2012", "cifar100", "digits").

    Args:
        preds: probabilities [B, C] (or [C] for one image); log-probabilities
            (e.g. `E3ViT.predict_ensemble`'s) are recognised, rows whose
            exponentials sum to 1, and exponentiated.
        class_names: a list of C names or a label set's name
            ("imagenet2012", "cifar100", "digits").
        top: classes per image.

    Returns:
        A list (one per image) of [(class_name, probability), ...].

    Example:
    ```python
    import numpy as np

    import keras_e3

    probs = np.array([[0.1, 0.7, 0.2]])
    keras_e3.decode_predictions(probs, ["cat", "dog", "fish"], top=2)
    # [[("dog", 0.7), ("fish", 0.2)]]
    ```
    """
    preds = np.asarray(preds, dtype=np.float64)
    if preds.ndim == 1:
        preds = preds[None]
    if preds.ndim != 2:
        raise ValueError("decode_predictions takes probabilities [B, C]; "
                         f"got shape {preds.shape}.")
    names = resolve_class_names(class_names, preds.shape[-1])
    if preds.size and preds.max() <= 0.0 and np.allclose(
            np.exp(preds).sum(-1), 1.0, atol=1e-3):
        preds = np.exp(preds)
    top = max(1, min(int(top), preds.shape[-1]))
    order = np.argsort(-preds, axis=-1, kind="stable")[:, :top]
    return [[(names[i], float(row[i])) for i in idx]
            for row, idx in zip(preds, order)]
