"""Input pipelines yielding `(images, labels)` batches for `model.fit`.

- `from_arrays`: NumPy arrays -> a `keras.utils.PyDataset` (no
  TensorFlow needed; works with every backend).
- `from_directory`: a folder of images, one sub-folder per class ->
  `tf.data.Dataset` (`keras.utils.image_dataset_from_directory`).
- `from_tfds`: a TensorFlow Datasets dataset already prepared in
  `data_dir` -> `tf.data.Dataset`.

`tf.data` pipelines feed `fit` on JAX and PyTorch too, but need
TensorFlow installed (`pip install keras-e3[tensorflow,data]`); it is
imported only when these functions are called.

Each takes a `preprocessor` (an `ImagePreprocessor` or a preset's
preprocessor config dict) and an optional `augment`
(`make_augmentation(...)`), applied to training batches after
preprocessing.
"""

import math

import keras
import numpy as np

from keras_e3.data.preprocessing import ImagePreprocessor


class ArrayDataset(keras.utils.PyDataset):
    """Batches of in-memory arrays, reshuffled every epoch when `shuffle`.

    The order of epoch e is the e-th permutation drawn from
    `np.random.default_rng(seed)`: the same for every run with that seed.
    """

    def __init__(self, x, y=None, batch_size=32, shuffle=False, seed=None,
                 preprocessor=None, augment=None, drop_remainder=False,
                 **kwargs):
        super().__init__(**kwargs)
        x = np.asarray(x)
        if y is not None:
            y = np.asarray(y)
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
        self.preprocessor = _as_preprocessor(preprocessor)
        self.augment = augment
        self._rng = np.random.default_rng(seed)
        self._order = self._new_order()

    def _new_order(self):
        if self.shuffle:
            return self._rng.permutation(len(self.x))
        return np.arange(len(self.x))

    def __len__(self):
        rounding = math.floor if self.drop_remainder else math.ceil
        return rounding(len(self.x) / self.batch_size)

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range ({len(self)}).")
        idx = self._order[index * self.batch_size:
                          (index + 1) * self.batch_size]
        images = self.x[idx]
        if self.preprocessor is not None:
            images = self.preprocessor(images)
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
                **kwargs):
    """An `ArrayDataset` of `(images, labels)` batches (see there).

    `preprocessor` (an `ImagePreprocessor` or a preprocessor config dict)
    is applied to each batch; None feeds `x` as it is. `kwargs` go to
    `keras.utils.PyDataset` (`workers`, `use_multiprocessing`, ...).
    """
    return ArrayDataset(x, y, batch_size=batch_size, shuffle=shuffle,
                        seed=seed, preprocessor=preprocessor, augment=augment,
                        drop_remainder=drop_remainder, **kwargs)


def from_directory(directory, preprocessor, batch_size=32, shuffle=True,
                   seed=None, augment=None, validation_split=None,
                   subset=None, class_names=None):
    """A `tf.data.Dataset` of `(images, int labels)` from an image folder.

    `directory/<class_name>/*.{png,jpg,bmp,gif}`; classes are the sorted
    sub-folder names (or `class_names`), kept as `dataset.class_names`.
    Images are read with the preprocessor's channels (gray, RGB or RGBA)
    and size, then scaled from [0, 255] to its `value_range`.
    """
    tf = _import_tf("from_directory")
    pre = _as_preprocessor(preprocessor)
    if pre is None or pre.image_size is None:
        raise ValueError("from_directory needs a preprocessor with an "
                         "image_size (e.g. a preset's preprocessor config).")
    color_mode = {1: "grayscale", 3: "rgb", 4: "rgba", None: "rgb"}[
        pre.num_channels]
    dataset = keras.utils.image_dataset_from_directory(
        str(directory), labels="inferred", label_mode="int",
        class_names=class_names, color_mode=color_mode,
        batch_size=batch_size, image_size=pre.image_size, shuffle=shuffle,
        seed=seed, validation_split=validation_split, subset=subset,
        verbose=False)
    names = dataset.class_names
    dataset = dataset.map(lambda x, y: (pre(x), y),
                          num_parallel_calls=tf.data.AUTOTUNE)
    dataset = _augment_tf(dataset, augment, tf)
    dataset = dataset.prefetch(tf.data.AUTOTUNE)
    dataset.class_names = names
    return dataset


def from_tfds(name, split, preprocessor, data_dir=None, batch_size=32,
              shuffle=False, seed=None, augment=None, download=False,
              image_key="image", label_key="label", shuffle_buffer=10_000,
              drop_remainder=False):
    """A `tf.data.Dataset` of `(images, labels)` from TensorFlow Datasets.

    The dataset must already be prepared in `data_dir` (`tfds build` or a
    copied directory) unless `download=True`, which lets TFDS download
    and prepare it. Each example's `image_key` is preprocessed (resized,
    so examples of any size batch together), then batched.
    """
    tf = _import_tf("from_tfds")
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError("from_tfds needs tensorflow-datasets: pip install "
                          "keras-e3[data]") from e
    pre = _as_preprocessor(preprocessor)
    if pre is None or pre.image_size is None:
        raise ValueError("from_tfds needs a preprocessor with an image_size "
                         "(examples of different sizes must be resized).")
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
    try:
        dataset = builder.as_dataset(
            split=split, shuffle_files=shuffle,
            read_config=tfds.ReadConfig(shuffle_seed=seed))
    except AssertionError as e:  # TFDS: "could not find data in ..."
        raise ValueError(
            f"TFDS dataset {name!r} is not prepared in data_dir="
            f"{data_dir!r}: prepare it there (`tfds build {name} "
            f"--data_dir ...`) or pass download=True.") from e
    dataset = dataset.map(lambda ex: (pre(ex[image_key]), ex[label_key]),
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


def _as_preprocessor(preprocessor):
    if preprocessor is None or isinstance(preprocessor, ImagePreprocessor):
        return preprocessor
    if isinstance(preprocessor, dict):
        return ImagePreprocessor.from_config(preprocessor)
    raise ValueError("preprocessor must be an ImagePreprocessor or a "
                     f"preprocessor config dict; got {type(preprocessor)}.")


def _import_tf(caller):
    try:
        import tensorflow as tf
    except ImportError as e:
        raise ImportError(
            f"{caller} builds a tf.data pipeline and needs TensorFlow "
            "(pip install tensorflow-cpu); from_arrays does not.") from e
    return tf
