"""Reader for google-research/vmoe's native (partitioned) checkpoints.

The officially released V-MoE / E³ checkpoints (e.g.
``gs://vmoe_checkpoints/eee_s32_last2_ilsvrc2012``) are written by
``vmoe.checkpoints.partitioned.save_checkpoint``: a ``<prefix>.index`` file
and data shards ``<prefix>.data-XXXXX-of-YYYYY``, all msgpack. This module
reads them with ``msgpack`` and NumPy only (no TensorFlow, JAX or Flax).

Format, as read here:

- The index is a map ``{"shard_count": int, "version": "20220622" (absent in
  older checkpoints), "index": tree}``; ``tree`` is a nested map of string
  keys whose leaves are IndexInfo (msgpack ExtType 8): the global shape and
  dtype (a packed ShapedArray, as in ExtType 4), the global slice (a packed
  SliceNd, as in ExtType 6) of each chunk of the array, and the shard that
  holds each chunk.
- Leaves are numbered 0, 1, ... in depth-first order with the keys of every
  map sorted (JAX's tree-flatten order of a Flax state dict).
- Each data shard is a map ``{"__msgpack_array_chunk_a87ca2__": true,
  "<leaf number>": [[subchunks, global slice], ...]}``; ``subchunks`` are
  flattened arrays (ExtType 1: shape, dtype name, raw C-order bytes) that,
  concatenated, hold the chunk's elements in C order; the global slice is an
  ExtType 6.

What is accepted: a tree that is the params dict itself (how the official
checkpoints are released), or a train state whose top level holds a
``params`` subtree (next to ``opt_state``, ``step``, ``rngs``...), in which
case only ``params`` is read (and only the shards holding it are read or
downloaded). A tree with ``opt_state`` or ``step`` but no ``params`` is
refused. Arrays are returned as NumPy arrays of their stored dtype, except
bfloat16 arrays, which are returned as float32 (exact).

Nothing in a file is ever executed: msgpack is decoded with explicit
ExtType decoders, dtypes come from a fixed list of names, and no pickle is
involved. Every problem raises `VmoeCheckpointError` naming the file.

Remote prefixes (``http://``, ``https://``, and ``gs://bucket/path``, read
as ``https://storage.googleapis.com/bucket/path``) are downloaded once with
``keras.utils.get_file`` into ``<cache>/vmoe/<hash of the URL>/``, where
``<cache>`` is the ``cache_dir`` argument, else ``$KERAS_E3_CACHE``, else
``$KERAS_HOME/keras_e3`` (``~/.keras/keras_e3``). Each file is downloaded
under a temporary name and renamed when complete, so an interrupted download
is never mistaken for a cached file.
"""

import hashlib
import os
import shutil
import uuid

import msgpack
import numpy as np

from keras_e3 import io_utils

__all__ = ["VmoeCheckpointError", "read_vmoe_checkpoint", "is_remote",
           "checkpoint_url"]

_CHUNKS_MAGIC = "__msgpack_array_chunk_a87ca2__"
_VERSIONS = (None, "20220622")
_EXT_NDARRAY = 1
_EXT_SHAPED_ARRAY = 4
_EXT_SLICE_ND = 6
_EXT_INDEX_INFO = 8
_EXT_NAMES = {1: "ndarray", 2: "complex", 3: "numpy scalar",
              4: "ShapedArray", 5: "Slice", 6: "SliceNd",
              7: "SliceNdArray", 8: "IndexInfo"}
# dtype name -> little-endian NumPy dtype of the stored bytes.
_DTYPES = {name: np.dtype(name).newbyteorder("<") for name in (
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
    "uint64", "float16", "float32", "float64", "complex64", "complex128")}
_DTYPES["bfloat16"] = np.dtype("<u2")  # Raw bits, widened to float32.


class VmoeCheckpointError(ValueError):
    """A vmoe checkpoint that is missing, corrupt or not understood."""


class _FormatError(Exception):
    """Internal: a malformed value; re-raised with the file name."""


# ---------------------------------------------------------------- decoding


class _Array:
    """An ndarray payload (ExtType 1), kept as raw bytes until placed."""

    __slots__ = ("dtype_name", "shape", "data")

    def __init__(self, dtype_name, shape, data):
        self.dtype_name, self.shape, self.data = dtype_name, shape, data


