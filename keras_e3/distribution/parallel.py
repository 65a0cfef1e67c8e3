"""Meshes, layout maps and distributions for expert and data parallelism
(see `keras_e3.distribution`)."""

import math

import keras
from keras import distribution as kd

from keras_e3.layers.moe import check_num_experts  # noqa: F401 (public)
from keras_e3.layers.moe import expert_axis_size  # noqa: F401 (public)

BATCH_AXIS = "batch"
EXPERT_AXIS = "expert"
# The stacked expert weights of `keras_e3.layers.mlp.ExpertsMlp`, by rank.
_EXPERT_WEIGHTS = {r"kernel_[01]": 3, r"bias_[01]": 2}
_EXPERT_PATH = r"(.*/)?experts/"


def device_mesh(batch=None, expert=None, devices=None):
    """A 2-D `DeviceMesh` with axes ("batch", "expert").

    Give either size (the other is inferred from the number of devices) or
    both; by default every device is on the expert axis.

    Args:
        batch: size of the "batch" axis (None: inferred).
        expert: size of the "expert" axis (None: inferred).
        devices: the devices to use (default: every device,
            `keras.distribution.list_devices()`).

    Returns:
        A `keras.distribution.DeviceMesh` of shape (batch, expert).

    Example:
    ```python
    # Backend: jax
    from keras_e3 import distribution

    mesh = distribution.device_mesh(batch=1)  # every device on "expert"
    mesh.axis_names, mesh.shape
    ```
    """
    devices = list(kd.list_devices() if devices is None else devices)
    count = len(devices)
    if batch is None and expert is None:
        batch = 1
    for name, size in (("batch", batch), ("expert", expert)):
        if size is not None and (size < 1 or count % size):
            raise ValueError(
                f"A mesh axis {name}={size} does not divide the {count} "
                "devices available (pass devices=... to use fewer).")
    batch = count // expert if batch is None else batch
    expert = count // batch if expert is None else expert
    if batch * expert != count:
        raise ValueError(
            f"A mesh of batch={batch} x expert={expert} needs "
            f"{batch * expert} devices; {count} are available (pass "
            "devices=... to use fewer).")
    return kd.DeviceMesh((batch, expert), (BATCH_AXIS, EXPERT_AXIS), devices)


def expert_layout_map(mesh):
    """A `LayoutMap` sharding every MoE layer's experts along "expert".

    Expert kernels and biases are split on their leading (expert) axis; the
    expert buffers (the experts layer's output [E, G*C, H]) along "expert"
    and their token rows along "batch". Unlisted variables are replicated.

    Args:
        mesh: a ("batch", "expert") `DeviceMesh` (`device_mesh`).

    Returns:
        A `keras.distribution.LayoutMap`.

    Example:
    ```python
    # Backend: jax
    from keras_e3 import distribution

    layout_map = distribution.expert_layout_map(distribution.device_mesh())
    layout_map["encoderblock_1/moe/experts/kernel_0"].axes  # ("expert", None, None)
    ```
    """
    layout_map = kd.LayoutMap(mesh)
    for name, rank in _EXPERT_WEIGHTS.items():
        layout_map[_EXPERT_PATH + name] = (EXPERT_AXIS,) + (None,) * (rank - 1)
    layout_map[_EXPERT_PATH + "output"] = (EXPERT_AXIS, BATCH_AXIS, None)
    return layout_map


def expert_parallel(batch=None, expert=None, devices=None):
    """`ModelParallel` over a ("batch", "expert") mesh: experts sharded,
    batch split. Use as `with expert_parallel(...).scope(): build model`.
    JAX backend only.

    Args:
        batch: size of the "batch" axis (None: inferred).
        expert: size of the "expert" axis (None: inferred; E must be a
            multiple of it).
        devices: the devices to use (default: every device).

    Returns:
        A `keras.distribution.ModelParallel`.

    Example:
    ```python
    # Backend: jax
    import numpy as np

    from keras_e3 import distribution

    with distribution.expert_parallel(batch=1).scope():
        import keras_e3

        model = keras_e3.E3ViT.from_preset("e3_tiny_digits")
        model.predict(np.zeros((2, 16, 16, 3), np.uint8), verbose=0).shape
    ```
    """
    _require_jax("expert_parallel")
    mesh = device_mesh(batch, expert, devices)
    return kd.ModelParallel(layout_map=expert_layout_map(mesh),
                            batch_dim_name=BATCH_AXIS)


