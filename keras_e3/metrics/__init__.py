"""Uncertainty, calibration, diversity and OOD metrics.

Plain numpy functions take probabilities [N, C] (or member probabilities
[N, M, C]) and integer labels [N]; `evaluate_predictions` takes member
logits [N, M, C] and reports everything for the ensemble and each member.
Keras metrics (`EnsembleAccuracy`, `EnsembleNLL`, `EnsembleBrier`, `ECE`,
each for the ensemble or one `member`; `MemberAccuracy`,
`MemberDisagreement`; all of them: `ensemble_metrics(M)`) take logits in
`model.compile`.
"""

from keras_e3.metrics.calibration import accuracy
from keras_e3.metrics.calibration import brier
from keras_e3.metrics.calibration import ece
from keras_e3.metrics.calibration import nll
from keras_e3.metrics.calibration import reliability
from keras_e3.metrics.calibration import softmax
from keras_e3.metrics.ensemble import average_pairwise_kl
from keras_e3.metrics.ensemble import diversity
from keras_e3.metrics.ensemble import ensemble_probs
from keras_e3.metrics.ensemble import evaluate_predictions
from keras_e3.metrics.ensemble import member_disagreement
from keras_e3.metrics.ensemble import normalized_disagreement
from keras_e3.metrics.keras_metrics import ECE
from keras_e3.metrics.keras_metrics import EnsembleAccuracy
from keras_e3.metrics.keras_metrics import EnsembleBrier
from keras_e3.metrics.keras_metrics import EnsembleNLL
from keras_e3.metrics.keras_metrics import MemberAccuracy
from keras_e3.metrics.keras_metrics import MemberDisagreement
from keras_e3.metrics.keras_metrics import ensemble_metrics
from keras_e3.metrics.ood import aupr
from keras_e3.metrics.ood import auroc
from keras_e3.metrics.ood import entropy_score
from keras_e3.metrics.ood import fpr_at_95_tpr
from keras_e3.metrics.ood import max_logit_score
from keras_e3.metrics.ood import msp_score
from keras_e3.metrics.ood import mutual_information_score
