"""keras_e3.hub against a fake Hugging Face Hub on 127.0.0.1 (no network).

How huggingface_hub is pointed at the fake: it reads HF_ENDPOINT, HF_HOME,
HF_HUB_CACHE and HF_HUB_OFFLINE into `huggingface_hub.constants` once, at
import time, and another test module may already have imported it. So, in
this process, the `hf` fixture sets the environment variables (for the
subprocesses below) and also patches the already-read constants that the
code paths used here consult at call time (ENDPOINT and the resolve-URL
template built from it, the cache paths, HF_HUB_OFFLINE). The token is read
from HF_TOKEN on every request. The offline test and the CLI test run in
fresh subprocesses, where the environment is set before huggingface_hub is
imported, exactly as a user would set it.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import BACKEND
from conftest import ROOT
from conftest import tiny_backbone_kwargs
from conftest import to_numpy
from fake_hub import FakeHub

import keras_e3
from keras_e3.presets import hub as e3hub
from keras_e3.presets.files import PresetError

pytestmark = pytest.mark.single_backend

PRESET_FILES = {"config.json", "model.weights.h5", "task.json",
                "task.weights.h5", "preprocessor.json", "metadata.json"}


@pytest.fixture(scope="module")
def fake_hub():
    with FakeHub() as hub:
        yield hub


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny E3ViT, its saved preset directory and reference outputs."""
    model = keras_e3.E3ViT(keras_e3.E3ViTBackbone(**tiny_backbone_kwargs()),
                           num_classes=5,
                           head_kernel_initializer="glorot_uniform")
    images = np.random.default_rng(0).uniform(
        -1, 1, (2, 16, 16, 3)).astype("float32")
    outputs = to_numpy(model(images))
    preset = tmp_path_factory.mktemp("presets") / "tiny"
    model.save_to_preset(preset)
    return {"preset": preset, "images": images, "outputs": outputs}


@pytest.fixture
def hf(fake_hub, tmp_path, monkeypatch):
    """Points huggingface_hub (this process and its children) at the fake
    hub, with a fresh cache per test. Returns the subprocess environment."""
    from huggingface_hub import constants

    home, cache = tmp_path / "hf_home", tmp_path / "hf_cache"
    env = {"HF_ENDPOINT": fake_hub.url, "HF_HOME": str(home),
           "HF_HUB_CACHE": str(cache), "HF_TOKEN": "hf_fake_token",
           "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "NO_PROXY": "127.0.0.1,localhost",
           "no_proxy": "127.0.0.1,localhost"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_OIDC_RESOURCE",
                "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", fake_hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        fake_hub.url + "/{repo_id}/resolve/{revision}/"
                        "{filename}")
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return dict(os.environ, KERAS_BACKEND=BACKEND, PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def _outputs(model, tiny):
    return to_numpy(model(tiny["images"]))


def _run_python(code, env):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, env=env,
                          timeout=120)


# -- parse_handle ----------------------------------------------------------

@pytest.mark.parametrize("handle, expected", [
    ("hf://owner/name", ("owner/name", None)),
    ("hf://owner/name/", ("owner/name", None)),
    ("hf://owner/name/dev", ("owner/name", "dev")),
    ("hf://org-1/e3-vit_b.16/" + "a" * 40, ("org-1/e3-vit_b.16", "a" * 40)),
])
def test_parse_handle(handle, expected):
    assert e3hub.parse_handle(handle) == expected


@pytest.mark.parametrize("handle", [
    "owner/name", "https://huggingface.co/owner/name", "hf://", "hf://owner",
    "hf://owner/name/refs/pr/1", "hf:///name", "hf://owner//dev", None, 42])
def test_parse_handle_rejects_bad_handles(handle):
    with pytest.raises(PresetError, match=r"hf://owner/repo\[/revision\]"):
        e3hub.parse_handle(handle)


# -- upload and download -----------------------------------------------------

def test_upload_then_from_preset_round_trip(hf, fake_hub, tiny):
    url = e3hub.upload_preset("hf://keras-e3/round-trip", tiny["preset"])
    sha = fake_hub.head("keras-e3/round-trip")
    assert url == f"{fake_hub.url}/keras-e3/round-trip/commit/{sha}"
    files = fake_hub.files("keras-e3/round-trip")
    assert set(files) == PRESET_FILES | {"README.md", ".gitattributes"}
    for name in PRESET_FILES:
        assert files[name] == (tiny["preset"] / name).read_bytes(), name
    card = files["README.md"].decode()
    assert card.startswith("---\nlibrary_name: keras-e3\n")
    assert "# keras-e3/round-trip" in card
    assert 'keras_e3.E3ViT.from_preset("hf://keras-e3/round-trip")' in card
    assert "@article{allingham2022sparse" in card
    assert "E³ (Efficient Ensemble of Experts)" in card
    # Files only travel inline in the commit: no LFS / Xet endpoints used.
    assert not [p for _, p in fake_hub.requests if "lfs" in p or "xet" in p]

    model = keras_e3.E3ViT.from_preset("hf://keras-e3/round-trip")
    np.testing.assert_array_equal(_outputs(model, tiny), tiny["outputs"])
    assert model.preprocessor.image_size == (16, 16)

    # Uploading the same preset again is a no-op commit, not an error.
    assert e3hub.upload_preset("hf://keras-e3/round-trip", tiny["preset"])
    assert fake_hub.head("keras-e3/round-trip") == sha


