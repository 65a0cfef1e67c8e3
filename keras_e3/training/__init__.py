"""Training: the paper's fine-tuning recipe (optimizer, schedule, freezing:
`recipe`), fine-tuning a preset on a dataset (`finetune`) and few-shot
linear probes (`fewshot`). The ensemble losses live in `keras_e3.losses`,
below the models that compile with them."""

from keras_e3.training import fewshot
from keras_e3.training.fine_tuning import finetune
from keras_e3.training.recipe import OPTIMIZERS
from keras_e3.training.recipe import TRAIN_MODES
from keras_e3.training.recipe import WarmupCosineSchedule
from keras_e3.training.recipe import expert_layers
from keras_e3.training.recipe import freeze
from keras_e3.training.recipe import make_optimizer
from keras_e3.training.recipe import set_mixed_precision
from keras_e3.training.recipe import warmup_cosine_schedule
