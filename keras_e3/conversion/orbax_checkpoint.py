"""Reader for the checkpoints that vmoe's own trainer writes (orbax, OCDBT).

``vmoe.train.trainer.create_checkpoint_manager`` saves, every so many steps,
``<workdir>/ckpt/<step>/`` with a ``state`` item (the ``TrainState``:
``step``, ``params``, ``opt_state``, ``rngs``) and a ``dataset_iterator``
item. ``state`` is an orbax PyTree checkpoint in OCDBT form:
``manifest.ocdbt`` and ``d/`` (an OCDBT key-value store holding one zarr
array per leaf, named by its tree keys joined with "."), ``_METADATA`` (JSON:
the tree's leaves, their keys and value types), ``_sharding`` and
``array_metadatas/``. Only the ``params`` subtree is read here; the optimizer
state, step counter and RNGs are ignored (the step is reported).

The OCDBT store and the zarr arrays in it are read with TensorStore (the
``keras-e3[orbax]`` extra), which is what orbax itself writes them with. It
does not need JAX, so TensorFlow and PyTorch users can convert too. Arrays
are read whole: an array saved from several devices (experts sharded over
devices) is one global zarr array of several chunks, assembled by
TensorStore.

Accepted paths: the ``state`` directory, a step directory
(``.../ckpt/<step>``), the ``ckpt`` folder or the trainer workdir that holds
it (then the latest completely saved step is taken, and named). An
interrupted save (a ``*.orbax-checkpoint-tmp*`` directory, or a step without
the ``commit_success.txt`` that orbax writes when a save completes), a state
without ``manifest.ocdbt`` or without ``params``, and unreadable arrays raise
`OrbaxCheckpointError` naming the path.
"""

import json
import os
import re
import warnings

import numpy as np

from keras_e3.conversion.vmoe_checkpoint import VmoeCheckpointError

__all__ = ["OrbaxCheckpointError", "OrbaxStep", "find_orbax_step",
           "read_orbax_checkpoint", "EXTRA"]

EXTRA = "orbax"
STATE_ITEM = "state"
_TMP_MARK = ".orbax-checkpoint-tmp"
_COMMIT_FILE = "commit_success.txt"
_STEP_METADATA = "_CHECKPOINT_METADATA"
_TREE_METADATA = "_METADATA"
_MANIFEST = "manifest.ocdbt"
_TMP_STEP = re.compile(r"^(\d+)" + re.escape(_TMP_MARK))


class OrbaxCheckpointError(VmoeCheckpointError):
    """A vmoe trainer (orbax) checkpoint that is incomplete or unreadable."""


class OrbaxStep:
    """Where one saved step is: its `state` directory and step number."""

    def __init__(self, state_dir, step, latest_of=None, skipped=()):
        self.state_dir = state_dir
        self.step = step
        self.latest_of = latest_of  # the ckpt folder it was chosen from
        self.skipped = tuple(skipped)  # newer steps whose save is incomplete

    def __repr__(self):
        return f"OrbaxStep(state_dir={self.state_dir!r}, step={self.step})"


def _tensorstore():
    try:
        import tensorstore
    except ImportError:
        raise ImportError(
            "Reading checkpoints written by vmoe's trainer (orbax/OCDBT) "
            "needs TensorStore: pip install 'keras-e3[orbax]'") from None
    return tensorstore


def _interrupted(path, why):
    return OrbaxCheckpointError(
        f"{path!r} is an interrupted orbax save ({why}); it holds no "
        "complete checkpoint. Use a completely saved step (or the workdir, "
        "which takes the latest complete one).")


def _step_number(name):
    return int(name) if name.isdigit() else None


def _is_committed(step_dir):
    return os.path.isfile(os.path.join(step_dir, _COMMIT_FILE))


