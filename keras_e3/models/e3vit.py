"""E3ViT: image classifier on an E3ViTBackbone (ViT, V-MoE or E³)."""

import keras
import numpy as np
from keras import ops

from keras_e3.layers.ensemble import EnsembleSplit
from keras_e3.layers.ensemble import ensemble_log_probs
from keras_e3.preprocessing.image_converter import ImageConverter
from keras_e3.losses import LOSSES
from keras_e3.models.backbone import E3ViTBackbone
from keras_e3.models.preset_mixin import PresetMixin


@keras.saving.register_keras_serializable(package="keras_e3")
class E3ViT(PresetMixin, keras.Model):
    """Image classifier: backbone -> linear head, one prediction per member.

    Output: logits [B, C] for a dense ViT or V-MoE (`ensemble_size` 1), and
    member logits [B, M, C] for E³. `to_official_order` turns [B, M, C] into
    vmoe's [B*M, C] (row b*M + m); `predict_ensemble` (or
    `keras_e3.ensemble_log_probs`) gives the ensemble's log-probabilities
    log(mean_m softmax(logits_m)) [B, C].

    `compile()` defaults to the paper's objective: each member's softmax
    cross-entropy on the shared label, averaged, plus the routers'
    auxiliary losses (added by the MoE layers and reported as `aux_loss`).

    Raw images: `preprocessor` (a `keras_e3.ImageConverter`; presets bring
    theirs) is applied by `predict`, `predict_members`, `predict_ensemble`,
    `fit` and `evaluate` to raw inputs (uint8 or float arrays of any size,
    one image or a batch, lists of arrays, file paths, encoded bytes, or a
    `tf.data.Dataset` of them). Float batches already of the model's input
    shape with values in its value range are taken as model-ready and fed
    as they are. `model(x)` and the backbone always take model-ready
    float images [B, H, W, C].
    """

    backbone_cls = E3ViTBackbone

    def __init__(self, backbone, num_classes, head_bias_init=0.0,
                 head_kernel_initializer="zeros", preprocessor=None,
                 dtype=None, **kwargs):
        if not isinstance(backbone, E3ViTBackbone):
            raise TypeError("backbone must be an E3ViTBackbone; got "
                            f"{type(backbone).__name__}.")
        head = keras.layers.Dense(
            num_classes, kernel_initializer=head_kernel_initializer,
            bias_initializer=keras.initializers.Constant(head_bias_init),
            dtype=dtype or backbone.embedding.dtype_policy, name="head")
        m = backbone.ensemble_size
        member_split = (EnsembleSplit(m, name="member_logits") if m > 1
                        else None)
        inputs = backbone.input
        logits = head(backbone(inputs)["pooled_output"])
        if member_split is not None:
            logits = member_split(logits)
        super().__init__(inputs=inputs, outputs=logits, **kwargs)
        self.input_spec = None  # the backbone's embedding checks images
        self.backbone = backbone
        self.head = head
        self.member_split = member_split
        self.num_classes = num_classes
        self.head_bias_init = head_bias_init
        self.head_kernel_initializer = head_kernel_initializer
        self.aux_loss_tracker = keras.metrics.Mean(name="aux_loss")
        self.router_loss_trackers = {
            name: keras.metrics.Mean(name=name)
            for name in ("importance_loss", "load_loss")}
        self.preprocessor = preprocessor

    @property
    def preprocessor(self):
        """The `ImageConverter` applied to raw images (None: inputs must be
        model-ready)."""
        return self.__dict__.get("_preprocessor")

    def __setattr__(self, name, value):
        if name != "preprocessor":
            return super().__setattr__(name, value)
        if isinstance(value, dict):
            value = ImageConverter.from_preset_config(value)
        if value is not None and not isinstance(value, ImageConverter):
            raise TypeError("preprocessor must be a keras_e3.ImageConverter"
                            f" (or None); got {type(value).__name__}.")
        # Kept out of Keras' (and torch's) layer tracking: it has no
        # weights, and the weight files stay those of a model without one.
        self.__dict__["_preprocessor"] = value

    def preprocess(self, images):
        """`images` as the model takes them: the preprocessor applied to
        raw images (model-ready inputs pass unchanged); a
        `tf.data.Dataset`'s images are mapped inside the pipeline."""
        if _is_dataset(images):
            return self._preprocess_dataset(images)
        converter = self.preprocessor
        if converter is None or _is_opaque(images) or \
                converter.is_model_ready(images):
            if hasattr(images, "shape") and not _is_opaque(images):
                self.backbone.embedding.check_images(tuple(images.shape))
            return images
        return converter(images)

    def _preprocess_dataset(self, dataset):
        converter = self.preprocessor
        spec = dataset.element_spec
        image_spec = spec[0] if isinstance(spec, tuple) else spec
        if converter is None or not hasattr(image_spec, "shape") or (
                image_spec.dtype.is_floating
                and image_spec.shape.rank == 4
                and tuple(image_spec.shape[1:]) == (
                    *self.backbone.embedding.image_size,
                    self.backbone.num_channels)):
            return dataset
        if isinstance(spec, tuple):
            return dataset.map(lambda x, *rest: (converter(x), *rest))
        return dataset.map(converter)

    def predict(self, x, batch_size=None, verbose="auto", steps=None,
                callbacks=None):
        """Keras' predict on raw or model-ready images (see the class
        docstring)."""
        return super().predict(self.preprocess(x), batch_size=batch_size,
                               verbose=verbose, steps=steps,
                               callbacks=callbacks)

    def fit(self, x=None, y=None, *args, validation_data=None, **kwargs):
        """Keras' fit; `x` (and `validation_data`'s images) may be raw."""
        if validation_data is not None:
            if isinstance(validation_data, tuple):
                validation_data = (self.preprocess(validation_data[0]),
                                   *validation_data[1:])
            else:
                validation_data = self.preprocess(validation_data)
        return super().fit(self.preprocess(x) if x is not None else x, y,
                           *args, validation_data=validation_data, **kwargs)

    def evaluate(self, x=None, y=None, *args, **kwargs):
        """Keras' evaluate; `x` may be raw images."""
        return super().evaluate(self.preprocess(x) if x is not None else x,
                                y, *args, **kwargs)

    def call(self, inputs, training=None, mask=None):
        self.backbone.embedding.check_images(inputs.shape)
        features, router_metrics = self.backbone(
            inputs, training=training, return_router_metrics=True)
        logits = self.head(features["pooled_output"])
        if self.member_split is not None:
            logits = self.member_split(logits)
        # The router statistics this forward pass returned, for the loss
        # computation of the same train or test step (`compute_loss`, which
        # Keras' trainers call right after it, in the same trace). Kept out
        # of Keras' attribute tracking: they are tensors of one step.
        self.__dict__["_step_router_metrics"] = router_metrics
        return logits

    def predict_step(self, *args):
        try:  # (data), or (state, data) on JAX
            return super().predict_step(*args)
        finally:  # predict computes no loss: nothing of its trace is kept
            self.__dict__.pop("_step_router_metrics", None)

    def _resolve_auto_jit_compile(self):
        """What `jit_compile="auto"` (compile()'s default, and that of a
        model never compiled) means: Keras' choice, except that on
        TensorFlow these models are compiled with XLA on a CPU-only machine
        too, where Keras runs TensorFlow graphs without XLA. The models
        compile there (the whole suite runs so), and XLA's program is the
        faster one: E³ S/32's `predict_on_batch` at batch 32 took 2341 ms
        without XLA and 1270 ms with it (`benchmarks/backends.py`). Not under
        a `tf.distribute` strategy, nor where a layer says it does not
        support XLA, nor with op determinism enabled (Keras' own rules)."""
        resolved = super()._resolve_auto_jit_compile()
        if resolved or keras.backend.backend() != "tensorflow":
            return resolved
        # Keras' rules for the layers and op determinism, as for a GPU.
        from keras.src.trainers.trainer import model_supports_jit

        return (not getattr(self, "_distribute_strategy", None)
                and model_supports_jit(self))

    @property
    def ensemble_size(self):
        return self.backbone.ensemble_size

    def compile(self, optimizer="adam", loss="auto", metrics="auto",
                **kwargs):
        """Keras' compile with the paper's defaults.

        `loss`: "auto" / "softmax" (each member's softmax cross-entropy on
        the shared label, averaged), "sigmoid" (vmoe's sigmoid
        cross-entropy), or any Keras loss. The routers' auxiliary losses
        are always added. `metrics`: "auto" reports the ensemble's accuracy
        and NLL and each member's accuracy; None for none.
        """
        if isinstance(loss, str) and loss in ("auto", *LOSSES):
            loss = LOSSES["softmax" if loss == "auto" else loss]()
        if isinstance(metrics, str) and metrics == "auto":
            from keras_e3.metrics import EnsembleAccuracy
            from keras_e3.metrics import EnsembleNLL
            from keras_e3.metrics import MemberAccuracy

            metrics = [EnsembleAccuracy(), EnsembleNLL()]
            if self.ensemble_size > 1:
                metrics += [MemberAccuracy(m)
                            for m in range(self.ensemble_size)]
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics,
                        **kwargs)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                     training=True):
        total = super().compute_loss(x, y, y_pred, sample_weight,
                                     training=training)
        aux = self.losses
        self.aux_loss_tracker.update_state(
            ops.sum(ops.stack([ops.cast(a, "float32") for a in aux]))
            if aux else 0.0)
        for name, value in self._router_losses().items():
            self.router_loss_trackers[name].update_state(value)
        return total

    def _router_losses(self):
        """Unweighted importance / load losses of the step's forward pass
        (the router metrics `call` got back from the backbone), each
        averaged over groups and members and summed over MoE blocks (vmoe's
        per-block metrics, totalled). The load loss exists only in
        training."""
        step_metrics = self.__dict__.pop("_step_router_metrics", None) or {}
        sums = {}
        for metrics in step_metrics.values():
            for name in self.router_loss_trackers:
                if name in metrics:
                    value = ops.mean(ops.cast(metrics[name], "float32"))
                    sums[name] = sums.get(name, 0.0) + value
        return sums

    @property
    def metrics(self):
        metrics = super().metrics
        if self.compiled:
            trackers = [self.aux_loss_tracker,
                        *self.router_loss_trackers.values()]
            metrics.extend(t for t in trackers if t not in metrics)
        return metrics

    def to_official_order(self, logits):
        """[B, M, C] member logits -> vmoe's [B*M, C] (row b*M + m)."""
        return ops.reshape(logits, (-1, logits.shape[-1]))

    def predict_members(self, images, batch_size=None, verbose=0):
        """Member logits as a float32 NumPy array [B, M, C] (M = 1 for a
        dense ViT or a V-MoE)."""
        logits = np.asarray(self.predict(images, batch_size=batch_size,
                                         verbose=verbose), dtype=np.float32)
        return logits[:, None, :] if logits.ndim == 2 else logits

    def predict_ensemble(self, images, batch_size=None, verbose=0):
        """Ensemble log-probabilities log(mean_m softmax(logits_m)), [B, C]."""
        logits = self.predict_members(images, batch_size, verbose)
        return np.asarray(ops.convert_to_numpy(ensemble_log_probs(logits)))

    def decode_predictions(self, preds, top=5):
        """keras-hub's `decode_predictions` with this model's class names
        (`model.class_names`, from its preset; class indices otherwise):
        [[(name, probability), ...] per image]. `preds`: probabilities
        [B, C] or `predict_ensemble`'s log-probabilities."""
        from keras_e3.data.labels import decode_predictions

        names = getattr(self, "class_names", None) or [
            str(i) for i in range(self.num_classes)]
        return decode_predictions(preds, names, top=top)

    def compute_intermediates(self, images, training=False):
        """`E3ViTBackbone.compute_intermediates` plus the `logits`."""
        out = self.backbone.compute_intermediates(images, training=training)
        logits = self.head(out["pooled_output"])
        if self.ensemble_size > 1:
            logits = ops.reshape(logits, (-1, self.ensemble_size,
                                          self.num_classes))
        out["logits"] = logits
        return out

    @classmethod
    def from_vmoe(cls, config, params, image_size=None):
        """Builds the model of a vmoe config and loads official parameters.

        `config` is a vmoe model config dict (the `model` kwargs, as in the
        fixtures' config.json) or a path to such a JSON file. `params` maps
        the official Flax parameter names ("Encoder/encoderblock_1/Moe/...")
        to arrays, or is a path to an .npz of them, a native vmoe
        checkpoint prefix (local, https:// or gs://; downloaded once into
        the cache), or a checkpoint of vmoe's trainer (orbax/OCDBT; the
        keras-e3[orbax] extra): its workdir or ckpt/ folder (the latest
        complete step, printed), a step directory ckpt/<step> or its state/
        directory, of which only the params are read. `image_size` defaults
        to the config's, else is inferred from the position embedding.
        """
        from keras_e3.conversion.vmoe import model_from_vmoe

        return model_from_vmoe(config, params, cls, image_size=image_size)

    def get_config(self):
        config = {
            "name": self.name,
            "trainable": self.trainable,
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            "num_classes": self.num_classes,
            "head_bias_init": self.head_bias_init,
            "head_kernel_initializer": self.head_kernel_initializer,
        }
        if self.preprocessor is not None:
            config["preprocessor"] = keras.saving.serialize_keras_object(
                self.preprocessor)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(
            config["backbone"])
        if config.get("preprocessor") is not None:
            config["preprocessor"] = ImageConverter.from_preset_config(
                config["preprocessor"])
        return cls(**config)


def _is_dataset(x):
    return type(x).__module__.startswith("tensorflow") and hasattr(
        x, "element_spec")


def _is_opaque(x):
    """Inputs the model passes to Keras untouched: generators, Keras
    PyDatasets, dicts."""
    return isinstance(x, (dict, keras.utils.PyDataset)) or (
        hasattr(x, "__next__") and not hasattr(x, "shape"))
