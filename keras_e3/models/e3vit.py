"""E3ViT: image classifier on an E3ViTBackbone (ViT, V-MoE or E³)."""

import contextlib

import keras
import numpy as np
from keras import ops

from keras_e3.layers.ensemble import EnsembleSplit
from keras_e3.layers.ensemble import ensemble_log_probs
from keras_e3.data.targets import loss_is_sparse
from keras_e3.data.targets import prepare_labels
from keras_e3.data.targets import prepare_labels_tf
from keras_e3.losses import LOSSES
from keras_e3.models.backbone import check_keywords
from keras_e3.models.backbone import E3ViTBackbone
from keras_e3.preprocessing.image_converter import ImageConverter
from keras_e3.models.preset_mixin import PresetMixin


def _member_logits(head, member_split, pooled):
    """The head on the pooled features [B*M, D], then the member split
    ([B, M, C] for E³; `member_split` None: [B, C]): the one place the
    classifier's logits are made, for its graph, `call` and
    `compute_intermediates`."""
    logits = head(pooled)
    return logits if member_split is None else member_split(logits)


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

    Args:
        backbone: an `E3ViTBackbone`.
        num_classes: number of classes of the linear head.
        head_bias_init: initial value of the head's bias.
        head_kernel_initializer: initializer of the head's kernel.
        preprocessor: the `keras_e3.ImageConverter` that turns raw images
            into this model's inputs (presets bring theirs); None: the
            raw-image doors refuse raw images (model-ready inputs only).
        class_names: the classes' names (index i is class i), for
            `decode_predictions` and string labels in `fit` / `evaluate`.
        dtype: the head's dtype policy (default: the backbone's).
        name, trainable: Keras' own keywords. Any other keyword is a
            TypeError.

    Raw images: `predict`, `predict_members`, `predict_ensemble`, `fit` and
    `evaluate` pass their images through `preprocess`, i.e. through
    `preprocessor` (see `preprocess` for every kind of input, `tf.data`
    included). `model(x)` and the backbone always take model-ready float
    images [B, H, W, C].

    Labels (`fit`, `evaluate`, `validation_data`): class indices, class
    names (through `class_names`) or one-hot rows, checked and put in the
    compiled loss's form by `keras_e3.data.targets.prepare_labels` (labels
    outside [0, num_classes) are a ValueError, not a silent zero loss).

    Example:

    ```python
    import numpy as np
    import keras_e3

    backbone = keras_e3.E3ViTBackbone(
        image_size=32, patch_size=8, num_channels=1, hidden_dim=48,
        num_layers=2, num_heads=2, mlp_dim=96, num_experts=4,
        moe_layers=(1,), ensemble_size=2)
    model = keras_e3.E3ViT(
        backbone, num_classes=10,
        preprocessor=keras_e3.ImageConverter(image_size=32, num_channels=1),
        class_names=[str(i) for i in range(10)])
    members = model.predict(np.zeros((1, 32, 32, 1), "float32"), verbose=0)
    assert members.shape == (1, 2, 10)  # [B, M, C]
    assert model.predict_ensemble(np.zeros((8, 8), np.uint8)).shape == (1, 10)
    ```
    """

    backbone_cls = E3ViTBackbone

    def __init__(self, backbone, num_classes, head_bias_init=0.0,
                 head_kernel_initializer="zeros", preprocessor=None,
                 class_names=None, dtype=None, **kwargs):
        check_keywords(type(self).__name__, kwargs)
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
        logits = _member_logits(head, member_split,
                                backbone(inputs)["pooled_output"])
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
        self.class_names = class_names

    @property
    def preprocessor(self):
        """The `ImageConverter` applied to raw images (None: inputs must be
        model-ready)."""
        return self.__dict__.get("_preprocessor")

    @property
    def class_names(self):
        """The classes' names (a list of `num_classes` strings), or
        None."""
        return self.__dict__.get("_class_names")

    def __setattr__(self, name, value):
        if name == "class_names":
            self.__dict__["_class_names"] = _check_class_names(
                value, self.num_classes)
            return None
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
        return None

    # ------------------------------------------------------------------
    # Raw images and labels.
    def preprocess(self, images, batch_size=None):
        """`images` as the model takes them, through `preprocessor`.

        Args:
            images: any input the converter takes (uint8 or float arrays
                of any size, one image [H, W(, C)] or a batch
                [B, H, W(, C)], lists of images of different sizes, file
                paths, encoded bytes, PIL images); or a `tf.data.Dataset`
                of images or of `(images, labels[, sample_weights])`,
                batched or not, whose images are numeric tensors, encoded
                image bytes or file paths (see `preprocess_dataset`); or a
                `keras.utils.PyDataset` / Python generator of such batches
                (converted batch by batch). Float batches of the model's
                input shape already in its value range (`converter.
                is_model_ready`) pass unchanged; uint8 never does.
            batch_size: the batch size given to an unbatched
                `tf.data.Dataset` (default 32).

        Returns:
            A float32 NumPy batch [B, H, W, C], or a dataset / PyDataset /
            generator yielding such batches.
        """
        return self._prepare(images, batch_size=batch_size)[0]

    def preprocess_dataset(self, dataset, batch_size=None, labels=False):
        """A `tf.data.Dataset` of raw images as the model takes them.

        Elements are images, or tuples `(images, labels[, weights])`.
        Images are batched or not, decided from their static shape:
        numeric [B, H, W, C] and gray [B, H, W] (last dimension known and
        larger than 4) are batches; [H, W, C] (last dimension 4 or less,
        or unknown) and [H, W] are single images; a `tf.string` scalar is
        one image, a `tf.string` vector a batch. A string is encoded image
        bytes when it starts with the signature of a format
        `tf.io.decode_image` reads (PNG, JPEG, GIF, BMP, WebP), else a
        file path (read with `tf.io.read_file`); decided element by
        element, in the graph. Every image goes through the converter's
        TensorFlow ops (`convert_tf`), except float batches of the model's
        input shape already in its value range (checked in the graph, as
        `is_model_ready` does). Unbatched datasets are converted image by
        image and then batched by `batch_size` (default 32).

        Args:
            dataset: a `tf.data.Dataset`.
            batch_size: for an unbatched dataset.
            labels: also check and convert the labels (the second tuple
                entry) in the graph with
                `keras_e3.data.targets.prepare_labels_tf`, in the compiled
                loss's form.

        Returns:
            A batched `tf.data.Dataset`.
        """
        import tensorflow as tf

        spec = dataset.element_spec
        is_tuple = isinstance(spec, tuple)
        image_spec = spec[0] if is_tuple else spec
        if not isinstance(image_spec, tf.TensorSpec):
            return dataset  # dicts, ragged tensors: passed to Keras as given
        batched = _is_batched_spec(image_spec)
        images_fn = self._dataset_images_fn(image_spec, batched)
        label_fn = None
        if labels and is_tuple and len(spec) > 1 and spec[1] is not None:
            sparse = self._sparse_labels()
            names, count = self.class_names, self.num_classes
            label_fn = (lambda y: prepare_labels_tf(y, count, names,
                                                    sparse=sparse))

        def convert(*element):
            if not is_tuple:
                return images_fn(element[0])
            return (images_fn(element[0]), *element[1:])

        def relabel(*element):
            return (element[0], label_fn(element[1]), *element[2:])

        if is_tuple and len(spec) == 1:
            dataset = dataset.map(lambda x: (x,))  # Keras' (x,) form
        dataset = dataset.map(convert, num_parallel_calls=tf.data.AUTOTUNE,
                              deterministic=True)
        if not batched:
            dataset = dataset.batch(int(batch_size or DEFAULT_BATCH_SIZE))
        if label_fn is not None:
            dataset = dataset.map(relabel)
        return dataset

    def _dataset_images_fn(self, spec, batched):
        """images (one element's or one batch's) -> model-ready float32
        [B, H, W, C] ([H, W, C] for one image), in TensorFlow ops."""
        import tensorflow as tf

        converter = self.preprocessor
        h, w = self.backbone.embedding.image_size
        c = self.backbone.num_channels
        if spec.dtype == tf.string:
            if spec.shape.rank not in (0, 1):
                raise ValueError(
                    "A tf.data pipeline of strings must hold one encoded "
                    "image or file path per element, or a vector of them "
                    f"per batch; got shape {spec.shape}.")
            if converter is None:
                raise ValueError(_NO_CONVERTER.format(
                    what="encoded images or file paths"))

            def one(s):
                return converter.convert_tf(_read_image_tf(s))

            if not batched:
                return one
            return lambda x: tf.map_fn(one, x, fn_output_signature=(
                tf.TensorSpec(_converted_shape(converter, c), tf.float32)))

        def convert(x):
            if spec.shape.rank == 2 or (batched and spec.shape.rank == 3):
                x = x[..., None]  # gray without a channel axis
            if converter is None:
                return x
            if not batched:
                return converter.ready_or_convert_tf(x[None], (h, w, c))[0]
            return converter.ready_or_convert_tf(x, (h, w, c))

        return convert

    def _prepare(self, x, batch_size=None, labels=False, y=None):
        """(x, y) for Keras: images through `preprocess`, labels (when
        `labels`) through `prepare_labels`."""
        if x is None:
            return x, y
        if _is_dataset(x):
            return self.preprocess_dataset(x, batch_size, labels=labels), y
        if isinstance(x, keras.utils.PyDataset):
            return _MappedPyDataset(x, self._batch_fn(labels)), y
        if isinstance(x, dict):
            return x, y
        if hasattr(x, "__next__") and not hasattr(x, "shape"):
            fn = self._batch_fn(labels)
            return (fn(batch) for batch in x), y
        if labels and y is not None:
            y = self.prepare_labels(y)
        return self._images(x), y

    def _images(self, images):
        converter = self.preprocessor
        if converter is not None:
            images = converter.ready_or_convert(images)
        if hasattr(images, "shape"):
            self.backbone.embedding.check_images(tuple(images.shape))
        return images

    def _batch_fn(self, labels):
        """One batch of a PyDataset or generator -> the model's form."""
        def fn(batch):
            if not isinstance(batch, tuple):
                return self._images(batch)
            out = [self._images(batch[0]), *batch[1:]]
            if labels and len(out) > 1 and out[1] is not None:
                out[1] = self.prepare_labels(out[1])
            return tuple(out)

        return fn

    def prepare_labels(self, labels):
        """`keras_e3.data.targets.prepare_labels` with this model's
        `num_classes`, `class_names` and compiled loss: class indices,
        class names or one-hot rows, checked, in the loss's form."""
        return prepare_labels(labels, self.num_classes, self.class_names,
                              sparse=self._sparse_labels())

    def _sparse_labels(self):
        loss = getattr(self, "loss", None)
        # Not compiled yet: keras-e3's default loss takes class indices.
        return True if loss is None else loss_is_sparse(loss)

    # ------------------------------------------------------------------
    # Keras' entry points, on raw images.
    def predict(self, x, batch_size=None, verbose="auto", steps=None,
                callbacks=None):
        """Keras' predict on raw or model-ready images (see
        `preprocess`)."""
        x, _ = self._prepare(x, batch_size=batch_size)
        with self._variables_kept():
            return super().predict(x, batch_size=batch_size,
                                   verbose=verbose, steps=steps,
                                   callbacks=callbacks)

    def fit(self, x=None, y=None, batch_size=None, *args,
            validation_data=None, **kwargs):
        """Keras' fit; `x` (and `validation_data`'s images) may be raw
        images of any kind `preprocess` takes, and the labels class
        indices, class names or one-hot rows (`prepare_labels`)."""
        if validation_data is not None:
            validation_data = self._prepare_validation(
                validation_data, kwargs.get("validation_batch_size")
                or batch_size)
        x, y = self._prepare(x, batch_size=batch_size, labels=True, y=y)
        with self._variables_kept():
            return super().fit(x, y, batch_size, *args,
                               validation_data=validation_data, **kwargs)

    def _prepare_validation(self, data, batch_size):
        if isinstance(data, tuple):
            images, *rest = data
            labels = rest[0] if rest else None
            images, labels = self._prepare(images, batch_size, labels=True,
                                           y=labels)
            return (images, labels, *rest[1:]) if rest else (images,)
        return self._prepare(data, batch_size, labels=True)[0]

    def evaluate(self, x=None, y=None, batch_size=None, *args, **kwargs):
        """Keras' evaluate; `x` may be raw images, the labels class
        indices, class names or one-hot rows (as `fit`)."""
        x, y = self._prepare(x, batch_size=batch_size, labels=True, y=y)
        with self._variables_kept():
            return super().evaluate(x, y, batch_size, *args, **kwargs)

    @contextlib.contextmanager
    def _variables_kept(self):
        """On JAX, Keras' loops detach the variables' values while they
        run and reattach them at the end; an error raised inside (e.g. a
        tf.data assertion on bad labels or pixels) would leave the model
        without weights. This puts them back: the loop's latest state,
        else the values from before the call."""
        if keras.backend.backend() != "jax":
            yield
            return
        optimizer = getattr(self, "optimizer", None)
        variables = list(self.variables) + list(self.metrics_variables) + (
            list(optimizer.variables) if optimizer is not None else [])
        before = [v._value for v in variables]
        try:
            yield
        except BaseException:
            try:
                self.jax_state_sync()
            finally:
                self.__dict__["_jax_state"] = None
                for v, value in zip(variables, before):
                    if v._value is None:
                        v._value = value
            raise

    def call(self, inputs, training=None, mask=None):
        self.backbone.embedding.check_images(inputs.shape)
        features, router_metrics = self.backbone(
            inputs, training=training, return_router_metrics=True)
        logits = _member_logits(self.head, self.member_split,
                                features["pooled_output"])
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
        faster one (PERFORMANCE.md, "Dispatch policy"). Not under
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

        names = self.class_names or [str(i)
                                     for i in range(self.num_classes)]
        return decode_predictions(preds, names, top=top)

    def compute_intermediates(self, images, training=False):
        """`E3ViTBackbone.compute_intermediates` plus the `logits`."""
        out = self.backbone.compute_intermediates(images, training=training)
        out["logits"] = _member_logits(self.head, self.member_split,
                                       out["pooled_output"])
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
        if self.class_names is not None:
            config["class_names"] = list(self.class_names)
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


