"""ImageConverter: raw images -> model-ready float32 [B, H, W, C].

Accepts uint8 or float arrays of any size (one image [H, W, C] or [H, W],
a batch [B, H, W, C] or a batch of gray images [B, H, W]), lists of them
(sizes may differ), file paths, encoded bytes (PNG, JPEG, ...; decoded on
the host with Pillow) and PIL images. In order it

1. converts channels, by one rule on every path: gray -> RGB repeats the
   channel; RGB or RGBA -> gray is the ITU-R 601 luma 0.2989 R + 0.5870 G
   + 0.1140 B (`tf.image.rgb_to_grayscale`'s weights, in float32, integer
   images rounded half to even back to their dtype); alpha is dropped
   (RGBA -> RGB, gray + alpha -> gray); other channel counts are a
   ValueError. Files are decoded with their own channels first (Pillow on
   the host, `tf.io.decode_image` in a graph), then this rule applies;
2. resizes: to `image_size` directly, or, with `smaller_side`, the smaller
   side to `smaller_side` (aspect ratio kept, sides rounded half to even as
   `tf.round`) and then crops the centre to `image_size` (offsets
   (size - crop) // 2); with `interpolation` "bilinear" (TensorFlow's
   `tf.image.resize`: half-pixel centres, no antialiasing) or "area"
   (`tf.compat.v1.image.resize_area`);
3. with `cast_to_input_dtype`, casts the resized image back to the input's
   dtype (truncation for uint8), as vmoe's `resize` op does;
4. maps `input_range` linearly onto `value_range` (float32).

`ImageConverter.from_vmoe_process("decode|resize_small(256)|"
"central_crop(224)|value_range(-1,1)")` builds the converter of a vmoe
evaluation pipeline; its outputs equal vmoe's (TensorFlow's resampling is
reproduced, not approximated).

Where it runs: on NumPy inputs and every host input the conversion is
NumPy (any Keras backend, no TensorFlow needed) and returns a NumPy array;
on `tf.Tensor`s inside a `tf.data` map (graph mode) it uses TensorFlow's
own ops (string tensors are decoded as encoded images, by
`tf.io.decode_image` with their own channels, JPEGs with libjpeg's
accurate integer DCT as Pillow decodes them, then the channel rule).

Pixels are checked before anything else (uint8 images only by a converter
of a range narrower than 0..255, e.g. an older 0..16 digits preset):
non-finite values, and values more than 0.25% of the range outside
`input_range` (e.g. images already scaled to [-1, 1], or 16-bit values,
given to a 0-255 converter), are a ValueError rather than silently wrong
model inputs; so are non-uint8 images that look like [0, 1] or [0, 16]
pixels (scikit-learn's digits) given to a 0-255 converter. Float batches of
the model's size already in `value_range` are model-ready
(`is_model_ready`), except [0, 1] values for a [-1, 1] model: ambiguous,
a ValueError telling what to pass. Inside a graph the same checks are
assertions.
"""

import ast
import io
import os

import keras
import numpy as np

INTERPOLATIONS = ("bilinear", "area")
# ITU-R 601 luma, the weights of tf.image.rgb_to_grayscale: RGB -> gray.
LUMA = (0.2989, 0.5870, 0.1140)
# Float inputs may stray this share of the input range outside it (a
# resampling overshoot), not more: [-1, 1] images given to a 0-255
# converter are refused.
INPUT_TOLERANCE = 0.0025
# Model-ready images may stray 1% of the value range outside it.
READY_TOLERANCE = 0.01
VMOE_OPS = ("decode", "resize", "resize_small", "central_crop",
            "value_range")