def test_branch_revision(hf, fake_hub, tiny):
    e3hub.upload_preset("hf://keras-e3/branched/dev", tiny["preset"],
                        commit_message="dev preset")
    assert set(fake_hub.files("keras-e3/branched")) == {".gitattributes"}
    dev = fake_hub.files("keras-e3/branched", "dev")
    assert set(dev) == PRESET_FILES | {"README.md", ".gitattributes"}
    # The card's usage line names the repository (the revision is separate).
    assert 'from_preset("hf://keras-e3/branched")' in dev["README.md"].decode()

    model = keras_e3.E3ViT.from_preset("hf://keras-e3/branched/dev")
    np.testing.assert_array_equal(_outputs(model, tiny), tiny["outputs"])
    # A commit sha is a revision too.
    sha = fake_hub.head("keras-e3/branched", "dev")
    path = e3hub.download_preset(f"hf://keras-e3/branched/{sha}")
    assert os.path.basename(path) == sha
    # main holds no preset; an unknown branch is a clear error.
    with pytest.raises(PresetError, match="metadata.json"):
        keras_e3.E3ViT.from_preset("hf://keras-e3/branched")
    with pytest.raises(PresetError, match="hf://keras-e3/branched/nope"):
        keras_e3.E3ViT.from_preset("hf://keras-e3/branched/nope")
    with pytest.raises(PresetError, match="RepositoryNotFound"):
        keras_e3.E3ViT.from_preset("hf://keras-e3/no-such-repo")


def test_existing_readme_is_kept(hf, fake_hub, tiny, tmp_path):
    preset = tmp_path / "with_card"
    shutil.copytree(tiny["preset"], preset)
    (preset / "README.md").write_text("---\nlicense: mit\n---\n# My card\n")
    (preset / ".hidden").write_text("not uploaded")
    e3hub.upload_preset("hf://keras-e3/own-card", preset, private=True)
    files = fake_hub.files("keras-e3/own-card")
    assert files["README.md"] == (preset / "README.md").read_bytes()
    assert ".hidden" not in files
    assert fake_hub.repo("keras-e3/own-card").private


def test_only_preset_file_types_are_downloaded(hf, fake_hub, tiny):
    e3hub.upload_preset("hf://keras-e3/stray", tiny["preset"])
    fake_hub.commit("keras-e3/stray", {"evil.pkl": b"cos\nsystem\n.",
                                       "loader.py": b"import os",
                                       "nested/notes.md": b"# notes"})
    path = e3hub.download_preset("hf://keras-e3/stray")
    downloaded = {os.path.relpath(os.path.join(root, name), path)
                  for root, _, names in os.walk(path) for name in names}
    assert downloaded == PRESET_FILES | {"README.md", "nested/notes.md"}
    fetched = [p for _, p in fake_hub.requests if "/keras-e3/stray/resolve/"
               in p]
    assert fetched and not [p for p in fetched
                            if p.endswith(("evil.pkl", "loader.py"))]
    model = keras_e3.E3ViT.from_preset("hf://keras-e3/stray")
    np.testing.assert_array_equal(_outputs(model, tiny), tiny["outputs"])


