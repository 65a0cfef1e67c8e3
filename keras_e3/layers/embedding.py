"""Patch embedding, class token and position embedding: learned (resizable),
fixed 2-D sin-cos (MoCo v3, vmoe's "sincos2d"), or none."""

import numbers

import keras
import numpy as np
from keras import ops


def as_pair(value, name):
    """An int or a (height, width) pair of ints -> a (height, width) tuple
    of Python ints; a clear ValueError naming `name` otherwise."""
    integral = (numbers.Integral,)
    pair = (value, value) if isinstance(value, integral) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, integral) and v > 0
                                 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of them; "
                         f"got {value!r}.")
    return tuple(int(v) for v in pair)


RESAMPLING_METHODS = ("vit_zoom", "bilinear", "bicubic")


def resample_position_embedding(pos_embedding, old_grid, new_grid,
                                num_prefix_tokens=1, method="vit_zoom"):
    """Resizes a [1, prefix + h*w, H] position embedding to a new patch grid.

    The prefix (class token) embeddings are kept; the grid part is resized
    along each axis:
    - "vit_zoom" (default): vmoe's `vit_zoom` rule and big_vision's /
      vit_jax's resampling, `scipy.ndimage.zoom(grid, order=1)`: linear
      interpolation with the corners aligned (output position o reads input
      position o * (h - 1) / (h' - 1)), in float64;
    - "bilinear" / "bicubic": `keras.ops.image.resize` with half-pixel
      centres, no antialiasing (timm's "bicubic" convention).

    Args:
        pos_embedding: [1, prefix + old_h * old_w, H].
        old_grid: (old_h, old_w), row-major.
        new_grid: (new_h, new_w).
        num_prefix_tokens: leading non-grid tokens (1 with a class token).
        method: "vit_zoom", "bilinear" or "bicubic".

    Returns:
        A NumPy array [1, prefix + new_h * new_w, H] of the input's dtype.

    Example:
    ```python
    import numpy as np
    from keras_e3.layers import resample_position_embedding
    pos = np.arange(1 + 2 * 3, dtype="float32").reshape(1, 7, 1)
    resample_position_embedding(pos, (2, 3), (3, 5))[0, :, 0].tolist()
    # [0.0, 1.0, 1.5, 2.0, 2.5, 3.0, 2.5, 3.0, 3.5, 4.0, 4.5, 4.0, 4.5,
    #  5.0, 5.5, 6.0]
    ```
    """
    if method not in RESAMPLING_METHODS:
        raise ValueError(f"method must be one of {RESAMPLING_METHODS}; got "
                         f"{method!r}.")
    pos_embedding = np.asarray(pos_embedding)
    (oh, ow), (nh, nw) = tuple(old_grid), tuple(new_grid)
    prefix = pos_embedding[:, :num_prefix_tokens]
    grid = pos_embedding[:, num_prefix_tokens:]
    if grid.shape[1] != oh * ow:
        raise ValueError(f"Position embedding has {grid.shape[1]} grid "
                         f"tokens; expected {oh}x{ow}.")
    if (oh, ow) == (nh, nw):
        return pos_embedding
    grid = grid.reshape(1, oh, ow, -1)
    if method == "vit_zoom":
        grid = np.einsum("ph,bhwc->bpwc", _zoom_matrix(oh, nh),
                         grid.astype(np.float64))
        grid = np.einsum("qw,bpwc->bpqc", _zoom_matrix(ow, nw), grid)
    else:
        grid = ops.convert_to_numpy(ops.image.resize(
            grid, (nh, nw), interpolation=method, antialias=False,
            data_format="channels_last"))
    grid = np.asarray(grid).reshape(1, nh * nw, -1)
    return np.concatenate([prefix, grid.astype(pos_embedding.dtype)], axis=1)


def _zoom_matrix(in_size, out_size):
    """[out, in] weights of `scipy.ndimage.zoom(order=1)` along one axis
    (corners aligned: output o reads input o * (in - 1) / (out - 1))."""
    weights = np.zeros((out_size, in_size))
    if in_size == 1 or out_size == 1:
        weights[:, 0] = 1.0
        return weights
    position = np.arange(out_size) * ((in_size - 1) / (out_size - 1))
    low = np.minimum(np.floor(position).astype(int), in_size - 2)
    frac = position - low
    weights[np.arange(out_size), low] = 1.0 - frac
    weights[np.arange(out_size), low + 1] += frac
    return weights