@keras.saving.register_keras_serializable(package="keras_e3")
class ImageConverter(keras.layers.Layer):
    """Raw images -> model-ready float32 images (see the module docstring).

    Args:
        image_size: int or (height, width) of the outputs; None keeps the
            input size (then only channels and values are converted).
        num_channels: channels the model takes (1 or 3 usually); None
            keeps the input's.
        smaller_side: if set, resize the smaller side to this (aspect ratio
            kept) and crop the centre to `image_size`.
        interpolation: "bilinear" or "area".
        cast_to_input_dtype: cast the resized image back to the input dtype
            (vmoe's `resize`: uint8 truncation).
        input_range: (low, high) of the raw pixel values.
        value_range: (low, high) the model takes.

    Example:
    ```python
    import numpy as np

    import keras_e3

    converter = keras_e3.ImageConverter(image_size=32, num_channels=3)
    converter(np.zeros((50, 40, 1), np.uint8)).shape  # (1, 32, 32, 3)
    ```
    """

    def __init__(self, image_size=None, num_channels=3, smaller_side=None,
                 interpolation="bilinear", cast_to_input_dtype=False,
                 input_range=(0.0, 255.0), value_range=(-1.0, 1.0),
                 **kwargs):
        kwargs.setdefault("dtype", "float32")
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        self.image_size = None if image_size is None else _pair(
            image_size, "image_size")
        if num_channels is not None and int(num_channels) < 1:
            raise ValueError(f"num_channels must be >= 1; got "
                             f"{num_channels}.")
        self.num_channels = None if num_channels is None else int(
            num_channels)
        if smaller_side is not None:
            smaller_side = int(smaller_side)
            if smaller_side < 1:
                raise ValueError("smaller_side must be >= 1; got "
                                 f"{smaller_side}.")
            if self.image_size is not None and smaller_side < min(
                    self.image_size):
                raise ValueError(
                    f"smaller_side={smaller_side} is smaller than the crop "
                    f"{self.image_size}: the centre crop would not fit.")
        self.smaller_side = smaller_side
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}"
                             f"; got {interpolation!r}.")
        self.interpolation = interpolation
        self.cast_to_input_dtype = bool(cast_to_input_dtype)
        self.input_range = _range(input_range, "input_range")
        self.value_range = _range(value_range, "value_range")
        self.built = True

    # ------------------------------------------------------------------
    # Construction from other descriptions.
    @classmethod
    def from_vmoe_process(cls, process, num_channels=None):
        """The converter of a vmoe process string.

        Args:
            process: ops `decode`, `resize`, `resize_small`, `central_crop`,
                `value_range`, written as vmoe's `parse_call` reads them,
                e.g. "decode|resize_small(256)|central_crop(224)|"
                "value_range(-1,1)".
            num_channels: the model's channels. None: `decode`'s
                (`decode(channels=1)`, else vmoe's default 3). A `decode`
                naming other channels than `num_channels` is a ValueError.

        Returns:
            An `ImageConverter`.

        Example:
        >>> c = ImageConverter.from_vmoe_process(
        ...     "decode|resize_small(40)|central_crop(32)|value_range(-1,1)",
        ...     num_channels=1)
        >>> (c.smaller_side, c.image_size, c.num_channels, c.interpolation)
        (40, (32, 32), 1, 'area')
        """
        kwargs = {"num_channels": num_channels, "value_range": None}
        seen = []
        for op, args, kw in parse_process(process):
            if op not in VMOE_OPS:
                raise ValueError(
                    f"Unsupported op {op!r} in vmoe process {process!r}: "
                    f"an ImageConverter understands {', '.join(VMOE_OPS)}.")
            if seen and op == "decode":
                raise ValueError(f"decode must come first in {process!r}.")
            if "value_range" in seen:
                raise ValueError(f"value_range must be the last op in "
                                 f"{process!r}.")
            if op in seen:
                raise ValueError(f"{op} appears twice in {process!r}.")
            seen.append(op)
            _apply_vmoe_op(kwargs, op, args, kw, process)
        if "resize" in seen and ("resize_small" in seen
                                 or "central_crop" in seen):
            raise ValueError(f"{process!r}: resize cannot be combined with "
                             "resize_small / central_crop here.")
        if "central_crop" in seen and "resize_small" not in seen:
            raise ValueError(f"{process!r}: central_crop is supported after "
                             "resize_small only.")
        if kwargs["num_channels"] is None:
            kwargs["num_channels"] = 3  # vmoe's decode default
        if kwargs["value_range"] is None:
            # Without value_range, vmoe feeds the model the 0-255 values.
            kwargs["value_range"] = kwargs.get("input_range", (0.0, 255.0))
        return cls(**kwargs)

    @classmethod
    def from_preset_config(cls, config, image_size=None, num_channels=None):
        """From a preset's preprocessor.json: the converter's Keras
        serialisation, or the older flat dict {image_size, num_channels,
        value_range[, source_range, interpolation]} (extra keys ignored).
        `image_size` / `num_channels` (the model's) fill in what the file
        leaves out."""
        if isinstance(config, ImageConverter):
            return config
        if not isinstance(config, dict):
            raise ValueError("A preprocessor config must be a dict; got "
                             f"{type(config).__name__}.")
        if "class_name" in config:
            if config["class_name"] != cls.__name__:
                raise ValueError(f"preprocessor config describes "
                                 f"{config['class_name']!r}, not an "
                                 f"{cls.__name__}.")
            return cls.from_config(dict(config.get("config") or {}))
        kwargs = {"image_size": config.get("image_size", image_size),
                  "num_channels": config.get("num_channels", num_channels),
                  "value_range": config.get("value_range", (-1.0, 1.0)),
                  "input_range": config.get("source_range", (0.0, 255.0)),
                  "interpolation": config.get("interpolation", "bilinear")}
        return cls(**kwargs)

    def preprocessor_config(self):
        """The flat dict older code reads (`image_size`, `num_channels`,
        `value_range`, `source_range`, `interpolation`)."""
        return {"image_size": None if self.image_size is None
                else list(self.image_size),
                "num_channels": self.num_channels,
                "value_range": list(self.value_range),
                "source_range": list(self.input_range),
                "interpolation": self.interpolation}

    def with_image_size(self, image_size):
        """A copy producing `image_size` (a centre crop's `smaller_side`
        scaled by the same factor)."""
        config = self.get_config()
        size = _pair(image_size, "image_size")
        if self.smaller_side is not None and self.image_size is not None:
            factor = min(size) / min(self.image_size)
            config["smaller_side"] = max(int(round(self.smaller_side
                                                   * factor)), min(size))
        config["image_size"] = list(size)
        return type(self).from_config(config)

    def process_string(self):
        """A vmoe-style description of the pipeline."""
        ops = ["decode"]
        if self.smaller_side is not None:
            ops.append(f"resize_small({self.smaller_side})")
            if self.image_size is not None:
                ops.append("central_crop(%d,%d)" % self.image_size)
        elif self.image_size is not None:
            method = ("" if self.interpolation == "bilinear"
                      else f", method='{self.interpolation}'")
            ops.append("resize((%d,%d)%s)" % (*self.image_size, method))
        lo, hi = self.value_range
        in_lo, in_hi = self.input_range
        ops.append(f"value_range({lo:g},{hi:g},{in_lo:g},{in_hi:g})")
        return "|".join(ops)

    def get_config(self):
        config = super().get_config()
        config.update({
            "image_size": None if self.image_size is None
            else list(self.image_size),
            "num_channels": self.num_channels,
            "smaller_side": self.smaller_side,
            "interpolation": self.interpolation,
            "cast_to_input_dtype": self.cast_to_input_dtype,
            "input_range": list(self.input_range),
            "value_range": list(self.value_range),
        })
        return config

    # ------------------------------------------------------------------
    # Conversion.
    def __call__(self, images):
        return self.call(images)

    def call(self, images):
        if _is_symbolic_tf(images):
            return self.convert_tf(images)
        return self.convert(images)

    def compute_output_shape(self, input_shape):
        size = self.image_size or tuple(input_shape[-3:-1])
        channels = self.num_channels or input_shape[-1]
        return (input_shape[0], *size, channels)

    def is_model_ready(self, images):
        """True if `images` are already what the model takes: a float
        batch [B, H, W, C] of `image_size` and `num_channels`, with values
        within `value_range` (1% tolerance)."""
        if isinstance(images, (str, bytes, os.PathLike, list, tuple)):
            return False
        if not hasattr(images, "shape") or not hasattr(images, "dtype"):
            return False
        shape = tuple(images.shape)
        if len(shape) != 4 or self.image_size is None or \
                shape[1:3] != self.image_size or (
                    self.num_channels is not None
                    and shape[3] != self.num_channels):
            return False
        if _is_symbolic_tf(images):
            return images.dtype.is_floating
        if not np.issubdtype(np.dtype(_dtype_name(images)), np.floating):
            return False
        x = _to_numpy(images)
        if x.size == 0:
            return True
        lo, hi = self.value_range
        tol = READY_TOLERANCE * (hi - lo)
        ready = bool(np.isfinite(x).all() and x.min() >= lo - tol
                     and x.max() <= hi + tol)
        if ready and self._checks_ambiguity() and \
                x.min() >= 0.0 and 0.0 < x.max() <= 1.0:
            raise ValueError(
                f"Float images of the model's size with values in "
                f"[{float(x.min()):g}, {float(x.max()):g}]: "
                + self._ambiguity_message())
        return ready

    def _checks_ambiguity(self):
        return self.value_range[0] < 0.0 and self.input_range[1] > 1.0

    def _ambiguity_message(self):
        lo, hi = self.value_range
        return (f"these look like pixels scaled to [0, 1], not model inputs "
                f"in [{lo:g}, {hi:g}] (which they would be taken for). Give "
                f"raw pixels (uint8 0..255, or floats in "
                f"[{self.input_range[0]:g}, {self.input_range[1]:g}]); to "
                f"feed model inputs as they are, call the model directly "
                f"(model(x) or model.predict_on_batch(x)).")

    def ready_or_convert(self, images):
        """`images` unchanged if `is_model_ready`, else converted: the
        host door's rule (`ready_or_convert_tf` is its graph twin)."""
        if self.is_model_ready(images):
            return images
        return self.convert(images)

    def ready_or_convert_tf(self, x, shape):
        """`is_model_ready` and `convert_tf` in one graph: a batch
        [B, H, W, C] (TensorFlow) through the converter, unless it is a
        float batch of the model's input `shape` (H, W, C) already in
        `value_range` (fed as it is); the ambiguous [0, 1] floats are an
        assertion. Returns float32 [B, *shape]."""
        import tensorflow as tf

        static = x.shape[1:]
        compatible = all(d is None or d == e for d, e in zip(static, shape))
        if not x.dtype.is_floating or not compatible:
            out = tf.cast(self.convert_tf(x), tf.float32)
            out.set_shape([None, *shape])
            return out
        lo, hi = self.value_range
        tol = READY_TOLERANCE * (hi - lo)

        def value_ready():
            f = tf.cast(x, tf.float32)
            x_min, x_max = tf.reduce_min(f), tf.reduce_max(f)
            ready = tf.logical_and(tf.reduce_all(tf.math.is_finite(f)),
                                   tf.logical_and(x_min >= lo - tol,
                                                  x_max <= hi + tol))
            if self._checks_ambiguity():
                scaled = tf.logical_and(x_min >= 0.0, tf.logical_and(
                    x_max > 0.0, x_max <= 1.0))
                check = tf.debugging.Assert(
                    tf.logical_not(tf.logical_and(ready, scaled)),
                    ["Float images of the model's size with values in "
                     "[0, 1]: " + self._ambiguity_message()])
                with tf.control_dependencies([check]):
                    ready = tf.identity(ready)
            return ready

        shape_ok = tf.reduce_all(tf.equal(tf.shape(x)[1:], list(shape)))
        ready = tf.cond(shape_ok, value_ready, lambda: tf.constant(False))
        out = tf.cond(ready, lambda: tf.cast(x, tf.float32),
                      lambda: tf.cast(self.convert_tf(x), tf.float32))
        out.set_shape([None, *shape])
        return out

    def convert(self, images):
        """Host conversion (NumPy): any supported input -> float32 NumPy
        [B, H, W, C]. Always a batch, also for one image."""
        items = _as_images(images)
        if isinstance(items, np.ndarray):  # one array [B, H, W, C]
            return self._convert_batch(items)
        outputs = [self._convert_batch(x) for x in items]
        shapes = {o.shape[1:] for o in outputs}
        if len(shapes) > 1:
            raise ValueError(
                "Images of different sizes cannot form one batch: give the "
                f"converter an image_size (got sizes {sorted(shapes)}).")
        if not outputs:
            raise ValueError("No images given.")
        return np.concatenate(outputs, axis=0)

    def _convert_batch(self, x):
        """[B, H, W, C] NumPy array -> float32 [B, H', W', C']."""
        if x.ndim != 4:
            raise ValueError(f"Expected images [H, W, C] or [B, H, W, C]; "
                             f"got shape {x.shape}.")
        if x.dtype == bool or not (np.issubdtype(x.dtype, np.integer)
                                   or np.issubdtype(x.dtype, np.floating)):
            raise ValueError(f"Images must be integer or float arrays; got "
                             f"dtype {x.dtype}.")
        self._check_pixels(x)
        x = _convert_channels(x, self.num_channels, np)
        dtype = x.dtype
        if self.smaller_side is not None:
            height, width = resize_small_size(x.shape[1], x.shape[2],
                                              self.smaller_side)
            x = _resize_np(x, (height, width), self.interpolation)
            if self.image_size is not None:
                x = _central_crop_np(x, self.image_size)
        elif self.image_size is not None:
            x = _resize_np(x, self.image_size, self.interpolation)
        if self.cast_to_input_dtype and x.dtype != dtype:
            x = _cast_np(x, dtype)
        return self._scale(np.asarray(x, dtype=np.float32))

    def _scale(self, x):
        lo, hi = self.input_range
        vmin, vmax = self.value_range
        if (lo, hi) == (vmin, vmax):
            return x
        f32 = np.float32
        if _is_symbolic_tf(x):
            import tensorflow as tf

            f32 = (lambda v: tf.constant(v, tf.float32))
        x = (x - f32(lo)) / (f32(hi) - f32(lo))
        return f32(vmin) + x * (f32(vmax) - f32(vmin))

    def _check_pixels(self, x):
        """Refuses pixels that cannot be what `input_range` says (module
        docstring): non-finite values, values far outside the range, and
        non-uint8 images that look like [0, 1] or [0, 16] pixels given to
        a 0..255 converter. uint8 images are pixels by definition: only a
        converter of a narrower range (e.g. 0..16) refuses them."""
        if x.size == 0:
            return
        if x.dtype == np.uint8:  # pixels; only a narrower range can fail
            if self.input_range[1] < 255.0 and float(x.max()) > \
                    self.input_range[1] * (1 + INPUT_TOLERANCE):
                raise ValueError(_pixel_problem(
                    float(x.min()), float(x.max()), self.input_range))
            return
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            raise ValueError("Images contain NaN or infinite values.")
        x_min, x_max = float(x.min()), float(x.max())
        message = _pixel_problem(x_min, x_max, self.input_range)
        if message:
            raise ValueError(message)

    def _check_pixels_tf(self, x):
        """`_check_pixels` as graph assertions (a tf.errors.
        InvalidArgumentError with the same message)."""
        import tensorflow as tf

        f = tf.cast(x, tf.float32)
        x_min = tf.reduce_min(f)
        x_max = tf.reduce_max(f)
        lo, hi = self.input_range
        tol = INPUT_TOLERANCE * (hi - lo)
        checks = [
            (tf.reduce_all(tf.math.is_finite(f)),
             "Images contain NaN or infinite values."),
            (tf.logical_and(x_min >= lo - tol, x_max <= hi + tol),
             f"Images far outside the converter's input range "
             f"[{lo:g}, {hi:g}]: give raw pixels in that range (e.g. "
             "uint8).")]
        if _checks_scaled_pixels(self.input_range):
            checks += [
                (tf.logical_not(tf.logical_and(x_max > 0.0, x_max <= 1.0)),
                 _SCALED_01),
                (tf.logical_not(tf.logical_and(
                    x_min >= 0.0, tf.logical_and(x_max > 1.0,
                                                 x_max <= 16.0))),
                 _SCALED_16)]
        asserts = [tf.debugging.Assert(ok, [message, x_min, x_max])
                   for ok, message in checks]
        with tf.control_dependencies(asserts):
            return tf.identity(x)

    def convert_tf(self, images, resize_fn=None):
        """The conversion in TensorFlow ops (tf.data maps, exported graphs).

        Args:
            images: a tf.Tensor [H, W, C] or [B, H, W, C] (any integer or
                float dtype), or a scalar tf.string of encoded image bytes.
            resize_fn: `resize_fn(x, size, interpolation)` in place of
                TensorFlow's resize ops (`tf.image.resize` /
                `tf.compat.v1.image.resize_area`), for formats that must
                express them with other ops (keras_e3.export); it must
                compute the same resampling.

        Returns:
            float32 of the same rank ([H, W, C] for strings); only static
            shapes are set (no shape-assertion ops in the graph).
        """
        import tensorflow as tf

        resize = resize_fn or _resize_tf
        x = images
        if x.dtype == tf.string:
            # The file's own channels (1, 2, 3 or 4), then the one channel
            # rule below, as on the host (Pillow decodes to the same).
            # JPEGs with the accurate integer DCT: libjpeg's ISLOW, what
            # Pillow decodes with (TensorFlow's default DCT differs by a
            # few levels).
            encoded = x
            x = tf.cond(
                tf.io.is_jpeg(encoded),
                lambda: tf.io.decode_jpeg(encoded, channels=0,
                                          dct_method="INTEGER_ACCURATE"),
                lambda: tf.io.decode_image(encoded, channels=0,
                                           expand_animations=False))
            x.set_shape([None, None, None])
        single = x.shape.rank == 3
        if single:
            x = x[None]
        if x.shape.rank != 4:
            raise ValueError(f"Expected images [H, W, C] or [B, H, W, C]; "
                             f"got shape {x.shape}.")
        dtype = x.dtype
        if dtype != tf.uint8:
            x = self._check_pixels_tf(x)
        x = _convert_channels(x, self.num_channels, tf)
        if self.smaller_side is not None:
            shape = tf.shape(x)
            h, w = shape[1], shape[2]
            ratio = (tf.cast(self.smaller_side, tf.float32)
                     / tf.cast(tf.minimum(h, w), tf.float32))
            size = [tf.cast(tf.round(tf.cast(h, tf.float32) * ratio),
                            tf.int32),
                    tf.cast(tf.round(tf.cast(w, tf.float32) * ratio),
                            tf.int32)]
            x = resize(x, size, self.interpolation)
            if self.image_size is not None:
                ch, cw = self.image_size
                top = (size[0] - ch) // 2
                left = (size[1] - cw) // 2
                x = x[:, top:top + ch, left:left + cw, :]
                x.set_shape([None, ch, cw, None])
        elif self.image_size is not None:
            x = resize(x, self.image_size, self.interpolation)
        if self.cast_to_input_dtype:
            x = tf.cast(x, dtype)
        x = self._scale(tf.cast(x, tf.float32))
        return x[0] if single else x


