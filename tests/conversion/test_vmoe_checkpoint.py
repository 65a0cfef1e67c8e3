"""Reading google-research/vmoe's native (partitioned msgpack) checkpoints."""

import functools
import http.server
import os
import shutil
import threading

import msgpack
import numpy as np
import pytest

import keras_e3
from conftest import fixture_dir
from conftest import load_fixture
from checkpoint_writer import _ndarray_ext
from checkpoint_writer import write_checkpoint
from conftest import official_logits
from keras_e3.conversion.vmoe import VmoeConversionError
from keras_e3.conversion.vmoe_checkpoint import VmoeCheckpointError
from keras_e3.conversion.vmoe_checkpoint import checkpoint_url
from keras_e3.conversion.vmoe_checkpoint import read_vmoe_checkpoint

FIXTURE = "eee_tiny_nodrop"
PREFIXES = ("ckpt", "ckpt_expert_sharded")
ATOL = 1e-5


def checkpoint_dir():
    path = fixture_dir(FIXTURE) / "checkpoint"
    if not path.is_dir():
        pytest.skip(f"native checkpoint fixture not found at {path}")
    return path


def fixture_params():
    with np.load(fixture_dir(FIXTURE) / "params.npz") as data:
        return {k: data[k] for k in data.files}


def assert_same_params(actual, expected):
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        got = actual[name]
        assert got.dtype == value.dtype and got.shape == value.shape, name
        assert got.tobytes() == value.tobytes(), name


def copy_checkpoint(dst, prefix="ckpt"):
    dst.mkdir(parents=True, exist_ok=True)
    for f in checkpoint_dir().glob(prefix + ".*"):
        shutil.copy(f, dst / f.name)
        os.chmod(dst / f.name, 0o644)
    return dst / prefix


# ------------------------------------------------------------ the fixtures


@pytest.mark.single_backend
@pytest.mark.parametrize("prefix", PREFIXES)
def test_checkpoint_decodes_to_params_npz(prefix):
    params = read_vmoe_checkpoint(checkpoint_dir() / prefix)
    assert_same_params(params, fixture_params())


@pytest.mark.parametrize("prefix", PREFIXES)
def test_from_vmoe_with_checkpoint_prefix(prefix):
    fx = load_fixture(FIXTURE)
    model = keras_e3.E3ViT.from_vmoe(fx["config"],
                                     str(checkpoint_dir() / prefix))
    logits = official_logits(model, fx["inputs"])
    assert logits.shape == fx["logits"].shape
    assert np.max(np.abs(logits - fx["logits"])) <= ATOL


@pytest.mark.single_backend
def test_missing_prefix_names_the_index(tmp_path):
    with pytest.raises(VmoeCheckpointError, match=r"nothere\.index"):
        read_vmoe_checkpoint(tmp_path / "nothere")
    config = load_fixture(FIXTURE)["config"]
    with pytest.raises(VmoeConversionError, match=r"nothere\.index"):
        keras_e3.E3ViT.from_vmoe(config, str(tmp_path / "nothere"))


# ---------------------------------------------------- corrupt / truncated


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def _flip(path):
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    for i in range(mid, mid + 16):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.single_backend
@pytest.mark.parametrize("damage,target", [
    ("truncate", "ckpt.data-00001-of-00002"),
    ("truncate", "ckpt.data-00000-of-00002"),
    ("flip", "ckpt.index"),
    ("delete", "ckpt.data-00001-of-00002"),
    ("truncate", "ckpt.index"),
    ("empty", "ckpt.index"),
    ("delete", "ckpt.index"),
])
def test_damaged_checkpoint_names_the_file(tmp_path, damage, target):
    prefix = copy_checkpoint(tmp_path)
    path = tmp_path / target
    if damage == "truncate":
        _truncate(path)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "flip":
        _flip(path)
    else:
        path.unlink()
    with pytest.raises(VmoeCheckpointError) as info:
        read_vmoe_checkpoint(prefix)
    assert target in str(info.value)


