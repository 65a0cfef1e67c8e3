"""Presets on the Hugging Face Hub: `hf://owner/repo[/revision]`.

Downloads go through huggingface_hub's `snapshot_download` (its cache,
`HF_HUB_OFFLINE`, `HF_ENDPOINT`, progress bars, revisions) and fetch only
the preset's JSON, HDF5 and Markdown files: nothing executable or pickled is
downloaded, and `from_preset` verifies every checksum before loading.
Uploads create the repository (and branch) and push the preset with a
generated model card in a single commit.
"""

import os

from keras_e3.presets import files as preset_io
from keras_e3.presets.files import PresetError

PREFIX = "hf://"
# JSON, HDF5, Markdown, and safetensors for timm's repositories (never
# pickles: pytorch_model.bin is not downloaded).
PRESET_PATTERNS = ("*.json", "*.h5", "*.md", "*.safetensors")


def parse_handle(handle):
    """'hf://owner/repo[/revision]' -> (repo_id, revision or None)."""
    if not isinstance(handle, str) or not handle.startswith(PREFIX):
        raise PresetError(f"Not a Hugging Face handle: {handle!r} (expected "
                          "hf://owner/repo[/revision]).")
    parts = handle[len(PREFIX):].strip("/").split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise PresetError(f"Expected hf://owner/repo[/revision]; got "
                          f"{handle!r}.")
    return "/".join(parts[:2]), (parts[2] if len(parts) == 3 else None)


def download_preset(handle, cache_dir=None):
    """Local directory holding the preset at `handle` (cached)."""
    import huggingface_hub

    repo_id, revision = parse_handle(handle)
    try:
        path = huggingface_hub.snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir,
            allow_patterns=list(PRESET_PATTERNS))
    except Exception as e:  # noqa: BLE001 - re-raised with the handle named
        hint = ""
        # huggingface_hub's own reading of HF_HUB_OFFLINE (also "yes"/"on",
        # and TRANSFORMERS_OFFLINE), not a narrower re-parse of the variable.
        from huggingface_hub import constants

        if getattr(constants, "HF_HUB_OFFLINE", False):
            hint = (" HF_HUB_OFFLINE is set and the preset is not in the "
                    "local cache.")
        raise PresetError(f"Could not download {handle}: "
                          f"{type(e).__name__}: {e}.{hint}") from e
    return path


def upload_preset(handle, preset_dir, private=False, commit_message=None,
                  token=None):
    """Uploads the local preset directory `preset_dir` to `hf://owner/repo`
    (or a branch: `hf://owner/repo/branch`) with a generated README.md model
    card unless the directory has one, in a single commit.

    Args:
        handle: `hf://owner/repo` or `hf://owner/repo/branch` (the
            repository and branch are created when missing).
        preset_dir: a preset directory written by `save_to_preset`; its
            checksums are verified before anything is sent.
        private: create the repository as private.
        commit_message: the commit's message (default: one naming the
            preset).
        token: a Hugging Face token (default: huggingface_hub's login).

    Returns:
        The commit's URL.

    Example:
    ```python
    from keras_e3.presets.files import PresetError
    from keras_e3.presets.hub import upload_preset

    # Nothing is sent for a folder that is not a verified preset.
    try:
        upload_preset("hf://me/my-e3", "no_such_preset")
    except PresetError as e:
        print(e)  # No preset directory at 'no_such_preset'.
    ```
    """
    import huggingface_hub
    from huggingface_hub import CommitOperationAdd

    from keras_e3.presets.model_card import model_card

    repo_id, revision = parse_handle(handle)
    preset_dir = os.fspath(preset_dir)
    if not os.path.isdir(preset_dir):
        raise PresetError(f"No preset directory at {preset_dir!r}.")
    metadata = preset_io.verify_preset(preset_dir)
    names = sorted(n for n in os.listdir(preset_dir)
                   if not n.startswith(".")
                   and os.path.isfile(os.path.join(preset_dir, n)))
    operations = [CommitOperationAdd(path_in_repo=n, path_or_fileobj=os.path.join(
        preset_dir, n)) for n in names]
    if "README.md" not in names:
        card = model_card(preset_dir, repo_id, metadata).encode()
        operations.append(CommitOperationAdd(path_in_repo="README.md",
                                             path_or_fileobj=card))
    api = huggingface_hub.HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    info = api.create_commit(
        repo_id, operations, revision=revision,
        commit_message=commit_message or "Upload keras-e3 preset")
    return info.commit_url
