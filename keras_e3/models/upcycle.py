"""Sparse upcycling: a dense ViT becomes a V-MoE or an E³, as vmoe's
`initialization.initialize_from_vit` does it (Komatsuzaki et al., "Sparse
Upcycling", ICLR 2023).

In each new MoE block every expert starts as an exact copy of that block's
dense MLP (vmoe's `expand_tile` rule: kernels tiled to [E, D, H], biases to
[E, H]); the routers keep the fresh initialisation the backbone gives them;
everything else (patch embedding, class token, position embedding,
attention, layer norms, the other MLPs, encoder norm, pre-logits, head) is
copied. The converter and the class names carry over. A new resolution or
head comes from `from_preset(..., image_size=..., num_classes=...)`, before
or after.
"""

import re

import numpy as np

from keras_e3.conversion.vmoe import vmoe_variable_map

_EXPERTS = re.compile(r"^(Encoder/encoderblock_\d+/)Moe/Mlp/(.+)$")


def upcycle(model, num_experts, moe_layers, num_selected_experts=None,
            ensemble_size=1, capacity_factor=None, group_size=None,
            router="top_k", seed=None, **moe_settings):
    """A V-MoE or E³ `E3ViT` whose experts start as the dense MLPs.

    Args:
        model: a dense `E3ViT` (no MoE block), whatever it was loaded from.
        num_experts: experts per MoE block (E).
        moe_layers: the blocks that become MoE blocks (e.g. (5, 7)).
        num_selected_experts: K (top-K routers; the router's default if
            None).
        ensemble_size: M; > 1 makes an E³ (E divisible by M).
        capacity_factor: the dispatch capacity factor (the router's default
            if None).
        group_size: routing group size (the backbone's default if None).
        router: "top_k", "experts_choice" or "soft".
        seed: the seed of the fresh routers (None: Keras' global seed).
        **moe_settings: any other MoE setting of `E3ViTBackbone`
            (`batch_priority`, `num_slots`, `router_noise_std`, loss
            weights, `dispatcher`, ...).

    Returns:
        A new `E3ViT` (the input is unchanged).

    Example:
    ```python
    import keras_e3

    dense = keras_e3.E3ViT.from_preset("vit_tiny_digits")
    e3 = keras_e3.upcycle(dense, num_experts=4, moe_layers=(1, 3),
                          num_selected_experts=1, ensemble_size=2)
    assert tuple(e3.backbone.moe_layers) == (1, 3)
    assert e3.ensemble_size == 2
    ```
    """
    backbone = getattr(model, "backbone", None)
    if backbone is None:
        raise TypeError(f"upcycle takes an E3ViT; got "
                        f"{type(model).__name__}.")
    if backbone.moe_layers:
        raise ValueError(f"The model already has MoE blocks "
                         f"{tuple(backbone.moe_layers)}: upcycle starts from"
                         " a dense ViT.")
    config = backbone.get_config()
    config.pop("name", None)
    config.update(num_experts=int(num_experts), moe_layers=tuple(moe_layers),
                  num_selected_experts=num_selected_experts,
                  ensemble_size=int(ensemble_size),
                  capacity_factor=capacity_factor, group_size=group_size,
                  router=router, seed=seed, **moe_settings)
    sparse = type(backbone).from_config(config)
    task = type(model)(sparse, model.num_classes,
                       head_bias_init=model.head_bias_init,
                       head_kernel_initializer=model.head_kernel_initializer,
                       preprocessor=model.preprocessor,
                       class_names=model.class_names)
    source = vmoe_variable_map(model)
    for name, variable in vmoe_variable_map(task).items():
        if name in source:
            value = np.asarray(source[name].numpy())
        else:
            match = _EXPERTS.match(name)
            if match:
                dense = source[f"{match.group(1)}Mlp/{match.group(2)}"]
                value = np.broadcast_to(np.asarray(dense.numpy())[None],
                                        tuple(variable.shape))
            elif "/Moe/Router/" in name:
                continue  # fresh, as the backbone initialised it
            else:  # pragma: no cover - a new kind of parameter
                raise ValueError(f"upcycle does not know how to initialise "
                                 f"{name}.")
        variable.assign(value.astype(variable.dtype))
    return task