# ----------------------------------------------------------------------
# vmoe process strings.
def parse_process(process):
    """[(op, args, kwargs)] of a vmoe process string "op(a, k=v)|op2".

    Args:
        process: a vmoe preprocessing string.

    Returns:
        A list of (op name, positional args tuple, keyword args dict).

    Example:
    ```python
    from keras_e3.preprocessing import parse_process

    parse_process("decode|resize(224)|value_range(-1, 1)")
    ```
    """
    if not isinstance(process, str) or not process.strip():
        raise ValueError(f"A vmoe process must be a non-empty string; got "
                         f"{process!r}.")
    calls = []
    for part in process.split("|"):
        part = part.strip()
        try:
            node = ast.parse(part if "(" in part else part + "()",
                             mode="eval").body
            if not isinstance(node, ast.Call) or not isinstance(
                    node.func, ast.Name):
                raise ValueError("not a call")
            args = [ast.literal_eval(a) for a in node.args]
            kwargs = {k.arg: ast.literal_eval(k.value)
                      for k in node.keywords}
        except (SyntaxError, ValueError) as e:
            raise ValueError(f"Cannot parse {part!r} in vmoe process "
                             f"{process!r}: {e}") from e
        calls.append((node.func.id, args, kwargs))
    return calls


def _bind(op, args, kwargs, names, defaults, process):
    if len(args) > len(names):
        raise ValueError(f"{op} takes at most {len(names)} arguments in "
                         f"{process!r}.")
    bound = dict(defaults)
    bound.update(zip(names, args))
    unknown = set(kwargs) - set(names)
    if unknown:
        raise ValueError(f"{op} got unknown argument(s) {sorted(unknown)} in "
                         f"{process!r}.")
    bound.update(kwargs)
    missing = [n for n in names if n not in bound]
    if missing:
        raise ValueError(f"{op} lacks {missing} in {process!r}.")
    return bound


