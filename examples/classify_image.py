"""Build an E³, classify one image, print each member's and the ensemble's
prediction.

    python examples/classify_image.py [IMAGE]

The model has random weights (no trained preset ships yet), so the classes
are placeholders; the point is the API:
  - `E3ViTBackbone(...)` is a dense ViT, a V-MoE or an E³ by config,
  - `E3ViT(backbone, num_classes)` outputs member logits [B, M, C],
  - `keras_e3.ensemble_log_probs` gives log(mean_m softmax(logits_m)).
"""

import sys

import keras
import numpy as np

import keras_e3
from keras_e3.demo import describe
from keras_e3.demo import load_image

keras.utils.set_random_seed(0)
backbone = keras_e3.E3ViTBackbone(
    image_size=64, patch_size=16, hidden_dim=96, num_layers=6, num_heads=3,
    mlp_dim=192, num_experts=8, moe_layers=(3, 5), num_selected_experts=1,
    ensemble_size=2, capacity_factor=1.5)  # E³ "last-2", M=2, K=1
model = keras_e3.E3ViT(backbone, num_classes=5,
                       head_kernel_initializer="glorot_uniform")

if len(sys.argv) > 1:
    images = load_image(sys.argv[1], (64, 64))
else:
    images = np.random.default_rng(0).uniform(-1, 1, (1, 64, 64, 3))
member_logits = np.asarray(keras.ops.convert_to_numpy(model(images)))
print("member logits:", member_logits.shape)  # [1, M=2, 5]
print("ensemble log-probs:",
      np.round(keras.ops.convert_to_numpy(
          keras_e3.ensemble_log_probs(member_logits))[0], 3))
for line in describe(member_logits[0],
                     ["cat", "dog", "bird", "fish", "frog"]):
    print(line)
