"""The demo behind `keras-e3 demo`: an E³ classifying one image.

Until a trained preset ships with the package, the demo builds a small E³
(random weights, fixed seed), so its classes are not meaningful: it shows
the mechanics (M member predictions and their ensemble), offline, in seconds.
"""

import keras
import numpy as np

from keras_e3.layers.ensemble import ensemble_log_probs
from keras_e3.models import E3ViT
from keras_e3.models import E3ViTBackbone

DEMO_CONFIG = dict(image_size=32, patch_size=8, hidden_dim=64, num_layers=4,
                   num_heads=4, mlp_dim=128, representation_size=64,
                   num_experts=8, moe_layers=(1, 3), num_selected_experts=2,
                   ensemble_size=2, capacity_factor=1.5)


def load_image(path, image_size):
    """An image file as a float32 [1, H, W, 3] array in [-1, 1]."""
    image = keras.utils.load_img(path, target_size=image_size)
    array = keras.utils.img_to_array(image).astype("float32")
    return (array / 127.5 - 1.0)[None]


def describe(member_logits, class_names=None, top_k=3):
    """Lines describing each member's and the ensemble's top-k classes for
    one image's member logits [M, C]."""
    member_logits = np.asarray(member_logits)
    names = class_names or [f"class {i}" for i in range(member_logits.shape[-1])]
    ensemble = np.exp(np.asarray(keras.ops.convert_to_numpy(
        ensemble_log_probs(member_logits[None]))))[0]
    lines = []
    for m, logits in enumerate(member_logits):
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        best = int(probs.argmax())
        lines.append(f"member {m}: {names[best]} (p={probs[best]:.3f})")
    top = np.argsort(-ensemble)[:top_k]
    lines.append("ensemble: " + ", ".join(
        f"{names[i]} (p={ensemble[i]:.3f})" for i in top))
    return lines


def run(image_path=None, seed=0):
    keras.utils.set_random_seed(seed)
    backbone = E3ViTBackbone(**DEMO_CONFIG)
    model = E3ViT(backbone, num_classes=10,
                  head_kernel_initializer="glorot_uniform")
    size = backbone.embedding.image_size
    if image_path:
        image = load_image(image_path, size)
    else:  # a synthetic image: a bright disc on a gradient
        yy, xx = np.mgrid[:size[0], :size[1]] / max(size)
        disc = ((yy - 0.5) ** 2 + (xx - 0.5) ** 2 < 0.1).astype("float32")
        image = np.stack([xx, yy, disc], -1)[None].astype("float32") * 2 - 1
    member_logits = np.asarray(keras.ops.convert_to_numpy(model(image)))[0]
    print(f"E³ with {backbone.num_experts} experts in {backbone.ensemble_size}"
          f" partitions, K={backbone.num_selected_experts}, MoE blocks "
          f"{backbone.moe_layers}; backend {keras.backend.backend()}; "
          f"{model.count_params():,} parameters (random weights).")
    for line in describe(member_logits):
        print(line)
    return member_logits