def _apply_vmoe_op(kwargs, op, args, kw, process):
    if op == "decode":
        b = _bind(op, args, kw, ("channels",), {"channels": None}, process)
        if b["channels"] is not None:
            channels = int(b["channels"])
            if kwargs["num_channels"] not in (None, channels):
                raise ValueError(
                    f"{process!r} decodes {channels} channels but the model "
                    f"takes {kwargs['num_channels']}.")
            kwargs["num_channels"] = channels
    elif op == "resize":
        b = _bind(op, args, kw, ("size", "method", "antialias"),
                  {"method": "bilinear", "antialias": False}, process)
        if b["method"] not in INTERPOLATIONS or b["antialias"]:
            raise ValueError(f"{process!r}: resize supports method "
                             f"{INTERPOLATIONS} without antialias.")
        kwargs.update(image_size=_pair(b["size"], "size"),
                      interpolation=b["method"], cast_to_input_dtype=True)
    elif op == "resize_small":
        b = _bind(op, args, kw, ("smaller_size", "method", "antialias"),
                  {"method": "area", "antialias": False}, process)
        if b["method"] != "area" or b["antialias"]:
            raise ValueError(f"{process!r}: resize_small supports the "
                             "area method only.")
        kwargs.update(smaller_side=int(b["smaller_size"]),
                      interpolation="area")
    elif op == "central_crop":
        b = _bind(op, args, kw, ("crop_size",), {}, process)
        kwargs["image_size"] = _pair(b["crop_size"], "crop_size")
    elif op == "value_range":
        b = _bind(op, args, kw,
                  ("vmin", "vmax", "in_min", "in_max", "clip_values"),
                  {"in_min": 0.0, "in_max": 255.0, "clip_values": False},
                  process)
        if b["clip_values"]:
            raise ValueError(f"{process!r}: value_range(clip_values=True) "
                             "is not supported.")
        kwargs.update(value_range=(b["vmin"], b["vmax"]),
                      input_range=(b["in_min"], b["in_max"]))


