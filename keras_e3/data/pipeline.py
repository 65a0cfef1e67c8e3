"""Input pipelines yielding `(images, labels)` batches for `model.fit`.

- `from_arrays`: images in memory (arrays of any size, lists of images of
  different sizes, file paths, encoded bytes) -> a `keras.utils.PyDataset`
  (no TensorFlow needed; works with every backend).
- `from_directory`: a folder of images, one sub-folder per class ->
  `tf.data.Dataset`.
- `from_tfds`: a TensorFlow Datasets dataset already prepared in
  `data_dir` -> `tf.data.Dataset`.

Each converts raw images with the model's converter, `preprocessor`: a
`keras_e3.ImageConverter` (`model.preprocessor`) or the model itself, so
that the batches are exactly what `model.predict` feeds the model for the
same images. `from_arrays` calls the converter on the host (NumPy);
`from_directory` and `from_tfds` call its TensorFlow ops
(`converter.convert_tf`, which also decodes the image files) inside the
`tf.data` map. An optional `augment` (`make_augmentation(...)`) is applied
to training batches after conversion.

`tf.data` pipelines feed `fit` on JAX and PyTorch too, but need
TensorFlow installed (`pip install keras-e3[tensorflow,data]`); it is
imported only when these functions are called.

Labels: integer class indices in [0, num_classes); strings are mapped
through `class_names` (the model's by default when a model is given);
one-hot or soft labels [N, num_classes] are passed as they are (compile
the loss with `sparse=False`). Anything else is a ValueError.
"""

import math
import os

import keras
import numpy as np

from keras_e3.data.folder import as_converter
from keras_e3.data.folder import index_image_folder


def _model_defaults(preprocessor, num_classes, class_names):
    """num_classes / class_names from a model given as the preprocessor."""
    if hasattr(preprocessor, "backbone"):
        if num_classes is None:
            num_classes = getattr(preprocessor, "num_classes", None)
        if class_names is None:
            class_names = getattr(preprocessor, "class_names", None)
    return num_classes, class_names


def prepare_dataset_labels(labels, num_classes=None, class_names=None):
    """Labels checked by `keras_e3.data.targets.prepare_labels`, kept in
    their form (int32 indices [N] or float32 rows [N, C]); strings mapped
    through `class_names`. Without `num_classes` (nor `class_names`), only
    what can be checked without it: whole, non-negative indices, or
    one-hot / soft rows."""
    from keras_e3.data.targets import prepare_labels

    if num_classes is None and class_names:
        num_classes = len(class_names)
    if num_classes is None:
        y = np.asarray(labels)
        if y.ndim == 2 and y.shape[1] > 1:
            num_classes = y.shape[1]
        elif y.dtype.kind in "biuf" and y.size:
            finite = y[np.isfinite(y)] if y.dtype.kind == "f" else y
            num_classes = int(max(finite.max(initial=0), 0)) + 1
        else:
            num_classes = 1
    return prepare_labels(labels, num_classes, class_names, sparse=None)


def _as_items(x):
    """Images as one NumPy batch [N, H, W, C] or a list of single images
    (arrays of any size, paths, bytes, PIL images)."""
    if isinstance(x, (str, bytes, os.PathLike)):
        raise ValueError("from_arrays takes a batch of images: give a list "
                         "of paths, not one path.")
    if isinstance(x, (list, tuple)):
        if not len(x):
            raise ValueError("No images given (an empty list).")
        return list(x)
    x = np.asarray(keras.ops.convert_to_numpy(x) if keras.ops.is_tensor(x)
                   else x)
    if x.dtype.kind in "USO":  # an array of paths (or of ragged images)
        return list(x)
    if x.ndim == 3:  # a batch of gray images [N, H, W]
        return x[..., None]
    if x.ndim != 4:
        raise ValueError(
            "from_arrays takes a batch of images [N, H, W, C] or [N, H, W],"
            " or a list of images (arrays of any size, paths, bytes); got "
            f"shape {x.shape}.")
    return x


