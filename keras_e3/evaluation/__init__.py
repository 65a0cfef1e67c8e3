"""Evaluation: the report of `keras-e3 evaluate` (`report`), robustness
under distribution shift (`robustness`: corruptions, mCE, shifted test
sets), routing inspection (`routing`), plots (`plots`), FLOP counts
(`flops`) and the deep-ensemble baseline (`deep_ensemble`)."""

from keras_e3.evaluation import flops
from keras_e3.evaluation.deep_ensemble import DeepEnsemble
from keras_e3.evaluation.flops import count_flops
from keras_e3.evaluation.flops import count_flops_from_config
from keras_e3.evaluation.flops import deep_ensemble_flops
from keras_e3.evaluation.flops import flops_ratio
from keras_e3.evaluation.report import describe_members
from keras_e3.evaluation.report import evaluate
from keras_e3.evaluation.report import ood_metrics
from keras_e3.evaluation.report import summary
from keras_e3.evaluation.robustness import evaluate_corruptions
from keras_e3.evaluation.robustness import evaluate_shift
from keras_e3.evaluation.robustness import mean_corruption_error
from keras_e3.evaluation.robustness import summarize_corruptions
from keras_e3.evaluation.routing import routing_stats