# ----------------------------------------------------------------------
# Inputs.
def decode_image(source):
    """A file path or encoded bytes -> uint8 NumPy [H, W, C] (C = 1 for
    gray, 3 for RGB, 4 for RGBA; palette images expanded), decoded with
    Pillow, without colour management or EXIF rotation (as TensorFlow's
    decoders).

    Args:
        source: a path (str or path-like) or the encoded bytes.

    Returns:
        A uint8 NumPy array [H, W, C].

    Example:
    ```python
    import io

    import numpy as np
    from PIL import Image

    from keras_e3.preprocessing import decode_image

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(buffer, "PNG")
    decode_image(buffer.getvalue()).shape  # (4, 6, 3)
    ```
    """
    from PIL import Image
    from PIL import UnidentifiedImageError

    if isinstance(source, (bytes, bytearray, memoryview)):
        name, stream = "encoded bytes", io.BytesIO(bytes(source))
    else:
        name = os.fspath(source)
        if not os.path.isfile(name):
            raise ValueError(f"No such image file: {name!r}.")
        stream = name
    try:
        with Image.open(stream) as image:
            image.load()
            return _pil_to_array(image)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"Cannot decode {name} as an image: {e}") from e


def _pil_to_array(image):
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info
                              else "RGB")
    elif mode == "1":
        image = image.convert("L")
    elif mode == "LA":
        image = image.convert("LA")
    elif mode in ("I;16", "I;16B", "I;16L"):
        arr = np.asarray(image, dtype=np.uint16) >> 8
        return arr.astype(np.uint8)[..., None]
    elif mode not in ("L", "RGB", "RGBA"):
        image = image.convert("RGB")
    arr = np.asarray(image)
    if image.mode == "LA":
        arr = arr[..., :1]
    if arr.ndim == 2:
        arr = arr[..., None]
    return arr


