"""The served functions of an export with preprocessing: raw images in,
member logits and ensemble probabilities out.

The raw images go through the model's own converter (`model.preprocessor`,
a `keras_e3.ImageConverter`), by its TensorFlow path
`ImageConverter.convert_tf`: the same ops as `model.predict` applies to
raw arrays (decode, channels, resize or resize_small + central_crop,
value_range). Nothing here re-implements the pipeline.

Served signatures:
- `images`: uint8 [B, H, W, C], any H and W (a batch of equal-size images,
  or a batch of one image of any size), C the model's channels;
- `encoded` (SavedModel only): tf.string [B], encoded image files (PNG,
  JPEG, GIF, BMP), each decoded and converted on its own, then stacked;
each returns {"member_logits": float32 [B, M, C] (M = 1 for a dense ViT
or V-MoE), "ensemble_probabilities": float32 [B, C] (mean_m of
softmax(member_logits))}.

Where a format's op set cannot express an op of the converter,
`check_graph_ops` raises an `ExportError` naming it. One op has an exact
substitute: TensorFlow's `ResizeArea` (vmoe's `resize_small`), which
tf2onnx silently turns into nearest-neighbour resampling and LiteRT lacks,
is written as two matrix products whose weights are computed in the graph
from the input's dynamic size (`resize_area_matmul`, the weights of
TensorFlow's kernel); see `portable_resize`.
"""


import keras

from keras_e3.export.errors import ExportError

MEMBER_LOGITS = "member_logits"
ENSEMBLE_PROBABILITIES = "ensemble_probabilities"
IMAGES = "images"
ENCODED = "encoded"

# TensorFlow ops a format cannot express (or, for ONNX, converts to
# something else), with why.
UNSUPPORTED_OPS = {
    "onnx": {
        "ResizeArea": "tf2onnx converts it to nearest-neighbour resampling",
        "DecodeImage": "ONNX has no image decoder",
        "DecodePng": "ONNX has no image decoder",
        "DecodeJpeg": "ONNX has no image decoder",
        "DecodeGif": "ONNX has no image decoder",
        "DecodeBmp": "ONNX has no image decoder",
    },
    "litert": {
        "ResizeArea": "LiteRT's built-in ops have no area resampling",
        "DecodeImage": "LiteRT's built-in ops have no image decoder",
        "DecodePng": "LiteRT's built-in ops have no image decoder",
        "DecodeJpeg": "LiteRT's built-in ops have no image decoder",
        "DecodeGif": "LiteRT's built-in ops have no image decoder",
        "DecodeBmp": "LiteRT's built-in ops have no image decoder",
    },
}


def model_converter(model):
    """`model.preprocessor` (its `ImageConverter`), or an `ExportError`
    when the model has none."""
    converter = getattr(model, "preprocessor", None)
    if converter is None:
        raise ExportError(
            "include_preprocessing=True needs the model's ImageConverter, "
            "and this model has none (model.preprocessor is None): build it "
            "with E3ViT(backbone, num_classes, preprocessor="
            "keras_e3.ImageConverter(...)), set model.preprocessor, or load "
            "a preset.")
    return converter


def model_image_shape(model):
    """(height, width, channels) of the model-ready images."""
    backbone = model.backbone
    height, width = backbone.embedding.image_size
    return int(height), int(width), int(backbone.num_channels)


def served_channels(model, converter):
    """Channels of the served uint8 images: the converter's, else the
    model's."""
    return int(converter.num_channels or model_image_shape(model)[2])


def ensemble_outputs(logits, ops):
    """Logits [B, C] or [B, M, C] -> {member logits [B, M, C], ensemble
    probabilities [B, C]}, with `ops` (`keras.ops` or a TensorFlow
    namespace offering expand_dims, softmax and mean)."""
    if len(logits.shape) == 2:
        logits = ops.expand_dims(logits, 1)
    probs = ops.mean(ops.softmax(logits, axis=-1), axis=1)
    return {MEMBER_LOGITS: logits, ENSEMBLE_PROBABILITIES: probs}


