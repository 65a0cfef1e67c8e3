"""Labels as a classifier's loss takes them, checked.

`prepare_labels` (NumPy, on the host) and `prepare_labels_tf` (TensorFlow
ops, inside `tf.data` maps) accept

- class indices: integers [N] (or [N, 1], or integral floats), each in
  [0, num_classes);
- class names: strings (or bytes) [N], mapped through `class_names`
  (a model's `class_names`; a name given to several classes, as ImageNet's
  two "crane"s, is an error: give indices);
- one-hot or soft labels [N, num_classes] (rows of non-negative values
  summing to 1).

`sparse` says what the loss takes: True (keras-e3's default losses,
`EnsembleSoftmaxCrossEntropy()`): class indices int32 [N]; one-hot rows
become their index, soft rows (MixUp, label smoothing done by hand) are a
ValueError telling to compile with `sparse=False`. False
(`EnsembleSoftmaxCrossEntropy(sparse=False)`): float32 one-hot or soft
rows [N, num_classes]; indices and names become one-hot rows. None: the
labels keep their form (indices stay int32 indices, rows stay rows), only
checked. Anything out of range, an unknown name, or a row of another
length is a ValueError naming the problem (in a graph: an assertion, a
`tf.errors.InvalidArgumentError` with the same message).
"""

import numpy as np

# One-hot / soft rows may sum to 1 within this tolerance.
ROW_SUM_TOLERANCE = 1e-3


def prepare_labels(labels, num_classes, class_names=None, sparse=True):
    """Checks labels and puts them in the form the loss takes.

    Args:
        labels: class indices [N] (ints, or integral floats; [N, 1] too),
            class names [N] (str or bytes; needs `class_names`), or one-hot
            / soft labels [N, num_classes].
        num_classes: the model's number of classes.
        class_names: the model's class names (index i is class i), for
            string labels.
        sparse: True: int32 indices [N]; False: float32 rows
            [N, num_classes]; None: the labels' own form (see the module
            docstring).

    Returns:
        A NumPy array: int32 [N] or float32 [N, num_classes].

    Example:
    >>> prepare_labels(["dog", "cat"], 2, class_names=["cat", "dog"])
    array([1, 0], dtype=int32)
    >>> prepare_labels([[0.0, 1.0]], 2)
    array([1], dtype=int32)
    """
    num_classes = int(num_classes)
    y = np.asarray(labels)
    if y.dtype.kind in "USO" and y.size and _is_text(y.flat[0]):
        y = _names_to_indices(y, class_names)
    elif y.dtype.kind == "O":
        raise ValueError(f"Labels must be class indices, class names or "
                         f"one-hot rows; got objects of type "
                         f"{type(y.flat[0]).__name__ if y.size else '?'}.")
    elif y.dtype.kind not in "biuf":
        raise ValueError(f"Labels must be class indices, class names or "
                         f"one-hot rows; got dtype {y.dtype}.")
    if y.ndim == 2 and y.shape[1] == 1 and num_classes != 1:
        y = y[:, 0]
    if y.ndim == 2:
        return _rows(y, num_classes, sparse)
    if y.ndim != 1:
        raise ValueError(
            f"Labels must be [N] class indices or names, or [N, "
            f"{num_classes}] one-hot rows; got shape {y.shape}.")
    indices = _indices(y, num_classes)
    if sparse is False:
        return np.eye(num_classes, dtype=np.float32)[indices]
    return indices


def prepare_labels_tf(labels, num_classes, class_names=None, sparse=True):
    """`prepare_labels` as TensorFlow ops, on a batch of labels ([B] or
    [B, num_classes]; [B, 1] too), for `tf.data` maps. The checks are
    graph assertions (`tf.errors.InvalidArgumentError` when the batch is
    read)."""
    import tensorflow as tf

    num_classes = int(num_classes)
    y = labels
    if y.shape.rank is None:
        raise ValueError("Labels of unknown rank in a tf.data pipeline: give"
                         " them a static rank ([B] or [B, num_classes]).")
    if y.dtype == tf.string:
        if not class_names:
            raise ValueError(_NO_NAMES)
        lookup = _name_index(class_names)
        table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(list(lookup)),
                tf.constant(list(lookup.values()), tf.int64)),
            default_value=-1)
        index = table.lookup(y)
        checks = [tf.debugging.Assert(
            tf.reduce_all(index != -1),
            ["Labels name classes the model does not have; its "
             f"class_names are {_shorten(class_names)}; unknown:",
             tf.boolean_mask(y, tf.equal(index, -1))], summarize=10),
            tf.debugging.Assert(
            tf.reduce_all(index != -2),
            ["Labels name classes that appear more than once in the "
             "model's class_names (give class indices for them):",
             tf.boolean_mask(y, tf.equal(index, -2))], summarize=10)]
        with tf.control_dependencies(checks):
            y = tf.identity(index)
    elif not (y.dtype.is_integer or y.dtype.is_floating or y.dtype.is_bool):
        raise ValueError(f"Labels must be class indices, class names or "
                         f"one-hot rows; got dtype {y.dtype.name}.")
    if y.shape.rank == 2 and y.shape[1] == 1 and num_classes != 1:
        y = y[:, 0]
    if y.shape.rank == 2:
        if y.shape[1] is not None and y.shape[1] != num_classes:
            raise ValueError(_row_length(y.shape[1], num_classes))
        f = tf.cast(y, tf.float32)
        ok = tf.logical_and(
            tf.reduce_all(f >= 0.0),
            tf.reduce_all(tf.abs(tf.reduce_sum(f, -1) - 1.0)
                          <= ROW_SUM_TOLERANCE))
        checks = [tf.debugging.assert_equal(
            tf.shape(f)[1], num_classes,
            message=_row_length("another number of", num_classes)),
            tf.debugging.Assert(ok, [_BAD_ROWS])]
        if sparse:
            one_hot = tf.reduce_all(tf.logical_or(
                tf.equal(f, 0.0), tf.equal(f, 1.0)))
            checks.append(tf.debugging.Assert(one_hot, [_SOFT_ROWS]))
        with tf.control_dependencies(checks):
            f = tf.identity(f)
        return tf.cast(tf.argmax(f, -1), tf.int32) if sparse else f
    if y.shape.rank != 1:
        raise ValueError(
            f"Labels must be a batch [B] of class indices or names, or "
            f"[B, {num_classes}] one-hot rows; got shape {y.shape}.")
    if y.dtype.is_floating:
        integral = tf.debugging.Assert(
            tf.reduce_all(tf.equal(y, tf.round(y))),
            ["Float labels that are not whole numbers: give class indices "
             "(ints), or one-hot rows [N, num_classes]."])
        with tf.control_dependencies([integral]):
            y = tf.identity(y)
    y64 = tf.cast(y, tf.int64)
    in_range = tf.debugging.Assert(
        tf.reduce_all(tf.logical_and(y64 >= 0, y64 < num_classes)),
        [f"Labels outside [0, {num_classes}) (the model has {num_classes} "
         "classes): give class indices in range, or a model with more "
         "classes (from_preset(..., num_classes=...)). Out of range:",
         tf.boolean_mask(y64, tf.logical_or(y64 < 0, y64 >= num_classes))],
        summarize=10)
    with tf.control_dependencies([in_range]):
        y = tf.cast(y64, tf.int32)
    if sparse is False:
        return tf.one_hot(y, num_classes, dtype=tf.float32)
    return y