def _latest_step(ckpt_dir):
    """The latest completely saved step of an orbax CheckpointManager dir."""
    complete, incomplete = [], []
    for name in os.listdir(ckpt_dir):
        path = os.path.join(ckpt_dir, name)
        if not os.path.isdir(path):
            continue
        step, tmp = _step_number(name), _TMP_STEP.match(name)
        if step is not None and _is_committed(path):
            complete.append((step, path))
        elif step is not None or tmp:
            incomplete.append((step if step is not None
                               else int(tmp.group(1)), path))
    if not complete:
        if incomplete:
            raise OrbaxCheckpointError(
                f"No completely saved step in {ckpt_dir!r}: every save was "
                "interrupted (" + ", ".join(
                    os.path.basename(p) for _, p in sorted(incomplete))
                + f": an {_TMP_MARK}* directory or no {_COMMIT_FILE}).")
        raise OrbaxCheckpointError(
            f"{ckpt_dir!r} holds no checkpoint step (expected directories "
            "named by their step, e.g. 1000/, as vmoe's trainer writes).")
    step, path = max(complete)
    skipped = sorted(p for s, p in incomplete if s >= step)
    return step, path, skipped


def _looks_like_state(path):
    return any(os.path.exists(os.path.join(path, f)) for f in (
        _TREE_METADATA, _MANIFEST, "d", "ocdbt.process_0"))