class _IndexInfo:
    __slots__ = ("shape", "dtype_name", "slices", "shards")

    def __init__(self, shape, dtype_name, slices, shards):
        self.shape, self.dtype_name = shape, dtype_name
        self.slices, self.shards = slices, shards


def _no_ext(code, data):
    raise _FormatError(f"unexpected nested msgpack ExtType {code}")


def _unpack_payload(data, what):
    try:
        return msgpack.unpackb(data, raw=False, ext_hook=_no_ext,
                               strict_map_key=False)
    except _FormatError:
        raise
    except Exception as e:
        raise _FormatError(f"corrupt {what} payload ({e})") from None


def _text(value, what):
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            raise _FormatError(f"{what} is not ASCII") from None
    if not isinstance(value, str):
        raise _FormatError(f"{what} is not a string: {value!r}")
    return value


def _int(value, what, allow_none=False):
    if value is None and allow_none:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise _FormatError(f"{what} is not an integer: {value!r}")
    return value


def _shape(value, what):
    if not isinstance(value, (list, tuple)):
        raise _FormatError(f"{what} is not a list: {value!r}")
    shape = tuple(_int(d, f"{what} dimension") for d in value)
    if any(d < 0 for d in shape):
        raise _FormatError(f"{what} has a negative dimension: {shape}")
    return shape


def _dtype_name(value):
    name = _text(value, "dtype name")
    if name not in _DTYPES:
        raise _FormatError(f"unsupported dtype {name!r} (supported: "
                           f"{', '.join(sorted(_DTYPES))})")
    return name


def _decode_ndarray(data):
    value = _unpack_payload(data, "ndarray")
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise _FormatError("ndarray payload is not (shape, dtype, bytes)")
    shape = _shape(value[0], "ndarray shape")
    name = _dtype_name(value[1])
    buffer = value[2]
    if not isinstance(buffer, bytes):
        raise _FormatError("ndarray data is not a byte string")
    expected = int(np.prod(shape, dtype=np.int64)) * _DTYPES[name].itemsize
    if len(buffer) != expected:
        raise _FormatError(
            f"ndarray of shape {shape} and dtype {name} has {len(buffer)} "
            f"bytes, expected {expected}")
    return _Array(name, shape, buffer)


def _decode_shaped_array(data):
    value = _unpack_payload(data, "ShapedArray")
    if not isinstance(value, (list, tuple)) or len(value) < 2:
        raise _FormatError("ShapedArray payload is not (shape, dtype, ...)")
    return _shape(value[0], "global shape"), _dtype_name(value[1])


def _decode_slice_nd(data):
    """SliceNd -> tuple of (start, stop) with None for open ends."""
    value = _unpack_payload(data, "SliceNd")
    if not isinstance(value, (list, tuple)):
        raise _FormatError("SliceNd payload is not a list")
    out = []
    for item in value:
        if not isinstance(item, bytes):
            raise _FormatError("SliceNd item is not a packed Slice")
        s = _unpack_payload(item, "Slice")
        if not isinstance(s, (list, tuple)) or len(s) != 3:
            raise _FormatError("Slice payload is not (start, stop, step)")
        start = _int(s[0], "slice start", allow_none=True)
        stop = _int(s[1], "slice stop", allow_none=True)
        if _int(s[2], "slice step", allow_none=True) not in (None, 1):
            raise _FormatError(f"unsupported slice step {s[2]!r}")
        out.append((start, stop))
    return tuple(out)


def _decode_index_info(data):
    value = _unpack_payload(data, "IndexInfo")
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise _FormatError("IndexInfo payload is not (shape, slices, shards)")
    shaped, slices, shards = value
    if not isinstance(shaped, bytes) or not isinstance(slices, (list, tuple)):
        raise _FormatError("malformed IndexInfo")
    shape, dtype_name = _decode_shaped_array(shaped)
    slices = []
    for s in value[1]:
        if not isinstance(s, bytes):
            raise _FormatError("IndexInfo slice is not a packed SliceNd")
        slices.append(_decode_slice_nd(s))
    if not isinstance(shards, (list, tuple)):
        raise _FormatError("IndexInfo shards is not a list")
    shards = [_int(s, "shard number") for s in shards]
    if len(shards) != len(slices):
        raise _FormatError(f"IndexInfo has {len(slices)} slices but "
                           f"{len(shards)} shard numbers")
    return _IndexInfo(shape, dtype_name, slices, shards)