def loss_is_sparse(loss):
    """What `prepare_labels`' `sparse` should be for a compiled `loss`:
    its `sparse` attribute (keras-e3's losses), True / False for Keras'
    sparse / categorical losses, else None (labels kept in their form)."""
    sparse = getattr(loss, "sparse", None)
    if isinstance(sparse, bool):
        return sparse
    name = loss if isinstance(loss, str) else getattr(
        loss, "__name__", type(loss).__name__)
    name = str(name).lower()
    if "sparse" in name:
        return True
    if "categorical" in name:
        return False
    return None


_NO_NAMES = ("String labels need the model's class names: build it with "
             "E3ViT(..., class_names=[...]) (presets bring theirs), or give "
             "class indices.")
_BAD_ROWS = ("One-hot / soft label rows must be non-negative and sum to 1.")
_SOFT_ROWS = ("Soft label rows (not one-hot) given to a loss that takes "
              "class indices: compile with keras_e3.losses."
              "EnsembleSoftmaxCrossEntropy(sparse=False) for soft labels.")


def _row_length(got, num_classes):
    return (f"One-hot label rows of {got} columns: the model has "
            f"{num_classes} classes (rows must be [N, {num_classes}]).")


def _is_text(value):
    return isinstance(value, (str, bytes, np.str_, np.bytes_))


def _shorten(names, limit=20):
    names = list(names)
    if len(names) <= limit:
        return names
    return names[:limit] + [f"... ({len(names)} in all)"]


def _name_index(class_names):
    """{name: index}; -2 for a name given to several classes (ImageNet has
    two "crane"s and two "maillot"s)."""
    index = {}
    for i, name in enumerate(class_names):
        name = str(name)
        index[name] = -2 if name in index else i
    return index


def _names_to_indices(y, class_names):
    if not class_names:
        raise ValueError(_NO_NAMES)
    index = _name_index(class_names)
    flat = [v.decode("utf-8") if isinstance(v, (bytes, np.bytes_))
            else str(v) for v in y.reshape(-1)]
    unknown = sorted({v for v in flat if v not in index})
    if unknown:
        raise ValueError(
            f"Labels {_shorten(unknown, 10)} are not among the model's "
            f"class_names {_shorten(class_names)}.")
    repeated = sorted({v for v in flat if index[v] == -2})
    if repeated:
        raise ValueError(
            f"Labels {_shorten(repeated, 10)} name several classes of the "
            "model's class_names: give class indices for them.")
    return np.asarray([index[v] for v in flat], np.int32).reshape(y.shape)


def _indices(y, num_classes):
    if y.dtype.kind == "f":
        if not np.isfinite(y).all() or not np.all(y == np.round(y)):
            raise ValueError(
                "Float labels that are not whole numbers: give class indices"
                f" (ints), or one-hot rows [N, {num_classes}].")
    bad = (y < 0) | (y >= num_classes)
    if np.any(bad):
        values = sorted({v.item() for v in np.unique(y[bad])})
        raise ValueError(
            f"Labels {_shorten(values, 10)} are outside [0, {num_classes}): "
            f"the model has {num_classes} classes. Give class indices in "
            "range, or a model with more classes "
            "(from_preset(..., num_classes=...)).")
    return y.astype(np.int32)


def _rows(y, num_classes, sparse):
    if y.shape[1] != num_classes:
        raise ValueError(_row_length(y.shape[1], num_classes))
    f = y.astype(np.float32)
    if not np.isfinite(f).all() or np.any(f < 0) or np.any(
            np.abs(f.sum(-1) - 1.0) > ROW_SUM_TOLERANCE):
        raise ValueError(_BAD_ROWS)
    if not sparse:
        return f
    if not np.all((f == 0.0) | (f == 1.0)):
        raise ValueError(_SOFT_ROWS)
    return np.argmax(f, -1).astype(np.int32)