class ArrayDataset(keras.utils.PyDataset):
    """Batches of in-memory images, reshuffled every epoch when `shuffle`.

    See `from_arrays`. The order of epoch e is the e-th permutation drawn
    from `np.random.default_rng(seed)`: the same for every run with that
    seed.

    Args:
        x, y, batch_size, shuffle, seed, preprocessor, augment,
        drop_remainder, class_names, num_classes, **kwargs: as
        `from_arrays`.

    Example:
    ```python
    import numpy as np

    from keras_e3 import data

    ds = data.ArrayDataset(np.zeros((5, 8, 8, 1), np.float32), np.arange(5),
                           batch_size=2)
    len(ds), ds[2][0].shape  # 3, (1, 8, 8, 1)
    ```
    """

    def __init__(self, x, y=None, batch_size=32, shuffle=False, seed=None,
                 preprocessor=None, augment=None, drop_remainder=False,
                 class_names=None, num_classes=None, **kwargs):
        super().__init__(**kwargs)
        self.converter = (None if preprocessor is None
                          else as_converter(preprocessor, "from_arrays"))
        num_classes, class_names = _model_defaults(preprocessor, num_classes,
                                                   class_names)
        if self.converter is None:
            if not isinstance(x, (list, tuple)):
                x = np.asarray(x)
            if isinstance(x, (list, tuple)) or x.dtype.kind in "USO":
                raise ValueError(
                    "Raw images (paths, bytes, images of different sizes) "
                    "need the model's converter: pass "
                    "preprocessor=model.preprocessor.")
        else:
            x = _as_items(x)
        if y is not None:
            if augment is not None and num_classes is None:
                num_classes = getattr(augment, "num_classes", None)
            y = prepare_dataset_labels(y, num_classes, class_names)
            if len(y) != len(x):
                raise ValueError(f"x and y differ in length: {len(x)} images "
                                 f"and {len(y)} labels.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
        if drop_remainder and len(x) < batch_size:
            raise ValueError(f"drop_remainder with {len(x)} examples < "
                             f"batch_size={batch_size} leaves no batch.")
        if augment is not None and y is None:
            raise ValueError("augment needs labels (y).")
        self.x, self.y = x, y
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.drop_remainder = drop_remainder
        self.augment = augment
        self._rng = np.random.default_rng(seed)
        self._order = self._new_order()

    @property
    def preprocessor(self):
        """The converter applied to each batch (None: `x` is fed as is)."""
        return self.converter

    def _new_order(self):
        if self.shuffle:
            return self._rng.permutation(len(self.x))
        return np.arange(len(self.x))

    def __len__(self):
        rounding = math.floor if self.drop_remainder else math.ceil
        return rounding(len(self.x) / self.batch_size)

    def _images(self, idx):
        if isinstance(self.x, list):
            return self.converter([self.x[i] for i in idx])
        images = self.x[idx]
        if self.converter is None:
            return images
        return self.converter.ready_or_convert(images)  # as model.predict

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range ({len(self)}).")
        idx = self._order[index * self.batch_size:
                          (index + 1) * self.batch_size]
        images = self._images(idx)
        if self.y is None:
            return (images,)
        labels = self.y[idx]
        if self.augment is not None:
            if self.augment.needs_one_hot and labels.ndim == 1:
                labels = np.eye(self.augment.num_classes,
                                dtype=np.float32)[labels]
            images, labels = self.augment(images, labels)
            images = np.asarray(keras.ops.convert_to_numpy(images))
            labels = np.asarray(keras.ops.convert_to_numpy(labels))
        return images, labels

    def on_epoch_end(self):
        self._order = self._new_order()


def from_arrays(x, y=None, batch_size=32, shuffle=False, seed=None,
                preprocessor=None, augment=None, drop_remainder=False,
                class_names=None, num_classes=None, **kwargs):
    """A `keras.utils.PyDataset` of `(images, labels)` batches.

    Args:
        x: images: a batch [N, H, W, C] or [N, H, W] (uint8 or float, any
            size), or a list of images of any sizes (arrays [H, W, C] or
            [H, W], file paths, encoded bytes, PIL images).
        y: labels [N] (integer class indices, or strings mapped through
            `class_names`) or one-hot / soft labels [N, C]; None for
            images only.
        batch_size: images per batch.
        shuffle: reshuffle every epoch (seeded by `seed`).
        seed: seed of the shuffling.
        preprocessor: the model's converter (`model.preprocessor`, a
            `keras_e3.ImageConverter`) or the model; each batch is what
            `model.predict` would feed for the same images (model-ready
            float batches pass as they are). None: batches of `x` (an
            array) are yielded as they are (`E3ViT.fit` still converts
            raw batches with its own converter).
        augment: a `make_augmentation(...)` applied after conversion.
        drop_remainder: drop the last, smaller batch.
        class_names: names for string labels (default: the model's when
            `preprocessor` is a model).
        num_classes: labels must be < num_classes (default: the model's).
        **kwargs: `keras.utils.PyDataset` arguments (`workers`,
            `use_multiprocessing`, ...).

    Returns:
        An `ArrayDataset`.

    Example:
    ```python
    import numpy as np

    import keras_e3
    from keras_e3 import data

    model = keras_e3.E3ViT.from_preset("e3_tiny_digits")
    raw = np.random.default_rng(0).integers(0, 256, (6, 20, 20), np.uint8)
    ds = data.from_arrays(raw, [0, 1, 2, 3, 4, 5], batch_size=4,
                          shuffle=True, seed=0, preprocessor=model)
    images, labels = ds[0]
    images.shape  # (4, 32, 32, 1)
    ```
    """
    return ArrayDataset(x, y, batch_size=batch_size, shuffle=shuffle,
                        seed=seed, preprocessor=preprocessor, augment=augment,
                        drop_remainder=drop_remainder,
                        class_names=class_names, num_classes=num_classes,
                        **kwargs)


# Formats TensorFlow's `tf.io.decode_image` reads.
TF_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


def from_directory(directory, preprocessor, batch_size=32, shuffle=True,
                   seed=None, augment=None, validation_split=None,
                   subset=None, class_names=None):
    """A `tf.data.Dataset` of `(images, int32 labels)` from an image folder.

    `directory/<class name>/*.{png,jpg,jpeg,bmp,gif}`, images of any size,
    gray, RGB or RGBA. Each file is read and decoded by the converter's
    TensorFlow ops (`converter.convert_tf`): the same pipeline as
    `model.predict` on the file.

    Args:
        directory: the folder.
        preprocessor: the model's converter (`model.preprocessor`) or the
            model; it needs an `image_size` (images are batched).
        batch_size: images per batch.
        shuffle: reshuffle the files every epoch (seeded by `seed`).
        seed: seed of the shuffling and of `validation_split`.
        augment: a `make_augmentation(...)` applied after conversion.
        validation_split: the fraction of files held out for validation.
        subset: with `validation_split`: "training", "validation" or
            "both" (a pair of datasets).
        class_names: the model's class names (default: a model's own when
            it is given as `preprocessor`): each sub-folder's label is the
            index of its name there (folders 0/ 1/ 7/ of a digits model are
            classes 0, 1 and 7); a sub-folder not named so is a
            ValueError. None: the sorted sub-folder names are the classes
            (a new task: the labels of a new head).

    Returns:
        The dataset, with `class_names` (the label of class i is
        `class_names[i]`) and `file_paths` (in label order, before any
        shuffling) attributes.

    Example:
    ```python
    import os

    import numpy as np
    from PIL import Image

    # A folder photos/<class>/<image>, images of any size.
    for name in ("cat", "dog"):
        os.makedirs(os.path.join("photos", name), exist_ok=True)
        for i in range(2):
            Image.fromarray(np.full((20, 30, 3), 60 * i, np.uint8)).save(
                os.path.join("photos", name, f"{i}.png"))

    import keras_e3
    from keras_e3 import data

    model = keras_e3.E3ViT.from_preset("vit_tiny_digits")
    ds = data.from_directory("photos", model.preprocessor, batch_size=2,
                             seed=0)
    ds.class_names  # ["cat", "dog"]
    ```
    """
    tf = _import_tf("from_directory")
    converter = as_converter(preprocessor, "from_directory")
    _, class_names = _model_defaults(preprocessor, None, class_names)
    if converter.image_size is None:
        raise ValueError("from_directory batches images of any size: the "
                         "converter needs an image_size.")
    paths, labels, names = index_image_folder(
        directory, class_names, extensions=TF_IMAGE_EXTENSIONS)
    subsets = _split(len(paths), validation_split, subset, shuffle, seed)
    datasets = []
    for idx in subsets:
        datasets.append(_file_dataset(
            [paths[i] for i in idx], labels[idx], converter, batch_size,
            shuffle, seed, augment, names, tf))
    return tuple(datasets) if len(datasets) > 1 else datasets[0]


def _split(count, validation_split, subset, shuffle, seed):
    """Index arrays of the requested subsets (keras' semantics)."""
    order = np.arange(count)
    if not validation_split:
        if subset is not None:
            raise ValueError("subset needs validation_split.")
        return [order]
    if not 0.0 < validation_split < 1.0:
        raise ValueError("validation_split must be in (0, 1); got "
                         f"{validation_split}.")
    if subset not in ("training", "validation", "both"):
        raise ValueError('With validation_split, subset must be "training", '
                         f'"validation" or "both"; got {subset!r}.')
    if shuffle:
        if seed is None:
            raise ValueError("validation_split with shuffle needs a seed (the"
                             " training and validation calls must split the "
                             "files the same way).")
        order = np.random.default_rng(seed).permutation(count)
    num_val = int(validation_split * count)
    train, val = np.sort(order[:count - num_val]), np.sort(
        order[count - num_val:])
    return {"training": [train], "validation": [val],
            "both": [train, val]}[subset]


def _file_dataset(paths, labels, converter, batch_size, shuffle, seed,
                  augment, names, tf):
    height, width = converter.image_size

    def load(path, label):
        image = converter.convert_tf(tf.io.read_file(path))
        image = tf.ensure_shape(image, [height, width,
                                        converter.num_channels])
        return image, label

    dataset = tf.data.Dataset.from_tensor_slices(
        (tf.constant(paths, tf.string), tf.constant(labels, tf.int32)))
    if shuffle and len(paths):
        dataset = dataset.shuffle(len(paths), seed=seed,
                                  reshuffle_each_iteration=True)
    dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.batch(batch_size)
    dataset = _augment_tf(dataset, augment, tf)
    dataset = dataset.prefetch(tf.data.AUTOTUNE)
    dataset.class_names = list(names)
    dataset.file_paths = list(paths)
    return dataset


def from_tfds(name, split, preprocessor, data_dir=None, batch_size=32,
              shuffle=False, seed=None, augment=None, download=False,
              image_key="image", label_key="label", shuffle_buffer=10_000,
              drop_remainder=False):
    """A `tf.data.Dataset` of `(images, labels)` from TensorFlow Datasets.

    The dataset must already be prepared in `data_dir` (`tfds build` or a
    copied directory) unless `download=True`, which lets TFDS download
    and prepare it. Each example's `image_key` (any size) goes through the
    converter's TensorFlow ops (`converter.convert_tf`, as `model.predict`
    on that image), then examples are batched. Labels are the dataset's
    (a model given as `preprocessor` must predict at least its classes).

    Args:
        name: the TFDS name ("mnist", "cifar10", ...).
        split: the split ("train", "test[:10%]", ...).
        preprocessor: the model's converter (`model.preprocessor`) or the
            model; it needs an `image_size`.
        data_dir: where the dataset is prepared.
        batch_size, shuffle, seed, drop_remainder: batching and shuffling.
        augment: a `make_augmentation(...)` applied after conversion.
        download: let TFDS download and prepare the dataset.
        image_key, label_key: the features holding images and labels.
        shuffle_buffer: examples in the shuffle buffer.

    Returns:
        The dataset.

    Example:
    ```python
    import tensorflow_datasets as tfds

    import keras_e3
    from keras_e3 import data

    model = keras_e3.E3ViT.from_preset("vit_tiny_digits")
    with tfds.testing.mock_data(num_examples=4):  # random data, no download
        ds = data.from_tfds("mnist", "test", model, batch_size=2)
        images, labels = next(iter(ds))
    images.shape  # (2, 32, 32, 1)
    ```
    """
    tf = _import_tf("from_tfds")
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError("from_tfds needs tensorflow-datasets: pip install "
                          "keras-e3[data]") from e
    converter = as_converter(preprocessor, "from_tfds")
    if converter.image_size is None:
        raise ValueError("from_tfds batches images of any size: the "
                         "converter needs an image_size.")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"Unknown TFDS dataset {name!r}.") from e
    if download:
        builder.download_and_prepare()  # a no-op once prepared
    features = builder.info.features
    missing = [k for k in (image_key, label_key) if k not in features]
    if missing:
        raise ValueError(f"TFDS dataset {name!r} has no feature(s) {missing}; "
                         f"its features are {sorted(features.keys())}.")
    model_classes = getattr(preprocessor, "num_classes", None)
    data_classes = getattr(features[label_key], "num_classes", None)
    if model_classes is not None and data_classes is not None and \
            data_classes > model_classes:
        raise ValueError(f"TFDS dataset {name!r} has {data_classes} classes;"
                         f" the model predicts {model_classes}.")
    try:
        dataset = builder.as_dataset(
            split=split, shuffle_files=shuffle,
            read_config=tfds.ReadConfig(shuffle_seed=seed))
    except AssertionError as e:  # TFDS: "could not find data in ..."
        raise ValueError(
            f"TFDS dataset {name!r} is not prepared in data_dir="
            f"{data_dir!r}: prepare it there (`tfds build {name} "
            f"--data_dir ...`) or pass download=True.") from e
    dataset = dataset.map(
        lambda ex: (converter.convert_tf(ex[image_key]), ex[label_key]),
        num_parallel_calls=tf.data.AUTOTUNE)
    if shuffle:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    dataset = _augment_tf(dataset, augment, tf)
    return dataset.prefetch(tf.data.AUTOTUNE)


def _augment_tf(dataset, augment, tf):
    if augment is None:
        return dataset

    def apply(images, labels):
        if augment.needs_one_hot and labels.shape.rank == 1:
            labels = tf.one_hot(labels, augment.num_classes)
        return augment(images, labels)

    return dataset.map(apply, num_parallel_calls=tf.data.AUTOTUNE)


def _import_tf(caller):
    try:
        import tensorflow as tf
    except ImportError as e:
        raise ImportError(
            f"{caller} builds a tf.data pipeline and needs TensorFlow "
            "(pip install tensorflow-cpu); from_arrays does not.") from e
    return tf