# ----------------------------------------------------------------------
# Area resampling with matrix products (ONNX, LiteRT).
def _area_weights(in_size, out_size):
    """[out, in] float32 weights of TensorFlow's ResizeArea along one axis,
    in-graph: output cell o covers [o * s, (o + 1) * s) of the input
    (s = in / out, float32 as the kernel); each input cell i is weighted by
    its overlap with it, over s. Cells past the edge (float rounding) fold
    onto the last one, as the kernel clamps them."""
    import tensorflow as tf

    f32 = tf.float32
    scale = tf.cast(in_size, f32) / tf.cast(out_size, f32)
    o = tf.cast(tf.range(out_size), f32)
    start, end = o * scale, (o + 1.0) * scale
    i = tf.cast(tf.range(in_size + 1), f32)
    start, end, i = start[:, None], end[:, None], i[None, :]
    overlap = tf.minimum(end, i + 1.0) - tf.maximum(start, i)
    # An output cell inside one input cell weighs it by s itself (not
    # end - start, which rounds differently), as the kernel does.
    overlap = tf.where((i < start) & (i + 1.0 > end), scale, overlap)
    weights = tf.maximum(overlap, 0.0) / scale
    return tf.concat([weights[:, :-2],
                      weights[:, -2:-1] + weights[:, -1:]], axis=1)


def resize_area_matmul(images, size):
    """`tf.compat.v1.image.resize_area(images, size)` as two matrix
    products (ops ONNX and LiteRT have): [B, H, W, C] -> float32
    [B, *size, C]; `size` may be dynamic.

    Args:
        images: images [B, H, W, C] (a TensorFlow tensor).
        size: (height, width) of the output.

    Returns:
        float32 images [B, *size, C].

    Example:
    ```python
    # Backend: tensorflow
    import tensorflow as tf

    from keras_e3 import export

    images = tf.random.uniform((1, 6, 9, 3))
    export.resize_area_matmul(images, (2, 3)).shape  # (1, 2, 3, 3)
    ```
    """
    import tensorflow as tf

    x = tf.cast(images, tf.float32)
    shape = tf.shape(x)
    rows = _area_weights(shape[1], size[0])  # [H', H]
    cols = _area_weights(shape[2], size[1])  # [W', W]
    x = tf.transpose(x, [0, 3, 1, 2])  # [B, C, H, W]
    x = tf.matmul(x, cols, transpose_b=True)  # [B, C, H, W']
    x = tf.matmul(rows, x)  # [B, C, H', W']
    return tf.transpose(x, [0, 2, 3, 1])


def _static_ensure_shape(x, shape, name=None):
    """`tf.ensure_shape` without its runtime op (LiteRT has none): the
    static shape only."""
    import tensorflow as tf

    x = tf.identity(x, name=name)
    x.set_shape(shape)
    return x


def portable_resize(x, size, interpolation):
    """The converter's resampling in ops ONNX and LiteRT express (its
    `convert_tf(..., resize_fn=portable_resize)`): area resampling as
    `resize_area_matmul`, bilinear resampling given float32 (LiteRT resizes
    float32 only; TensorFlow's kernel computes in float32 from any input
    dtype, so it is the same resampling)."""
    import tensorflow as tf

    from keras_e3.preprocessing.image_converter import _resize_tf

    if interpolation == "area":
        return resize_area_matmul(x, size)
    return _resize_tf(tf.cast(x, tf.float32), size, interpolation)


def check_graph_ops(graph, format):
    """Raises `ExportError` naming each op of `graph` (a tf.Graph) that
    `format` cannot express (`UNSUPPORTED_OPS`)."""
    definition = graph.as_graph_def()
    types = {node.op for node in definition.node}
    for function in definition.library.function:
        types.update(node.op for node in function.node_def)
    unsupported = UNSUPPORTED_OPS.get(format, {})
    found = {op: unsupported[op] for op in types if op in unsupported}
    if found:
        ops = "; ".join(f"{op} ({why})" for op, why in sorted(found.items()))
        raise ExportError(f"Cannot export the preprocessing to {format!r}: "
                          f"its op set cannot express {ops}.")


# ----------------------------------------------------------------------
# Keras serving model (TensorFlow backend: ONNX and LiteRT).
class ConvertImages(keras.layers.Layer):
    """`converter.convert_tf` as a layer (TensorFlow backend), with
    `portable_resize` if `portable`."""

    def __init__(self, converter, output_shape, portable=False, **kwargs):
        super().__init__(**kwargs)
        self._converter = [converter]  # not tracked: no weights
        self._output_shape = tuple(output_shape)
        self.portable = portable

    def call(self, images):
        x = self._converter[0].convert_tf(
            images, resize_fn=portable_resize if self.portable else None)
        return _static_ensure_shape(x, [None, *self._output_shape])

    def compute_output_spec(self, images):
        return keras.KerasTensor((images.shape[0], *self._output_shape),
                                 dtype="float32")


