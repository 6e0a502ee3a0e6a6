"""Weight decay exclusions and dropout of the whole model."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfft import FineTuneModel
from tfft.models import load_classifier
from tfft.optim import build_optimizer, split_weight_decay


def model_with_every_kind_of_variable():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,), dtype="int32")
    hidden = keras.layers.Embedding(10, 6, name="token_embedding")(inputs)
    hidden = keras.layers.LayerNormalization(name="layer_norm")(hidden)
    hidden = keras.layers.Dense(6, name="dense")(hidden)
    outputs = keras.layers.Dense(1, name="head")(keras.layers.Flatten()(hidden))
    return keras.Model(inputs, outputs)


def zero_loss(y_true, y_pred):
    """A loss whose gradient is exactly zero for every weight."""
    return 0.0 * tf.reduce_sum(y_pred, axis=-1)


def test_decay_with_zero_gradient():
    inner = model_with_every_kind_of_variable()
    before = {v.path: v.numpy().copy() for v in inner.trainable_variables}
    model = FineTuneModel(inner)
    optimizer = build_optimizer(1e-3, 0.1, inner.trainable_variables)
    model.compile(optimizer=optimizer, loss=zero_loss)
    x = np.arange(8, dtype=np.int32).reshape(2, 4) % 10
    model.fit(x, np.zeros(2, np.float32), batch_size=2, epochs=1, verbose=0)

    decayed = {"dense/kernel", "head/kernel"}
    for variable in inner.trainable_variables:
        if any(variable.path.endswith(kernel) for kernel in decayed):
            # Decoupled decay: w - lr * wd * w = w * (1 - 1e-3 * 0.1) = 0.9999 w,
            # up to float32 rounding of the two forms (2 units in the last place).
            np.testing.assert_allclose(
                variable.numpy(), before[variable.path] * 0.9999, rtol=2 * 2.0**-23
            )
        else:
            # Bias, gamma, beta and the embedding table are excluded.
            np.testing.assert_array_equal(variable.numpy(), before[variable.path], err_msg=variable.path)


def test_split_counts_and_embeddings_option():
    variables = model_with_every_kind_of_variable().trainable_variables
    decayed, excluded = split_weight_decay(variables)
    assert sorted(v.path.split("/")[-2] + "/" + v.path.split("/")[-1] for v in decayed) == [
        "dense/kernel", "head/kernel"
    ]
    assert len(excluded) == 5  # embeddings, gamma, beta, 2 biases
    decayed, _ = split_weight_decay(variables, decay_embeddings=True)
    assert any(v.path.endswith("embeddings") for v in decayed)


def test_pattern_matching_nothing_is_an_error():
    variables = model_with_every_kind_of_variable().trainable_variables
    with pytest.raises(ValueError, match=r"pattern 'LayerNorm\.weight' matches no variable.*token_embedding/embeddings"):
        split_weight_decay(variables, exclude=["bias", "LayerNorm.weight"])


def test_dropout_option_reaches_every_layer(tiny_preset):
    classifier = load_classifier(tiny_preset, num_labels=2, max_length=16, dropout=0.3)
    rates = []
    for layer in classifier._flatten_layers():
        if isinstance(layer, keras.layers.Dropout):
            rates.append((layer.name, layer.rate))
        if isinstance(layer, keras.layers.MultiHeadAttention):
            rates.append((layer.name + " attention", layer.dropout))
    names = [name for name, _ in rates]
    # Embeddings, the head, and attention and feed-forward of both layers.
    assert "embeddings_dropout" in names
    assert "classifier_dropout" in names
    assert names.count("self_attention_layer attention") == 2
    assert len(rates) >= 8
    assert {rate for _, rate in rates} == {0.3}, rates
