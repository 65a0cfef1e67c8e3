"""benchmarks/overhead.py: its bare training step is the step Keras'
`train_on_batch` takes (same loss, same SGD update), so that their times
compare the overhead around the same work (JAX only, as the benchmark)."""

import os
import sys

import keras
import numpy as np
import pytest
from conftest import tiny_backbone_kwargs

import keras_e3

pytestmark = pytest.mark.skipif(keras.backend.backend() != "jax",
                                reason="overhead.py compares with jax.jit")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..",
                                "benchmarks"))
import overhead  # noqa: E402


def test_bare_calls_are_keras_calls(rng):
    import jax

    images = rng.uniform(-1, 1, (4, 16, 16, 3)).astype("float32")
    labels = rng.integers(0, 5, 4)
    keras.utils.set_random_seed(0)
    model = keras_e3.E3ViT(keras_e3.E3ViTBackbone(**tiny_backbone_kwargs()),
                           num_classes=5)
    model.compile(optimizer=keras.optimizers.SGD(overhead.LEARNING_RATE))
    model.build(images.shape)
    state = ([np.array(v.value) for v in model.trainable_variables],
             [np.array(v.value) for v in model.non_trainable_variables])
    logs = model.train_on_batch(images, labels, return_dict=True)

    # Training: the same loss (the routers' auxiliary losses included)
    # and the same SGD update.
    loss, trainable, _ = jax.jit(overhead.sgd_step(model))(
        *state, images, labels)
    assert logs["aux_loss"] > 0
    np.testing.assert_allclose(float(loss), logs["loss"], rtol=1e-5)
    for variable, value in zip(model.trainable_variables, trainable):
        np.testing.assert_allclose(np.asarray(value), variable.numpy(),
                                   rtol=1e-5, atol=1e-7,
                                   err_msg=variable.path)
    assert any(not np.allclose(before, np.asarray(value))
               for before, value in zip(state[0], trainable))

    # Inference: predict_on_batch's logits.
    run, compiled = overhead.bare_predict(model, images)
    np.testing.assert_allclose(np.asarray(run()),
                               model.predict_on_batch(images), rtol=1e-5,
                               atol=1e-6)
    assert overhead.cost(compiled)[0] > 0
