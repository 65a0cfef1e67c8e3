"""Fine-tuning helpers: the paper's optimizer, schedule and freezing recipe.

V-MoE / E³ fine-tuning (vmoe's configs, Allingham et al. 2022, App. A) uses
SGD with momentum 0.9, gradients clipped to a global norm of 1.0 and a
learning rate with a linear warm-up followed by a cosine decay to 0::

    schedule = warmup_cosine_schedule(0.01, total_steps=10_000,
                                      warmup_steps=500)
    model.compile(optimizer=make_optimizer("sgd", schedule))

`freeze(model, train=...)` chooses which part of an `E3ViT` is trained.
Call it before `compile()` (or compile again afterwards): Keras collects the
trainable variables when it builds the train step.

Mixed precision is Keras' global dtype policy: `set_mixed_precision(True)`
(= `keras.mixed_precision.set_global_policy("mixed_bfloat16")`) before the
model is built; variables stay float32, layers compute in bfloat16. The
fp32 equivalence with vmoe (README) holds for float32 models only.
"""

import keras

from keras_e3.layers.mlp import ExpertsMlp

OPTIMIZERS = ("sgd", "adam", "adamw")
TRAIN_MODES = ("head", "all", "all_but_experts")


def warmup_cosine_schedule(peak_lr, total_steps, warmup_steps=0, end_lr=0.0):
    """Linear warm-up from 0 to `peak_lr`, then cosine decay to `end_lr`:
    Keras' own `CosineDecay` (its `warmup_target` / `warmup_steps`).

    lr(s) = peak_lr * s / warmup_steps                     for s < warmup
    lr(s) = end_lr + (peak_lr - end_lr) * (1 + cos(pi p)) / 2  afterwards,
    with p = (s - warmup_steps) / (total_steps - warmup_steps) clipped to
    [0, 1] (so lr = end_lr from `total_steps` on). This is vmoe's /
    big_vision's "linear_warmup * cosine_decay".

    Args:
        peak_lr: the learning rate at the end of the warm-up (> 0).
        total_steps: steps of warm-up and decay together.
        warmup_steps: steps of the linear warm-up (< `total_steps`).
        end_lr: the final learning rate, in [0, peak_lr].

    Returns:
        A `keras.optimizers.schedules.LearningRateSchedule`.

    Example:
    ```python
    from keras_e3 import training

    schedule = training.warmup_cosine_schedule(0.1, total_steps=100,
                                               warmup_steps=10)
    [float(schedule(step)) for step in (0, 5, 10, 100)]  # [0, 0.05, 0.1, 0]
    ```
    """
    _validate_schedule(peak_lr, total_steps, warmup_steps, end_lr)
    return keras.optimizers.schedules.CosineDecay(
        **_cosine_decay_args(peak_lr, total_steps, warmup_steps, end_lr))


def _cosine_decay_args(peak_lr, total_steps, warmup_steps, end_lr):
    warm = bool(warmup_steps)
    return dict(initial_learning_rate=0.0 if warm else float(peak_lr),
                decay_steps=int(total_steps - warmup_steps),
                alpha=float(end_lr) / float(peak_lr),
                warmup_target=float(peak_lr) if warm else None,
                warmup_steps=int(warmup_steps))


@keras.saving.register_keras_serializable(package="keras_e3")
class WarmupCosineSchedule(keras.optimizers.schedules.CosineDecay):
    """The schedule of `warmup_cosine_schedule` under its earlier name, kept
    so that optimizers saved with it (config keys `peak_lr`, `total_steps`,
    `warmup_steps`, `end_lr`) still load.

    Args:
        peak_lr: the learning rate at the end of the warm-up.
        total_steps: steps of warm-up and decay together.
        warmup_steps: steps of the linear warm-up.
        end_lr: the final learning rate.

    Example:
    ```python
    from keras_e3 import training

    schedule = training.WarmupCosineSchedule(0.1, total_steps=100,
                                             warmup_steps=10)
    float(schedule(10))  # 0.1
    ```
    """

    def __init__(self, peak_lr, total_steps, warmup_steps=0, end_lr=0.0):
        _validate_schedule(peak_lr, total_steps, warmup_steps, end_lr)
        super().__init__(**_cosine_decay_args(peak_lr, total_steps,
                                              warmup_steps, end_lr))
        self.peak_lr = float(peak_lr)
        self.total_steps = int(total_steps)
        self.end_lr = float(end_lr)

    def get_config(self):
        return {"peak_lr": self.peak_lr, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps, "end_lr": self.end_lr}


