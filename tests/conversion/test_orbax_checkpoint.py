"""Checkpoints written by vmoe's own trainer (orbax / OCDBT), read through
TensorStore: the fixture's workdir, ckpt/ folder, step and state
directories, expert-sharded (multi-chunk) saves, `keras-e3 convert`, and a
clear error for every damaged copy."""

import json
import os
import shutil
import sys
import warnings

import numpy as np
import pytest
from conftest import fixture_dir
from conftest import load_fixture
from conftest import official_logits

import keras_e3
from keras_e3 import cli
from keras_e3.conversion.orbax_checkpoint import OrbaxCheckpointError
from keras_e3.conversion.orbax_checkpoint import find_orbax_step
from keras_e3.conversion.orbax_checkpoint import read_orbax_checkpoint
from keras_e3.conversion.vmoe import VmoeConversionError

FIXTURE = "eee_tiny_nodrop"
STEP = 1000


@pytest.fixture(scope="module")
def fixture():
    data = load_fixture(FIXTURE)
    orbax = fixture_dir(FIXTURE) / "orbax"
    if not orbax.is_dir():
        pytest.skip(f"no orbax fixture at {orbax}")
    data["orbax"] = orbax
    data["logits_after"] = np.load(orbax / "logits_after.npy")
    with np.load(orbax / "params_after.npz") as f:
        data["params_after"] = {k: f[k] for k in f.files}
    return data


@pytest.fixture(autouse=True)
def _tensorstore():
    pytest.importorskip("tensorstore", reason="the keras-e3[orbax] extra")


def writable_copy(src, dst):
    """A copy of a read-only fixture tree that tests may damage."""
    shutil.copytree(src, dst)
    for root, dirs, files in os.walk(dst):
        os.chmod(root, 0o755)
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)
    return dst


@pytest.fixture
def workdir(fixture, tmp_path):
    """tmp_path/work/ckpt/1000/..., a damageable copy of the fixture."""
    work = tmp_path / "work"
    writable_copy(fixture["orbax"] / "ckpt", work / "ckpt")
    return work


def state_of(work, step=STEP):
    return work / "ckpt" / str(step) / "state"


def edit_metadata(state, edit):
    path = state / "_METADATA"
    metadata = json.loads(path.read_text())
    metadata["tree_metadata"] = {
        k: v for k, v in metadata["tree_metadata"].items() if edit(v)}
    path.write_text(json.dumps(metadata))


def leaf_keys(leaf):
    return [k["key"] for k in leaf["key_metadata"]]


# ------------------------------------------------------------ loading


@pytest.mark.parametrize("where", ["workdir", "ckpt", "step", "state"])
def test_trainer_checkpoint_gives_fixture_logits(fixture, where, capsys):
    path = {"workdir": fixture["orbax"],
            "ckpt": fixture["orbax"] / "ckpt",
            "step": fixture["orbax"] / "ckpt" / str(STEP),
            "state": fixture["orbax"] / "ckpt" / str(STEP) / "state"}[where]
    model = keras_e3.E3ViT.from_vmoe(fixture["config"], str(path))
    np.testing.assert_allclose(official_logits(model, fixture["inputs"]),
                               fixture["logits_after"], atol=1e-5)
    said = capsys.readouterr().out
    assert f"step {STEP}" in said
    assert ("latest" in said) == (where in ("workdir", "ckpt"))


def test_params_equal_the_checkpoint_params(fixture):
    params = read_orbax_checkpoint(fixture["orbax"] / "ckpt" / str(STEP),
                                   verbose=False)
    expected = fixture["params_after"]
    assert sorted(params) == sorted(expected)
    for name, value in expected.items():
        assert params[name].dtype == value.dtype, name
        np.testing.assert_array_equal(params[name], value, err_msg=name)
    found = find_orbax_step(fixture["orbax"])
    assert found.step == STEP
    assert found.state_dir == str(fixture["orbax"] / "ckpt" / "1000" /
                                  "state")


def test_state_dir_on_its_own_reports_the_stored_step(fixture, tmp_path,
                                                      capsys):
    state = writable_copy(fixture["orbax"] / "ckpt" / str(STEP) / "state",
                          tmp_path / "copied_state")
    params = read_orbax_checkpoint(state)
    assert f"step {STEP} from {state}" in capsys.readouterr().out
    for name, value in fixture["params_after"].items():
        np.testing.assert_array_equal(params[name], value, err_msg=name)
    (state / "commit_success.txt").unlink()
    with pytest.raises(OrbaxCheckpointError, match="interrupted"):
        read_orbax_checkpoint(state)