def _is_host_item(x):
    if isinstance(x, (str, bytes, bytearray, memoryview, os.PathLike)):
        return True
    return type(x).__module__.startswith("PIL.")


def _as_image(x):
    """One image (path, bytes, PIL image or array) -> NumPy [1, H, W, C]."""
    if isinstance(x, (str, bytes, bytearray, memoryview, os.PathLike)):
        return decode_image(x)[None]
    if type(x).__module__.startswith("PIL."):
        return _pil_to_array(x)[None]
    x = _to_numpy(x)
    if x.ndim == 2:
        return x[None, :, :, None]
    if x.ndim == 3:
        return x[None]
    raise ValueError("Each image of a list must be [H, W] or [H, W, C]; got "
                     f"shape {x.shape}.")


def _as_images(images):
    """A NumPy batch [B, H, W, C], or a list of [1, H, W, C] arrays."""
    if _is_host_item(images):
        return [_as_image(images)]
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("No images given (an empty list).")
        if _is_host_item(images[0]) or hasattr(images[0], "shape"):
            return [_as_image(x) for x in images]
    x = _to_numpy(images)
    if x.dtype == object:
        raise ValueError("Images of different sizes must be given as a list"
                         " of arrays, not as one array.")
    if x.ndim == 2:  # one gray image [H, W]
        return x[None, :, :, None]
    if x.ndim == 3:
        # [H, W, C] with C <= 4 is one image; otherwise a gray batch.
        return x[None] if x.shape[-1] <= 4 else x[..., None]
    if x.ndim == 4:
        return x
    raise ValueError("Images must be [H, W], [H, W, C], [B, H, W] or "
                     f"[B, H, W, C]; got shape {x.shape}.")