class ServingOutputs(keras.layers.Layer):
    """Logits [B, C] or [B, M, C] -> `ensemble_outputs`."""

    def call(self, logits):
        return ensemble_outputs(logits, keras.ops)

    def compute_output_spec(self, logits):
        shape = tuple(logits.shape)
        if len(shape) == 2:
            shape = (shape[0], 1, shape[1])
        return {MEMBER_LOGITS: keras.KerasTensor(shape, dtype="float32"),
                ENSEMBLE_PROBABILITIES: keras.KerasTensor(
                    (shape[0], shape[-1]), dtype="float32")}


def serving_model(model, portable=False):
    """A functional model (TensorFlow backend): raw uint8 images
    [B, None, None, C] -> `model.preprocessor.convert_tf` -> `model` ->
    {"member_logits", "ensemble_probabilities"}; `portable`: the
    converter's resampling `portable_resize` (for ONNX and LiteRT).

    Args:
        model: an `E3ViT` with a `preprocessor`.
        portable: resample with ops ONNX and LiteRT have.

    Returns:
        A `keras.Model`.

    Example:
    ```python
    # Backend: tensorflow
    import numpy as np

    import keras_e3
    from keras_e3 import export

    model = keras_e3.E3ViT.from_preset("vit_tiny_digits")
    served = export.serving_model(model)
    outputs = served(np.zeros((2, 30, 20, 1), np.uint8))
    outputs["ensemble_probabilities"].shape  # (2, 10)
    ```
    """
    converter = model_converter(model)
    shape = model_image_shape(model)
    images = keras.Input((None, None, served_channels(model, converter)),
                         dtype="uint8", name=IMAGES)
    x = ConvertImages(converter, shape, portable,
                      name="image_converter")(images)
    outputs = ServingOutputs(name="outputs")(model(x))
    return keras.Model(images, outputs, name=f"{model.name}_serving")


# ----------------------------------------------------------------------
# SavedModel (TensorFlow and JAX backends).
def served_module(ready, model):
    """A tf.Module serving raw images with `model`'s converter in front of
    `ready` (the model-ready SavedModel Keras exported from `model`,
    loaded with `tf.saved_model.load`; its `serve` takes float32
    [B, *image_size, C]). Its `serve` takes uint8 images, its
    `serve_encoded` encoded image bytes (see the module docstring);
    `served_signatures(module)` names them for `tf.saved_model.save`."""
    import tensorflow as tf

    converter = model_converter(model)
    height, width, channels = model_image_shape(model)
    image_spec = tf.TensorSpec([height, width, channels], tf.float32)

    def convert(images):
        return tf.ensure_shape(converter.convert_tf(images),
                               [None, height, width, channels])

    def outputs(x):
        return ensemble_outputs(ready.serve(x), _TF_OPS)

    module = tf.Module()
    module.ready = ready  # owns the model's variables

    @tf.function(input_signature=[tf.TensorSpec(
        [None, None, None, served_channels(model, converter)], tf.uint8,
        name=IMAGES)])
    def serve(images):
        return outputs(convert(images))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string,
                                                name=ENCODED)])
    def serve_encoded(encoded):
        x = tf.map_fn(
            lambda data: tf.ensure_shape(converter.convert_tf(data),
                                         image_spec.shape),
            encoded, fn_output_signature=image_spec)
        return outputs(x)

    module.serve = serve
    module.serve_encoded = serve_encoded
    return module


def served_signatures(module):
    """The signatures `tf.saved_model.save` gives `served_module`'s
    functions: "serving_default" (uint8 images) and "serve_encoded"."""
    return {"serving_default": module.serve,
            "serve_encoded": module.serve_encoded}


class _TFOps:
    """The three ops `ensemble_outputs` needs, in TensorFlow."""

    @staticmethod
    def expand_dims(x, axis):
        import tensorflow as tf

        return tf.expand_dims(x, axis)

    @staticmethod
    def softmax(x, axis):
        import tensorflow as tf

        return tf.nn.softmax(x, axis=axis)

    @staticmethod
    def mean(x, axis):
        import tensorflow as tf

        return tf.reduce_mean(x, axis=axis)


_TF_OPS = _TFOps()
