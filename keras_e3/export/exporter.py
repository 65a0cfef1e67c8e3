"""Export an E3ViT for serving: a TensorFlow SavedModel, ONNX or LiteRT.

`export_model(model, path, format)` writes the artefact atomically (into a
temporary path beside `path`, renamed at the end), from any backend that
can write that format (`SUPPORT`; anything else is an `ExportError` naming
the backend, the format and the reason). The artefact needs neither
keras_e3 nor Keras to run: plain TensorFlow (`tf.saved_model.load`), ONNX
Runtime or the LiteRT interpreter.

The batch size stays dynamic: routing groups and the padding of a partial
group are computed from symbolic shapes (`keras_e3.layers.moe.MoeMlp`),
so one artefact serves any batch size with the numbers of `model.predict`.

Where a format cannot express an op of the model's token dispatch
(`FORMAT_DISPATCHER`), the model is exported with the einsum reference
dispatcher instead: the same outputs (`keras_e3.layers.dispatch`).
"""

import os

import keras

from keras_e3.export.serving import serving_model
from keras_e3.io_utils import atomic_replace

FORMATS = ("saved_model", "onnx", "litert")
KERAS_FORMATS = {"saved_model": "tf_saved_model", "onnx": "onnx",
                 "litert": "litert"}
EXTENSIONS = {"saved_model": "", "onnx": ".onnx", "litert": ".tflite"}

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


class ExportError(ValueError):
    """This model, backend and format cannot be exported (the message
    says why)."""


def check_supported(format, backend=None):
    """Raises `ExportError` if `backend` (default: the current one) cannot
    export `format`."""
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
    or has no MoE layers."""
    backbone = model.backbone
    if dispatcher is None or not backbone.moe_layers or \
            backbone.dispatcher == dispatcher:
        return model
    config = model.get_config()
    config["backbone"] = dict(config["backbone"])
    config["backbone"]["config"] = dict(config["backbone"]["config"],
                                        dispatcher=dispatcher)
    clone = type(model).from_config(config)
    clone.set_weights(model.get_weights())
    for attr in ("preprocessor_config", "class_names"):
        if hasattr(model, attr):
            setattr(clone, attr, getattr(model, attr))
    return clone


def model_preprocessor_config(model):
    """The preprocessor config the model came with (a preset's
    preprocessor.json), else the default one for its input shape."""
    from keras_e3.presets.loader import preprocessor_config

    return {**preprocessor_config(model.backbone),
            **(getattr(model, "preprocessor_config", None) or {})}


def export_model(model, path, format="saved_model",
                 include_preprocessing=False, preprocessor=None,
                 verbose=False):
    """Exports `model` (an `E3ViT`) to `path`; returns `path`.

    Args:
        model: the E3ViT to export (`E3ViT.from_preset(...)`).
        path: the artefact: a directory for "saved_model", a file for
            "onnx" (.onnx) and "litert" (must end with .tflite). An existing
            one is replaced only once the new one is complete.
        format: "saved_model" (TensorFlow SavedModel, endpoint `serve`),
            "onnx" or "litert".
        include_preprocessing: False: the served function takes model-ready
            float32 images [B, *image_size, C] and returns the model's
            output (member logits [B, M, C] for E³, [B, C] otherwise).
            True: it takes raw uint8 images [B, H, W, C] (the preset's raw
            size, `keras_e3.export.serving.raw_image_shape`), applies the
            preset's preprocessing and returns {"member_logits" [B, M, C],
            "ensemble_probabilities" [B, C]}.
        preprocessor: the preprocessor config for include_preprocessing
            (default: the model's preset's, `model_preprocessor_config`).
    """
    check_supported(format)
    path = os.path.abspath(os.fspath(path))
    if format == "litert" and not path.endswith(".tflite"):
        raise ExportError(f"A LiteRT export is a .tflite file; got {path}.")
    if getattr(model, "backbone", None) is None:
        raise TypeError("export_model exports an E3ViT; got "
                        f"{type(model).__name__}.")
    model = with_dispatcher(model, FORMAT_DISPATCHER[format])
    target = model
    if include_preprocessing:
        target = serving_model(
            model, preprocessor or model_preprocessor_config(model))
    if not getattr(target, "_called", True):  # Keras' ONNX export asks
        spec = target.inputs[0]
        target(keras.ops.zeros((1, *spec.shape[1:]), dtype=spec.dtype))
    with atomic_replace(path, directory=format == "saved_model",
                        error=ExportError) as tmp:
        target.export(tmp, format=KERAS_FORMATS[format], verbose=verbose)
    return path


def export_preset(preset, path, format="saved_model",
                  include_preprocessing=False, verbose=False):
    """`export_model` of `E3ViT.from_preset(preset)` (its preprocessing is
    the preset's preprocessor.json)."""
    check_supported(format)
    from keras_e3.models.e3vit import E3ViT

    return export_model(E3ViT.from_preset(preset), path, format,
                        include_preprocessing=include_preprocessing,
                        verbose=verbose)
