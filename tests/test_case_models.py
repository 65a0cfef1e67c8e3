"""The backbone (`E3ViTBackbone`) and the task (`E3ViT`), dense ViT, V-MoE
and E³, through `test_case.run_backbone_test` / `run_task_test`, on the
tiny models of `tests/raw_doors.py`."""

import numpy as np
import pytest
import raw_doors
from test_case import run_backbone_test
from test_case import run_task_test

import keras_e3


@pytest.mark.parametrize("kind", raw_doors.KINDS)
def test_backbone(tmp_path, kind):
    members = 2 if kind == "e3" else 1
    images = np.random.default_rng(0).uniform(
        -1, 1, (2, raw_doors.IMAGE_SIZE, raw_doors.IMAGE_SIZE, 3)).astype(
            "float32")
    # 16x16 images, 8x8 patches: 4 patch tokens and the class token.
    run_backbone_test(keras_e3.E3ViTBackbone, raw_doors.backbone_kwargs(kind),
                      images,
                      {"sequence_output": (2 * members, 5, 16),
                       "pooled_output": (2 * members, 16)}, tmp_path)


@pytest.mark.parametrize("kind", raw_doors.KINDS)
def test_task(tmp_path, kind):
    model = raw_doors.tiny_model(kind)
    images = np.stack(raw_doors.raw_images(sizes=((20, 27),) * 4))
    expected = (4, 2, 3) if kind == "e3" else (4, 3)
    run_task_test(model, images, [0, 1, 2, 0], expected, tmp_path)