def write_sharded_state(state, params, metadata_src, zarr3=False):
    """An OCDBT state whose arrays are split into chunks along axis 0, as
    orbax stores arrays saved from several devices (experts sharded)."""
    import tensorstore as ts

    state.mkdir(parents=True)
    metadata = json.loads((metadata_src / "_METADATA").read_text())
    metadata["use_zarr3"] = zarr3
    (state / "_METADATA").write_text(json.dumps(metadata))
    kvstore = {"driver": "ocdbt",
               "base": {"driver": "file", "path": str(state) + "/"}}
    context = ts.Context()
    transaction = ts.Transaction()  # one OCDBT commit for all arrays
    for name, value in params.items():
        chunks = list(value.shape)
        if chunks:
            chunks[0] = 1
        if zarr3:
            spec = {"driver": "zarr3", "metadata": {
                "shape": list(value.shape), "data_type": "float32",
                "chunk_grid": {"name": "regular",
                               "configuration": {"chunk_shape": chunks}}}}
        else:
            spec = {"driver": "zarr", "metadata": {
                "shape": list(value.shape), "chunks": chunks, "dtype": "<f4",
                "compressor": {"id": "zstd", "level": 1}}}
        spec["kvstore"] = dict(kvstore, path="params." +
                               name.replace("/", ".") + "/")
        array = ts.open(spec, create=True, context=context,
                        transaction=transaction).result()
        array.write(value).result()
    transaction.commit_sync()
    (state / "commit_success.txt").write_text("done")
    store = ts.KvStore.open(kvstore, context=context).result()
    return {k.decode() for k in store.list().result()}


@pytest.mark.parametrize("zarr3", [False, True], ids=["zarr", "zarr3"])
def test_expert_sharded_save_loads(fixture, tmp_path, zarr3):
    params = fixture["params_after"]
    state = tmp_path / "sharded" / "state"
    keys = write_sharded_state(state, params,
                               fixture["orbax"] / "ckpt" / "1000" / "state",
                               zarr3)
    kernel = "params.Encoder.encoderblock_1.Moe.Mlp.Dense_0.kernel/"
    chunk_keys = [k for k in keys if k.startswith(kernel)
                  and not k.endswith((".zarray", "zarr.json"))]
    assert len(chunk_keys) == 4, chunk_keys  # one chunk per expert
    model = keras_e3.E3ViT.from_vmoe(fixture["config"], str(state))
    np.testing.assert_allclose(official_logits(model, fixture["inputs"]),
                               fixture["logits_after"], atol=1e-5)
    read = read_orbax_checkpoint(state, verbose=False)
    for name, value in params.items():
        np.testing.assert_array_equal(read[name], value, err_msg=name)


