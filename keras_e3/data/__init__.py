"""Input pipelines, datasets, augmentation and k-shot sampling.

Raw images are turned into model inputs by the model's converter
(`model.preprocessor`, a `keras_e3.ImageConverter`) at every loader:
`from_arrays`, `from_directory`, `from_tfds`, `load_images`,
`load_image_folder` and `load_dataset` take it (or the model) as
`preprocessor`.

Importing this package needs neither TensorFlow nor TensorFlow Datasets:
`from_directory` and `from_tfds` import them when called.
"""

from keras_e3.data.augmentation import Augmentation
from keras_e3.data.augmentation import make_augmentation
from keras_e3.data.corruptions import corrupt
from keras_e3.data.corruptions import corruption_names
from keras_e3.data.folder import load_dataset
from keras_e3.data.folder import load_image_folder
from keras_e3.data.folder import load_images
from keras_e3.data.folder import load_raw_dataset
from keras_e3.data.pipeline import ArrayDataset
from keras_e3.data.pipeline import from_arrays
from keras_e3.data.pipeline import from_directory
from keras_e3.data.pipeline import from_tfds
from keras_e3.data.sampling import sample_k_shot
from keras_e3.data.shift import class_subset
from keras_e3.data.shift import load_shift_dataset