DEFAULT_BATCH_SIZE = 32  # an unbatched tf.data pipeline's batches
# Leading bytes of the formats tf.io.decode_image reads: a tf.string that
# starts so is an encoded image, any other a file path.
_IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a",
                     b"GIF89a")
_NO_CONVERTER = ("This model has no preprocessor, so it cannot take "
                 "{what}: build it with E3ViT(backbone, num_classes, "
                 "preprocessor=keras_e3.ImageConverter(...)), or give "
                 "model-ready float32 images.")


def _is_dataset(x):
    return type(x).__module__.startswith("tensorflow") and hasattr(
        x, "element_spec")


def _check_class_names(names, num_classes):
    if names is None:
        return None
    if isinstance(names, (str, bytes)):
        raise ValueError("class_names must be a list of names, not one "
                         "string.")
    names = [str(n) for n in names]
    if len(names) != num_classes:
        raise ValueError(f"class_names has {len(names)} names for a model "
                         f"of {num_classes} classes.")
    return names


def _is_batched_spec(spec):
    """Whether a tf.data element's images are a batch (see
    `E3ViT.preprocess_dataset`)."""
    rank = spec.shape.rank
    if rank is None:
        raise ValueError("A tf.data pipeline of images of unknown rank: give "
                         "its images a static rank.")
    if spec.dtype.name == "string":
        return rank == 1
    if rank == 4:
        return True
    if rank == 2:
        return False
    if rank == 3:  # [H, W, C] with C <= 4 is one image, else [B, H, W]
        last = spec.shape[-1]
        return last is not None and last > 4
    raise ValueError("tf.data images must be [H, W], [H, W, C], [B, H, W] "
                     f"or [B, H, W, C]; got shape {spec.shape}.")