def data_parallel(devices=None):
    """`DataParallel`: the model replicated, the batch split over devices.
    JAX backend only.

    Args:
        devices: the devices to use (default: every device).

    Returns:
        A `keras.distribution.DataParallel`.

    Example:
    ```python
    # Backend: jax
    from keras_e3 import distribution

    dist = distribution.data_parallel()
    with dist.scope():
        pass  # build and compile the model here, then fit as usual
    ```
    """
    _require_jax("data_parallel")
    return kd.DataParallel(devices=devices)  # None: every device


def tf_data_parallel(devices=None):
    """`tf.distribute.MirroredStrategy` for the TensorFlow backend: build
    and compile the model inside `strategy.scope()`, then `fit` as usual.

    Args:
        devices: the devices to mirror on (default: every visible GPU, else
            the CPU).

    Returns:
        A `tf.distribute.MirroredStrategy`.

    Example:
    ```python
    # Backend: tensorflow
    from keras_e3 import distribution

    strategy = distribution.tf_data_parallel()
    with strategy.scope():
        pass  # build and compile the model here, then fit as usual
    strategy.num_replicas_in_sync
    ```
    """
    if keras.backend.backend() != "tensorflow":
        raise RuntimeError("tf_data_parallel needs KERAS_BACKEND=tensorflow; "
                           f"the backend is {keras.backend.backend()!r}.")
    import tensorflow as tf

    return tf.distribute.MirroredStrategy(devices)


def variable_shardings(model):
    """{variable path: sharding spec} of a model built under a distribution
    (a tuple of mesh axis names or None per dimension; JAX only).

    Args:
        model: a built Keras model.

    Returns:
        A dict from each variable's path to its sharding spec (None where
        the variable has none).

    Example:
    ```python
    # Backend: jax
    from keras_e3 import distribution

    with distribution.expert_parallel(batch=1).scope():
        import keras_e3

        model = keras_e3.E3ViT.from_preset("e3_tiny_digits")
    specs = distribution.variable_shardings(model)
    # ("expert", None, None) on a mesh of several devices (None on one):
    specs["encoderblock_1/moe/experts/kernel_0"]
    ```
    """
    specs = {}
    for variable in model.variables:
        sharding = getattr(variable.value, "sharding", None)
        spec = getattr(sharding, "spec", None)
        if spec is not None:
            spec = tuple(spec) + (None,) * (len(variable.shape) - len(spec))
        specs[variable.path] = spec
    return specs


def _require_jax(what):
    if keras.backend.backend() != "jax":
        raise RuntimeError(
            f"{what} uses keras.distribution, which shards models on the "
            f"JAX backend only (the backend is {keras.backend.backend()!r}). "
            "On TensorFlow use keras_e3.distribution.tf_data_parallel().")


def parameter_bytes_per_device(model, distribution=None):
    """Bytes of weights each device holds under `distribution` (default:
    the active one), from the layouts alone: works on an abstract model
    (`E3ViT.abstract_from_preset`) to plan a mesh before building it.

    Args:
        model: a Keras model (built, or abstract).
        distribution: a `keras.distribution.Distribution` (default: the
            active one; none: every weight whole).

    Returns:
        The number of bytes, an int.

    Example:
    ```python
    import keras_e3

    model = keras_e3.E3ViT.from_preset("e3_tiny_digits")

    from keras_e3 import distribution

    distribution.parameter_bytes_per_device(model)  # 4 bytes per fp32 weight
    ```
    """
    distribution = distribution or kd.distribution()
    total = 0
    for variable in model.weights:
        shape = list(variable.shape)
        layout = (distribution.get_variable_layout(variable)
                  if distribution is not None else None)
        if layout is not None:
            mesh = layout.device_mesh or distribution.device_mesh
            for i, axis in enumerate(layout.axes):
                if axis is not None:
                    shape[i] = -(-shape[i] // mesh.shape[
                        mesh.axis_names.index(axis)])
        total += math.prod(shape) * _dtype_bytes(variable.dtype)
    return total


def _dtype_bytes(dtype):
    bits = "".join(c for c in str(dtype) if c.isdigit())
    return int(bits) // 8 if bits else 1
