"""Export an E3ViT for serving: a TensorFlow SavedModel, ONNX or LiteRT.

`export_model(model, path)` writes the artefact atomically (into a
temporary path beside `path`, renamed at the end), in the format its name
says (`.onnx`: ONNX, `.tflite`: LiteRT, anything else: a SavedModel
directory) unless `format` says otherwise, from any backend that can write
that format (`SUPPORT`; anything else is an `ExportError` naming the
backend, the format and the reason). The artefact needs neither keras_e3
nor Keras to run: plain TensorFlow (`tf.saved_model.load`), ONNX Runtime
or the LiteRT interpreter.

The batch size stays dynamic: routing groups and the padding of a partial
group are computed from symbolic shapes (`keras_e3.layers.moe.MoeMlp`),
so one artefact serves any batch size with the numbers of `model.predict`.

Where a format cannot express an op of the model's token dispatch
(`FORMAT_DISPATCHER`), the model is exported with the einsum reference
dispatcher instead: the same outputs (`keras_e3.layers.dispatch`).

With `include_preprocessing=True` the served functions take raw images
and apply the model's own converter (`model.preprocessor.convert_tf`):
see `keras_e3.export.serving` for the signatures.
"""

import os
import tempfile

import keras

from keras_e3.export import serving
from keras_e3.export.errors import ExportError
from keras_e3.io_utils import atomic_replace

FORMATS = ("saved_model", "onnx", "litert")
KERAS_FORMATS = {"saved_model": "tf_saved_model", "onnx": "onnx",
                 "litert": "litert"}
EXTENSIONS = {"saved_model": "", "onnx": ".onnx", "litert": ".tflite"}
FORMAT_NAMES = {"saved_model": "A SavedModel is a directory",
                "onnx": "An ONNX export is a .onnx file",
                "litert": "A LiteRT export is a .tflite file"}

# (format, backend) -> why it cannot export (absent: it can).
SUPPORT = {
    ("saved_model", "torch"): (
        "Keras writes a TensorFlow SavedModel only from the TensorFlow and "
        "JAX backends; export from one of those (the weights are the same "
        "files), or use format='onnx'"),
    ("litert", "jax"): (
        "Keras converts to LiteRT only from the TensorFlow and PyTorch "
        "backends; export from TensorFlow (the weights are the same files)"),
    ("onnx", "jax"): (
        "Keras converts JAX models to ONNX with jax2onnx, which keras-e3 "
        "does not install (it pulls flax, optax and orbax) and has not "
        "checked on the routing ops; export from TensorFlow (the weights "
        "are the same files)"),
    ("onnx", "torch"): (
        "Keras' PyTorch ONNX exporter traces the model at one fixed batch "
        "size, and the number of routing groups and the padding of the last "
        "one become constants of that trace, so the artefact would not "
        "serve other batch sizes; export from TensorFlow"),
    ("litert", "torch"): (
        "Keras' PyTorch LiteRT exporter (litert-torch, not installed by "
        "keras-e3) converts at one fixed batch size, and the routing groups "
        "depend on the batch size; export from TensorFlow"),
}

# The dispatcher each format exports with (None: the model's own). LiteRT's
# built-in ops lack the strided slices and scatter of the gather path
# (the converter falls back to TensorFlow "Flex" ops that the plain LiteRT
# interpreter cannot run): the einsum reference only needs matmuls,
# comparisons and cumulative sums.
FORMAT_DISPATCHER = {"saved_model": None, "onnx": None, "litert": "einsum"}


def check_supported(format, backend=None):
    """Raises `ExportError` if `backend` (default: the current one) cannot
    export `format`.

    Args:
        format: "saved_model", "onnx" or "litert" (`FORMATS`).
        backend: a Keras backend name (default: the current one).

    Raises:
        ExportError: with the reason and what to do instead.

    Example:
    ```python
    from keras_e3 import export

    export.check_supported("saved_model", backend="tensorflow")  # no error
    try:
        export.check_supported("saved_model", backend="torch")
    except export.ExportError as error:
        print(error)
    ```
    """
    backend = backend or keras.backend.backend()
    if format not in FORMATS:
        raise ExportError(f"Unknown export format {format!r}; expected one "
                          f"of {FORMATS}.")
    reason = SUPPORT.get((format, backend))
    if reason:
        raise ExportError(f"Cannot export format {format!r} from the "
                          f"{backend!r} backend: {reason}.")


