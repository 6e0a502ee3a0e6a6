"""LoRA: only adapters and head train, frozen weights stay bit-identical, the merged export matches."""

import keras
import keras_hub
import numpy as np
import tensorflow as tf

from tfft import FineTuneModel
from tfft.models import enable_lora


def classifier():
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=50, num_layers=2, num_heads=2, hidden_dim=8,
        intermediate_dim=16, max_sequence_length=32, dropout=0.0,
    )
    return keras_hub.models.BertTextClassifier(backbone, num_classes=2, preprocessor=None, dropout=0.0)


def inputs(count=6):
    rng = np.random.default_rng(0)
    return {
        "token_ids": tf.constant(rng.integers(0, 50, (count, 10)), tf.int32),
        "segment_ids": tf.zeros((count, 10), tf.int32),
        "padding_mask": tf.ones((count, 10), tf.bool),
    }


def test_trainable_parameters_are_adapters_and_head():
    model = classifier()
    assert enable_lora(model, rank=3) == 4  # query and value of 2 layers
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    # Query and value kernels are (8, 2, 4); Keras factors an EinsumDense
    # kernel into A (8, 2, 3) and B (3, 4): 48 + 12 = 60 parameters, for 4
    # layers. The head is (8, 2) + 2. Their biases are frozen.
    assert trainable == 4 * 60 + 18
    assert all("lora" in v.path or v.path.startswith("logits") for v in model.trainable_variables)


def test_update_changes_only_adapters_and_head(tmp_path):
    model = classifier()
    enable_lora(model, rank=4, alpha=8.0)
    frozen = {v.path: v.numpy().copy() for v in model.non_trainable_variables}
    trainer = FineTuneModel(model)
    trainer.compile(
        optimizer=keras.optimizers.Adam(0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    trainer.fit(inputs(), np.array([0, 1, 0, 1, 1, 0]), batch_size=6, epochs=2, verbose=0)
    for variable in model.non_trainable_variables:
        np.testing.assert_array_equal(variable.numpy(), frozen[variable.path], err_msg=variable.path)
    assert any(
        np.abs(v.numpy()).max() > 0 for v in model.trainable_variables if "lora_kernel_b" in v.path
    )

    # The saved model has merged kernels and no adapters, and predicts the same.
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras", compile=False)
    assert not any("lora" in v.path for v in loaded.weights)
    np.testing.assert_allclose(loaded(inputs()), model(inputs()), atol=1e-5)