def _to_numpy(x):
    if isinstance(x, np.ndarray):
        return x
    if keras.ops.is_tensor(x) or type(x).__module__.split(".")[0] in (
            "tensorflow", "torch", "jax", "jaxlib"):
        return np.asarray(keras.ops.convert_to_numpy(x)) if \
            keras.ops.is_tensor(x) else np.asarray(x)
    return np.asarray(x)


def _dtype_name(x):
    dtype = x.dtype
    return getattr(dtype, "name", None) or str(dtype).replace("torch.", "")


def _is_symbolic_tf(x):
    """A tf.Tensor in graph mode (e.g. inside a tf.data map)."""
    if not type(x).__module__.startswith("tensorflow"):
        return False
    import tensorflow as tf

    return isinstance(x, tf.Tensor) and not hasattr(x, "numpy")


# ----------------------------------------------------------------------
# Operations.
def _convert_channels(x, num_channels, lib):
    """The one channel rule (module docstring), for NumPy (`lib` numpy)
    or TensorFlow (`lib` tensorflow; a channel count unknown until run
    time, as of decoded files, is switched on in the graph)."""
    channels = x.shape[-1]
    if channels is None:  # TensorFlow, decoded file: 1 to 4 channels
        import tensorflow as tf

        if num_channels is None:
            raise ValueError("A converter without num_channels cannot "
                             "decode files inside a graph.")
        count = tf.shape(x)[-1]
        rank = len(x.shape)

        def branch(c):
            def convert():
                part = x[..., :c]
                part.set_shape([None] * (rank - 1) + [c])
                return _convert_static(part, num_channels, tf)
            return convert

        out = tf.switch_case(tf.clip_by_value(count, 1, 4) - 1,
                             [branch(c) for c in (1, 2, 3, 4)])
        with tf.control_dependencies([tf.debugging.assert_less_equal(
                count, 4, message="images with more than 4 channels")]):
            out = tf.identity(out)
        out.set_shape([None] * (rank - 1) + [num_channels])
        return out
    return _convert_static(x, num_channels, lib)


def _convert_static(x, num_channels, lib):
    channels = x.shape[-1]
    if channels == 2:  # gray + alpha: the alpha is dropped
        x, channels = x[..., :1], 1
    if num_channels is None or channels == num_channels:
        if channels not in (1, 3, 4):
            raise ValueError(f"Images with {channels} channels: expected 1 "
                             "(gray), 2 (gray + alpha), 3 (RGB) or 4 "
                             "(RGBA).")
        return x
    if channels == 1 and num_channels == 3:
        return lib.repeat(x, 3, axis=-1) if lib is np else lib.tile(
            x, [1] * (len(x.shape) - 1) + [3])
    if channels == 4 and num_channels == 3:
        return x[..., :3]
    if channels in (3, 4) and num_channels == 1:
        return _luma(x, lib)
    raise ValueError(
        f"Images with {channels} channels (shape {tuple(x.shape)}) cannot "
        f"be converted to the model's {num_channels} channels: give gray "
        "(1), gray + alpha (2), RGB (3) or RGBA (4) images.")


def _luma(x, lib):
    """RGB(A) -> gray: ITU-R 601 luma 0.2989 R + 0.5870 G + 0.1140 B (the
    weights of `tf.image.rgb_to_grayscale`), in float32, the same ops on
    the host and in the graph; integer images are rounded (half to even)
    back to their dtype, so that uint8 stays uint8 (vmoe's `resize` casts
    back to the input dtype)."""
    if lib is np:
        f = np.asarray(x[..., :3], np.float32)
        w = [np.float32(v) for v in LUMA]
        y = f[..., 0:1] * w[0] + f[..., 1:2] * w[1] + f[..., 2:3] * w[2]
        if np.issubdtype(x.dtype, np.integer):
            info = np.iinfo(x.dtype)
            y = np.clip(np.round(y), info.min, info.max).astype(x.dtype)
        return y
    tf = lib
    f = tf.cast(x[..., :3], tf.float32)
    w = [tf.constant(v, tf.float32) for v in LUMA]
    y = f[..., 0:1] * w[0] + f[..., 1:2] * w[1] + f[..., 2:3] * w[2]
    if x.dtype.is_integer:
        y = tf.cast(tf.clip_by_value(tf.round(y), x.dtype.min, x.dtype.max),
                    x.dtype)
    return y


_SCALED_01 = (
    "Images with values in [0, 1] given to a converter of 0..255 pixels: "
    "they look like pixels scaled to [0, 1] and would be taken as almost "
    "black. Multiply them by 255 (or pass uint8), or build the converter "
    "with input_range=(0, 1).")
_SCALED_16 = (
    "Images with values in [0, 16] given to a converter of 0..255 pixels: "
    "they look like scikit-learn's digits (0..16) and would be taken as "
    "almost black. Scale them to 0..255 (keras_e3.data.digits.to_uint8), "
    "or build the converter with input_range=(0, 16); if they really are "
    "dark 0..255 images, pass them as uint8.")