def with_dispatcher(model, dispatcher):
    """`model` (an E3ViT) rebuilt with another token dispatcher, sharing
    nothing but the weights' values; `model` itself if it already uses it
    or has no MoE layers.

    Args:
        model: an `E3ViT`.
        dispatcher: "auto", "gather", "einsum", or None (`model`).

    Returns:
        An `E3ViT`.

    Example:
    ```python
    import numpy as np

    import keras_e3
    from keras_e3 import export

    model = keras_e3.E3ViT.from_preset("e3_tiny_digits")
    einsum = export.with_dispatcher(model, "einsum")
    raw = np.zeros((1, 8, 8, 1), np.uint8)
    np.abs(einsum.predict(raw, verbose=0)
           - model.predict(raw, verbose=0)).max()  # 0 up to fp32 rounding
    ```
    """
    backbone = model.backbone
    if dispatcher is None or not backbone.moe_layers or \
            backbone.dispatcher == dispatcher:
        return model
    config = model.get_config()
    config["backbone"] = dict(config["backbone"])
    config["backbone"]["config"] = dict(config["backbone"]["config"],
                                        dispatcher=dispatcher)
    clone = type(model).from_config(config)
    clone.set_weights(model.get_weights())  # the config carries the
    return clone  # converter and the class names


def format_from_path(path, format=None):
    """The export format of `path`: `format` if given (it must agree with
    the name: .onnx is ONNX, .tflite LiteRT, anything else a SavedModel
    directory), else the one its extension names.

    Args:
        path: the artefact's path.
        format: "saved_model", "onnx", "litert" or None.

    Returns:
        The format.

    Raises:
        ExportError: for an unknown format, or one the name disagrees with.

    Example:
    ```python
    from keras_e3 import export

    export.format_from_path("model.onnx")  # "onnx"
    export.format_from_path("served")  # "saved_model"
    ```
    """
    name = os.fspath(path).rstrip("/\\")
    ext = os.path.splitext(name)[1].lower()
    named = next((f for f, e in EXTENSIONS.items() if e and e == ext),
                 "saved_model")
    if format is None:
        return named
    if format not in FORMATS:
        raise ExportError(f"Unknown export format {format!r}; expected one "
                          f"of {FORMATS}.")
    if format != named:
        rename = (f"without {ext}" if format == "saved_model"
                  else f"with {EXTENSIONS[format]}")
        raise ExportError(
            f"{FORMAT_NAMES[format]}; got {os.fspath(path)!r}, whose name "
            f"says {named!r}. Name it {rename}, or leave the format out.")
    return format


