"""Whole datasets as model inputs (NumPy), for the CLI and k-shot sampling.

Every image goes through the model's converter (`model.preprocessor`, a
`keras_e3.ImageConverter`), so the arrays are what `model.predict` feeds
the model for the same images (files of any size, gray or RGB, PNG or
JPEG).

`load_dataset(spec, preprocessor, split, class_names)` understands
  - "digits": scikit-learn's handwritten digits (shipped with the package
    scikit-learn, no download) as raw 8x8 uint8 images (what PNG files of
    them hold; `keras_e3.data.digits.load_raw_digits_splits`), the
    fixed-seed split the `*_tiny_digits` presets use (`split` "train" or
    "test");
  - a directory with one sub-folder of images per class.

Class names: given the model's `class_names`, each sub-folder is the class
of that name (folders 0/ 1/ 7/ with a digits model are classes 0, 1 and 7;
names the model does not have are a ValueError listing both). Without
`class_names`, the sorted sub-folder names are the classes (a new task,
as `keras-e3 finetune` trains a new head on).
"""

import os

import numpy as np

from keras_e3.preprocessing.image_converter import ImageConverter

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
BUILTIN_DATASETS = ("digits",)


def as_converter(preprocessor, caller="This loader"):
    """The `ImageConverter` of `preprocessor`: a converter, or a model whose
    `preprocessor` is one. Anything else (a flat preprocessor dict, None,
    a model without a converter) is a ValueError saying what to pass."""
    if isinstance(preprocessor, ImageConverter):
        return preprocessor
    converter = getattr(preprocessor, "preprocessor", None)
    if isinstance(converter, ImageConverter):
        return converter
    if hasattr(preprocessor, "backbone"):
        raise ValueError(
            f"{caller}: the model has no converter (model.preprocessor is "
            "None); build it with E3ViT(backbone, num_classes, "
            "preprocessor=keras_e3.ImageConverter(...)) or load a preset.")
    hint = (" Flat preprocessor dicts are no longer accepted: "
            "keras_e3.ImageConverter.from_preset_config(d) turns one into a "
            "converter." if isinstance(preprocessor, dict) else "")
    raise ValueError(
        f"{caller} takes the model's converter: preprocessor must be a "
        "keras_e3.ImageConverter (model.preprocessor) or a model that has "
        f"one; got {type(preprocessor).__name__}.{hint}")


def load_images(paths, preprocessor):
    """Image files -> model inputs float32 [N, H, W, C].

    Args:
        paths: image files (any size; gray, RGB, RGBA or palette).
        preprocessor: the model's converter (`model.preprocessor`) or the
            model.

    Returns:
        `converter(path)` of each file, stacked: what `model.predict(paths)`
        feeds the model. A missing or unreadable file is a ValueError
        naming it.

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
    x = data.load_images(["photos/cat/0.png", "photos/dog/1.png"],
                         model.preprocessor)
    x.shape  # (2, 32, 32, 1): the model's input size and channels
    ```
    """
    converter = as_converter(preprocessor, "load_images")
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError("No image files given.")
    return np.concatenate([convert_file(converter, p) for p in paths])


def convert_file(converter, path):
    """`converter(path)` ([1, H, W, C]); a ValueError naming the file if it
    cannot be read or converted."""
    try:
        return converter(path)
    except ValueError as e:
        message = str(e)
        if path not in message:
            message = f"{path}: {message}"
        raise ValueError(message) from e


def folder_class_names(directory):
    """The sorted class sub-folder names of `directory` (hidden folders
    skipped); a ValueError if there is no such folder or none inside."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise ValueError(f"No such image folder: {directory!r}.")
    classes = sorted(d for d in os.listdir(directory)
                     if os.path.isdir(os.path.join(directory, d))
                     and not d.startswith("."))
    if not classes:
        raise ValueError(f"{directory!r} has no class sub-folders (expected "
                         f"{directory}/<class name>/<image files>).")
    return classes


def match_class_names(names, class_names, where):
    """{name: index in class_names} for each of `names`; a ValueError
    listing both when some name is not among `class_names`. ImageNet
    synset ids ("n01440764") match the imagenet2012 label set's names."""
    class_names = [str(n) for n in class_names]
    index = {n: i for i, n in enumerate(class_names)}
    if len(class_names) == 1000:
        from keras_e3.data import labels as label_sets

        if class_names == label_sets.class_names("imagenet2012"):
            index.update({s: i for i, s in
                          enumerate(label_sets.synsets("imagenet2012"))})
    unknown = [n for n in names if n not in index]
    if unknown:
        shown = class_names if len(class_names) <= 30 else (
            class_names[:30] + [f"... ({len(class_names)} in all)"])
        raise ValueError(
            f"The classes of {where} ({', '.join(unknown)}) are not among "
            f"the model's class names ({', '.join(shown)}). Name the "
            "sub-folders after the model's classes (for a new task, "
            "fine-tune a new head: keras-e3 finetune).")
    return {n: index[n] for n in names}


def index_image_folder(directory, class_names=None,
                       extensions=IMAGE_EXTENSIONS):
    """(paths, labels int32 [N], names) of an image folder.

    Args:
        directory: `directory/<class name>/<image files>`.
        class_names: the model's class names: each sub-folder's label is
            the index of its name there (else a ValueError listing both).
            None: the sorted sub-folder names are the classes.
        extensions: the image files' extensions (lower case).

    Returns:
        The files (sorted per class, classes in sorted folder order), their
        labels, and the class names the labels index (`class_names`, or
        the sub-folder names).
    """
    directory = os.fspath(directory)
    folders = folder_class_names(directory)
    if class_names is None:
        names = folders
        index = {n: i for i, n in enumerate(folders)}
    else:
        names = [str(n) for n in class_names]
        index = match_class_names(folders, names, repr(directory))
    paths, labels = [], []
    for name in folders:
        folder = os.path.join(directory, name)
        files = sorted(f for f in os.listdir(folder)
                       if f.lower().endswith(tuple(extensions)))
        if not files:
            raise ValueError(f"Class folder {folder!r} has no images "
                             f"({', '.join(extensions)}).")
        paths += [os.path.join(folder, f) for f in files]
        labels += [index[name]] * len(files)
    return paths, np.asarray(labels, np.int32), list(names)


