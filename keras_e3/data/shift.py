"""The standard shifted test sets, by their tensorflow-datasets names.

| name | split | classes |
|---|---|---|
| `imagenet2012_corrupted/<corruption>_<severity>` (ImageNet-C) | validation | ILSVRC2012's 1,000 |
| `imagenet_a` (natural adversarial examples) | test | 200 of the 1,000 |
| `imagenet_r` (renditions) | test | 200 of the 1,000 |
| `imagenet_v2` (a new test set) | test | 1,000 |
| `imagenet_sketch` | test | 1,000 |
| `cifar10_corrupted/<corruption>_<severity>` (CIFAR-10-C) | test | CIFAR-10's 10 |
| `cifar10_1` (CIFAR-10.1, a new test set) | test | 10 |

The datasets must be prepared in tensorflow-datasets' `data_dir` (`tfds
build NAME`; ImageNet-C and ImageNet-A/R need their archives downloaded by
hand as tensorflow-datasets explains) unless `download=True`.
`load_shift_dataset` yields the raw uint8 images (any size) and labels:
models convert them with their own preprocessing.

ImageNet-A and ImageNet-R label 200 of ILSVRC2012's classes: a 1,000-class
model's logits are restricted to those classes before any metric (as the
datasets' authors evaluate), with `class_subset(name)`: the sorted indices
of those classes in ILSVRC2012's order (tensorflow-datasets', the sorted
synset ids), from the authors' lists (`keras_e3/data/labels/imagenet_a.txt`,
`imagenet_r.txt`).
"""

import numpy as np

from keras_e3.data.corruptions import check_corruption

# name -> (split, label set, class subset or None)
SHIFT_DATASETS = {
    "imagenet_a": ("test", "imagenet2012", "imagenet_a"),
    "imagenet_r": ("test", "imagenet2012", "imagenet_r"),
    "imagenet_v2": ("test", "imagenet2012", None),
    "imagenet_sketch": ("test", "imagenet2012", None),
    "cifar10_1": ("test", "cifar10", None),
}
CORRUPTED_DATASETS = {"imagenet2012_corrupted": ("validation",
                                                 "imagenet2012"),
                      "cifar10_corrupted": ("test", "cifar10")}
NUM_CLASSES = {"imagenet2012": 1000, "cifar10": 10}
SUBSETS = ("imagenet_a", "imagenet_r")


def class_subset(name):
    """The classes of ImageNet-A or ImageNet-R among ILSVRC2012's.

    Args:
        name: "imagenet_a" or "imagenet_r".

    Returns:
        Sorted int indices [200] into ILSVRC2012's classes
        (tensorflow-datasets' order).

    Example:
    ```python
    from keras_e3 import data

    data.class_subset("imagenet_a")[:3]  # [6, 11, 13]
    ```
    """
    from importlib import resources

    from keras_e3.data.labels import synsets

    if name not in SUBSETS:
        raise ValueError(f"No class subset for {name!r}; known: "
                         f"{', '.join(SUBSETS)}.")
    text = resources.files("keras_e3.data").joinpath(
        "labels", f"{name}.txt").read_text(encoding="utf-8")
    wnids = [line.strip() for line in text.splitlines()
             if line.strip() and not line.startswith("#")]
    order = {w: i for i, w in enumerate(synsets("imagenet2012"))}
    return np.asarray(sorted(order[w] for w in wnids), np.int64)


def shift_dataset_info(name):
    """{"name", "tfds_name", "split", "label_set", "num_classes",
    "class_subset"} of a shifted test set's name (module docstring)."""
    if not isinstance(name, str):
        raise ValueError(f"A dataset name must be a string; got {name!r}.")
    if name in SHIFT_DATASETS:
        split, label_set, subset = SHIFT_DATASETS[name]
        return {"name": name, "tfds_name": name, "split": split,
                "label_set": label_set,
                "num_classes": NUM_CLASSES[label_set],
                "class_subset": subset}
    base, _, config = name.partition("/")
    if base in CORRUPTED_DATASETS:
        corruption, _, severity = config.rpartition("_")
        if not corruption or not severity.isdigit():
            raise ValueError(f"{name!r}: expected {base}/<corruption>_"
                             "<severity>, e.g. "
                             f"{base}/gaussian_noise_3.")
        check_corruption(corruption, int(severity))
        split, label_set = CORRUPTED_DATASETS[base]
        return {"name": name, "tfds_name": name, "split": split,
                "label_set": label_set,
                "num_classes": NUM_CLASSES[label_set],
                "class_subset": None}
    known = list(SHIFT_DATASETS) + [f"{b}/<corruption>_<severity>"
                                    for b in CORRUPTED_DATASETS]
    raise ValueError(f"Unknown shifted test set {name!r}; known: "
                     f"{', '.join(known)}.")


def load_shift_dataset(name, data_dir=None, max_examples=None,
                       download=False):
    """A shifted test set as a `tf.data.Dataset` of (uint8 image [H, W, 3],
    int label) examples, unbatched, in the dataset's order.

    Args:
        name: a name of the module docstring's table.
        data_dir: tensorflow-datasets' data directory (None: its default).
        max_examples: the first N examples only.
        download: let tensorflow-datasets download and prepare it.

    Returns:
        (dataset, info): info is `shift_dataset_info(name)`.

    Example:
    ```python
    import tensorflow_datasets as tfds

    from keras_e3 import data

    with tfds.testing.mock_data(num_examples=4):  # random data, no download
        ds, info = data.load_shift_dataset("cifar10_1")
        image, label = next(iter(ds))
    image.shape, info["num_classes"]  # (32, 32, 3), 10
    ```
    """
    info = shift_dataset_info(name)
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError("Shifted test sets need tensorflow-datasets: pip "
                          "install keras-e3[data]") from e
    try:
        dataset = tfds.load(info["tfds_name"], split=info["split"],
                            data_dir=data_dir, download=download,
                            as_supervised=True, shuffle_files=False)
    except (AssertionError, FileNotFoundError) as e:
        raise ValueError(
            f"{name!r} is not prepared in data_dir={data_dir!r}: prepare it "
            f"(`tfds build {info['tfds_name'].split('/')[0]}`) or pass "
            "download=True.") from e
    if max_examples is not None:
        dataset = dataset.take(int(max_examples))
    return dataset, info