def export_model(model, path, format=None, include_preprocessing=False,
                 verbose=False):
    """Exports `model` (an `E3ViT`) to `path`; returns `path`.

    Args:
        model: the E3ViT to export (`E3ViT.from_preset(...)`).
        path: the artefact: a directory for a SavedModel, a .onnx file for
            ONNX, a .tflite file for LiteRT. An existing one is replaced
            only once the new one is complete.
        format: "saved_model" (TensorFlow SavedModel), "onnx" or "litert";
            None (default): the one `path`'s extension names. A format
            that contradicts the extension is an `ExportError`.
        include_preprocessing: False: the served function takes model-ready
            float32 images [B, *image_size, C] and returns the model's
            output (member logits [B, M, C] for E³, [B, C] otherwise).
            True: the model's own converter (`model.preprocessor`, an
            `ImageConverter`; an `ExportError` if it has none) is part of
            the graph. The served function takes raw uint8 images
            [B, H, W, C] of any height and width (C: the converter's
            channels) and returns {"member_logits" [B, M, C],
            "ensemble_probabilities" [B, C]} (M = 1 for a dense ViT or
            V-MoE); a SavedModel's `serve` (signature "serving_default")
            is that function and its `serve_encoded` (signature
            "serve_encoded") takes encoded image files, tf.string [B].
            Where a format's ops cannot express the converter, an
            `ExportError` names the op.
        verbose: print Keras' export messages.

    Returns:
        The absolute path written.

    Example:
    ```python
    # Backend: tensorflow
    import numpy as np
    import tensorflow as tf

    import keras_e3
    from keras_e3 import export

    model = keras_e3.E3ViT.from_preset("vit_tiny_digits")
    export.export_model(model, "served", include_preprocessing=True)
    served = tf.saved_model.load("served")
    served.serve(tf.zeros((1, 30, 20, 1), tf.uint8))["member_logits"].shape
    # (1, 1, 10)
    ```
    """
    format = format_from_path(path, format)
    if getattr(model, "backbone", None) is None:
        raise TypeError("export_model exports an E3ViT; got "
                        f"{type(model).__name__}.")
    if include_preprocessing:
        serving.model_converter(model)  # an ExportError without one
    check_supported(format)
    path = os.path.abspath(os.fspath(path))
    model = with_dispatcher(model, FORMAT_DISPATCHER[format])
    if not getattr(model, "_called", True):  # Keras' ONNX export asks
        spec = model.inputs[0]
        model(keras.ops.zeros((1, *spec.shape[1:]), dtype=spec.dtype))
    if include_preprocessing and format == "saved_model":
        _export_served_saved_model(model, path, verbose)
        return path
    target, kwargs = model, {}
    if include_preprocessing:
        target = serving.serving_model(model, portable=True)
        _check_ops(target, format)
    if format == "litert":  # built-in ops only: the plain interpreter
        import tensorflow as tf

        kwargs["target_spec"] = {
            "supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS]}
    with atomic_replace(path, directory=format == "saved_model",
                        error=ExportError) as tmp:
        try:
            target.export(tmp, format=KERAS_FORMATS[format], verbose=verbose,
                          **kwargs)
        except ExportError:
            raise
        except Exception as e:
            if format != "litert" or "not supported" not in str(e):
                raise
            raise ExportError(f"Cannot convert the model to LiteRT's "
                              f"built-in ops: {e}") from e
    return path


def _check_ops(target, format):
    """`serving.check_graph_ops` on `target`'s traced graph (TensorFlow
    backend)."""
    import tensorflow as tf

    spec = target.inputs[0]
    fn = tf.function(lambda x: target(x, training=False))
    graph = fn.get_concrete_function(
        tf.TensorSpec(spec.shape, spec.dtype)).graph
    serving.check_graph_ops(graph, format)


def _export_served_saved_model(model, path, verbose):
    """The model-ready SavedModel Keras writes, loaded and wrapped in
    `serving.served_module` (the converter's TensorFlow ops in front)."""
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as work:
        ready_path = os.path.join(work, "ready")
        model.export(ready_path, format="tf_saved_model", verbose=False)
        ready = tf.saved_model.load(ready_path)
        module = serving.served_module(ready, model)
        with atomic_replace(path, directory=True, error=ExportError) as tmp:
            # Serving only: the gradients of the restored model (jax2tf's
            # custom gradients on JAX) are not re-saved.
            tf.saved_model.save(
                module, tmp, signatures=serving.served_signatures(module),
                options=tf.saved_model.SaveOptions(
                    experimental_custom_gradients=False))
    if verbose:
        print(f"Saved the served functions (serve, serve_encoded) to {path}")


def export_preset(preset, path, format=None, include_preprocessing=False,
                  verbose=False):
    """`export_model` of `E3ViT.from_preset(preset)` (with preprocessing:
    the preset's converter).

    Args:
        preset: a preset name or directory.
        path, format, include_preprocessing, verbose: as `export_model`.

    Returns:
        The absolute path written.

    Example:
    ```python
    # Backend: tensorflow
    from keras_e3 import export

    export.export_preset("vit_tiny_digits", "served")
    ```
    """
    format = format_from_path(path, format)
    check_supported(format)
    from keras_e3.models.e3vit import E3ViT

    return export_model(E3ViT.from_preset(preset), path, format,
                        include_preprocessing=include_preprocessing,
                        verbose=verbose)
