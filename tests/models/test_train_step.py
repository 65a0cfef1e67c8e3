"""One training step against vmoe's trainer (train_step.npz): main loss,
auxiliary loss and every parameter's gradient, router noise off."""

import keras
import numpy as np
import pytest

import keras_e3
from conftest import BACKEND
from conftest import gradients
from conftest import load_fixture
from conftest import to_numpy
from keras_e3.conversion.vmoe import vmoe_variable_map
from keras_e3.layers.encoder_block import materialize_gradient


def loss_and_grads(model, images, labels):
    """(main loss, aux loss, grads in model.trainable_variables order)."""
    loss_fn = keras_e3.EnsembleSoftmaxCrossEntropy()

    def losses(logits):
        # Experts Choice and Soft MoE add no auxiliary loss.
        aux = (keras.ops.sum(keras.ops.stack(model.losses)) if model.losses
               else keras.ops.zeros(()))
        return loss_fn(labels, logits), aux

    if BACKEND == "jax":
        import jax

        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]

        def total(trainable):
            logits, _, aux = model.stateless_call(
                trainable, non_trainable, images, training=False,
                return_losses=True)
            main = loss_fn(labels, logits)
            aux = sum(aux, jax.numpy.zeros(()))
            return main + aux, (main, aux)

        (_, (main, aux)), grads = jax.jit(
            jax.value_and_grad(total, has_aux=True))(
            trainable)
        return main, aux, grads
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            main, aux = losses(model(images, training=False))
            total = main + aux
        return main, aux, tape.gradient(total, model.trainable_variables)
    main, aux = losses(model(images, training=False))
    model.zero_grad()
    (main + aux).backward()
    return main, aux, [v.value.grad for v in model.trainable_variables]


@pytest.mark.parametrize("name", ["eee_tiny_nodrop", "vmoe_tiny_drop"])
def test_training_step_matches_official(name):
    fx = load_fixture(name)
    ref = fx["train_step"]
    model = keras_e3.E3ViT.from_vmoe(fx["config"], fx["params"])
    main, aux, grads = loss_and_grads(model, fx["inputs"], ref["labels"])
    to_np = keras.ops.convert_to_numpy
    np.testing.assert_allclose(to_np(main), ref["main_loss"], atol=1e-5)
    np.testing.assert_allclose(to_np(aux), ref["auxiliary_loss"], atol=1e-7)
    by_variable = {id(v): g for v, g in zip(model.trainable_variables, grads)}
    names = vmoe_variable_map(model)
    assert len(names) == len(model.trainable_variables)
    worst, global_sq = 0.0, 0.0
    for official, variable in names.items():
        grad = np.asarray(to_np(by_variable[id(variable)]))
        expected = ref[f"grad/{official}"]
        assert grad.shape == expected.shape, official
        err = float(np.abs(grad - expected).max())
        assert err <= 1e-5, f"{official}: gradient max abs error {err:.3g}"
        worst = max(worst, err)
        global_sq += float((grad.astype("float64") ** 2).sum())
    np.testing.assert_allclose(np.sqrt(global_sq), ref["grad_global_norm"],
                               rtol=1e-5)


@pytest.mark.parametrize("jit", [
    False, pytest.param(True, marks=[pytest.mark.jit, pytest.mark.skipif(
        BACKEND == "torch", reason="XLA: JAX, TensorFlow")])])
@pytest.mark.parametrize("first", [2.0, np.nan, np.inf])
def test_materialize_gradient_is_identity(jit, first):
    """The encoder blocks' gradient barrier passes values and gradients
    through unchanged, NaN and inf included (its `cond` must never take
    the zero branch)."""
    x = np.array([[[1.0, np.nan], [np.inf, -3.0]]], "float32")
    w = np.array([[[first, 5.0], [-7.0, 0.5]]], "float32")
    np.testing.assert_array_equal(to_numpy(materialize_gradient(x)), x)
    (grad,) = gradients(
        lambda x: keras.ops.sum(
            keras.ops.multiply(materialize_gradient(x), w)), [x], jit)
    np.testing.assert_array_equal(grad, w)
