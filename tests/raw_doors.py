"""Shared pieces of the "one pipeline at every door" tests.

Tiny dense ViT, V-MoE and E³ classifiers carrying a vmoe-style pipeline
(`decode|resize_small(..)|central_crop(..)|value_range(-1,1)`, area
resampling: the ops of vmoe's ILSVRC2012 evaluation, at a small size), and
raw images at and away from the model's size, gray and RGB.

Every door's test compares against `reference(model, images)`:
`model.predict` on the decoded NumPy arrays, one image at a time (so that
the oracle never batches images of different sizes, and is the one door
issue 28 found right). Routing groups span a batch; these models keep
every token (capacity factor 4, routing groups of one image), so a row's logits do
not depend on the other rows of its batch.
"""

import os

import keras
import numpy as np

import keras_e3

KINDS = ("vit", "vmoe", "e3")
IMAGE_SIZE = 16
NUM_CLASSES = 3
CLASS_NAMES = ("cat", "dog", "fish")
PROCESS = (f"decode|resize_small({IMAGE_SIZE + 4})|"
           f"central_crop({IMAGE_SIZE})|value_range(-1,1)")
# (height, width): the model's size, landscape, portrait, smaller than the
# crop (upsampled), and odd sizes.
SIZES = ((16, 16), (20, 30), (37, 21), (9, 12), (23, 23))


def backbone_kwargs(kind, num_channels=3):
    kwargs = dict(image_size=IMAGE_SIZE, patch_size=8, hidden_dim=16,
                  num_layers=2, num_heads=2, mlp_dim=32, num_channels=
                  num_channels)
    if kind in ("vmoe", "e3"):
        kwargs.update(num_experts=4, moe_layers=(1,), num_selected_experts=1,
                      capacity_factor=4.0, group_size=1)
    if kind == "e3":
        kwargs.update(ensemble_size=2, group_size=2)
    return kwargs


def tiny_model(kind, num_channels=3, process=PROCESS, seed=0,
               class_names=CLASS_NAMES, num_classes=NUM_CLASSES):
    """A tiny `kind` ("vit", "vmoe" or "e3") classifier with random weights
    (a non-zero head) and the converter of vmoe process `process`."""
    keras.utils.set_random_seed(seed)
    backbone = keras_e3.E3ViTBackbone(**backbone_kwargs(kind, num_channels))
    converter = keras_e3.ImageConverter.from_vmoe_process(
        process, num_channels=num_channels)
    model = keras_e3.E3ViT(backbone, num_classes=num_classes,
                           head_kernel_initializer="glorot_uniform",
                           preprocessor=converter)
    if class_names is not None and len(class_names) == num_classes:
        model.class_names = list(class_names)
    return model


def raw_images(channels=3, sizes=SIZES, seed=0):
    """uint8 images [H, W, C] of the given sizes, smooth enough that the
    resampling matters (a gradient plus noise)."""
    rng = np.random.default_rng(seed)
    out = []
    for h, w in sizes:
        yy, xx = np.mgrid[0:h, 0:w]
        base = (yy * 255 / max(h - 1, 1) + xx * 97 / max(w - 1, 1))[..., None]
        noise = rng.integers(-40, 40, (h, w, channels))
        out.append(np.clip(base + noise + rng.integers(0, 60, channels),
                           0, 255).astype(np.uint8))
    return out


def write_images(folder, images, fmt="png", prefix="img"):
    """Writes `images` as files in `folder`; returns their paths."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = os.path.join(folder, f"{prefix}{i}.{fmt}")
        array = image[..., 0] if image.shape[-1] == 1 else image
        Image.fromarray(array).save(path)
        paths.append(path)
    return paths


def reference(model, images):
    """Member logits [N, M, C]: `model.predict` on each decoded array
    alone (the oracle of every door test)."""
    rows = [model.predict(np.asarray(image)[None], verbose=0)
            for image in images]
    logits = np.concatenate([np.asarray(r, np.float32) for r in rows])
    return logits[:, None, :] if logits.ndim == 2 else logits


def own_metrics(logits, labels, num_bins=15):
    """Accuracy, NLL, ECE (equal-width bins) and Brier of probabilities
    computed here, float64."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(-1, keepdims=True)
    if probs.ndim == 3:  # [N, M, C] -> the ensemble
        probs = probs.mean(1)
    n = len(labels)
    confidence, predicted = probs.max(-1), probs.argmax(-1)
    correct = predicted == labels
    ece = 0.0
    for b in range(num_bins):
        lo, hi = b / num_bins, (b + 1) / num_bins
        inside = (confidence > lo) & (confidence <= hi) if b else \
            (confidence <= hi)
        if inside.any():
            ece += inside.sum() / n * abs(correct[inside].mean()
                                          - confidence[inside].mean())
    onehot = np.eye(probs.shape[-1])[labels]
    return {"accuracy": correct.mean(),
            "nll": -np.mean(np.log(probs[np.arange(n), labels])),
            "ece": ece, "brier": np.mean(((probs - onehot) ** 2).sum(-1))}
