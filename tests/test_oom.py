"""Out-of-memory recovery: the same batch again in smaller micro-batches, nothing else changed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfft import FineTuneModel
from tfft.batch_size import find_micro_batch_size
from tfft.callbacks import OOMRetry, OutOfMemoryError


class FakeOutOfMemory(FineTuneModel):
    """Raises ResourceExhaustedError when a micro-batch is larger than `memory_limit`."""

    def __init__(self, model, memory_limit, eval_memory_limit=None, **kwargs):
        super().__init__(model, **kwargs)
        self.memory_limit = memory_limit
        self.eval_memory_limit = eval_memory_limit

    def train_step(self, data):
        # Runs while the step is traced, once per micro-batch size.
        size = min(self.micro_batch_size or 10**9, int(data[0].shape[0]))
        if size > self.memory_limit:
            raise tf.errors.ResourceExhaustedError(None, None, f"fake: {size} examples do not fit")
        return super().train_step(data)

    def test_step(self, data):
        size = min(self.eval_micro_batch_size or 10**9, int(data[0].shape[0]))
        if self.eval_memory_limit is not None and size > self.eval_memory_limit:
            raise tf.errors.ResourceExhaustedError(None, None, f"fake: {size} examples do not fit")
        return super().test_step(data)


def dense_model():
    keras.utils.set_random_seed(4)
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(2)])


def data(count=128, batch_size=32):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(count, 6)).astype(np.float32)
    y = rng.integers(0, 2, size=count)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)


def compile_model(model):
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def test_halving_matches_small_micro_batches():
    model = compile_model(FakeOutOfMemory(dense_model(), memory_limit=8))
    retry = OOMRetry()
    history = model.fit(data(), epochs=2, verbose=0, callbacks=[retry])

    # 32 and 16 fail, 8 fits: the sizes tried are 32, 16, 8.
    assert retry.attempts == [32, 16]
    assert model.micro_batch_size == 8
    assert [change["message"] for change in retry.changes] == [
        "micro_batch_size 32 -> 16 (accumulation 1 -> 2) after out of memory at update 0",
        "micro_batch_size 16 -> 8 (accumulation 2 -> 4) after out of memory at update 0",
    ]
    # The effective batch stays 32: 4 updates per epoch over 128 examples.
    assert int(model.optimizer.iterations.numpy()) == 8
    assert int(model.examples_seen.numpy()) == 256

    twin = compile_model(FineTuneModel(dense_model(), micro_batch_size=8))
    twin_history = twin.fit(data(), epochs=2, verbose=0)
    for actual, expected in zip(model.model.get_weights(), twin.model.get_weights()):
        np.testing.assert_allclose(actual, expected, atol=1e-6)
    # Metrics count each batch once, not once per attempt.
    assert history.history["accuracy"] == twin_history.history["accuracy"]


def test_oom_at_every_size_stops():
    model = compile_model(FakeOutOfMemory(dense_model(), memory_limit=0))
    retry = OOMRetry()
    with pytest.raises(OutOfMemoryError, match="even with one example per micro-batch") as raised:
        model.fit(data(), epochs=1, verbose=0, callbacks=[retry])
    assert retry.attempts == [32, 16, 8, 4, 2, 1]
    assert "a shorter --max-length; mixed precision" in str(raised.value)
    assert int(model.optimizer.iterations.numpy()) == 0


def test_other_errors_propagate_unchanged():
    class Broken(FineTuneModel):
        def train_step(self, data):
            raise ValueError("not a memory problem")

    model = compile_model(Broken(dense_model()))
    retry = OOMRetry()
    with pytest.raises(ValueError, match="not a memory problem"):
        model.fit(data(), epochs=1, verbose=0, callbacks=[retry])
    assert retry.attempts == []
    assert retry.changes == []


def test_evaluation_halves_only_the_evaluation_batch():
    model = compile_model(FakeOutOfMemory(dense_model(), memory_limit=64, eval_memory_limit=4))
    retry = OOMRetry()
    model.fit(data(), validation_data=data(64, 16), epochs=1, verbose=0, callbacks=[retry])
    assert model.eval_micro_batch_size == 4
    assert model.micro_batch_size is None
    assert [change["kind"] for change in retry.changes] == ["evaluation", "evaluation"]

    # Evaluating in micro-batches of 4 gives the loss of one pass over each batch.
    reference = compile_model(FineTuneModel(dense_model()))
    reference.model.set_weights(model.model.get_weights())
    split = model.evaluate(data(64, 16), verbose=0, return_dict=True)
    whole = reference.evaluate(data(64, 16), verbose=0, return_dict=True)
    assert split["loss"] == pytest.approx(whole["loss"], abs=1e-6)
    assert split["accuracy"] == whole["accuracy"]


def test_state_resets_between_fits():
    model = compile_model(FakeOutOfMemory(dense_model(), memory_limit=16))
    retry = OOMRetry()
    model.fit(data(), epochs=1, verbose=0, callbacks=[retry])
    assert retry.attempts == [32]
    model.fit(data(), epochs=1, verbose=0, callbacks=[retry])
    # The model keeps its smaller size; the callback starts a fresh record.
    assert retry.attempts == []
    assert retry.changes == []
    assert model.out_of_memory_handler is None


def test_grow_back_tries_each_size_once():
    model = compile_model(FakeOutOfMemory(dense_model(), memory_limit=16))
    retry = OOMRetry(grow_back_after=2)
    model.fit(data(count=256), epochs=1, verbose=0, callbacks=[retry])
    messages = [change["message"] for change in retry.changes]
    assert messages[0].startswith("micro_batch_size 32 -> 16")
    assert messages[1] == "micro_batch_size 16 -> 32 after 2 clean updates at update 2"
    assert messages[2].startswith("micro_batch_size 32 -> 16")
    assert len(messages) == 3
    assert int(model.optimizer.iterations.numpy()) == 8


def test_finder_on_a_fake_memory_model():
    tried = []

    def fits(size):
        tried.append(size)
        return size <= 37

    # Doubling 1..32 fits, 64 fails; bisection finds 37; 10% margin gives 33.
    assert find_micro_batch_size(fits, max_size=128) == 33
    assert tried[:7] == [1, 2, 4, 8, 16, 32, 64]
    assert find_micro_batch_size(lambda size: True, max_size=48) == 48
    with pytest.raises(MemoryError, match="One example does not fit"):
        find_micro_batch_size(lambda size: False, max_size=8)


WORKER = Path(__file__).with_name("oom_worker.py")


def run_worker(*arguments, timeout=600):
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "TF_CPP_MIN_LOG_LEVEL": "2"}
    completed = subprocess.run(
        [sys.executable, str(WORKER), *arguments], capture_output=True, text=True, env=env, timeout=timeout
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_real_out_of_memory_under_address_space_limit(tmp_path):
    constrained = run_worker("train", "--limited", "--output", str(tmp_path / "constrained.npz"))
    assert constrained["attempts"][0] == 64
    assert constrained["micro_batch_size"] < 64
    assert any("after out of memory" in message for message in constrained["changes"])
    free = run_worker("train", "--output", str(tmp_path / "free.npz"), "--micro-batch-size", "8")
    assert free["attempts"] == []
    with np.load(tmp_path / "constrained.npz") as a, np.load(tmp_path / "free.npz") as b:
        for name in a.files:
            # Sums over 128 x 4096 activations in other groupings: float32 rounding.
            np.testing.assert_allclose(a[name], b[name], atol=1e-6)


def test_finder_under_address_space_limit(tmp_path):
    found = run_worker("find", "--limited")
    assert 1 <= found["micro_batch_size"] < 64
    assert found["trained"] is True
