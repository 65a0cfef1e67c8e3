"""Training objectives for ensembles of members that share one label."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_e3")
class EnsembleSoftmaxCrossEntropy(keras.losses.Loss):
    """Each member's softmax cross-entropy on the shared label, averaged.

    This is vmoe's `ensemble_softmax_xent_train`. `y_pred` is member logits
    [B, M, C] (or [B, C] for a single model); `y_true` is integer labels [B]
    (`sparse=True`) or one-hot / soft labels [B, C].
    """

    def __init__(self, sparse=True, label_smoothing=0.0,
                 name="ensemble_softmax_cross_entropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.sparse = sparse
        self.label_smoothing = label_smoothing

    def call(self, y_true, y_pred):
        num_classes = y_pred.shape[-1]
        if self.sparse:
            y_true = ops.one_hot(ops.cast(ops.reshape(y_true, (-1,)), "int32"),
                                 num_classes, dtype=y_pred.dtype)
        y_true = ops.cast(y_true, y_pred.dtype)
        if self.label_smoothing:
            y_true = (y_true * (1.0 - self.label_smoothing)
                      + self.label_smoothing / num_classes)
        log_probs = ops.log_softmax(y_pred, axis=-1)
        if len(y_pred.shape) == 3:  # [B, M, C]: same label for every member.
            y_true = y_true[:, None, :]
            return -ops.mean(ops.sum(y_true * log_probs, axis=-1), axis=1)
        return -ops.sum(y_true * log_probs, axis=-1)

    def get_config(self):
        config = super().get_config()
        config.update(sparse=self.sparse, label_smoothing=self.label_smoothing)
        return config
