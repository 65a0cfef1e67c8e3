"""A minimal writer of vmoe's native checkpoint format, for tests (see the
fixture README, "Native checkpoint")."""

import msgpack
import numpy as np


def _packed_slice_nd(slices):
    return msgpack.packb([msgpack.packb([a, b, None]) for a, b in slices],
                         use_bin_type=True)


def _ndarray_ext(array, dtype_name=None, data=None):
    data = array.tobytes() if data is None else data
    return msgpack.ExtType(1, msgpack.packb(
        [list(array.shape), dtype_name or array.dtype.name, data],
        use_bin_type=True))


def write_checkpoint(prefix, arrays, shard_count=2, dtype_names=None,
                     chunks=None, shards=None, ext_overrides=None):
    """A minimal vmoe-format writer for tests.

    arrays: {"a/b/c": np.ndarray}; chunks: {name: n} splits axis 0 in n;
    shards: {name: shard or [shard of chunk i]} (default: i % shard_count).
    """
    dtype_names, chunks = dtype_names or {}, chunks or {}
    shards, ext_overrides = shards or {}, ext_overrides or {}
    names = sorted(arrays, key=lambda n: n.split("/"))  # tree-flatten order
    index, data = {}, [{"__msgpack_array_chunk_a87ca2__": True}
                       for _ in range(shard_count)]
    for leaf_id, name in enumerate(names):
        array = arrays[name]
        n = chunks.get(name, 1)
        bounds = np.linspace(0, array.shape[0], n + 1).astype(int) if n > 1 \
            else None
        slices, where = [], []
        for i in range(n):
            s = [(0, d) for d in array.shape]
            if bounds is not None:
                s[0] = (int(bounds[i]), int(bounds[i + 1]))
            shard = shards.get(name, i % shard_count)
            shard = shard[i] if isinstance(shard, list) else shard
            slices.append(s)
            where.append(shard)
            chunk = array[tuple(slice(a, b) for a, b in s)].reshape(-1)
            half = max(1, chunk.size // 2)  # Two subchunks.
            subchunks = [_ndarray_ext(c, dtype_names.get(name))
                         for c in (chunk[:half], chunk[half:]) if c.size]
            subchunks = ext_overrides.get(name, subchunks)
            data[shard].setdefault(str(leaf_id), []).append(
                [subchunks, msgpack.ExtType(6, _packed_slice_nd(s))])
        info = msgpack.packb([
            msgpack.packb([list(array.shape),
                           dtype_names.get(name, array.dtype.name), False,
                           {}], use_bin_type=True),
            [_packed_slice_nd(s) for s in slices], where], use_bin_type=True)
        node = index
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = msgpack.ExtType(8, info)
    with open(f"{prefix}.index", "wb") as f:
        f.write(msgpack.packb({"shard_count": shard_count, "index": index,
                               "version": "20220622"}, use_bin_type=True))
    for shard, content in enumerate(data):
        path = f"{prefix}.data-{shard:05d}-of-{shard_count:05d}"
        with open(path, "wb") as f:
            f.write(msgpack.packb(content, use_bin_type=True))