# ------------------------------------------------------- over HTTP (local)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_dir(tmp_path, monkeypatch):
    """(served directory, base URL, stop()) of a 127.0.0.1 HTTP server."""
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    running = [True]

    def stop():
        if running[0]:
            running[0] = False
            server.shutdown()
            server.server_close()
            thread.join()

    yield served, f"http://127.0.0.1:{server.server_address[1]}", stop
    stop()


@pytest.mark.single_backend
def test_download_and_cache(http_dir, tmp_path):
    served, url, stop = http_dir
    copy_checkpoint(served, "ckpt_expert_sharded")
    cache = tmp_path / "cache"
    expected = fixture_params()
    assert_same_params(
        read_vmoe_checkpoint(f"{url}/ckpt_expert_sharded", cache_dir=cache),
        expected)
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert sorted(p.name for p in files) == sorted(
        p.name for p in served.iterdir())
    stop()  # The second load must come from the cache.
    assert_same_params(
        read_vmoe_checkpoint(f"{url}/ckpt_expert_sharded", cache_dir=cache),
        expected)


def test_from_vmoe_url_uses_keras_e3_cache(http_dir, tmp_path, monkeypatch):
    served, url, _ = http_dir
    copy_checkpoint(served)
    monkeypatch.setenv("KERAS_E3_CACHE", str(tmp_path / "envcache"))
    fx = load_fixture(FIXTURE)
    model = keras_e3.E3ViT.from_vmoe(fx["config"], f"{url}/ckpt")
    logits = official_logits(model, fx["inputs"])
    assert np.max(np.abs(logits - fx["logits"])) <= ATOL
    assert list((tmp_path / "envcache" / "vmoe").rglob("ckpt.index"))


@pytest.mark.single_backend
def test_failed_download_leaves_no_cached_file(http_dir, tmp_path):
    served, url, _ = http_dir
    copy_checkpoint(served)
    (served / "ckpt.data-00001-of-00002").unlink()
    cache = tmp_path / "cache"
    with pytest.raises(VmoeCheckpointError,
                       match=r"ckpt\.data-00001-of-00002"):
        read_vmoe_checkpoint(f"{url}/ckpt", cache_dir=cache)
    names = [p.name for p in cache.rglob("*") if p.is_file()]
    assert "ckpt.data-00001-of-00002" not in names
    assert not [n for n in names if ".part-" in n]


@pytest.mark.single_backend
def test_gs_prefix_maps_to_storage_url():
    assert checkpoint_url("gs://vmoe_checkpoints/eee_s32_last2_ilsvrc2012") \
        == ("https://storage.googleapis.com/vmoe_checkpoints/"
            "eee_s32_last2_ilsvrc2012")
    assert checkpoint_url("https://h/x") == "https://h/x"


# ---------------------------------------- synthetic checkpoints (own writer)


@pytest.mark.single_backend
def test_bfloat16_train_state_and_chunked_arrays(tmp_path, rng):
    kernel = rng.normal(size=(6, 5, 3)).astype("float32")
    bf16_bits = (rng.normal(size=(4, 3)).astype("float32").view("uint32")
                 >> 16).astype("uint16")
    arrays = {"params/Block/kernel": kernel,
              "params/Block/bf16": bf16_bits,
              "params/scalar": np.array(3.5, "float64"),
              "opt_state/mu/Block/kernel": np.zeros((6, 5, 3), "float32"),
              "step": np.array(7, "int32")}
    write_checkpoint(tmp_path / "c", arrays, shard_count=3,
                     dtype_names={"params/Block/bf16": "bfloat16"},
                     chunks={"params/Block/kernel": 3},
                     shards={"params/Block/kernel": [1, 0, 1],
                             "opt_state/mu/Block/kernel": 2, "step": 2,
                             "params/Block/bf16": 1, "params/scalar": 0})
    # Only the params are read: the optimizer-state shard is not needed.
    (tmp_path / "c.data-00002-of-00003").unlink()
    params = read_vmoe_checkpoint(tmp_path / "c")
    assert sorted(params) == ["Block/bf16", "Block/kernel", "scalar"]
    np.testing.assert_array_equal(params["Block/kernel"], kernel)
    assert params["Block/bf16"].dtype == np.float32
    np.testing.assert_array_equal(
        params["Block/bf16"],
        (bf16_bits.astype("uint32") << 16).view("float32"))
    assert params["scalar"].shape == () and params["scalar"] == 3.5


