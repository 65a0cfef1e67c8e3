"""Out-of-distribution data sets for `keras-e3 evaluate --ood-data`.

"noise" (raw pixels uniform over the converter's input range, as many
images of the model's size as the in-distribution set, fixed seed),
"<dataset>-inverted" (raw pixels mirrored within their range: white digits
on black become black on white), "<dataset>-rotated" (each raw image
rotated by 90 degrees) for a built-in dataset, or a folder of images (its
labels are ignored). All are raw images through the model's converter.
"""

import os

import numpy as np

from keras_e3.data.folder import BUILTIN_DATASETS
from keras_e3.data.folder import as_converter
from keras_e3.data.folder import digits_images
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
    """OOD images for `spec` (module doc), as model inputs.

    Args:
        spec: "noise", "<dataset>-inverted", "<dataset>-rotated" or a
            folder of images (its labels ignored).
        preprocessor: the model's converter (`model.preprocessor`) or the
            model: every OOD image is a raw image through it, as
            `model.predict` would convert it.
        images: the in-distribution model inputs [N, H, W, C], whose count
            and shape "noise" copies.

    Returns:
        float32 [N', H, W, C].
    """
    converter = as_converter(preprocessor, "load_ood_dataset")
    lo, hi = converter.input_range
    if spec == "noise":
        # Raw pixels uniform over the converter's input range.
        rng = np.random.default_rng(NOISE_SEED)
        raw = rng.uniform(lo, hi, size=np.shape(images)).astype(np.float32)
        if (lo, hi) == (0.0, 255.0):
            raw = np.round(raw).astype(np.uint8)
        return converter(raw)
    if not os.path.isdir(os.fspath(spec)):
        parsed = _ood_transform(spec)
        if parsed is None:
            check_dataset_spec(spec, "--ood-data", ood=True)
        base, transform = parsed
        raw, _ = digits_images("test", converter)
        if transform == "inverted":  # mirrored within the pixel range
            raw = (255 - raw if raw.dtype == np.uint8
                   else (lo + hi - raw).astype(np.float32))
        else:
            raw = np.ascontiguousarray(np.rot90(raw, k=1, axes=(1, 2)))
        return converter(raw)
    x, _, _ = load_dataset(spec, converter, split="test")
    return x
