"""Training augmentation from Keras 3 core layers (no keras-cv).

`make_augmentation(...)` returns an `Augmentation`: a callable
`(images, labels) -> (images, labels)` on batches, usable in
`from_arrays` (NumPy batches, any backend) and in `tf.data` pipelines
(`from_directory`, `from_tfds`), where Keras runs its preprocessing layers
with TensorFlow whatever the backend.

Image layers (`keras.layers.RandomFlip`, `RandAugment`, `RandomCrop`, ...)
run first, on images already in the model's `value_range`; then MixUp or
CutMix, which need one-hot labels: the pipelines one-hot integer labels
first when `needs_one_hot` is set, so compile with
`keras_e3.EnsembleSoftmaxCrossEntropy(sparse=False)`.
"""

import keras

from keras_e3.layers.embedding import as_pair


class Augmentation:
    """Image layers, then an optional label-mixing layer.

    Args:
        layers: Keras preprocessing layers applied to the images.
        mix: a `keras.layers.MixUp` / `CutMix` (or None).
        num_classes: needed with `mix` (labels are one-hot encoded).

    `augment(images, labels)` returns the augmented (images, labels).

    Example:
    ```python
    import numpy as np

    from keras_e3 import data

    augment = data.make_augmentation(flip=True, seed=0)
    images, labels = augment(np.zeros((2, 8, 8, 3), np.float32),
                             np.array([0, 1]))
    ```
    """

    def __init__(self, layers=(), mix=None, num_classes=None):
        if mix is not None and not num_classes:
            raise ValueError("MixUp / CutMix mix labels: pass num_classes so "
                             "that integer labels can be one-hot encoded.")
        self.layers = list(layers)
        self.pipeline = keras.layers.Pipeline(self.layers) if layers else None
        self.mix = mix
        self.num_classes = num_classes

    @property
    def needs_one_hot(self):
        return self.mix is not None

    def __call__(self, images, labels):
        if self.pipeline is not None:
            images = self.pipeline(images, training=True)
        if self.mix is not None:
            out = self.mix({"images": images, "labels": labels}, training=True)
            images, labels = out["images"], out["labels"]
        return images, labels


def make_augmentation(value_range=(-1.0, 1.0), flip=True, rand_augment=None,
                      crop=None, mixup_alpha=None, cutmix_factor=None,
                      num_classes=None, seed=None):
    """Builds an `Augmentation` from Keras core layers.

    Args:
        value_range: range of the (already preprocessed) images.
        flip: horizontal flips (`keras.layers.RandomFlip("horizontal")`).
        rand_augment: None, True, or a dict of `keras.layers.RandAugment`
            arguments (e.g. `{"num_ops": 2, "factor": 0.5}`).
        crop: (height, width) of a `keras.layers.RandomCrop`, or None.
        mixup_alpha: MixUp's alpha (None: no MixUp).
        cutmix_factor: CutMix's factor (None: no CutMix). Not with MixUp.
        num_classes: required with MixUp / CutMix.
        seed: seed of every layer.

    Returns:
        An `Augmentation`.

    Example:
    ```python
    import numpy as np

    from keras_e3 import data

    augment = data.make_augmentation(flip=True, mixup_alpha=0.2,
                                     num_classes=3, seed=0)
    images, labels = augment(np.zeros((2, 8, 8, 3), np.float32),
                             np.array([0, 2]))
    labels.shape  # (2, 3): MixUp mixes one-hot labels
    ```
    """
    if mixup_alpha is not None and cutmix_factor is not None:
        raise ValueError("Use either mixup_alpha or cutmix_factor, not both.")
    layers = []
    if flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if crop is not None:
        height, width = as_pair(crop, "crop")
        layers.append(keras.layers.RandomCrop(height, width, seed=seed))
    if rand_augment:
        options = rand_augment if isinstance(rand_augment, dict) else {}
        layers.append(keras.layers.RandAugment(
            value_range=tuple(value_range), seed=seed, **options))
    mix = None
    if mixup_alpha is not None:
        mix = keras.layers.MixUp(alpha=mixup_alpha, seed=seed)
    elif cutmix_factor is not None:
        mix = keras.layers.CutMix(factor=cutmix_factor, seed=seed)
    return Augmentation(layers, mix, num_classes)