POSITION_EMBEDDINGS = ("learned", "sincos2d", "none")
SINCOS2D_TEMPERATURE = 10000.0


def sincos2d_position_embedding(grid_size, hidden_dim,
                                temperature=SINCOS2D_TEMPERATURE):
    """vmoe's fixed "sincos2d" table [h*w, D] (MoCo v3) as float32 NumPy.

    concat(sin(x*w), cos(x*w), sin(y*w), cos(y*w)) over the row-major patch
    grid (x the column, y the row), w_i = 1 / temperature^(i / (D/4 - 1)),
    i < D/4. Computed in float64, then rounded.
    """
    check_sincos2d(hidden_dim)
    h, w = grid_size
    y, x = np.mgrid[:h, :w].astype(np.float64)
    y, x = y.ravel(), x.ravel()
    quarter = hidden_dim // 4
    omega = 1.0 / temperature ** (np.arange(quarter) / (quarter - 1))
    x, y = x[:, None] * omega, y[:, None] * omega
    table = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], -1)
    return table.astype(np.float32)


def check_sincos2d(hidden_dim):
    if hidden_dim % 4 or hidden_dim < 8:
        raise ValueError(
            f'position_embedding="sincos2d" needs a hidden size that is a '
            f"multiple of 4 and >= 8 (sin and cos of both grid axes); got "
            f"hidden_dim={hidden_dim}.")