@pytest.mark.single_backend
def test_train_state_without_params_is_refused(tmp_path):
    write_checkpoint(tmp_path / "c", {"opt_state/x": np.zeros(2, "float32"),
                                      "step": np.array(1, "int32")}, 1)
    with pytest.raises(VmoeCheckpointError, match=r"c\.index.*params"):
        read_vmoe_checkpoint(tmp_path / "c")


def _rewrite_index(prefix, edit):
    path = f"{prefix}.index"
    with open(path, "rb") as f:
        top = msgpack.unpackb(f.read(), raw=False)
    edit(top)
    with open(path, "wb") as f:
        f.write(msgpack.packb(top, use_bin_type=True))


@pytest.mark.single_backend
def test_inconsistent_checkpoints_are_refused(tmp_path):
    x = np.arange(8, dtype="float32").reshape(4, 2)
    # A chunk whose bytes do not match its slice.
    write_checkpoint(tmp_path / "a", {"w": x}, 1, ext_overrides={
        "w": [_ndarray_ext(x.reshape(-1)[:6])]})
    with pytest.raises(VmoeCheckpointError,
                       match=r"a\.data-00000-of-00001.*24 bytes.*32"):
        read_vmoe_checkpoint(tmp_path / "a")
    # An ndarray whose payload is shorter than its shape says.
    write_checkpoint(tmp_path / "b", {"w": x}, 1, ext_overrides={
        "w": [_ndarray_ext(x.reshape(-1), data=x.tobytes()[:-4])]})
    with pytest.raises(VmoeCheckpointError, match=r"b\.data-00000-of-00001"):
        read_vmoe_checkpoint(tmp_path / "b")
    # An unknown ExtType code.
    write_checkpoint(tmp_path / "c", {"w": x}, 1, ext_overrides={
        "w": [msgpack.ExtType(42, b"\x00")]})
    with pytest.raises(VmoeCheckpointError,
                       match=r"c\.data-00000-of-00001.*ExtType code 42"):
        read_vmoe_checkpoint(tmp_path / "c")
    # shard_count smaller than the shards the index refers to.
    write_checkpoint(tmp_path / "d", {"w": x}, 2, chunks={"w": 2})
    _rewrite_index(tmp_path / "d", lambda t: t.update(shard_count=1))
    with pytest.raises(VmoeCheckpointError,
                       match=r"d\.index.*shard_count mismatch"):
        read_vmoe_checkpoint(tmp_path / "d")
    # shard_count larger than the files written: the missing shard is named.
    write_checkpoint(tmp_path / "e", {"w": x}, 2, chunks={"w": 2})
    _rewrite_index(tmp_path / "e", lambda t: t.update(shard_count=3))
    with pytest.raises(VmoeCheckpointError,
                       match=r"e\.data-00000-of-00003"):
        read_vmoe_checkpoint(tmp_path / "e")
    # An array not covered by its chunks (one chunk dropped from the index).
    write_checkpoint(tmp_path / "f", {"w": x}, 2, chunks={"w": 2})

    def drop_chunk(top):
        info = msgpack.unpackb(top["index"]["w"].data, raw=False)
        info[1], info[2] = info[1][:1], info[2][:1]
        top["index"]["w"] = msgpack.ExtType(
            8, msgpack.packb(info, use_bin_type=True))

    _rewrite_index(tmp_path / "f", drop_chunk)
    with pytest.raises(VmoeCheckpointError,
                       match=r"f\.index.*not exactly covered"):
        read_vmoe_checkpoint(tmp_path / "f")
    # A chunk listed by the index but absent from its shard.
    write_checkpoint(tmp_path / "g", {"w": x, "v": x}, 1)
    shard = tmp_path / "g.data-00000-of-00001"
    content = msgpack.unpackb(shard.read_bytes(), raw=False)
    del content["1"]
    shard.write_bytes(msgpack.packb(content, use_bin_type=True))
    with pytest.raises(VmoeCheckpointError,
                       match=r"g\.data-00000-of-00001.*no chunks of w"):
        read_vmoe_checkpoint(tmp_path / "g")
