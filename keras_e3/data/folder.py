"""Whole datasets as NumPy arrays, for the CLI and for k-shot sampling.

`load_dataset(spec, preprocessor, split)` understands
  - "digits": scikit-learn's handwritten digits (shipped with the package
    scikit-learn, no download), the fixed-seed split the `*_tiny_digits`
    presets use (`split` "train" or "test");
  - a directory with one sub-folder of images per class (sorted names are
    the classes, as `keras.utils.image_dataset_from_directory`).
"""

import os

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
BUILTIN_DATASETS = ("digits",)


def load_images(paths, preprocessor):
    """Image files -> a float32 batch [N, H, W, C] for a preset's
    preprocessor config; a missing or unreadable file is a ValueError
    naming it."""
    import keras

    from keras_e3.data.preprocessing import ImagePreprocessor

    # Image files hold 0..255 pixels, whatever the preset's source_range
    # (which describes its training arrays, e.g. digits' 0..16).
    preprocess = ImagePreprocessor.from_config(preprocessor,
                                               source_range=(0, 255))
    mode = {1: "grayscale", 4: "rgba"}.get(preprocess.num_channels, "rgb")
    images = []
    for path in paths:
        if not os.path.isfile(path):
            raise ValueError(f"No such image file: {path!r}.")
        try:
            image = keras.utils.load_img(path, color_mode=mode)
        except Exception as e:  # noqa: BLE001 - PIL's many error types
            raise ValueError(f"Cannot read image {path!r}: {e}") from e
        images.append(preprocess(keras.utils.img_to_array(image)))
    return np.stack(images)


def load_image_folder(directory, preprocessor):
    """(images [N, H, W, C] float32, labels [N] int32, class_names)."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise ValueError(f"No such image folder: {directory!r}.")
    classes = sorted(d for d in os.listdir(directory)
                     if os.path.isdir(os.path.join(directory, d))
                     and not d.startswith("."))
    if not classes:
        raise ValueError(f"{directory!r} has no class sub-folders (expected "
                         f"{directory}/<class name>/<image files>).")
    images, labels = [], []
    for label, name in enumerate(classes):
        folder = os.path.join(directory, name)
        files = sorted(f for f in os.listdir(folder)
                       if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise ValueError(f"Class folder {folder!r} has no images "
                             f"({', '.join(IMAGE_EXTENSIONS)}).")
        images.append(load_images([os.path.join(folder, f) for f in files],
                                  preprocessor))
        labels += [label] * len(files)
    return np.concatenate(images), np.asarray(labels, np.int32), classes


def load_dataset(spec, preprocessor, split="test"):
    """(images, labels, class_names) for a dataset spec (module doc)."""
    if spec == "digits":
        from keras_e3.data.digits import load_digits_splits

        size = preprocessor.get("image_size", [32, 32])
        train, test = load_digits_splits(
            image_size=int(size[0]),
            num_channels=int(preprocessor.get("num_channels", 1)))
        x, y = {"train": train, "test": test}[split]
        return x, y, [str(i) for i in range(10)]
    if not os.path.isdir(os.fspath(spec)):
        raise ValueError(f"Unknown dataset {spec!r}: expected one of "
                         f"{BUILTIN_DATASETS} or a folder of class "
                         "sub-folders of images.")
    return load_image_folder(spec, preprocessor)
