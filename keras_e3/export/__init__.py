"""Export for serving without keras_e3: SavedModel, ONNX, LiteRT."""

from keras_e3.export.exporter import FORMATS
from keras_e3.export.exporter import ExportError
from keras_e3.export.exporter import check_supported
from keras_e3.export.exporter import export_model
from keras_e3.export.exporter import export_preset
from keras_e3.export.exporter import with_dispatcher
from keras_e3.export.serving import preprocess_raw_images
from keras_e3.export.serving import raw_image_shape
from keras_e3.export.serving import serving_model
