"""hf:// handles of timm and keras-hub ViTs, served by the fake Hub: the
repository's files as each library writes them, converted on first use."""

import os
import sys

import numpy as np
import pytest

from conftest import ROOT
from conftest import to_numpy
from test_hub import fake_hub  # noqa: F401 - pytest fixture
from test_hub import hf  # noqa: F401 - pytest fixture

import keras_e3

sys.path.insert(0, str(ROOT / "tests"))
from timm_reference import import_timm  # noqa: E402

pytestmark = pytest.mark.single_backend


def _folder_files(folder):
    return {name: (folder / name).read_bytes() for name in os.listdir(folder)}


def test_hf_timm_repository(fake_hub, hf, tmp_path, monkeypatch):  # noqa: F811
    """`hf://timm/<name>`: config.json and model.safetensors are fetched
    (not the pickle beside them), and the model gives timm's logits."""
    timm = import_timm()
    import torch
    from timm.models._hub import save_for_hf

    monkeypatch.setenv("KERAS_E3_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    reference = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
        num_classes=4, depth=2, embed_dim=24, num_heads=3).eval()
    folder = tmp_path / "timm_repo"
    save_for_hf(reference, str(folder), safe_serialization="both",
                data_config={"input_size": (3, 32, 32), "crop_pct": 1.0,
                             "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)})
    fake_hub.create_repo("timm/vit_tiny_test")
    fake_hub.commit("timm/vit_tiny_test", _folder_files(folder))
    pixels = np.random.default_rng(0).integers(
        0, 256, (2, 32, 32, 3)).astype("uint8")
    with torch.no_grad():
        expected = reference(torch.from_numpy(
            (pixels / 127.5 - 1.0).astype("float32").transpose(0, 3, 1, 2))
            ).numpy()
    model = keras_e3.E3ViT.from_preset("hf://timm/vit_tiny_test")
    np.testing.assert_allclose(to_numpy(model.predict(pixels, verbose=0)),
                               expected, atol=1e-5, rtol=0)
    fetched = {path for method, path in fake_hub.requests if method == "GET"}
    assert any(p.endswith("/model.safetensors") for p in fetched)
    assert not any(p.endswith("/pytorch_model.bin") for p in fetched)


def test_hf_keras_hub_repository(fake_hub, hf, tmp_path, monkeypatch):  # noqa: F811
    keras_hub = pytest.importorskip("keras_hub")
    import keras

    monkeypatch.setenv("KERAS_E3_CACHE", str(tmp_path / "cache"))
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.ViTBackbone(
        image_shape=(32, 32, 3), patch_size=8, num_layers=2, num_heads=2,
        hidden_dim=16, mlp_dim=32)
    preprocessor = keras_hub.models.ViTImageClassifierPreprocessor(
        image_converter=keras_hub.layers.ViTImageConverter(
            image_size=(32, 32), scale=1 / 127.5, offset=-1.0))
    classifier = keras_hub.models.ViTImageClassifier(
        backbone=backbone, num_classes=3, preprocessor=preprocessor)
    rng = np.random.default_rng(1)
    for w in classifier.weights:
        w.assign(rng.normal(0, 0.3, w.shape).astype("float32"))
    folder = tmp_path / "keras_hub_repo"
    classifier.save_to_preset(str(folder))
    fake_hub.create_repo("keras/vit_test")
    fake_hub.commit("keras/vit_test", _folder_files(folder))
    pixels = rng.integers(0, 256, (2, 32, 32, 3)).astype("uint8")
    expected = to_numpy(classifier.predict(pixels.astype("float32"),
                                           verbose=0))
    model = keras_e3.E3ViT.from_preset("hf://keras/vit_test")
    np.testing.assert_allclose(to_numpy(model.predict(pixels, verbose=0)),
                               expected, atol=1e-5, rtol=0)
