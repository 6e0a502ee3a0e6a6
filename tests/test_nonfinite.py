"""The divergence guard: skip, roll back, stop with a diagnosis."""

import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfft import FineTuneModel
from tfft.callbacks import DivergenceError, NonFiniteGuard

from helpers import read_scalars


def tiny_model(seed=0, learning_rate=0.05, optimizer=None):
    keras.utils.set_random_seed(seed)
    inner = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, activation="relu", name="hidden"),
            keras.layers.Dense(1, name="output"),
        ]
    )
    model = FineTuneModel(inner)
    model.compile(optimizer=optimizer or keras.optimizers.Adam(learning_rate), loss="mse")
    return model


def batches_with_bad(count, bad_batches, batch_size=2, seed=1):
    """`count` batches of regression data; batches numbered in `bad_batches` (from 1) hold an Inf."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(count * batch_size, 3)).astype(np.float32)
    y = rng.normal(size=(count * batch_size, 1)).astype(np.float32)
    for number in bad_batches:
        x[(number - 1) * batch_size] = np.inf
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)


class RecordState(keras.callbacks.Callback):
    """Copies the wrapped model's weights and the optimizer's variables after each step."""

    def on_train_begin(self, logs=None):
        self.states = []
        self.logs = []

    def on_train_batch_end(self, batch, logs=None):
        self.states.append([v.numpy().copy() for v in self.model.training_state()])
        self.logs.append({k: float(v) for k, v in logs.items()})


def assert_states_equal(actual, expected):
    assert len(actual) == len(expected)
    for a, b in zip(actual, expected):
        np.testing.assert_array_equal(a, b)


def test_skip_policy_skips_one_update_bit_for_bit():
    model = tiny_model()
    recorder = RecordState()
    guard = NonFiniteGuard("skip")
    model.fit(batches_with_bad(20, bad_batches=[7]), epochs=1, verbose=0, callbacks=[guard, recorder])

    assert int(model.skipped_steps.numpy()) == 1
    assert int(model.optimizer.iterations.numpy()) == 19
    assert guard.bad_updates == 1
    assert guard.rollbacks == 0
    # The state after update 6 (step 6) is the state before update 8 (after step 7).
    assert_states_equal(recorder.states[6], recorder.states[5])
    assert not np.array_equal(recorder.states[7][0], recorder.states[6][0])


@pytest.mark.parametrize("on_disk", [False, True])
def test_rollback_restores_snapshot_exactly(on_disk, tmp_path):
    model = tiny_model()
    recorder = RecordState()
    guard = NonFiniteGuard(
        "rollback",
        patience=3,
        snapshot_every=4,
        snapshot_dir=tmp_path / "snapshots" if on_disk else None,
        log_dir=tmp_path / "logs",
    )
    # Steps 7, 8 and 9 are non-finite: after the third, roll back to the
    # snapshot of update 4 (the one at update 8 was never taken).
    data = batches_with_bad(12, bad_batches=[7, 8, 9])
    model.fit(data, epochs=1, verbose=0, callbacks=[guard, recorder])

    assert guard.rollbacks == 1
    assert recorder.logs[3]["skipped_steps"] == 0
    # recorder.states[8] is read after the guard restored the snapshot at step 9.
    assert_states_equal(recorder.states[8], recorder.states[3])
    assert guard.events[-1] == {
        "step": 9, "update": 4, "rollback": 1, "learning_rate_multiplier": 0.5
    }
    # The next update runs at half the learning rate.
    assert recorder.logs[9]["learning_rate"] == pytest.approx(0.025)
    assert int(model.optimizer.iterations.numpy()) == 4 + 3

    scalars = read_scalars(tmp_path / "logs" / "train")
    assert scalars["bad_updates"][-1] == (12, 3.0)
    assert scalars["rollbacks"][8] == (9, 1.0)
    assert scalars["learning_rate_multiplier"][7:10] == [(8, 1.0), (9, 0.5), (10, 0.5)]


def test_exploding_learning_rate_rolls_back_then_stops(tmp_path):
    model = tiny_model(optimizer=keras.optimizers.SGD(1e3))
    guard = NonFiniteGuard(
        "rollback", patience=2, window=3, snapshot_every=2, max_rollbacks=3, diagnosis_dir=tmp_path
    )
    data = batches_with_bad(40, bad_batches=[])
    history = model.fit(data, epochs=1, verbose=0, callbacks=[guard])

    multipliers = [event["learning_rate_multiplier"] for event in guard.events if "rollback" in event]
    if guard.diagnosis is None:
        # Recovered: at least one rollback, each halving the rate.
        assert multipliers and multipliers == [0.5**k for k in range(1, len(multipliers) + 1)]
        return
    assert multipliers == [0.5, 0.25, 0.125]
    assert guard.rollbacks == 3
    assert isinstance(history, keras.callbacks.History)
    diagnosis = json.loads((tmp_path / "diagnosis.json").read_text())
    layer_names = {layer.name for layer in model.model.layers}
    assert diagnosis["first_non_finite_layer"] in layer_names
    assert diagnosis["rollbacks"] == 3
    assert diagnosis["learning_rate_multiplier"] == 0.125
    assert len(diagnosis["largest_gradient_norms"]) == 4  # kernel and bias of 2 layers
    for item in diagnosis["largest_gradient_norms"]:
        assert item["variable"].split("/")[-2] in layer_names
        assert math.isfinite(item["norm"])
    # The model is left at the last good snapshot, not at the diverged state.
    assert all(np.all(np.isfinite(w.numpy())) for w in model.model.weights)


def test_stop_policy_raises_when_asked():
    model = tiny_model()
    guard = NonFiniteGuard("stop", patience=2, raise_on_stop=True)
    with pytest.raises(DivergenceError, match="Training diverged at update 4") as raised:
        model.fit(batches_with_bad(8, bad_batches=[4, 5]), epochs=1, verbose=0, callbacks=[guard])
    assert raised.value.diagnosis["first_non_finite_layer"] == "hidden"
    # Both bad updates were skipped, so the weights are still those of update 3.
    assert raised.value.diagnosis["restored_update"] is None
    assert int(model.optimizer.iterations.numpy()) == 3


def test_stop_keeps_backup_and_restore_backup(tmp_path):
    backup = tmp_path / "backup"

    def run(bad_batches):
        model = tiny_model()
        callbacks = [
            keras.callbacks.BackupAndRestore(str(backup), save_freq=1),
            NonFiniteGuard("stop", patience=2),
        ]
        model.fit(batches_with_bad(6, bad_batches), epochs=1, verbose=0, callbacks=callbacks)

    run(bad_batches=[])
    assert not backup.exists()  # Keras deletes the backup after a run that finished
    run(bad_batches=[4, 5])
    assert backup.exists()
    assert any(backup.iterdir())


def scripted_guard(**options):
    model = tiny_model()
    guard = NonFiniteGuard("skip", **options)
    guard.set_model(model)
    guard.on_train_begin()
    return guard


def test_spike_rule_fires_after_warmup_only():
    guard = scripted_guard(window=5, spike_factor=3.0)
    # 9.0 arrives during warmup (fewer than 5 losses seen): not a spike. At
    # step 7 the median of the last five (1.1, 9.0, 0.9, 1.0, 1.0) is 1.0 and
    # 3.5 > 3 x 1.0 is a spike; 2.9 at step 8 is not.
    losses = [1.0, 1.1, 9.0, 0.9, 1.0, 1.0, 3.5, 2.9]
    for step, loss in enumerate(losses):
        guard.on_train_batch_end(step, {"update_loss": loss, "skipped_steps": 0, "loss_scale": 1.0})
    assert [event["step"] for event in guard.events] == [7]
    assert "loss spike 3.5" in guard.events[0]["reason"]
    assert guard.bad_updates == 1


def test_low_loss_scale_counts_as_bad():
    guard = scripted_guard(min_loss_scale=1.0)
    guard.on_train_batch_end(0, {"update_loss": 1.0, "skipped_steps": 0, "loss_scale": 0.5})
    assert "loss scale 0.5 below min_loss_scale 1" in guard.events[0]["reason"]


def test_float16_always_non_finite_acts_within_patience():
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = tiny_model()
    recorder = RecordState()
    guard = NonFiniteGuard("rollback", patience=3, max_rollbacks=1)
    bad = list(range(1, 13))
    model.fit(batches_with_bad(12, bad_batches=bad), epochs=1, verbose=0, callbacks=[guard, recorder])

    assert guard.events[3] == {"step": 3, "update": 0, "rollback": 1, "learning_rate_multiplier": 0.5}
    assert guard.diagnosis is not None
    assert guard.diagnosis["step"] == 6
    scales = [logs["loss_scale"] for logs in recorder.logs]
    assert min(scales) > 0
    assert scales[:3] == [32768.0, 16384.0, 8192.0]  # halved by each skipped update


def test_one_instance_across_two_fits():
    model = tiny_model()
    guard = NonFiniteGuard("rollback", patience=1, snapshot_every=1)
    model.fit(batches_with_bad(6, bad_batches=[3]), epochs=1, verbose=0, callbacks=[guard])
    assert guard.rollbacks == 1
    assert float(model.learning_rate_multiplier.numpy()) == 0.5

    model.fit(batches_with_bad(6, bad_batches=[]), epochs=1, verbose=0, callbacks=[guard])
    assert guard.rollbacks == 0
    assert guard.bad_updates == 0
    assert guard.events == []
    assert float(model.learning_rate_multiplier.numpy()) == 1.0


def test_rejects_invalid_options():
    with pytest.raises(ValueError, match="Received: policy='retry'"):
        NonFiniteGuard("retry")
    with pytest.raises(ValueError, match="Received: backoff=1.5"):
        NonFiniteGuard(backoff=1.5)
    with pytest.raises(ValueError, match="Received: patience=0"):
        NonFiniteGuard(patience=0)