def test_corrupted_file_on_the_hub(hf, fake_hub, tiny):
    e3hub.upload_preset("hf://keras-e3/tampered", tiny["preset"])
    weights = bytearray(fake_hub.files("keras-e3/tampered")[
        "model.weights.h5"])
    weights[len(weights) // 2] ^= 0xFF  # same size, one byte flipped
    fake_hub.commit("keras-e3/tampered", {"model.weights.h5": bytes(weights)})
    with pytest.raises(PresetError, match=r"model\.weights\.h5 is corrupt"):
        keras_e3.E3ViT.from_preset("hf://keras-e3/tampered")


def test_upload_rejects_incomplete_presets(hf, fake_hub, tiny, tmp_path):
    before = len(fake_hub.requests)
    with pytest.raises(PresetError, match="No preset directory"):
        e3hub.upload_preset("hf://keras-e3/bad", tmp_path / "missing")
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(tiny["preset"] / "config.json", partial)
    with pytest.raises(PresetError, match="metadata.json is missing"):
        e3hub.upload_preset("hf://keras-e3/bad", partial)
    no_weights = tmp_path / "no_weights"
    shutil.copytree(tiny["preset"], no_weights)
    (no_weights / "model.weights.h5").unlink()
    with pytest.raises(PresetError, match=r"model\.weights\.h5 is missing"):
        e3hub.upload_preset("hf://keras-e3/bad", no_weights)
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny["preset"], truncated)
    data = (truncated / "task.weights.h5").read_bytes()
    (truncated / "task.weights.h5").write_bytes(data[:len(data) // 2])
    with pytest.raises(PresetError, match=r"task\.weights\.h5 is corrupt"):
        e3hub.upload_preset("hf://keras-e3/bad", truncated)
    with pytest.raises(PresetError, match="hf://owner/repo"):
        e3hub.upload_preset("keras-e3/bad", tiny["preset"])
    # Nothing reached the hub: no repository, not a single request.
    assert len(fake_hub.requests) == before
    assert ("model", "keras-e3/bad") not in fake_hub.repos


def test_offline_mode_uses_the_cache(hf, fake_hub, tiny):
    """HF_HUB_OFFLINE=1 set before huggingface_hub is imported, in a fresh
    process: a downloaded preset resolves from the cache, one never
    downloaded is a PresetError that says why, and nothing reaches the hub.
    (The subprocess stops at resolving the handle, which is all from_preset
    does with the hub; building a model there would cost a JAX start-up.)"""
    e3hub.upload_preset("hf://keras-e3/offline", tiny["preset"])
    e3hub.upload_preset("hf://keras-e3/offline-never", tiny["preset"])
    online = e3hub.download_preset("hf://keras-e3/offline")
    before = len(fake_hub.requests)
    result = _run_python("""
        from keras_e3.presets import files as preset_io
        from keras_e3.presets.files import PresetError
        from keras_e3.presets.loader import resolve

        path = resolve("hf://keras-e3/offline")
        preset_io.verify_preset(path)
        print("PATH", path)
        try:
            resolve("hf://keras-e3/offline-never")
        except PresetError as e:
            print("PresetError:", e)
        """, dict(hf, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr
    assert f"PATH {online}\n" in result.stdout
    assert "PresetError: Could not download hf://keras-e3/offline-never" in (
        result.stdout)
    assert "HF_HUB_OFFLINE is set" in result.stdout
    assert len(fake_hub.requests) == before  # offline means offline
    model = keras_e3.E3ViT.from_preset(online)
    np.testing.assert_array_equal(_outputs(model, tiny), tiny["outputs"])


def test_offline_from_preset_in_process(hf, fake_hub, tiny, monkeypatch):
    """The same, in this process: huggingface_hub checks offline mode on
    every request, so from_preset("hf://...") loads the cached preset. The
    hint follows huggingface_hub's reading of the variables (it also takes
    HF_HUB_OFFLINE=yes/on and TRANSFORMERS_OFFLINE=1)."""
    from huggingface_hub import constants

    e3hub.upload_preset("hf://keras-e3/offline-in-process", tiny["preset"])
    e3hub.download_preset("hf://keras-e3/offline-in-process")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    before = len(fake_hub.requests)
    model = keras_e3.E3ViT.from_preset("hf://keras-e3/offline-in-process")
    np.testing.assert_array_equal(_outputs(model, tiny), tiny["outputs"])
    with pytest.raises(PresetError, match="HF_HUB_OFFLINE is set"):
        keras_e3.E3ViT.from_preset("hf://keras-e3/never-downloaded")
    assert len(fake_hub.requests) == before


# -- CLI --------------------------------------------------------------------

def test_cli_upload(hf, fake_hub, tiny, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "keras_e3.cli", "upload", str(tiny["preset"]),
         "hf://keras-e3/from-cli/release", "--message", "from the CLI"],
        capture_output=True, text=True, env=hf, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "hf://keras-e3/from-cli/release" in result.stdout
    sha = fake_hub.head("keras-e3/from-cli", "release")
    assert f"/keras-e3/from-cli/commit/{sha}" in result.stdout
    repo = fake_hub.repo("keras-e3/from-cli")
    assert repo.commits[sha]["message"] == "from the CLI"
    files = fake_hub.files("keras-e3/from-cli", "release")
    assert set(files) == PRESET_FILES | {"README.md", ".gitattributes"}
    assert json.loads(files["metadata.json"]) == json.loads(
        (tiny["preset"] / "metadata.json").read_text())
