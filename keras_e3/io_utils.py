"""Atomic writes of files and directories, JSON-safe values and the cache
folder, shared by reports, plots, presets, conversions and exports: a crash
never leaves a half-written file or directory behind."""

import contextlib
import json
import math
import os
import shutil
import tempfile

import numpy as np


def cache_root(cache_dir=None):
    """The keras-e3 cache folder: the one rule every download and converted
    preset follows.

    Args:
        cache_dir: an explicit folder (`~` expanded), which wins.

    Returns:
        `cache_dir`, else `$KERAS_E3_CACHE`, else `$KERAS_HOME/keras_e3`
        (`~/.keras/keras_e3` when `KERAS_HOME` is unset), as a string.

    Example:

    ```python
    import os
    from keras_e3.io_utils import cache_root

    os.environ["KERAS_E3_CACHE"] = "/tmp/e3cache"
    assert cache_root() == "/tmp/e3cache"
    assert cache_root("/data/cache") == "/data/cache"
    ```
    """
    if cache_dir is not None:
        return os.path.expanduser(os.fspath(cache_dir))
    if os.environ.get("KERAS_E3_CACHE"):
        return os.path.expanduser(os.environ["KERAS_E3_CACHE"])
    keras_home = os.environ.get("KERAS_HOME") or os.path.join("~", ".keras")
    return os.path.join(os.path.expanduser(keras_home), "keras_e3")


def default_permissions(path, directory=False):
    """mkstemp / mkdtemp create private files (0600 / 0700): give `path` the
    mode a plain open() / mkdir() would have under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_path(path, suffix=""):
    """`with atomic_path(p) as tmp:` write tmp; on success it replaces p."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(
        prefix=f".{os.path.basename(path)}.", suffix=suffix + ".tmp",
        dir=directory)
    os.close(fd)
    try:
        yield tmp
        default_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class atomic_directory:
    """`with atomic_directory(target) as tmp:` write into tmp; on success
    tmp replaces target (the old one is removed only after the swap)."""

    def __init__(self, target):
        self.target = os.path.abspath(os.fspath(target))

    def __enter__(self):
        parent = os.path.dirname(self.target)
        os.makedirs(parent, exist_ok=True)
        self.tmp = tempfile.mkdtemp(
            dir=parent, prefix=f".{os.path.basename(self.target)}.tmp-")
        default_permissions(self.tmp, directory=True)  # not mkdtemp's 0700
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if os.path.lexists(self.target):
            if not os.path.isdir(self.target):
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise ValueError(f"{self.target} exists and is not a "
                                 "directory.")
            old = tempfile.mkdtemp(
                dir=os.path.dirname(self.target),
                prefix=f".{os.path.basename(self.target)}.old-")
            os.rmdir(old)
            os.rename(self.target, old)
        os.rename(self.tmp, self.target)
        if old:
            shutil.rmtree(old, ignore_errors=True)
        return False


@contextlib.contextmanager
def atomic_replace(path, directory=False, error=ValueError):
    """`with atomic_replace(p) as tmp:` let a writer create `tmp`, a file or
    (`directory`) a folder with `p`'s base name (some writers check the
    extension) inside a temporary folder beside `p`; on success it replaces
    `p`. Raises `error` when `p` exists as the other kind, or when the
    writer wrote nothing."""
    parent = os.path.dirname(path)
    if os.path.lexists(path) and os.path.isdir(path) != directory:
        kind = "a directory" if os.path.isdir(path) else "a file"
        raise error(f"{path} exists and is {kind}; remove it or "
                          "choose another path.")
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(dir=parent,
                            prefix=f".{os.path.basename(path)}.tmp-")
    tmp = os.path.join(work, os.path.basename(path))
    try:
        yield tmp
        if not os.path.exists(tmp):
            raise error(f"The exporter wrote nothing at {tmp}.")
        old = None
        if os.path.lexists(path):
            old = tempfile.mkdtemp(
                dir=parent, prefix=f".{os.path.basename(path)}.old-")
            os.rename(path, os.path.join(old, "old"))
        os.rename(tmp, path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_text_atomic(path, text):
    """Writes `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
    return path


def json_safe(x):
    """NaN / inf -> None, NumPy values -> Python, tuples -> lists."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, np.ndarray):
        return json_safe(x.tolist())
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else None
    return x


def write_json_atomic(path, data):
    """Writes `data` (made JSON-safe) to `path` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(json_safe(data), f, indent=2, sort_keys=True,
                      allow_nan=False)
            f.write("\n")
    return path
