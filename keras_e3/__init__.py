"""keras-e3: V-MoE and E³ (Efficient Ensemble of Experts) models for Keras 3."""

__version__ = "0.1.0"

from keras_e3 import data
from keras_e3 import distribution
from keras_e3 import layers
from keras_e3 import metrics
from keras_e3.data.labels import decode_predictions
from keras_e3.layers.ensemble import ensemble_log_probs
from keras_e3.preprocessing.image_converter import ImageConverter
from keras_e3.losses import EnsembleSigmoidCrossEntropy
from keras_e3.losses import EnsembleSoftmaxCrossEntropy
from keras_e3.models import E3ViT
from keras_e3.models import E3ViTBackbone
from keras_e3.models.upcycle import upcycle
from keras_e3 import evaluation
from keras_e3 import presets
from keras_e3 import training
from keras_e3.evaluation import DeepEnsemble
from keras_e3.evaluation import count_flops
from keras_e3.evaluation import count_flops_from_config
from keras_e3.evaluation import deep_ensemble_flops
from keras_e3.evaluation import flops
from keras_e3.evaluation import flops_ratio
from keras_e3.presets import PresetError
from keras_e3.presets import list_presets
from keras_e3.presets import upload_preset
from keras_e3.training import fewshot