def find_orbax_step(path):
    """Resolves a workdir, ckpt folder, step or state directory.

    Returns an `OrbaxStep` (state directory, step number). Raises
    `OrbaxCheckpointError` for an interrupted save or a directory that is
    not a vmoe trainer checkpoint.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise OrbaxCheckpointError(f"No such checkpoint directory: {path!r}.")
    latest_of, skipped = None, []
    if _TMP_MARK in os.path.basename(path):
        raise _interrupted(path, f"its name has {_TMP_MARK}")
    if _looks_like_state(path):
        state_dir, step_dir = path, os.path.dirname(path)
        if _TMP_MARK in os.path.basename(step_dir):
            raise _interrupted(step_dir, f"its name has {_TMP_MARK}")
        if not os.path.isfile(os.path.join(step_dir, _STEP_METADATA)):
            step_dir = state_dir  # a state directory on its own
    else:
        workdir = os.path.isdir(os.path.join(path, "ckpt"))
        if workdir:
            path = os.path.join(path, "ckpt")
        if os.path.isdir(os.path.join(path, STATE_ITEM)) or os.path.isfile(
                os.path.join(path, _STEP_METADATA)):
            step_dir = path
        elif workdir or any(_step_number(n) is not None or _TMP_STEP.match(n)
                            for n in os.listdir(path)):
            _, step_dir, skipped = _latest_step(path)
            latest_of = path
        else:
            raise OrbaxCheckpointError(
                f"{path!r} is not a vmoe trainer checkpoint: expected a "
                f"workdir with ckpt/, a ckpt/ folder of steps, a step "
                f"directory (ckpt/<step>) or its {STATE_ITEM}/ directory.")
        state_dir = os.path.join(step_dir, STATE_ITEM)
        if not os.path.isdir(state_dir):
            raise OrbaxCheckpointError(
                f"The checkpoint step {step_dir!r} has no {STATE_ITEM}/ "
                "item (the TrainState that vmoe's trainer saves).")
    if not _is_committed(step_dir):
        raise _interrupted(
            step_dir, f"no {_COMMIT_FILE}, which orbax writes when a save "
                      "completes")
    step = _step_number(os.path.basename(step_dir))
    return OrbaxStep(state_dir, step, latest_of, skipped)


def _tree_metadata(state_dir):
    path = os.path.join(state_dir, _TREE_METADATA)
    try:
        with open(path) as f:
            metadata = json.load(f)
        tree = metadata["tree_metadata"]
        leaves = [([k["key"] for k in leaf["key_metadata"]],
                   leaf["value_metadata"]) for leaf in tree.values()]
    except FileNotFoundError:
        raise OrbaxCheckpointError(
            f"{state_dir!r} has no {_TREE_METADATA}: not an orbax PyTree "
            "checkpoint (or an incomplete copy of one).") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise OrbaxCheckpointError(
            f"Unreadable orbax tree metadata {path!r}: "
            f"{type(e).__name__}: {e}") from None
    return metadata, leaves


def _kvstore_spec(state_dir, metadata):
    if metadata.get("use_ocdbt", True):
        if not os.path.isfile(os.path.join(state_dir, _MANIFEST)):
            raise OrbaxCheckpointError(
                f"{state_dir!r} has no {_MANIFEST}: the OCDBT store of this "
                "checkpoint is incomplete (an interrupted save or a partial "
                "copy).")
        return {"driver": "ocdbt",
                "base": {"driver": "file", "path": state_dir + "/"}}
    return {"driver": "file", "path": state_dir + "/"}


def _read_array(ts, kvstore, keys, name, context, state_dir):
    # orbax names each array by its tree keys joined with "."; zarr v2
    # (.zarray) by default, zarr v3 (zarr.json) with use_zarr3.
    driver = None
    for candidate, marker in (("zarr", ".zarray"), ("zarr3", "zarr.json")):
        if f"{name}/{marker}".encode() in keys:
            driver = candidate
    if driver is None:
        raise OrbaxCheckpointError(
            f"The array of parameter {name!r} is missing from the OCDBT "
            f"store of {state_dir!r}.")
    try:
        array = ts.open({"driver": driver,
                         "kvstore": dict(kvstore, path=name + "/")},
                        open=True, read=True, context=context).result()
        value = array.read().result()
    except Exception as e:  # TensorStore raises ValueError and others
        raise OrbaxCheckpointError(
            f"Cannot read parameter {name!r} from {state_dir!r}: "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    value = np.asarray(value)
    if value.dtype.name == "bfloat16":
        value = value.astype(np.float32)  # exact, like the native reader
    return value


def read_orbax_state(state_dir):
    """({official name: array} of `params`, stored step or None)."""
    metadata, leaves = _tree_metadata(state_dir)
    params = [(keys, value) for keys, value in leaves
              if keys and keys[0] == "params"
              and value.get("value_type") != "None"]
    if not params:
        found = sorted({str(keys[0]) for keys, _ in leaves if keys})
        raise OrbaxCheckpointError(
            f"The orbax state {state_dir!r} has no 'params' subtree (its top "
            f"level holds: {', '.join(found) or 'nothing'}).")
    kvstore = _kvstore_spec(state_dir, metadata)
    ts = _tensorstore()
    context = ts.Context()
    try:
        store = ts.KvStore.open(kvstore, context=context).result()
        keys = set(store.list().result())
    except Exception as e:
        raise OrbaxCheckpointError(
            f"Cannot open the OCDBT store of {state_dir!r}: "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    out = {}
    for path, _ in params:
        name = ".".join(str(k) for k in path)
        out["/".join(str(k) for k in path[1:])] = _read_array(
            ts, kvstore, keys, name, context, state_dir)
    step = None
    if any(k == ["step"] for k, _ in leaves):
        try:
            step = int(_read_array(ts, kvstore, keys, "step", context,
                                   state_dir))
        except (OrbaxCheckpointError, TypeError, ValueError):
            pass  # only reported
    return out, step


def read_orbax_checkpoint(path, verbose=True):
    """Reads the parameters of a checkpoint written by vmoe's trainer.

    Args:
        path: the trainer's workdir, its ``ckpt/`` folder (the latest
            completely saved step is taken), a step directory
            (``ckpt/<step>``) or its ``state/`` directory.
        verbose: print which step is read.

    Returns:
        ``{name: np.ndarray}`` of the ``params`` subtree, named like
        params.npz (``Encoder/encoderblock_1/Moe/Mlp/Dense_0/kernel``).

    Raises:
        OrbaxCheckpointError: interrupted save, missing manifest or params,
            unreadable arrays (the path is named).
        ImportError: TensorStore is not installed (``keras-e3[orbax]``).
    """
    found = find_orbax_step(path)
    for skipped in found.skipped:
        warnings.warn(f"Skipping {skipped!r}: its save was interrupted.",
                      stacklevel=2)
    params, stored_step = read_orbax_state(found.state_dir)
    if verbose:
        step = found.step if found.step is not None else stored_step
        where = (f" (the latest complete step in {found.latest_of})"
                 if found.latest_of else "")
        print(f"keras-e3: read the params of step {step}{where} from "
              f"{found.state_dir}; optimizer state ignored")
    return params