def load_image_folder(directory, preprocessor, class_names=None):
    """An image folder as model inputs.

    Args:
        directory: `directory/<class name>/<image files>` (PNG, JPEG, BMP,
            GIF, WebP; any size; gray, RGB or RGBA).
        preprocessor: the model's converter (`model.preprocessor`) or the
            model.
        class_names: the model's class names (see `index_image_folder`):
            sub-folders are labelled by name; None: the sorted sub-folder
            names are new classes 0, 1, ...

    Returns:
        (images float32 [N, H, W, C], labels int32 [N], class_names).

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
    x, y, names = data.load_image_folder("photos", model.preprocessor)
    names, y  # ["cat", "dog"], [0, 0, 1, 1]
    ```
    """
    converter = as_converter(preprocessor, "load_image_folder")
    paths, labels, names = index_image_folder(directory, class_names)
    return load_images(paths, converter), labels, names


def digits_images(split, preprocessor):
    """(raw images, labels int32) of the digits' `split` ("train" or
    "test"): uint8 [N, 8, 8, 1] (`to_uint8`) for a converter of 0..255
    pixels; for a converter of another input range (an older preset's
    `source_range`, e.g. 0..16) the same digits as floats in that range."""
    from keras_e3.data.digits import SOURCE_RANGE

    converter = as_converter(preprocessor, "digits_images")
    x, y = _raw_digits(split)
    lo, hi = converter.input_range
    if (lo, hi) != (0.0, 255.0):
        # The whole 0..16 values back (to_uint8 is invertible), mapped
        # linearly into the converter's input range.
        digits = np.round(x.astype(np.float64) * SOURCE_RANGE[1] / 255.0)
        x = (lo + digits / SOURCE_RANGE[1] * (hi - lo)).astype(np.float32)
    return x, y


def load_dataset(spec, preprocessor, split="test", class_names=None):
    """(images, labels, class_names) of a dataset spec (module doc).

    Args:
        spec: "digits" or a folder of class sub-folders.
        preprocessor: the model's converter (`model.preprocessor`) or the
            model.
        split: "train" or "test" (digits only; a folder is one set).
        class_names: the model's class names, to label by name (a
            ValueError if the dataset's classes are not among them); None:
            the dataset's own classes.

    Returns:
        (images float32 [N, H, W, C] as the model takes them, labels int32
        [N], class names).

    Example:
    ```python
    import keras_e3
    from keras_e3 import data

    model = keras_e3.E3ViT.from_preset("vit_tiny_digits")
    x, y, names = data.load_dataset("digits", model.preprocessor,
                                    class_names=model.class_names)
    x.shape[1:], len(names)  # (32, 32, 1), 10
    ```
    """
    converter = as_converter(preprocessor, "load_dataset")
    if spec == "digits":
        x, y = digits_images(split, converter)
        return (converter(x), *_digits_labels(y, class_names))
    _check_folder_spec(spec)
    return load_image_folder(spec, converter, class_names)


def load_raw_dataset(spec, split="test", class_names=None):
    """A dataset spec's raw images, for transformations of the pixels
    themselves (e.g. `keras_e3.data.corrupt`) before a model's converter.

    Args:
        spec: "digits" (uint8 [N, 8, 8, 1], `to_uint8`) or a folder of
            class sub-folders (every file decoded to uint8 [H, W, C], any
            size; gray, RGB, RGBA as stored).
        split: "train" or "test" (digits only).
        class_names: as in `load_dataset`.

    Returns:
        (images: a uint8 array or a list of uint8 arrays, labels int32
        [N], class names).

    Example:
    ```python
    from keras_e3 import data

    images, labels, names = data.load_raw_dataset("digits", split="test")
    images.dtype, images.shape[1:]  # uint8, (8, 8, 1)
    ```
    """
    from keras_e3.preprocessing.image_converter import decode_image

    if spec == "digits":
        x, y = _raw_digits(split)
        return (x, *_digits_labels(y, class_names))
    _check_folder_spec(spec)
    paths, labels, names = index_image_folder(spec, class_names)
    return [decode_image(p) for p in paths], labels, names


def _raw_digits(split):
    """The digits' `split` as uint8 [N, 8, 8, 1] and int32 labels."""
    from keras_e3.data.digits import load_raw_digits_splits

    if split not in ("train", "test"):
        raise ValueError(f'split must be "train" or "test"; got {split!r}.')
    train, test = load_raw_digits_splits()
    return {"train": train, "test": test}[split]


def _digits_labels(y, class_names):
    """(labels, names): the digits' labels 0-9, renumbered as the indices
    of "0" ... "9" in `class_names` when given (see
    `match_class_names`)."""
    names = [str(i) for i in range(10)]
    if class_names is None:
        return y, names
    mapping = match_class_names(names, class_names, '"digits"')
    return (np.asarray([mapping[names[v]] for v in y], np.int32),
            [str(n) for n in class_names])


def _check_folder_spec(spec):
    if not os.path.isdir(os.fspath(spec)):
        raise ValueError(f"Unknown dataset {spec!r}: expected one of "
                         f"{BUILTIN_DATASETS} or a folder of class "
                         "sub-folders of images.")

