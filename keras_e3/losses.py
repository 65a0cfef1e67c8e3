"""Training objectives for ensembles of members that share one label."""

import keras
from keras import ops


class _EnsembleLoss(keras.losses.Loss):
    """Each member's loss on the shared label, averaged over members.

    `y_pred` is member logits [B, M, C] (or [B, C] for a single model);
    `y_true` is integer labels [B] (`sparse=True`) or one-hot / soft labels
    [B, C]. `label_smoothing` mixes the targets with the uniform
    distribution.
    """

    def __init__(self, sparse=True, label_smoothing=0.0, name=None, **kwargs):
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
        if len(y_pred.shape) == 3:  # [B, M, C]: same label for every member.
            return ops.mean(self.per_member(y_true[:, None, :], y_pred),
                            axis=1)
        return self.per_member(y_true, y_pred)

    def get_config(self):
        config = super().get_config()
        config.update(sparse=self.sparse, label_smoothing=self.label_smoothing)
        return config


@keras.saving.register_keras_serializable(package="keras_e3")
class EnsembleSoftmaxCrossEntropy(_EnsembleLoss):
    """Each member's softmax cross-entropy on the shared label, averaged:
    vmoe's `ensemble_softmax_xent_train` (the paper's objective).

    `y_pred` is member logits [B, M, C] (or [B, C]); `y_true` integer labels
    [B] (`sparse=True`) or one-hot / soft labels [B, C].

    Args:
        sparse: whether the labels are integers.
        label_smoothing: label smoothing of the one-hot targets.
        name: the loss's name.
        **kwargs: Keras' `Loss` arguments (e.g. `reduction`).

    Example:
    ```python
    import numpy as np

    import keras_e3

    loss = keras_e3.EnsembleSoftmaxCrossEntropy()
    logits = np.zeros((2, 3, 4), np.float32)  # 2 images, 3 members, 4 classes
    float(loss(np.array([0, 3]), logits))  # log(4)
    ```
    """

    def __init__(self, sparse=True, label_smoothing=0.0,
                 name="ensemble_softmax_cross_entropy", **kwargs):
        super().__init__(sparse, label_smoothing, name=name, **kwargs)

    def per_member(self, y_true, logits):
        return -ops.sum(y_true * ops.log_softmax(logits, axis=-1), axis=-1)


@keras.saving.register_keras_serializable(package="keras_e3")
class EnsembleSigmoidCrossEntropy(_EnsembleLoss):
    """Each member's sigmoid cross-entropy summed over classes, averaged
    over members: vmoe's `sigmoid_xent` (used to pre-train V-MoE on
    ILSVRC2012 and ImageNet-21k).

    `y_pred` is member logits [B, M, C] (or [B, C]); `y_true` integer labels
    [B] (`sparse=True`) or multi-hot / soft labels [B, C].

    Args:
        sparse: whether the labels are integers.
        label_smoothing: label smoothing of the targets.
        name: the loss's name.
        **kwargs: Keras' `Loss` arguments (e.g. `reduction`).

    Example:
    ```python
    import numpy as np

    import keras_e3

    loss = keras_e3.EnsembleSigmoidCrossEntropy()
    logits = np.zeros((2, 3, 4), np.float32)
    float(loss(np.array([0, 3]), logits))  # 4 log(2)
    ```
    """

    def __init__(self, sparse=True, label_smoothing=0.0,
                 name="ensemble_sigmoid_cross_entropy", **kwargs):
        super().__init__(sparse, label_smoothing, name=name, **kwargs)

    def per_member(self, y_true, logits):
        return -ops.sum(y_true * ops.log_sigmoid(logits)
                        + (1.0 - y_true) * ops.log_sigmoid(-logits), axis=-1)


LOSSES = {"softmax": EnsembleSoftmaxCrossEntropy,
          "sigmoid": EnsembleSigmoidCrossEntropy}