def _checks_scaled_pixels(input_range):
    lo, hi = input_range
    return lo == 0.0 and hi > 16.0


def _pixel_problem(x_min, x_max, input_range):
    """The error message for non-uint8 pixels in [x_min, x_max] given to a
    converter of `input_range`, or None."""
    lo, hi = input_range
    tol = INPUT_TOLERANCE * (hi - lo)
    if x_min < lo - tol or x_max > hi + tol:
        return (f"Images with values in [{x_min:g}, {x_max:g}] are far "
                f"outside the converter's input range [{lo:g}, {hi:g}]. Give"
                f" raw pixels in [{lo:g}, {hi:g}] (e.g. uint8), give "
                "model-ready images of the model's size, or build the "
                "converter with the right input_range.")
    if _checks_scaled_pixels(input_range):
        if 0.0 < x_max <= 1.0:
            return _SCALED_01
        if x_min >= 0.0 and 1.0 < x_max <= 16.0:
            return _SCALED_16
    return None


def resize_small_size(height, width, smaller_side):
    """vmoe's resize_small: the smaller side becomes `smaller_side`, the
    other is scaled by the same ratio and rounded half to even (float32
    arithmetic, as `tf.round`)."""
    ratio = np.float32(smaller_side) / np.float32(min(height, width))
    return (int(np.round(np.float32(height) * ratio)),
            int(np.round(np.float32(width) * ratio)))


def _central_crop_np(x, size):
    ch, cw = size
    height, width = x.shape[1:3]
    if ch > height or cw > width:
        raise ValueError(f"Cannot crop {ch}x{cw} from a {height}x{width} "
                         "image.")
    top, left = (height - ch) // 2, (width - cw) // 2
    return x[:, top:top + ch, left:left + cw, :]


def _cast_np(x, dtype):
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    if info is None:
        return x.astype(dtype)
    return np.clip(np.trunc(x), info.min, info.max).astype(dtype)


def _resize_np(x, size, interpolation):
    height, width = _pair(size, "size")
    if interpolation == "area":
        return _resize_area_np(x, height, width)
    return _resize_bilinear_np(x, height, width)


def _bilinear_taps(in_size, out_size):
    """TensorFlow's half-pixel bilinear taps, in float32 as its kernel."""
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    pos = (np.arange(out_size, dtype=f32) + f32(0.5)) * scale - f32(0.5)
    floor = np.floor(pos)
    low = np.maximum(floor.astype(np.int64), 0)
    high = np.minimum(np.ceil(pos).astype(np.int64), in_size - 1)
    return low, high, (pos - floor).astype(f32)


def _resize_bilinear_np(x, height, width):
    """`tf.image.resize(..., "bilinear", antialias=False)` in NumPy."""
    x = np.asarray(x, dtype=np.float32)
    y0, y1, dy = _bilinear_taps(x.shape[1], height)
    x0, x1, dx = _bilinear_taps(x.shape[2], width)
    dx = dx[None, None, :, None]
    dy = dy[None, :, None, None]
    top, bottom = x[:, y0], x[:, y1]
    top = top[:, :, x0] + (top[:, :, x1] - top[:, :, x0]) * dx
    bottom = bottom[:, :, x0] + (bottom[:, :, x1] - bottom[:, :, x0]) * dx
    return top + (bottom - top) * dy


def _area_weights(in_size, out_size):
    """[out, in] weights of TensorFlow's resize_area along one axis (each
    input cell weighted by its overlap with the output cell's footprint,
    in float32 as its kernel), normalised by the footprint."""
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    weights = np.zeros((out_size, in_size), dtype=np.float64)
    for o in range(out_size):
        start = f32(o) * scale
        end = f32(o + 1) * scale
        for i in range(int(np.floor(start)), int(np.ceil(end))):
            if i < start:
                w = scale if i + 1 > end else f32(i + 1) - start
            else:
                w = end - f32(i) if i + 1 > end else f32(1.0)
            weights[o, min(max(i, 0), in_size - 1)] += float(w)
    return weights / float(scale)


def _resize_area_np(x, height, width):
    """`tf.compat.v1.image.resize_area` in NumPy (float32 output)."""
    x = np.asarray(x, dtype=np.float64)
    rows = _area_weights(x.shape[1], height)
    cols = _area_weights(x.shape[2], width)
    out = np.einsum("oh,bhwc->bowc", rows, x)
    out = np.einsum("pw,bowc->bopc", cols, out)
    return out.astype(np.float32)


def _resize_tf(x, size, interpolation):
    import tensorflow as tf

    if interpolation == "area":
        return tf.compat.v1.image.resize_area(x, size)
    return tf.image.resize(x, size, method="bilinear", antialias=False)


def _pair(size, name):
    if isinstance(size, (int, np.integer)):
        size = (int(size), int(size))
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"{name} must be an int or (height, width) of "
                         f"positive ints; got {size}.")
    return size


def _range(value, name):
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be (low, high); got {value!r}.") from e
    if not hi > lo:
        raise ValueError(f"{name} must be (low, high) with high > low; got "
                         f"{tuple(value)}.")
    return (lo, hi)
