"""Out-of-distribution data sets for `keras-e3 evaluate --ood-data`.

"noise" (uniform noise in the model's value range, as many images as the
in-distribution set, fixed seed), "<dataset>-inverted" (values mirrored
within the value range: white digits on black become black on white),
"<dataset>-rotated" (each image rotated by 90 degrees) for a built-in
dataset, or a folder of images (its labels are ignored).
"""

import os

import numpy as np

from keras_e3.data.folder import BUILTIN_DATASETS
from keras_e3.data.folder import load_dataset

OOD_TRANSFORMS = ("inverted", "rotated")
NOISE_SEED = 0


def check_dataset_spec(spec, option, ood):
    if os.path.isdir(os.fspath(spec)) or spec in BUILTIN_DATASETS:
        return
    if ood and (spec == "noise" or _ood_transform(spec) is not None):
        return
    known = list(BUILTIN_DATASETS)
    if ood:
        known += ["noise"] + [f"{d}-{t}" for d in BUILTIN_DATASETS
                              for t in OOD_TRANSFORMS]
    looks_like_path = os.sep in spec or spec.startswith(".")
    what = "No such folder" if looks_like_path else "Unknown dataset"
    raise ValueError(f"{option}: {what} {spec!r}. Expected one of "
                     f"{', '.join(known)} or a folder of class sub-folders "
                     "of images.")


def _ood_transform(spec):
    base, _, transform = spec.rpartition("-")
    if transform in OOD_TRANSFORMS and base in BUILTIN_DATASETS:
        return base, transform
    return None


def load_ood_dataset(spec, preprocessor, images):
    """OOD images for `spec` (module doc); `images` is the in-distribution
    set, whose count and shape "noise" copies."""
    low, high = [float(v) for v in preprocessor.get("value_range",
                                                    (-1.0, 1.0))]
    if spec == "noise":
        rng = np.random.default_rng(NOISE_SEED)
        return rng.uniform(low, high, size=images.shape).astype(np.float32)
    if not os.path.isdir(os.fspath(spec)):
        parsed = _ood_transform(spec)
        if parsed is None:
            check_dataset_spec(spec, "--ood-data", ood=True)
        base, transform = parsed
        x, _, _ = load_dataset(base, preprocessor, split="test")
        if transform == "inverted":
            return (low + high - x).astype(np.float32)
        return np.ascontiguousarray(np.rot90(x, k=1, axes=(1, 2)))
    x, _, _ = load_dataset(spec, preprocessor, split="test")
    return x
