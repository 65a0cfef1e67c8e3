"""Keras layers for ViT, V-MoE and E³ models."""

from keras_e3.layers.dispatch import EinsumDispatcher
from keras_e3.layers.dispatch import compute_capacity
from keras_e3.layers.dispatch import make_dispatcher
from keras_e3.layers.dispatch import top_experts_per_item
from keras_e3.layers.embedding import PatchAndPositionEmbedding
from keras_e3.layers.embedding import resample_position_embedding
from keras_e3.layers.encoder_block import EncoderBlock
from keras_e3.layers.ensemble import EnsembleSplit
from keras_e3.layers.ensemble import EnsembleTile
from keras_e3.layers.ensemble import ensemble_log_probs
from keras_e3.layers.mlp import ExpertsMlp
from keras_e3.layers.mlp import Mlp
from keras_e3.layers.moe import MoeMlp
from keras_e3.layers.moe import MoeSettings
from keras_e3.layers.router import Router
