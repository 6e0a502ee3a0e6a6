"""Contracts of the training step, each with numbers worked out by hand or by a twin run."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfft import FineTuneModel, WarmupSchedule
from tfft.step import global_norm


def linear_loss(y_true, y_pred):
    """Per-example loss equal to the model output, so d(loss)/d(output) is 1."""
    return tf.reduce_sum(y_pred, axis=-1)


def linear_model(inputs: int, dtype=None) -> keras.Model:
    """x -> x . w with w = 0: the gradient of `linear_loss` for w is the input."""
    model = keras.Sequential(
        [
            keras.Input((inputs,)),
            keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros", dtype=dtype),
        ]
    )
    return model


def batches(x, y, batch_size, sample_weight=None):
    parts = (x, y) if sample_weight is None else (x, y, sample_weight)
    return tf.data.Dataset.from_tensor_slices(parts).batch(batch_size)


class RecordLogs(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.batch_logs = []
        self.examples = []
        self._seen = int(self.model.examples_seen.numpy())

    def on_train_batch_end(self, batch, logs=None):
        self.batch_logs.append({k: float(v) for k, v in logs.items()})
        seen = int(self.model.examples_seen.numpy())
        self.examples.append(seen - self._seen)
        self._seen = seen


def kernel(model: FineTuneModel) -> np.ndarray:
    return model.model.layers[-1].kernel.numpy().reshape(-1)


def test_clip_once_after_accumulation():
    # Micro-batch 1 has two rows [2, 0] (mean gradient [2, 0]), micro-batch 2
    # two rows [0, 2] (mean [0, 2]); the global mean gradient is [1, 1].
    x = np.array([[2, 0], [2, 0], [0, 2], [0, 2]], np.float32)
    y = np.zeros(4, np.float32)
    model = FineTuneModel(linear_model(2), micro_batch_size=2, max_grad_norm=1.0)
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss=linear_loss)
    recorder = RecordLogs()
    model.fit(batches(x, y, 4), epochs=1, verbose=0, callbacks=[recorder])

    applied = -kernel(model)  # SGD at learning rate 1: the weight moves by -gradient.
    # [1, 1] * 1 / sqrt(2) = [0.70710678, 0.70710678]; clipping each micro-batch
    # first would give ([1, 0] + [0, 1]) / 2 = [0.5, 0.5] instead.
    np.testing.assert_allclose(applied, [0.70710678, 0.70710678], atol=1e-6)
    assert recorder.batch_logs[0]["grad_norm"] == pytest.approx(math.sqrt(2), abs=1e-6)
    assert recorder.batch_logs[0]["clipped"] == 1.0


def small_dense_model(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(7, activation="tanh"),
            keras.layers.Dense(3),
        ]
    )


def regression_data(count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(count, 5)).astype(np.float32)
    y = rng.normal(size=(count, 3)).astype(np.float32)
    return x, y


def train_dense(micro_batch_size, jit_compile=False, updates=8, batch_size=12, max_grad_norm=None):
    x, y = regression_data(updates * batch_size)
    model = FineTuneModel(
        small_dense_model(seed=3), micro_batch_size=micro_batch_size, max_grad_norm=max_grad_norm
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-2, weight_decay=0.05),
        loss="mse",
        jit_compile=jit_compile,
    )
    model.fit(batches(x, y, batch_size), epochs=1, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == updates
    return [w.numpy() for w in model.model.weights]


def test_accumulation_equals_large_batch():
    whole = train_dense(micro_batch_size=None)
    split = train_dense(micro_batch_size=4)
    # Float32 sums of 3 partial gradients against one sum over 12 rows differ
    # in rounding only; 8 AdamW updates keep that far below 1e-6.
    for expected, actual in zip(whole, split):
        np.testing.assert_allclose(actual, expected, atol=1e-6)


def test_xla_step_matches_graph_step():
    graph = train_dense(micro_batch_size=4)
    xla = train_dense(micro_batch_size=4, jit_compile=True)
    # XLA may fuse and reorder float32 sums; 1e-5 allows that rounding.
    for expected, actual in zip(graph, xla):
        np.testing.assert_allclose(actual, expected, atol=1e-5)


class TokenLogits(keras.layers.Layer):
    """Logits over a vocabulary of 4 for every position: embedding of the token id."""

    def build(self, input_shape):
        self.table = self.add_weight(shape=(6, 4), initializer="glorot_uniform", name="table")

    def call(self, token_ids):
        return tf.gather(self.table, token_ids)


def token_model() -> keras.Model:
    keras.utils.set_random_seed(11)
    inputs = keras.Input((100,), dtype="int32")
    return keras.Model(inputs, TokenLogits()(inputs))


def test_token_normalized_across_micro_batches():
    rng = np.random.default_rng(5)
    token_ids = rng.integers(0, 6, size=(2, 100)).astype(np.int32)
    labels = rng.integers(0, 4, size=(2, 100)).astype(np.int32)
    mask = np.zeros((2, 100), np.float32)
    mask[0, :10] = 1.0  # 10 supervised tokens
    mask[1, :100] = 1.0  # 100 supervised tokens
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    # Independent reference: one pass over both sequences, sum(w * loss) / sum(w).
    reference = token_model()
    start = reference.get_weights()
    with tf.GradientTape() as tape:
        logits = reference(token_ids)
        per_token = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        objective = tf.reduce_sum(per_token * mask) / tf.reduce_sum(mask)
    expected_gradient = tf.convert_to_tensor(
        tape.gradient(objective, reference.trainable_variables)[0]
    ).numpy()

    def one_update(micro_batch_size):
        model = FineTuneModel(token_model(), micro_batch_size=micro_batch_size)
        model.model.set_weights(start)
        model.compile(optimizer=keras.optimizers.SGD(1.0), loss=loss)
        model.fit(batches(token_ids, labels, 2, sample_weight=mask), epochs=1, verbose=0)
        return start[0] - model.model.get_weights()[0]

    np.testing.assert_allclose(one_update(micro_batch_size=1), expected_gradient, atol=1e-6)
    np.testing.assert_allclose(one_update(micro_batch_size=None), expected_gradient, atol=1e-6)

    # A mean per micro-batch would weight each of the 10 short-sequence tokens
    # 1/10 instead of 1/110: the same update would then be far off.
    with tf.GradientTape() as tape:
        logits = reference(token_ids)
        per_token = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        naive = sum(
            tf.reduce_sum(per_token[i] * mask[i]) / mask[i].sum() for i in range(2)
        ) / 2
    naive_gradient = tf.convert_to_tensor(
        tape.gradient(naive, reference.trainable_variables)[0]
    ).numpy()
    assert np.abs(naive_gradient - expected_gradient).max() > 1e-2


@pytest.mark.parametrize("micro_batch_size", [8, 2])
def test_schedule_counts_updates(micro_batch_size):
    x = np.ones((64, 2), np.float32)
    y = np.zeros(64, np.float32)
    schedule = WarmupSchedule(1e-3, total_updates=8, warmup_updates=8, decay="constant")
    model = FineTuneModel(linear_model(2), micro_batch_size=micro_batch_size)
    model.compile(optimizer=keras.optimizers.SGD(schedule), loss=linear_loss)
    recorder = RecordLogs()
    model.fit(batches(x, y, 8), epochs=1, verbose=0, callbacks=[recorder])

    rates = [logs["learning_rate"] for logs in recorder.batch_logs]
    # Update k of a linear warmup over 8 updates uses k / 8 * 1e-3.
    expected = [k / 8 * 1e-3 for k in range(1, 9)]
    np.testing.assert_allclose(rates, expected, rtol=1e-6)
    # Each update moves both weights by -lr * 1 (gradient 1 per input of 1).
    np.testing.assert_allclose(kernel(model), -np.cumsum(expected)[-1] * np.ones(2), rtol=1e-5)


def test_first_update_moves_weights():
    schedule = WarmupSchedule(1e-3, total_updates=100, warmup_updates=10, decay="linear")
    model = FineTuneModel(linear_model(2))
    model.compile(optimizer=keras.optimizers.SGD(schedule), loss=linear_loss)
    x = np.ones((4, 2), np.float32)
    model.fit(batches(x, np.zeros(4, np.float32), 4), epochs=1, verbose=0)
    # One update at 1e-3 / 10 with gradient 1: each weight is -1e-4.
    np.testing.assert_allclose(kernel(model), [-1e-4, -1e-4], rtol=1e-5)


def test_warmup_schedule_values():
    schedule = WarmupSchedule(1.0, total_updates=10, warmup_updates=2, decay="linear")
    # Steps 0, 1 warm up to 1/2, 2/2; then (10 - step) / 8 down to 1/8 at step 9.
    expected = [0.5, 1.0] + [(10 - step) / 8 for step in range(2, 10)]
    np.testing.assert_allclose([float(schedule(step)) for step in range(10)], expected, rtol=1e-6)
    cosine = WarmupSchedule(1.0, total_updates=10, warmup_updates=0, decay="cosine")
    # Halfway through a cosine decay the rate is half the peak.
    assert float(cosine(5)) == pytest.approx(0.5, abs=1e-6)


def test_clip_after_unscaling_under_float16():
    # 1024 inputs of 3/32: the gradient has 1024 elements of 3/32, norm
    # sqrt(1024) * 3/32 = 3.0. Scaled by 65536 each element is 6144, within
    # float16's range (65504).
    x = np.full((4, 1024), 3 / 32, np.float32)
    y = np.zeros(4, np.float32)

    def run(policy):
        keras.mixed_precision.set_global_policy(policy)
        optimizer = keras.optimizers.SGD(1.0)
        if policy == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer, initial_scale=65536.0)
        model = FineTuneModel(linear_model(1024), max_grad_norm=1.0)
        model.compile(optimizer=optimizer, loss=linear_loss)
        recorder = RecordLogs()
        model.fit(batches(x, y, 4), epochs=1, verbose=0, callbacks=[recorder])
        keras.mixed_precision.set_global_policy("float32")
        return kernel(model), recorder.batch_logs[0]

    update16, logs16 = run("mixed_float16")
    update32, logs32 = run("float32")
    # Clipped to norm 1: every element is 3/32 / 3 = 1/32, exact in float16.
    assert np.linalg.norm(update16) == pytest.approx(1.0, abs=1e-3)  # float16: 10-bit mantissa
    np.testing.assert_allclose(update16, update32, atol=1e-3)
    np.testing.assert_allclose(update32, -np.full(1024, 1 / 32), atol=1e-7)
    assert logs16["grad_norm"] == pytest.approx(3.0, rel=1e-3)
    assert logs16["loss_scale"] == 65536.0
    assert logs32["loss_scale"] == 1.0


def two_step_data(second_input):
    x = np.array([[1.0, 1.0], second_input], np.float32)
    return batches(x, np.zeros(2, np.float32), 1)


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16", "mixed_float16"])
def test_non_finite_gradient_changes_nothing(policy):
    keras.mixed_precision.set_global_policy(policy)
    model = FineTuneModel(linear_model(2))
    model.compile(optimizer=keras.optimizers.Adam(0.1), loss=linear_loss)
    data = two_step_data([1.0, np.inf])
    iterator = iter(data)
    # First a clean update, so that Adam's moments are non-zero.
    model.fit(data.take(1), epochs=1, verbose=0)
    before = [v.numpy().copy() for v in model.model.weights + model.optimizer.variables]
    scale_before = float(model.optimizer.dynamic_scale.numpy()) if policy == "mixed_float16" else None
    rate_before = float(model.optimizer.learning_rate)
    iterations_before = int(model.optimizer.iterations.numpy())
    del iterator

    recorder = RecordLogs()
    model.fit(data.skip(1), epochs=1, verbose=0, callbacks=[recorder])

    logs = recorder.batch_logs[0]
    assert not math.isfinite(logs["grad_norm"])
    assert logs["skipped_steps"] == 1.0
    assert int(model.skipped_steps.numpy()) == 1
    assert int(model.optimizer.iterations.numpy()) == iterations_before
    assert float(model.optimizer.learning_rate) == rate_before
    after = model.model.weights + model.optimizer.variables
    for old, new in zip(before, after):
        if policy == "mixed_float16" and new.path.endswith(("dynamic_scale", "step_counter")):
            continue
        np.testing.assert_array_equal(new.numpy(), old, err_msg=new.path)
    if policy == "mixed_float16":
        # The skipped update halves the loss scale.
        assert float(model.optimizer.dynamic_scale.numpy()) == scale_before / 2


class ExplodingBranch(keras.layers.Layer):
    """Outputs where(a < 15, a, 10 ** exp(a)) with a = 10: a finite value whose
    gradient is NaN, because the branch not taken has an infinite derivative."""

    def build(self, input_shape):
        self.a = self.add_weight(shape=(), initializer=keras.initializers.Constant(10.0), name="a")

    def call(self, inputs):
        value = tf.where(self.a < 15.0, self.a, tf.pow(10.0, tf.exp(self.a)))
        return tf.zeros_like(inputs[:, :1]) + value


def test_nan_gradient_behind_finite_loss():
    inputs = keras.Input((1,))
    model = FineTuneModel(keras.Model(inputs, ExplodingBranch()(inputs)))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=linear_loss)
    recorder = RecordLogs()
    model.fit(batches(np.ones((2, 1), np.float32), np.zeros(2, np.float32), 2),
              epochs=1, verbose=0, callbacks=[recorder])
    logs = recorder.batch_logs[0]
    assert logs["update_loss"] == 10.0
    assert math.isnan(logs["grad_norm"])
    assert logs["skipped_steps"] == 1.0
    assert float(model.model.layers[-1].a.numpy()) == 10.0


def test_last_smaller_batch_uses_its_own_count():
    # 10 examples in global batches of 4: updates over 4, 4 and 2 examples.
    inputs = keras.Input((1,))
    outputs = keras.layers.Dense(1, kernel_initializer="zeros", bias_initializer="zeros")(inputs)
    model = FineTuneModel(keras.Model(inputs, outputs), micro_batch_size=2)
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss=linear_loss)
    recorder = RecordLogs()
    x = np.zeros((10, 1), np.float32)
    model.fit(batches(x, np.zeros(10, np.float32), 4), epochs=1, verbose=0, callbacks=[recorder])

    assert recorder.examples == [4, 4, 2]
    assert int(model.optimizer.iterations.numpy()) == 3
    # The bias's gradient is the mean of 1.0 over each update's examples, 1.0:
    # three updates at learning rate 1 move it by exactly 3.0.
    assert float(model.model.layers[-1].bias.numpy()[0]) == -3.0


def test_uneven_micro_batch_split_matches_whole_batch():
    # 12 examples in micro-batches of 5: 5, 5 and 2, the last filled to 5 with
    # weight-0 copies. The result must equal one pass over the 12.
    whole = train_dense(micro_batch_size=None, updates=3)
    split = train_dense(micro_batch_size=5, updates=3)
    for expected, actual in zip(whole, split):
        np.testing.assert_allclose(actual, expected, atol=1e-6)


def test_global_norm_in_float32():
    gradients = [tf.fill([256], tf.constant(256.0, tf.float16))]
    # sqrt(256 * 256**2) = 16 * 256 = 4096; in float16 the squares (65536) overflow.
    assert float(global_norm(gradients)) == 4096.0


def test_matches_keras_accumulation_and_clipping():
    x, y = regression_data(60, seed=2)
    ours = FineTuneModel(small_dense_model(seed=9), micro_batch_size=4, max_grad_norm=0.5)
    ours.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    ours.fit(batches(x, y, 12), epochs=1, verbose=0)

    theirs = small_dense_model(seed=9)
    theirs.compile(
        optimizer=keras.optimizers.Adam(1e-2, gradient_accumulation_steps=3, global_clipnorm=0.5),
        loss="mse",
    )
    theirs.fit(batches(x, y, 4), epochs=1, verbose=0)
    # Both clip the mean of 3 micro-batch gradients once; float32 rounding only.
    for expected, actual in zip(theirs.get_weights(), ours.model.get_weights()):
        np.testing.assert_allclose(actual, expected, atol=1e-6)


@pytest.mark.parametrize(
    "option, value, replacement",
    [
        ("gradient_accumulation_steps", 2, "micro_batch_size"),
        ("clipnorm", 1.0, "max_grad_norm"),
        ("global_clipnorm", 1.0, "max_grad_norm"),
        ("clipvalue", 1.0, "max_grad_norm"),
    ],
)
def test_refuses_optimizer_clipping_and_accumulation(option, value, replacement):
    model = FineTuneModel(linear_model(2))
    optimizer = keras.optimizers.SGD(0.1, **{option: value})
    with pytest.raises(ValueError, match=f"{option}.*{replacement}"):
        model.compile(optimizer=optimizer, loss=linear_loss)


def test_rejects_invalid_arguments():
    with pytest.raises(ValueError, match="Received: micro_batch_size=0"):
        FineTuneModel(linear_model(2), micro_batch_size=0)
    with pytest.raises(ValueError, match="Received: max_grad_norm=-1"):
        FineTuneModel(linear_model(2), max_grad_norm=-1)