def _converted_shape(converter, channels):
    size = converter.image_size or (None, None)
    return (*size, converter.num_channels or channels)


def _read_image_tf(s):
    """A scalar tf.string -> encoded image bytes: itself when it starts
    with an image format's signature, else the file it names."""
    import tensorflow as tf

    checks = [tf.equal(tf.strings.substr(s, 0, len(sig)), sig)
              for sig in _IMAGE_SIGNATURES]
    # BMP: "BM", then 4 bytes of file size and 4 reserved zero bytes (a
    # path never holds a NUL byte); WebP: "RIFF", size, "WEBP".
    checks.append(tf.logical_and(
        tf.equal(tf.strings.substr(s, 0, 2), b"BM"),
        tf.equal(tf.strings.substr(s, 6, 4), b"\x00\x00\x00\x00")))
    checks.append(tf.logical_and(
        tf.equal(tf.strings.substr(s, 0, 4), b"RIFF"),
        tf.equal(tf.strings.substr(s, 8, 4), b"WEBP")))
    encoded = tf.reduce_any(tf.stack(checks))
    return tf.cond(encoded, lambda: s, lambda: tf.io.read_file(s))


class _MappedPyDataset(keras.utils.PyDataset):
    """A PyDataset whose batches go through `fn` (raw images through the
    model's converter, labels checked)."""

    def __init__(self, dataset, fn):
        super().__init__(workers=dataset.workers,
                         use_multiprocessing=dataset.use_multiprocessing,
                         max_queue_size=dataset.max_queue_size)
        self.dataset = dataset
        self.fn = fn

    def __len__(self):
        return len(self.dataset)

    @property
    def num_batches(self):
        return self.dataset.num_batches

    def __getitem__(self, index):
        return self.fn(self.dataset[index])

    def on_epoch_begin(self):
        self.dataset.on_epoch_begin()

    def on_epoch_end(self):
        self.dataset.on_epoch_end()
