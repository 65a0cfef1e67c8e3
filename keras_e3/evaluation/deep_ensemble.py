"""Deep-ensemble baseline: independent E3ViT models, their members pooled.

`DeepEnsemble([model_a, model_b, ...])` stacks every model's member logits
([B, C] for a ViT / V-MoE, [B, M, C] for an E³) into [B, M_total, C], so a
deep ensemble and an E³ are evaluated by the same code
(`keras_e3.metrics.evaluate_predictions`): the ensemble prediction is
log(mean over all M_total members of softmax(logits)).
"""

import keras
import numpy as np

from keras_e3.data.targets import prepare_labels
from keras_e3.evaluation.flops import count_flops
from keras_e3.layers.ensemble import ensemble_log_probs
from keras_e3.metrics.ensemble import evaluate_predictions
from keras_e3.models import E3ViT


class DeepEnsemble:
    """An ensemble of independently trained `E3ViT` models.

    Args:
        models: non-empty list of `E3ViT` models with the same
            `num_classes` and input image shape. E³ models contribute all
            their members.

    Example:
    ```python
    import numpy as np

    import keras_e3

    ensemble = keras_e3.DeepEnsemble([
        keras_e3.E3ViT.from_preset("vit_tiny_digits"),
        keras_e3.E3ViT.from_preset("e3_tiny_digits")])
    len(ensemble)  # 2 models
    raw = np.zeros((2, 8, 8, 1), np.uint8)
    ensemble.predict_members(raw).shape  # (2, 3, 10): 1 + 2 members
    ```
    """

    def __init__(self, models):
        models = list(models)
        if not models:
            raise ValueError("DeepEnsemble needs at least one model; got an "
                             "empty list.")
        for i, model in enumerate(models):
            if not isinstance(model, E3ViT):
                raise ValueError(f"models[{i}] must be an E3ViT; got "
                                 f"{type(model).__name__}.")
        classes = [m.num_classes for m in models]
        if len(set(classes)) > 1:
            raise ValueError(f"All models must have the same num_classes; "
                             f"got {classes}.")
        shapes = [tuple(m.input_shape[1:]) for m in models]
        if len(set(shapes)) > 1:
            raise ValueError("All models must take the same image shape "
                             f"(height, width, channels); got {shapes}.")
        self.models = models
        self.num_classes = classes[0]
        self.image_shape = shapes[0]

    @property
    def ensemble_size(self):
        """Total number of members, M_total."""
        return sum(m.ensemble_size for m in self.models)

    def __len__(self):
        return len(self.models)

    def predict_members(self, images, batch_size=None, verbose=0):
        """Member logits [B, M_total, C] (numpy), models in list order.

        `images`: raw images of any kind `E3ViT.predict` takes (arrays of
        any size, lists, paths, bytes, a `tf.data.Dataset`), each model
        converting them with its own converter (`model.preprocessor`), or
        model-ready images [B, H, W, C]."""
        if all(m.preprocessor is None for m in self.models):
            shape = tuple(getattr(images, "shape", np.shape(images))[1:])
            if shape != self.image_shape:
                expected = ", ".join(map(str, self.image_shape))
                raise ValueError(
                    f"images must be [B, {expected}] (these models have no "
                    f"preprocessor for raw images); got shape "
                    f"{np.shape(images)}.")
        return np.concatenate(
            [model.predict_members(images, batch_size, verbose)
             for model in self.models], axis=1)

    def predict_ensemble(self, images, batch_size=None):
        """Ensemble log-probabilities log(mean_m softmax(logits_m)) [B, C]."""
        logits = self.predict_members(images, batch_size)
        return np.asarray(keras.ops.convert_to_numpy(
            ensemble_log_probs(logits)))

    def evaluate_ensemble(self, images, labels, batch_size=None,
                          num_bins=15, binning="equal_width"):
        """`keras_e3.metrics.evaluate_predictions` on the pooled member
        logits: ensemble and per-member accuracy, NLL, ECE and Brier, and
        the members' diversity. `labels`: class indices, class names (the
        first model's `class_names`) or one-hot rows."""
        labels = prepare_labels(labels, self.num_classes,
                                self.models[0].class_names, sparse=True)
        return evaluate_predictions(self.predict_members(images, batch_size),
                                    labels, num_bins=num_bins,
                                    binning=binning)

    def flops(self, **options):
        """`keras_e3.count_flops` of the ensemble (members summed)."""
        return count_flops(self, **options)