def _ext_hook(allowed):
    decoders = {_EXT_NDARRAY: _decode_ndarray,
                _EXT_SLICE_ND: _decode_slice_nd,
                _EXT_INDEX_INFO: _decode_index_info}

    def hook(code, data):
        if code not in allowed:
            name = _EXT_NAMES.get(code)
            raise _FormatError(
                f"unexpected msgpack ExtType code {code}"
                + (f" ({name})" if name else " (unknown)"))
        return decoders[code](data)

    return hook


def _read_msgpack(path, allowed_ext, what):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise VmoeCheckpointError(f"Missing {what} file {path!r}.") from None
    except OSError as e:
        raise VmoeCheckpointError(
            f"Could not read {what} file {path!r}: {e}") from e
    try:
        return msgpack.unpackb(data, raw=False,
                               ext_hook=_ext_hook(allowed_ext),
                               strict_map_key=False)
    except _FormatError as e:
        raise VmoeCheckpointError(
            f"Corrupt {what} file {path!r}: {e}.") from None
    except Exception as e:  # msgpack's errors: truncation, extra data...
        raise VmoeCheckpointError(
            f"Corrupt or truncated {what} file {path!r}: "
            f"{type(e).__name__}: {e}.") from None


# ------------------------------------------------------------------- index


def _flatten_index(tree, prefix, out):
    """Depth-first leaves with sorted keys: JAX's order of a state dict."""
    for key in sorted(tree):
        value = tree[key]
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            _flatten_index(value, name + "/", out)
        else:
            out.append((name, value))


def _normalize_slices(info, name):
    """Chunk slices as ((start, stop), ...) tuples within the global shape."""
    out = []
    for slice_nd in info.slices:
        if len(slice_nd) > len(info.shape):
            raise _FormatError(f"{name}: chunk slice {slice_nd} has more "
                               f"axes than the shape {info.shape}")
        full = []
        for axis, size in enumerate(info.shape):
            start, stop = slice_nd[axis] if axis < len(slice_nd) else (0, size)
            start = 0 if start is None else start
            stop = size if stop is None else stop
            if not 0 <= start <= stop <= size:
                raise _FormatError(f"{name}: chunk slice {slice_nd} is out "
                                   f"of bounds of shape {info.shape}")
            full.append((start, stop))
        out.append(tuple(full))
    return out


def _check_coverage(name, shape, slices):
    """The chunks must tile the array: disjoint, with the full volume."""
    def volume(s):
        return int(np.prod([b - a for a, b in s], dtype=np.int64))

    total = sum(volume(s) for s in slices)
    size = int(np.prod(shape, dtype=np.int64))
    overlap = any(
        all(max(a0, b0) < min(a1, b1)
            for (a0, a1), (b0, b1) in zip(slices[i], slices[j]))
        for i in range(len(slices)) for j in range(i))
    if overlap or total != size:
        raise _FormatError(
            f"array {name} of shape {shape} is not exactly covered by its "
            f"chunks {slices}")


def _load_index(prefix):
    """(shard_count, [(name, leaf id, IndexInfo, slices)]) of the params."""
    path = prefix + ".index"
    top = _read_msgpack(path, {_EXT_INDEX_INFO}, "checkpoint index")
    try:
        if not isinstance(top, dict) or not isinstance(top.get("index"), dict):
            raise _FormatError("not a vmoe checkpoint index (no 'index' map)")
        shard_count = top.get("shard_count")
        if (not isinstance(shard_count, int) or isinstance(shard_count, bool)
                or shard_count < 1):
            raise _FormatError(f"invalid shard_count {shard_count!r}")
        if top.get("version") not in _VERSIONS:
            raise _FormatError(
                f"unsupported checkpoint version {top.get('version')!r}")
        tree = top["index"]
        leaves = []
        _flatten_index(tree, "", leaves)
        if "params" in tree and isinstance(tree["params"], dict):
            strip = "params/"
        elif "opt_state" in tree or "step" in tree:
            raise _FormatError("the checkpoint holds a train state without a "
                               "top-level 'params' entry")
        else:
            strip = ""
        selected = []
        for leaf_id, (name, info) in enumerate(leaves):
            if not isinstance(info, _IndexInfo):
                raise _FormatError(f"leaf {name} is not an IndexInfo")
            if not name.startswith(strip):
                continue
            for shard in info.shards:
                if not 0 <= shard < shard_count:
                    raise _FormatError(
                        f"shard_count mismatch: {name} is stored in shard "
                        f"{shard} but the index declares shard_count="
                        f"{shard_count}")
            slices = _normalize_slices(info, name)
            _check_coverage(name, info.shape, slices)
            selected.append((name[len(strip):], leaf_id, info, slices))
        if not selected:
            raise _FormatError("the checkpoint holds no parameters")
    except _FormatError as e:
        raise VmoeCheckpointError(
            f"Invalid checkpoint index {path!r}: {e}.") from None
    return shard_count, selected