def make_optimizer(name="sgd", learning_rate=0.01, momentum=0.9,
                   global_clipnorm=1.0, weight_decay=None, **kwargs):
    """A Keras optimizer with the paper's gradient clipping.

    Args:
        name: "sgd" (momentum SGD, the fine-tuning recipe), "adam" or
            "adamw" (upstream pre-training uses Adam with beta_2 = 0.999).
        learning_rate: a float or a schedule (`warmup_cosine_schedule`).
        momentum: SGD momentum (ignored by Adam).
        global_clipnorm: clip the global norm of all gradients together
            (None: no clipping).
        weight_decay: decoupled weight decay (None: none).
        **kwargs: passed on to the Keras optimizer (e.g. `beta_2`).

    Returns:
        A `keras.optimizers.Optimizer`.

    Example:
    ```python
    from keras_e3 import training

    schedule = training.warmup_cosine_schedule(0.01, total_steps=100,
                                               warmup_steps=10)
    optimizer = training.make_optimizer("sgd", learning_rate=schedule)
    optimizer.global_clipnorm  # 1.0
    ```
    """
    key = str(name).lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}; expected one of "
                         f"{OPTIMIZERS}.")
    if global_clipnorm is not None and global_clipnorm <= 0:
        raise ValueError("global_clipnorm must be positive or None; got "
                         f"{global_clipnorm}.")
    common = dict(learning_rate=learning_rate, global_clipnorm=global_clipnorm,
                  weight_decay=weight_decay, **kwargs)
    if key == "sgd":
        return keras.optimizers.SGD(momentum=momentum, **common)
    if key == "adam":
        return keras.optimizers.Adam(**common)
    if weight_decay is None:
        common["weight_decay"] = 0.004  # Keras' AdamW default.
    return keras.optimizers.AdamW(**common)


def expert_layers(model):
    """The `ExpertsMlp` layers of an `E3ViT` or `E3ViTBackbone`.

    Args:
        model: an `E3ViT` or `E3ViTBackbone`.

    Returns:
        A list of `keras_e3.layers.ExpertsMlp` (empty for a dense ViT).

    Example:
    ```python
    import keras_e3

    model = keras_e3.E3ViT.from_preset("e3_tiny_digits")

    from keras_e3 import training

    [layer.path for layer in training.expert_layers(model)]
    ```
    """
    backbone = getattr(model, "backbone", model)
    layers = [block.mlp.experts for block in backbone.moe_blocks]
    assert all(isinstance(layer, ExpertsMlp) for layer in layers)
    return layers


def freeze(model, train="head"):
    """Sets which weights of an `E3ViT` are trained; returns the model.

    - "head": only the classifier head (`model.head`): a linear probe.
    - "all": every weight (full fine-tuning, the paper's default).
    - "all_but_experts": everything except the experts' MLPs (the routers,
      attention, norms, embeddings and head are trained).

    Call before `compile()`, or compile again: Keras collects the trainable
    variables when it builds the train step.

    Args:
        model: an `E3ViT`.
        train: "head", "all" or "all_but_experts" (`TRAIN_MODES`).

    Returns:
        `model`.

    Example:
    ```python
    import keras_e3

    model = keras_e3.E3ViT.from_preset("e3_tiny_digits")

    from keras_e3 import training

    training.freeze(model, train="head")
    len(model.trainable_weights)  # 2: the head's kernel and bias
    ```
    """
    if train not in TRAIN_MODES:
        raise ValueError(f"train must be one of {TRAIN_MODES}; got {train!r}.")
    if not hasattr(model, "backbone") or not hasattr(model, "head"):
        raise ValueError("freeze expects an E3ViT (a model with `backbone` "
                         f"and `head`); got {type(model).__name__}.")
    # Reset every sublayer. Toggle through False: on TensorFlow, Keras'
    # trackable __setattr__ skips `x.trainable = True` when it is already
    # True, leaving frozen sublayers frozen.
    model.trainable = False
    model.trainable = True
    if train == "head":
        model.backbone.trainable = False
    elif train == "all_but_experts":
        experts = expert_layers(model)
        if not experts:
            raise ValueError("train='all_but_experts' needs a model with MoE "
                             "layers; this backbone has none.")
        for layer in experts:
            layer.trainable = False
    return model


def set_mixed_precision(enabled=True, policy="mixed_bfloat16"):
    """Sets Keras' global dtype policy (`policy`, or "float32" if disabled).

    Affects models built afterwards.

    Args:
        enabled: True for `policy`, False for "float32".
        policy: a Keras mixed dtype policy name.

    Returns:
        The previous policy's name.

    Example:
    ```python
    from keras_e3 import training

    previous = training.set_mixed_precision(True)  # "mixed_bfloat16"
    training.set_mixed_precision(policy=previous)  # back to what it was
    ```
    """
    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy(policy if enabled else "float32")
    return previous


def _validate_schedule(peak_lr, total_steps, warmup_steps, end_lr):
    if peak_lr <= 0:
        raise ValueError(f"peak_lr must be positive; got {peak_lr}.")
    if end_lr < 0 or end_lr > peak_lr:
        raise ValueError(f"end_lr must be in [0, peak_lr={peak_lr}]; got "
                         f"{end_lr}.")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0; got {warmup_steps}.")
    if total_steps <= warmup_steps:
        raise ValueError(f"total_steps ({total_steps}) must exceed "
                         f"warmup_steps ({warmup_steps}).")


__all__ = ["WarmupCosineSchedule", "warmup_cosine_schedule", "make_optimizer",
           "freeze", "expert_layers", "set_mixed_precision"]
