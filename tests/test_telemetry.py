"""The event files hold one point per update for every signal of the step."""

import keras
import numpy as np
import tensorflow as tf

from tfft import FineTuneModel
from tfft.callbacks import TrainingTelemetry

from helpers import read_scalars


class RecordLosses(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.losses = []

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(float(logs["update_loss"]))


def test_scalars_per_update_and_per_evaluation(tmp_path):
    keras.utils.set_random_seed(0)
    model = FineTuneModel(
        keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]),
        micro_batch_size=2,
        max_grad_norm=1.0,
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    x = np.random.default_rng(0).normal(size=(12, 3)).astype(np.float32)
    y = np.array([0, 1] * 6)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    recorder = RecordLosses()
    model.fit(data, validation_data=data, epochs=2, verbose=0, shuffle=False,
              callbacks=[TrainingTelemetry(tmp_path), recorder])

    train = read_scalars(tmp_path / "train")
    # 12 examples in batches of 4: 3 updates per epoch, 6 in all.
    for tag in ("loss", "learning_rate", "grad_norm", "clipped", "loss_scale",
                "skipped_steps", "micro_batch_size", "examples_per_second", "memory_in_use_bytes"):
        assert [step for step, _ in train[tag]] == [1, 2, 3, 4, 5, 6], tag
    np.testing.assert_allclose([value for _, value in train["loss"]], recorder.losses, rtol=1e-6)
    np.testing.assert_allclose([value for _, value in train["learning_rate"]], [0.1] * 6, rtol=1e-6)
    assert {value for _, value in train["micro_batch_size"]} == {2.0}

    validation = read_scalars(tmp_path / "validation")
    assert [step for step, _ in validation["loss"]] == [3, 6]
    history = model.history.history
    gaps = [value for _, value in validation["generalization_gap"]]
    np.testing.assert_allclose(gaps, np.subtract(history["val_loss"], history["loss"]), rtol=1e-5)