def _shard_path(prefix, shard, shard_count):
    return f"{prefix}.data-{shard:05d}-of-{shard_count:05d}"


def _needed_shards(selected):
    return sorted({s for _, _, info, _ in selected for s in info.shards})


# -------------------------------------------------------------------- read


def _read_local(prefix):
    shard_count, selected = _load_index(prefix)
    index_path = prefix + ".index"
    out = {}
    wanted = {}  # shard -> [(name, leaf id, global slice)]
    for name, leaf_id, info, slices in selected:
        dtype = np.float32 if info.dtype_name == "bfloat16" else (
            _DTYPES[info.dtype_name].newbyteorder("="))
        out[name] = np.empty(info.shape, dtype)
        for slice_nd, shard in zip(slices, info.shards):
            wanted.setdefault(shard, []).append((name, leaf_id, slice_nd))
    infos = {name: info for name, _, info, _ in selected}
    for shard in sorted(wanted):
        path = _shard_path(prefix, shard, shard_count)
        if not os.path.exists(path):
            raise VmoeCheckpointError(
                f"Missing checkpoint shard {path!r} (listed by {index_path!r}"
                f" with shard_count={shard_count}).")
        data = _read_msgpack(path, {_EXT_NDARRAY, _EXT_SLICE_ND},
                             "checkpoint shard")
        try:
            if (not isinstance(data, dict)
                    or data.get(_CHUNKS_MAGIC) is not True):
                raise _FormatError("not a vmoe array-chunks shard")
            for name, leaf_id, slice_nd in wanted[shard]:
                _place_chunk(out[name], infos[name], data, name, leaf_id,
                             slice_nd)
        except _FormatError as e:
            raise VmoeCheckpointError(
                f"Invalid checkpoint shard {path!r}: {e}.") from None
        del data
    return out


def _place_chunk(array, info, shard_data, name, leaf_id, slice_nd):
    entries = shard_data.get(str(leaf_id))
    if not isinstance(entries, list):
        raise _FormatError(f"no chunks of {name} (array {leaf_id})")
    for entry in entries:
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise _FormatError(f"malformed chunk entry of {name}")
        subchunks, chunk_slice = entry
        if not isinstance(chunk_slice, tuple):
            raise _FormatError(f"chunk of {name} has no SliceNd")
        try:
            chunk_slice = _normalize_slices(
                _IndexInfo(info.shape, None, [chunk_slice], None), name)[0]
        except _FormatError:
            continue  # Not the chunk we look for; mismatches reported below.
        if chunk_slice != slice_nd:
            continue
        if not isinstance(subchunks, list) or not all(
                isinstance(c, _Array) for c in subchunks):
            raise _FormatError(f"chunk {slice_nd} of {name} is not a list of "
                               "arrays")
        for c in subchunks:
            if c.dtype_name != info.dtype_name:
                raise _FormatError(
                    f"chunk {slice_nd} of {name} has dtype {c.dtype_name}, "
                    f"the index says {info.dtype_name}")
        raw = b"".join(c.data for c in subchunks)
        chunk_shape = tuple(b - a for a, b in slice_nd)
        dtype = _DTYPES[info.dtype_name]
        expected = int(np.prod(chunk_shape, dtype=np.int64)) * dtype.itemsize
        if len(raw) != expected:
            raise _FormatError(
                f"chunk {slice_nd} of {name} holds {len(raw)} bytes; shape "
                f"{chunk_shape} of {info.dtype_name} needs {expected}")
        values = np.frombuffer(raw, dtype).reshape(chunk_shape)
        if info.dtype_name == "bfloat16":
            values = (values.astype(np.uint32) << 16).view(np.float32)
        array[tuple(slice(a, b) for a, b in slice_nd)] = values
        return
    raise _FormatError(f"chunk {slice_nd} of {name} (array {leaf_id}) is "
                       "missing")