@pytest.mark.parametrize("source", ["orbax_step", "npz"])
def test_convert_cli_makes_a_preset(fixture, tmp_path, source, monkeypatch,
                                    capsys):
    config = fixture_dir(FIXTURE) / "config.json"
    checkpoint, expected = {
        "orbax_step": (fixture["orbax"] / "ckpt" / str(STEP),
                       fixture["logits_after"]),
        "npz": (fixture_dir(FIXTURE) / "params.npz", fixture["logits"]),
    }[source]
    out = tmp_path / "preset"
    assert cli.main(["convert", "--config", str(config), "--checkpoint",
                     str(checkpoint), "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    # The preset needs no TensorStore.
    monkeypatch.setitem(sys.modules, "tensorstore", None)
    model = keras_e3.E3ViT.from_preset(str(out))
    np.testing.assert_allclose(official_logits(model, fixture["inputs"]),
                               expected, atol=1e-5)


# ------------------------------------------------------------ bad inputs


@pytest.mark.parametrize("suffix", [".orbax-checkpoint-tmp",
                                    ".orbax-checkpoint-tmp-1764555731"])
def test_interrupted_tmp_save_is_refused(fixture, workdir, suffix):
    tmp = workdir / "ckpt" / f"{STEP}{suffix}"
    os.rename(workdir / "ckpt" / str(STEP), tmp)
    for path in (tmp, tmp / "state"):
        with pytest.raises(OrbaxCheckpointError,
                           match="interrupted") as e:
            keras_e3.E3ViT.from_vmoe(fixture["config"], str(path))
        assert str(tmp) in str(e.value)
    for path in (workdir, workdir / "ckpt"):
        with pytest.raises(OrbaxCheckpointError,
                           match="No completely saved step") as e:
            keras_e3.E3ViT.from_vmoe(fixture["config"], str(path))
        assert tmp.name in str(e.value)


def test_save_without_commit_file_is_refused(fixture, workdir):
    step = workdir / "ckpt" / str(STEP)
    (step / "commit_success.txt").unlink()
    for path in (step, step / "state"):
        with pytest.raises(OrbaxCheckpointError,
                           match="interrupted.*commit_success.txt") as e:
            keras_e3.E3ViT.from_vmoe(fixture["config"], str(path))
        assert repr(str(step)) in str(e.value)


def test_workdir_takes_the_latest_complete_step(fixture, workdir, capsys):
    ckpt = workdir / "ckpt"
    shutil.copytree(ckpt / str(STEP), ckpt / "2000.orbax-checkpoint-tmp")
    shutil.copytree(ckpt / str(STEP), ckpt / "3000")
    (ckpt / "3000" / "commit_success.txt").unlink()
    shutil.copytree(ckpt / str(STEP), ckpt / "500")  # complete but older
    # interrupted but older than the step read: skipped without a word
    shutil.copytree(ckpt / str(STEP), ckpt / "400.orbax-checkpoint-tmp")
    for name in ("3000", "2000.orbax-checkpoint-tmp", "500",
                 "400.orbax-checkpoint-tmp"):
        # Were they read, the model would not load.
        shutil.rmtree(ckpt / name / "state" / "ocdbt.process_0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = keras_e3.E3ViT.from_vmoe(fixture["config"], str(workdir))
    skipped = sorted(str(w.message) for w in caught
                     if "Skipping" in str(w.message))
    assert skipped == [f"Skipping {str(ckpt / name)!r}: its save was "
                       "interrupted." for name in
                       ("2000.orbax-checkpoint-tmp", "3000")]
    np.testing.assert_allclose(official_logits(model, fixture["inputs"]),
                               fixture["logits_after"], atol=1e-5)
    said = capsys.readouterr().out
    assert f"step {STEP} (the latest complete step in {ckpt})" in said


def test_missing_manifest_is_refused(fixture, workdir):
    state = state_of(workdir)
    (state / "manifest.ocdbt").unlink()
    with pytest.raises(OrbaxCheckpointError,
                       match=r"state'? has no manifest\.ocdbt") as e:
        keras_e3.E3ViT.from_vmoe(fixture["config"], str(workdir))
    assert str(state) in str(e.value)


def test_state_without_params_is_refused(fixture, workdir):
    state = state_of(workdir)
    edit_metadata(state, lambda leaf: leaf_keys(leaf)[0] != "params")
    with pytest.raises(OrbaxCheckpointError,
                       match="no 'params' subtree.*opt_state, rngs, step"
                       ) as e:
        keras_e3.E3ViT.from_vmoe(fixture["config"], str(state))
    assert str(state) in str(e.value)


def test_params_that_do_not_match_the_config_are_named(fixture, workdir):
    state = state_of(workdir)
    edit_metadata(state, lambda leaf: leaf_keys(leaf) != ["params", "head",
                                                          "bias"])
    with pytest.raises(VmoeConversionError,
                       match="missing parameters: head/bias"):
        keras_e3.E3ViT.from_vmoe(fixture["config"], str(workdir))
    config = json.loads(json.dumps(fixture["config"]))
    config["encoder"]["mlp_dim"] = 48
    with pytest.raises(VmoeConversionError,
                       match="wrongly shaped parameters: Encoder/"
                             "encoderblock_0/Mlp/Dense_0/bias: got \\(64,\\)"):
        keras_e3.E3ViT.from_vmoe(config, str(fixture["orbax"]))


@pytest.mark.parametrize("damaged, error", [
    (("d", "ocdbt.process_0/d"), "Cannot open the OCDBT store"),
    (("ocdbt.process_0/d",), "Cannot read parameter 'params.Encoder"),
], ids=["tree_and_data", "data"])
def test_corrupt_store_names_the_path_without_a_tensorstore_trace(
        fixture, workdir, damaged, error):
    state = state_of(workdir)
    for folder in damaged:
        for data in (state / folder).iterdir():
            data.write_bytes(data.read_bytes()[:20])
    with pytest.raises(OrbaxCheckpointError, match=error) as e:
        keras_e3.E3ViT.from_vmoe(fixture["config"], str(workdir))
    assert str(state) in str(e.value)
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_missing_array_is_named(fixture, workdir):
    state = state_of(workdir)
    path = state / "_METADATA"
    metadata = json.loads(path.read_text())
    leaves = metadata["tree_metadata"]
    leaf = json.loads(json.dumps(leaves["('params', 'head', 'bias')"]))
    leaf["key_metadata"][1]["key"] = "extra"
    leaves["('params', 'extra', 'bias')"] = leaf
    path.write_text(json.dumps(metadata))
    with pytest.raises(OrbaxCheckpointError,
                       match="'params.extra.bias' is missing") as e:
        keras_e3.E3ViT.from_vmoe(fixture["config"], str(state))
    assert str(state) in str(e.value)


def test_other_directories_are_refused(fixture, tmp_path):
    with pytest.raises(OrbaxCheckpointError,
                       match="is not a vmoe trainer checkpoint"):
        keras_e3.E3ViT.from_vmoe(fixture["config"], str(tmp_path))
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(OrbaxCheckpointError, match="holds no checkpoint"):
        keras_e3.E3ViT.from_vmoe(fixture["config"], str(tmp_path))


def test_missing_extra_names_it(fixture, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "tensorstore", None)
    with pytest.raises(ImportError, match=r"pip install 'keras-e3\[orbax\]'"):
        keras_e3.E3ViT.from_vmoe(fixture["config"], str(fixture["orbax"]))
    with pytest.raises(SystemExit) as e:
        cli.main(["convert", "--config",
                  str(fixture_dir(FIXTURE) / "config.json"), "--checkpoint",
                  str(fixture["orbax"]), "--out", str(tmp_path / "never")])
    assert e.value.code == 1
    assert "keras-e3[orbax]" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
