"""The one pipeline from raw images to model inputs: `ImageConverter`.

Every door of keras-e3 that takes raw images (`predict`, `fit`,
`evaluate`, few-shot, the data loaders, the command line, routing maps and
the exported serving graph) goes through the model's `ImageConverter`.
It sits between the layers (which know nothing about files) and the models
(which own a converter as their `preprocessor`).
"""

from keras_e3.preprocessing.image_converter import ImageConverter
from keras_e3.preprocessing.image_converter import decode_image
from keras_e3.preprocessing.image_converter import parse_process