# ------------------------------------------------------------------ remote


def is_remote(prefix):
    """Whether `prefix` is an http(s):// or gs:// checkpoint prefix."""
    return isinstance(prefix, str) and prefix.startswith(
        ("http://", "https://", "gs://"))


def checkpoint_url(prefix):
    """The https URL of a gs:// prefix; http(s) prefixes unchanged."""
    if prefix.startswith("gs://"):
        return "https://storage.googleapis.com/" + prefix[len("gs://"):]
    return prefix


def cache_root(cache_dir=None):
    """The download cache: `cache_dir`, else $KERAS_E3_CACHE, else
    $KERAS_HOME/keras_e3 (~/.keras/keras_e3)."""
    return _cache_root(cache_dir)


def download_file(url, directory, fname):
    """Downloads `url` to directory/fname unless already there (a temporary
    name renamed when complete); returns the local path."""
    return _download(url, directory, fname)


def _cache_root(cache_dir):
    return io_utils.cache_root(cache_dir)


def _download(url, directory, fname):
    """Downloads `url` to directory/fname unless already there."""
    final = os.path.join(directory, fname)
    if os.path.isfile(final):
        return final
    import keras

    # keras.utils.get_file writes straight to its target name (removing it
    # only on a Python exception), so download to a unique temporary name
    # and rename it once complete: a killed process never leaves a partial
    # file under the final name.
    temp = f"{fname}.part-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        got = keras.utils.get_file(fname=temp, origin=url,
                                   cache_dir=directory, cache_subdir="")
        shutil.move(got, final)
    except Exception as e:
        leftover = os.path.join(directory, temp)
        if os.path.exists(leftover):
            os.remove(leftover)
        raise VmoeCheckpointError(
            f"Could not download {url!r} to {final!r}: {e}") from e
    return final


def _fetch(prefix, cache_dir):
    """Downloads a remote checkpoint into the cache; its local prefix."""
    url = checkpoint_url(prefix)
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
    directory = os.path.join(_cache_root(cache_dir), "vmoe", digest)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise VmoeCheckpointError(
            f"Cannot create the checkpoint cache {directory!r}: {e}") from e
    base = url.rstrip("/").rsplit("/", 1)[-1]
    if not base:
        raise VmoeCheckpointError(f"No checkpoint name in {prefix!r}.")
    local = os.path.join(directory, base)
    _download(url + ".index", directory, base + ".index")
    shard_count, selected = _load_index(local)
    for shard in _needed_shards(selected):
        name = os.path.basename(_shard_path(base, shard, shard_count))
        _download(_shard_path(url, shard, shard_count), directory, name)
    return local


def read_vmoe_checkpoint(prefix, cache_dir=None):
    """Reads the parameters of a native vmoe checkpoint.

    Args:
        prefix: checkpoint prefix: a local path (``<prefix>.index`` and the
            ``<prefix>.data-*`` shards exist), an ``http(s)://`` URL prefix
            or a ``gs://bucket/path`` prefix (downloaded once, then cached).
        cache_dir: root of the download cache for remote prefixes (default
            ``$KERAS_E3_CACHE`` or ``~/.keras/keras_e3``); files go to
            ``<cache_dir>/vmoe/<hash of the URL>/``.

    Returns:
        ``{name: np.ndarray}`` with the official parameter names joined with
        "/" (e.g. ``Encoder/encoderblock_1/Moe/Mlp/Dense_0/kernel``) and the
        full (global) arrays.

    Raises:
        VmoeCheckpointError: on a missing, truncated, corrupt or
            inconsistent file (named in the message) or a failed download.
    """
    prefix = os.fspath(prefix)
    if is_remote(prefix):
        local = _fetch(prefix, cache_dir)
        try:
            return _read_local(local)
        except VmoeCheckpointError as e:
            raise VmoeCheckpointError(
                f"{e} (downloaded from {checkpoint_url(prefix)!r}; delete "
                f"{os.path.dirname(local)!r} to download it again)") from None
    return _read_local(prefix)
