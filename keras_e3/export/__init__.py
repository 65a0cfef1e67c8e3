"""Export for serving without keras_e3: SavedModel, ONNX, LiteRT."""

from keras_e3.export.errors import ExportError
from keras_e3.export.exporter import FORMATS
from keras_e3.export.exporter import check_supported
from keras_e3.export.exporter import export_model
from keras_e3.export.exporter import export_preset
from keras_e3.export.exporter import format_from_path
from keras_e3.export.exporter import with_dispatcher
from keras_e3.export.serving import resize_area_matmul
from keras_e3.export.serving import serving_model