@keras.saving.register_keras_serializable(package="keras_e3")
class PatchAndPositionEmbedding(keras.layers.Layer):
    """Images [B, H, W, C] -> tokens [B, T, D].

    A conv with kernel = stride = patch size (kernel [p, p, C, D], HWIO as in
    vmoe; computed as a matmul, `embed_patches`), row-major flattening of
    the patch grid, an optional class token prepended, then the position
    embedding added: `position_embedding="learned"` a weight [1, T, D]
    (class token included); "sincos2d" vmoe's fixed table
    (`sincos2d_position_embedding`, no weight) added to the patch tokens
    only, not to the class token; "none" nothing.

    Args:
        image_size: int or (height, width) of the images.
        patch_size: int or (height, width) of the patches (dividing
            `image_size`).
        hidden_dim: the token width D.
        num_channels: image channels C.
        use_class_token: prepend a learned class token.
        position_embedding: "learned", "sincos2d" or "none".
        sincos2d_temperature: temperature of the "sincos2d" table.
        **kwargs: Keras' `Layer` arguments (`name`, `dtype`, ...).

    Example:
    ```python
    import numpy as np
    from keras_e3.layers import PatchAndPositionEmbedding
    embed = PatchAndPositionEmbedding(image_size=16, patch_size=8,
                                      hidden_dim=32)
    embed(np.zeros((2, 16, 16, 3), "float32")).shape  # (2, 5, 32)
    ```
    """

    def __init__(self, image_size, patch_size, hidden_dim, num_channels=3,
                 use_class_token=True, position_embedding="learned",
                 sincos2d_temperature=SINCOS2D_TEMPERATURE, **kwargs):
        super().__init__(**kwargs)
        if position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(
                f"position_embedding must be one of {POSITION_EMBEDDINGS}; "
                f"got {position_embedding!r}.")
        if position_embedding == "sincos2d":
            check_sincos2d(hidden_dim)
        self.position_embedding_type = position_embedding
        self.sincos2d_temperature = float(sincos2d_temperature)
        self.image_size = as_pair(image_size, "image_size")
        self.patch_size = as_pair(patch_size, "patch_size")
        for side, (i, p) in zip(("height", "width"),
                                zip(self.image_size, self.patch_size)):
            if i % p:
                raise ValueError(
                    f"Image {side} {i} is not divisible by the patch size "
                    f"{p} (image_size={image_size}, patch_size={patch_size}).")
        self.grid_size = tuple(i // p for i, p in
                               zip(self.image_size, self.patch_size))
        self.hidden_dim = hidden_dim
        self.num_channels = num_channels
        self.use_class_token = use_class_token
        self.num_prefix_tokens = int(use_class_token)
        self.num_tokens = (self.grid_size[0] * self.grid_size[1]
                           + self.num_prefix_tokens)
        self._sincos2d = None
        if position_embedding == "sincos2d":  # a constant [1, h*w, D]
            self._sincos2d = sincos2d_position_embedding(
                self.grid_size, hidden_dim, self.sincos2d_temperature)[None]
        self.conv = keras.layers.Conv2D(
            hidden_dim, self.patch_size, strides=self.patch_size,
            padding="valid", data_format="channels_last",
            kernel_initializer="lecun_normal", dtype=self.dtype_policy,
            name="patch_conv")

    def build(self, input_shape=None):
        self.conv.build((None, *self.image_size, self.num_channels))
        if self.use_class_token:
            self.class_token = self.add_weight(
                name="class_token", shape=(1, 1, self.hidden_dim),
                initializer="zeros")
        if self.position_embedding_type == "learned":
            self.position_embedding = self.add_weight(
                name="position_embedding",
                shape=(1, self.num_tokens, self.hidden_dim),
                initializer=keras.initializers.RandomNormal(stddev=0.02))
        else:
            self.position_embedding = None

    def check_images(self, shape):
        expected = (f"[batch, {self.image_size[0]}, {self.image_size[1]}, "
                    f"{self.num_channels}]")
        if len(shape) != 4:
            raise ValueError(
                f"Expected a batch of model-ready images {expected} "
                f"(channels last); got rank {len(shape)} with shape "
                f"{tuple(shape)}. Add a batch axis (images[None]) for one "
                "image. E3ViT.predict() takes raw images when the model has a "
                "preprocessor (a keras_e3.ImageConverter; presets bring "
                "theirs).")
        height, width, channels = shape[1:]
        if channels is not None and channels != self.num_channels:
            raise ValueError(f"Expected images with {self.num_channels} "
                             f"channels {expected} (channels last); got "
                             f"shape {tuple(shape)}.")
        for got, want, side in ((height, self.image_size[0], "height"),
                                (width, self.image_size[1], "width")):
            if got is not None and got != want:
                raise ValueError(
                    f"Expected images of {self.image_size[0]}x"
                    f"{self.image_size[1]} pixels; got {side} {got} "
                    f"(shape {tuple(shape)}, expected {expected}). Resize "
                    "the images, or build "
                    f"the model with image_size={tuple(shape[1:3])}.")

    def call(self, images, return_patches=False):
        self.check_images(images.shape)
        patches = self.embed_patches(images)
        x = ops.reshape(patches, (-1, self.num_tokens - self.num_prefix_tokens,
                                  self.hidden_dim))
        if self.position_embedding_type == "sincos2d":
            x = x + ops.cast(self._sincos2d, x.dtype)
        if self.use_class_token:
            cls = ops.broadcast_to(ops.cast(self.class_token, x.dtype),
                                   (ops.shape(x)[0], 1, self.hidden_dim))
            x = ops.concatenate([cls, x], axis=1)
        if self.position_embedding is not None:
            x = x + ops.cast(self.position_embedding, x.dtype)
        return (x, patches) if return_patches else x

    def embed_patches(self, images):
        """The patch conv [B, h, w, D], computed as one matmul: each patch
        flattened (row, column, channel, as the HWIO kernel) times the
        kernel reshaped to [p*p*C, D]. The same sums as the strided conv,
        up to fp32 rounding, and faster on CPU: with XLA (JAX) the conv ran
        at a third of the matmul rate at batch 128 (PERFORMANCE.md)."""
        (gh, gw), (ph, pw) = self.grid_size, self.patch_size
        channels = self.num_channels
        x = ops.reshape(images, (-1, gh, ph, gw, pw, channels))
        x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
        x = ops.reshape(x, (-1, gh * gw, ph * pw * channels))
        kernel = ops.cast(ops.reshape(self.conv.kernel,
                                      (ph * pw * channels, self.hidden_dim)),
                          x.dtype)
        x = ops.matmul(x, kernel) + ops.cast(self.conv.bias, x.dtype)
        return ops.reshape(x, (-1, gh, gw, self.hidden_dim))

    def compute_output_shape(self, input_shape):
        self.check_images(input_shape)
        return (input_shape[0], self.num_tokens, self.hidden_dim)

    def get_config(self):
        config = super().get_config()
        config.update(image_size=self.image_size, patch_size=self.patch_size,
                      hidden_dim=self.hidden_dim,
                      num_channels=self.num_channels,
                      use_class_token=self.use_class_token)
        if self.position_embedding_type != "learned":
            config.update(position_embedding=self.position_embedding_type,
                          sincos2d_temperature=self.sincos2d_temperature)
        return config
