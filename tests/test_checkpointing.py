"""Gradient checkpointing: the same loss and gradients as without, in eager, graph and XLA."""

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf

from tfft.checkpointing import enable_gradient_checkpointing


def backbone(dropout=0.0):
    keras.utils.set_random_seed(0)
    return keras_hub.models.BertBackbone(
        vocabulary_size=50, num_layers=2, num_heads=2, hidden_dim=8,
        intermediate_dim=16, max_sequence_length=32, dropout=dropout,
    )


def inputs():
    rng = np.random.default_rng(0)
    lengths = np.array([[10], [6], [3]])
    return {
        "token_ids": tf.constant(rng.integers(0, 50, (3, 10)), tf.int32),
        "segment_ids": tf.zeros((3, 10), tf.int32),
        # Different lengths, so a mask that failed to reach the recomputation shows.
        "padding_mask": tf.constant(np.arange(10)[None, :] < lengths),
    }


def loss_and_gradients(model, mode):
    def compute():
        with tf.GradientTape() as tape:
            outputs = model(inputs(), training=True)
            loss = tf.reduce_sum(outputs["sequence_output"] ** 2) + tf.reduce_sum(outputs["pooled_output"])
        return loss, tape.gradient(loss, model.trainable_variables)

    if mode == "eager":
        return compute()
    return tf.function(compute, jit_compile=mode == "xla")()


@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
def test_same_loss_and_gradients(mode):
    plain, checkpointed = backbone(), backbone()
    assert enable_gradient_checkpointing(checkpointed) == 2
    loss, gradients = loss_and_gradients(plain, mode)
    checkpointed_loss, checkpointed_gradients = loss_and_gradients(checkpointed, mode)
    assert float(checkpointed_loss) == pytest.approx(float(loss), rel=1e-6)
    for variable, expected, actual in zip(plain.trainable_variables, gradients, checkpointed_gradients):
        assert actual is not None, variable.path
        # Recomputation repeats the same float32 operations; XLA may fuse the
        # two passes differently, hence 1e-5.
        np.testing.assert_allclose(
            tf.convert_to_tensor(actual), tf.convert_to_tensor(expected), atol=1e-5, err_msg=variable.path
        )


def test_dropout_is_refused():
    with pytest.raises(ValueError, match=r"draw a different mask.*--dropout 0"):
        enable_gradient_checkpointing(backbone(dropout=0.1))


def test_backbone_without_transformer_layers():
    with pytest.raises(ValueError, match="has no `transformer_layers`"):
        enable_gradient_checkpointing(keras.Sequential([keras.layers.Dense(2)]))


def test_layers_run_again_in_the_backward_pass():
    model = backbone()
    calls = []
    for layer in model.transformer_layers:
        original = layer.call

        def counted(*args, _original=original, **kwargs):
            calls.append(1)
            return _original(*args, **kwargs)

        layer.call = counted
    enable_gradient_checkpointing(model)
    loss_and_gradients(model, "eager")
    # 2 layers, each run once forward and once more to recompute its activations.
    assert len(calls) == 4
