"""The overfitting monitor on scripted evaluations, and one small fit for the wiring."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfft import FineTuneModel
from tfft.callbacks import OverfittingMonitor


def tiny_model():
    keras.utils.set_random_seed(0)
    model = FineTuneModel(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="dense")]))
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.model.build((None, 3))
    return model


def scripted(monitor_options, evaluations, model=None):
    """Feeds (training loss, validation logs) pairs through on_epoch_end."""
    model = model or tiny_model()
    monitor = OverfittingMonitor(**monitor_options)
    monitor.set_model(model)
    monitor.on_train_begin()
    for epoch, (train_loss, validation) in enumerate(evaluations):
        monitor.on_epoch_end(epoch, {"loss": train_loss, **validation})
    return monitor, model


def test_gap_rule_fires_at_expected_evaluation():
    # Relative gaps: 0.05, 0.111, 0.1875, 0.25 -> above 0.1 from evaluation 2;
    # with patience 2 the rule fires at evaluation 3.
    evaluations = [
        (1.0, {"val_loss": 1.05}),
        (0.9, {"val_loss": 1.0}),
        (0.8, {"val_loss": 0.95}),
        (0.72, {"val_loss": 0.9}),
    ]
    monitor, model = scripted({"patience": 2, "action": "warn"}, evaluations[:2])
    assert monitor.fired == []
    monitor.on_epoch_end(2, {"loss": 0.8, "val_loss": 0.95})
    assert [(f["rule"], f["evaluation"]) for f in monitor.fired] == [("gap", 3)]
    assert monitor.evaluations[2]["gap"] == pytest.approx(0.1875)
    # warn does not stop training.
    assert not model.stop_training


def test_trend_rule_on_stalled_validation():
    # Best accuracy 0.80 at evaluation 1; no improvement at 2, 3, 4 while the
    # training loss falls; the validation loss equals the training loss (no gap).
    evaluations = [
        (1.0, {"val_loss": 1.0, "val_accuracy": 0.80}),
        (0.9, {"val_loss": 0.9, "val_accuracy": 0.79}),
        (0.8, {"val_loss": 0.8, "val_accuracy": 0.80}),
        (0.7, {"val_loss": 0.7, "val_accuracy": 0.78}),
    ]
    monitor, model = scripted({"monitor": "val_accuracy", "patience": 3, "action": "stop"}, evaluations)
    assert [(f["rule"], f["evaluation"]) for f in monitor.fired] == [("trend", 4)]
    assert model.stop_training
    assert monitor.best_evaluation == 1


def test_trend_needs_falling_training_loss():
    evaluations = [(1.0, {"val_loss": 1.0, "val_accuracy": 0.8})] + [
        (1.0, {"val_loss": 1.0, "val_accuracy": 0.7})
    ] * 4
    monitor, _ = scripted({"monitor": "val_accuracy", "patience": 2}, evaluations)
    assert monitor.fired == []


def test_restore_best_at_the_end_of_training():
    model = tiny_model()
    monitor = OverfittingMonitor(monitor="val_loss", action="restore_best", patience=5)
    monitor.set_model(model)
    monitor.on_train_begin()
    kernel = model.model.layers[0].kernel
    for epoch, (value, val_loss) in enumerate([(1.0, 0.9), (2.0, 0.5), (3.0, 0.7)]):
        kernel.assign(np.full((3, 2), value, np.float32))
        monitor.on_epoch_end(epoch, {"loss": 0.5, "val_loss": val_loss})
    monitor.on_train_end()
    # Evaluation 2 (validation loss 0.5) was best; its kernel was all 2.0.
    np.testing.assert_array_equal(kernel.numpy(), np.full((3, 2), 2.0, np.float32))


def test_missing_metric_lists_the_metrics_found():
    with pytest.raises(KeyError, match="'val_f1' not found.*Metrics found: val_accuracy, val_loss"):
        scripted({"monitor": "val_f1"}, [(1.0, {"val_loss": 1.0, "val_accuracy": 0.5})])


def test_direction_from_the_metric_name():
    assert OverfittingMonitor(monitor="val_loss").mode == "min"
    assert OverfittingMonitor(monitor="val_f1").mode == "max"
    assert OverfittingMonitor(monitor="val_auc").mode == "max"
    with pytest.raises(ValueError, match="Pass mode='min' or mode='max'"):
        OverfittingMonitor(monitor="val_score")
    assert OverfittingMonitor(monitor="val_score", mode="max").mode == "max"


def test_evaluates_every_n_updates_in_fit():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3)).astype(np.float32)
    y = rng.integers(0, 2, size=64)
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    validation = tf.data.Dataset.from_tensor_slices((x[:16], y[:16])).batch(8)
    model = tiny_model()
    monitor = OverfittingMonitor(validation_data=validation, eval_every=3, patience=100)
    history = model.fit(train, epochs=1, verbose=0, callbacks=[monitor])
    # 8 updates: evaluations after updates 3 and 6.
    assert [e["update"] for e in monitor.evaluations] == [3, 6]
    # The epoch's training accuracy is not reset by the evaluations in between.
    reference = tiny_model()
    reference_history = reference.fit(train, epochs=1, verbose=0)
    assert history.history["accuracy"] == reference_history.history["accuracy"]


def test_train_gap_measured_in_evaluation_mode():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(32, 3)).astype(np.float32)
    y = rng.integers(0, 2, size=32)
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    held = tf.data.Dataset.from_tensor_slices((x[:16], y[:16])).batch(8)
    model = tiny_model()
    monitor = OverfittingMonitor(train_gap_data=held, patience=100)
    model.fit(train, validation_data=held, epochs=2, verbose=0, callbacks=[monitor])
    # The training loss of the last evaluation is the held subset's loss in
    # evaluation mode with the final weights, not the running training loss.
    measured = model.evaluate(held, verbose=0, return_dict=True)["loss"]
    assert monitor.evaluations[-1]["train_loss"] == pytest.approx(measured, abs=1e-6)
    assert monitor.evaluations[-1]["train_loss"] != pytest.approx(model.history.history["loss"][-1])
