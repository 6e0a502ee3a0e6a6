"""The training model: one `fit` step is one optimizer update over a global batch.

`FineTuneModel` wraps any `keras.Model` and replaces Keras' train and test steps
with ones that keep the contracts of the training step:

1. The data pipeline yields global batches; `micro_batch_size` splits each one
   inside the step, so Keras' step counter, callbacks and learning-rate
   schedules all count optimizer updates.
2. The loss of a global batch is sum(w * loss) / sum(w) over all of its
   elements (examples, or tokens when the labels have a time axis), whatever
   the split into micro-batches.
3. Order: scale the loss (float16 only), sum the gradients of each micro-batch
   in float32, unscale, take the global norm in float32, check finiteness,
   clip to `max_grad_norm`, then one optimizer update (weight decay included).
4. A non-finite loss or gradient changes no weight and no optimizer state.
   The update count does not advance, `skipped_steps` increases, and under
   float16 the loss scale halves.
"""

from __future__ import annotations

import logging

import keras
import tensorflow as tf

__all__ = ["FineTuneModel", "ScaledSchedule", "TrainingStopped", "global_norm"]

logger = logging.getLogger(__name__)

# The dynamic loss scale never halves below this. From the default 2**15 it
# takes 30 skipped updates to get here, and the divergence guard acts long
# before. The floor keeps the scale from underflowing to 0, because no update
# could succeed after that.
MIN_LOSS_SCALE = 2.0**-15

_REJECTED_OPTIMIZER_OPTIONS = {
    "gradient_accumulation_steps": "micro_batch_size (the global batch is split inside the step)",
    "clipnorm": "max_grad_norm (one global norm, clipped after accumulation and unscaling)",
    "global_clipnorm": "max_grad_norm (clipped after accumulation and unscaling)",
    "clipvalue": "max_grad_norm (clipping by value is not supported)",
}


def global_norm(tensors: list[tf.Tensor]) -> tf.Tensor:
    """Returns the L2 norm of all `tensors` together, computed in float32.

    A float16 gradient of moderate size squares past float16's largest value
    (65504), so each tensor is cast to float32 before squaring.
    """
    return _norms(tensors)[0]


def _norms(tensors: list[tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
    """Returns the global L2 norm of `tensors` and the norm of each, in float32."""
    squares = [tf.reduce_sum(tf.square(tf.cast(t, tf.float32))) for t in tensors]
    if not squares:
        return tf.constant(0.0, tf.float32), tf.zeros([0], tf.float32)
    squares = tf.stack(squares)
    return tf.sqrt(tf.reduce_sum(squares)), tf.sqrt(squares)


class TrainingStopped(Exception):
    """Raised by a callback to end `FineTuneModel.fit` at once, like an error.

    No callback's `on_train_end` runs, so that a run stopped because it
    diverged does not look finished: `keras.callbacks.BackupAndRestore` keeps
    its backup, and callbacks that restore "best" weights at the end do not
    act. `FineTuneModel.fit` then returns the `History` so far, or raises
    `error` when it is set.

    Args:
        reason: Why the run stopped.
        error: The exception for `fit` to raise instead of returning.
            Defaults to `None`.
    """

    def __init__(self, reason: str, error: Exception | None = None):
        super().__init__(reason)
        self.reason = reason
        self.error = error


@keras.saving.register_keras_serializable(package="tfft")
class ScaledSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """A learning-rate schedule multiplied by a variable factor.

    The factor lowers the rate after instability without replacing the
    schedule: warmup and decay go on as before, times the factor.

    Args:
        schedule: The schedule to scale.
        multiplier: A scalar float32 variable.
    """

    def __init__(self, schedule, multiplier):
        self.schedule = schedule
        self.multiplier = multiplier

    def __call__(self, step):
        return keras.ops.cast(self.schedule(step), "float32") * self.multiplier

    def get_config(self):
        # The factor belongs to one run; a reloaded optimizer starts at 1.
        return {"schedule": keras.saving.serialize_keras_object(self.schedule), "multiplier": 1.0}

    @classmethod
    def from_config(cls, config):
        schedule = keras.saving.deserialize_keras_object(config["schedule"])
        return cls(schedule, keras.Variable(config["multiplier"], trainable=False))


def _add_gradient(total: tf.Tensor, gradient) -> tf.Tensor:
    """Adds one micro-batch's gradient to a float32 running sum.

    A variable used only through a lookup (an embedding table) gets its
    gradient as `tf.IndexedSlices`; scattering the rows avoids a dense copy.
    A variable without a gradient contributes zero.
    """
    if gradient is None:
        return total
    if isinstance(gradient, tf.IndexedSlices):
        return tf.tensor_scatter_nd_add(
            total, gradient.indices[:, tf.newaxis], tf.cast(gradient.values, tf.float32)
        )
    return total + tf.cast(gradient, tf.float32)


def _slice_micro_batch(index, micro, batch_size, x, y, row_weights):
    """Returns micro-batch `index` of a batch: its inputs, targets and weights.

    An uneven split fills the last micro-batch up with copies of earlier rows
    at weight 0, so every micro-batch has the same static shape.
    """
    positions = index * micro + tf.range(micro)
    rows = positions % batch_size
    x_micro = tf.nest.map_structure(lambda t: tf.gather(t, rows), x)
    y_micro = tf.nest.map_structure(lambda t: tf.gather(t, rows), y)
    in_batch = tf.cast(positions < batch_size, tf.float32)
    weights_micro = tf.gather(row_weights, rows)
    weights_micro *= tf.reshape(in_batch, [-1] + [1] * (len(weights_micro.shape) - 1))
    return x_micro, y_micro, weights_micro


def check_fine_tune_model(model, reason: str) -> None:
    """Raises a TypeError unless `model` is a `FineTuneModel`; `reason` explains why a callback needs one."""
    if not isinstance(model, FineTuneModel):
        raise TypeError(
            f"{reason} Received a model of type {type(model).__name__}; wrap it in "
            "tfft.FineTuneModel(model)."
        )


@keras.saving.register_keras_serializable(package="tfft")
class FineTuneModel(keras.Model):
    """Wraps a Keras model with tfft's training step.

    Compile it with a Keras optimizer, a loss and metrics as usual, and call
    `fit`. Per-batch logs hold, besides the compiled metrics: `loss` (the mean
    over the epoch so far, as in Keras), `update_loss` (this update's global
    batch), `learning_rate` (used by this update), `grad_norm` (before clipping,
    after unscaling), `clipped` (1.0 when the gradient was clipped),
    `loss_scale` (1.0 without loss scaling), `skipped_steps` (so far) and
    `micro_batch_size`.

    Precision follows Keras' global dtype policy: under `mixed_float16`
    `compile` wraps the optimizer in `keras.optimizers.LossScaleOptimizer`.
    Logits are cast to float32 before the loss.

    Compiled metrics count the predictions of every batch, also of an update
    that was skipped as non-finite; the running `loss` counts applied updates
    only.

    Regularization losses of the wrapped model (`model.losses`) are added once
    per update: each micro-batch adds its share divided by the number of
    micro-batches.

    Args:
        model: The model to train. It must have one output.
        micro_batch_size: Examples per forward and backward pass. A global batch
            is split into micro-batches of this size (the last one smaller) and
            their gradients are accumulated. Defaults to `None`, the whole
            global batch in one pass.
        max_grad_norm: Clip the global gradient norm to this value after
            accumulation. Defaults to `None`, no clipping.
        training_noise: Objects with an `active` flag (such as
            `tfft.models.NEFTuneNoise`) switched on while the training step
            is traced, so that their noise is part of training steps only.
            Defaults to `None`.

    Example:

    ```python
    model = tfft.FineTuneModel(classifier, micro_batch_size=8, max_grad_norm=1.0)
    model.compile(
        optimizer=keras.optimizers.AdamW(2e-5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(train_batches, validation_data=dev_batches, epochs=3)
    ```
    """

    def __init__(
        self,
        model: keras.Model,
        *,
        micro_batch_size: int | None = None,
        max_grad_norm: float | None = None,
        training_noise: list | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self._check_size("micro_batch_size", micro_batch_size)
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(
                "`max_grad_norm` must be a positive number or None (no clipping). "
                f"Received: max_grad_norm={max_grad_norm!r}"
            )
        self._step_version = 0
        self._eval_micro_batch_size = None
        # Set by `tfft.callbacks.OOMRetry` while it is active (see `_make_retrying_function`).
        self.out_of_memory_handler = None
        self.model = model
        # The wrapper adds no weights of its own that depend on the input, so
        # it is built when the wrapped model is (BackupAndRestore checks this).
        if model.built:
            self.built = True
        self._micro_batch_size = micro_batch_size
        self.max_grad_norm = max_grad_norm
        self.training_noise = list(training_noise or [])
        self.skipped_steps = self.add_weight(
            shape=(), dtype="int64", initializer="zeros", trainable=False, name="skipped_steps"
        )
        # Running totals for throughput, read by the telemetry callback.
        self.examples_seen = self.add_weight(
            shape=(), dtype="int64", initializer="zeros", trainable=False, name="examples_seen"
        )
        self.tokens_seen = self.add_weight(
            shape=(), dtype="int64", initializer="zeros", trainable=False, name="tokens_seen"
        )
        # Multiplies the learning-rate schedule (see `scale_learning_rate`).
        self.learning_rate_multiplier = self.add_weight(
            shape=(),
            dtype="float32",
            initializer="ones",
            trainable=False,
            name="learning_rate_multiplier",
        )
        self._per_element_loss = None
        self._gradient_norms = None
        self._last_finite_gradient_norms = None

    @property
    def micro_batch_size(self) -> int | None:
        return self._micro_batch_size

    @micro_batch_size.setter
    def micro_batch_size(self, value: int | None) -> None:
        # The size is a Python constant of the traced step, so that XLA gets
        # static shapes. The train function traces the step anew on its next
        # call (see `_make_retrying_function`).
        self._check_size("micro_batch_size", value)
        self._micro_batch_size = value
        self._step_version += 1

    @property
    def eval_micro_batch_size(self) -> int | None:
        """Examples per forward pass in evaluation; `None` evaluates a batch in one pass."""
        return self._eval_micro_batch_size

    @eval_micro_batch_size.setter
    def eval_micro_batch_size(self, value: int | None) -> None:
        self._check_size("eval_micro_batch_size", value)
        self._eval_micro_batch_size = value
        self._step_version += 1

    @staticmethod
    def _check_size(name: str, value) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"`{name}` must be a positive integer or None. Received: {name}={value!r}")

    def call(self, inputs, training=None):
        return self.model(inputs, training=training)

    def compile(self, optimizer="rmsprop", loss=None, metrics=None, **kwargs):
        """Configures the model for training, as `keras.Model.compile`.

        Raises:
            ValueError: when the optimizer accumulates or clips gradients itself,
                when the loss is not a single loss, or when a distribution
                strategy has several replicas.
        """
        optimizer = keras.optimizers.get(optimizer)
        inner = getattr(optimizer, "inner_optimizer", optimizer)
        for option, replacement in _REJECTED_OPTIMIZER_OPTIONS.items():
            value = getattr(inner, option, None)
            if value:
                raise ValueError(
                    f"The optimizer sets `{option}={value}`, which would act per "
                    f"micro-batch or before unscaling. Remove it from the optimizer and "
                    f"pass tfft.FineTuneModel({replacement}) instead."
                )
        if loss is None or isinstance(loss, (list, tuple, dict)):
            raise ValueError(
                "tfft.FineTuneModel needs one loss for the model's one output, such as "
                "keras.losses.SparseCategoricalCrossentropy(from_logits=True). "
                f"Received: loss={loss!r}"
            )
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics, **kwargs)
        if self.distribute_strategy.num_replicas_in_sync > 1:
            raise ValueError(
                "tfft.FineTuneModel does not support several replicas yet: clipping "
                "would see each replica's gradient instead of the all-reduced one. "
                f"Received a strategy with {self.distribute_strategy.num_replicas_in_sync} "
                "replicas; train on one device."
            )
        inner = self._inner_optimizer
        # Keras keeps the schedule object only in the private `_learning_rate`;
        # the public `learning_rate` returns its current value.
        schedule = getattr(inner, "_learning_rate", None)
        if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule) and not isinstance(
            schedule, ScaledSchedule
        ):
            inner.learning_rate = ScaledSchedule(schedule, self.learning_rate_multiplier)
        self.learning_rate_multiplier.assign(1.0)
        loss_object = keras.losses.get(loss)
        if isinstance(loss_object, keras.losses.Loss):
            # `Loss.call` returns the loss of each element, before reduction.
            self._per_element_loss = loss_object.call
        elif callable(loss_object):
            self._per_element_loss = loss_object
        else:
            raise ValueError(f"Cannot use the loss {loss!r}: it is not callable.")

    @property
    def _inner_optimizer(self) -> keras.optimizers.Optimizer:
        """The optimizer that owns the learning rate: the one inside a LossScaleOptimizer."""
        return getattr(self.optimizer, "inner_optimizer", self.optimizer)

    @property
    def _uses_loss_scale(self) -> bool:
        return isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer)

    @staticmethod
    def _micro_size(configured: int | None, batch_size: tf.Tensor) -> tf.Tensor:
        if configured is None:
            return batch_size
        return tf.minimum(configured, batch_size)

    def _weighted_loss_sum(self, y, y_pred, row_weights):
        """Returns sum(w * loss) over one batch and the number of loss elements per row.

        `row_weights` has one weight per example (the sample weights, or 1), or
        the full shape of the per-element loss (token weights).
        """
        y_pred = tf.nest.map_structure(lambda t: tf.cast(t, tf.float32), y_pred)
        losses = tf.cast(self._per_element_loss(y, y_pred), tf.float32)
        weights = row_weights
        while len(weights.shape) < len(losses.shape):
            weights = weights[..., tf.newaxis]
        weights = tf.broadcast_to(weights, tf.shape(losses))
        # A masked element (weight 0: padding, or a filler row of an uneven
        # split) adds nothing, even when its own loss is not finite.
        weighted_sum = tf.reduce_sum(tf.where(weights > 0, losses * weights, 0.0))
        elements_per_weight = tf.cast(tf.size(losses), tf.float32) / tf.maximum(
            tf.cast(tf.size(row_weights), tf.float32), 1.0
        )
        return weighted_sum, elements_per_weight, y_pred

    def _ensure_built(self, data):
        """Creates the model's and the optimizer's variables before tracing the step.

        Variables cannot be created inside the micro-batch loop or the branch
        that applies the update. Keras builds lazily, inside the first trace,
        unless a distribution strategy is set; build here the same way (Keras'
        `_symbolic_build`, run eagerly).
        """
        unbuilt = not all(layer.built for layer in self._flatten_layers()) or (
            self.optimizer is not None and not self.optimizer.built
        )
        if unbuilt:
            with tf.init_scope():
                self._symbolic_build(data_batch=data)
        if self._gradient_norms is None:
            with tf.init_scope():
                count = len(self.trainable_variables)
                # Norm of each variable's gradient at the latest update, and at
                # the latest update whose gradient was finite, for diagnoses.
                self._gradient_norms = tf.Variable(tf.zeros([count]), trainable=False)
                self._last_finite_gradient_norms = tf.Variable(tf.zeros([count]), trainable=False)

    def scale_learning_rate(self, factor: float) -> float:
        """Multiplies the learning rate by `factor` on top of its schedule.

        With a schedule, a multiplier variable scales it; with a constant
        learning rate, the optimizer's learning-rate variable itself is
        scaled. Either way the traced step reads the new value at once.

        Returns:
            The multiplier now in effect, relative to the compiled learning rate.
        """
        inner = self._inner_optimizer
        new_multiplier = float(self.learning_rate_multiplier.numpy()) * factor
        if not isinstance(inner._learning_rate, ScaledSchedule):
            inner.learning_rate = float(inner.learning_rate) * factor
        self.learning_rate_multiplier.assign(new_multiplier)
        return new_multiplier

    def training_state(self) -> list[keras.Variable]:
        """Returns the variables a snapshot must hold to resume training exactly.

        These are the wrapped model's weights and the optimizer's variables
        (update count, moments, loss scale). A constant learning rate, which
        Keras keeps as an optimizer variable, is left out: it is a setting
        that `scale_learning_rate` lowers, not state to roll back.
        """
        rate = getattr(self._inner_optimizer, "_learning_rate", None)
        optimizer_state = [v for v in self.optimizer.variables if v is not rate]
        return list(self.model.weights) + optimizer_state

    def gradient_norms(self, finite_only: bool = False) -> dict[str, float]:
        """Returns the gradient norm of each trainable variable, by variable path.

        Args:
            finite_only: Read the norms of the latest update whose gradient
                was finite instead of the latest update. Defaults to `False`.
        """
        norms = self._last_finite_gradient_norms if finite_only else self._gradient_norms
        if norms is None:
            return {}
        values = norms.numpy()
        return {v.path: float(x) for v, x in zip(self.trainable_variables, values)}

    def train_step(self, data):
        self._ensure_built(data)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        batch_size = tf.shape(tf.nest.flatten(x)[0])[0]
        if sample_weight is None:
            row_weights = tf.ones([batch_size], tf.float32)
        else:
            row_weights = tf.cast(sample_weight, tf.float32)
        # The denominator of the whole global batch, known before any micro-batch
        # runs: the sum of the given weights times the loss elements per weight.
        weight_total = tf.reduce_sum(row_weights)

        variables = self.trainable_variables
        micro = self._micro_size(self._micro_batch_size, batch_size)
        num_micro_batches = (batch_size + micro - 1) // micro
        loss_scale = self.optimizer.dynamic_scale if self._uses_loss_scale else None

        # Phase 1: forward and backward pass of each micro-batch, one at a time.
        def micro_batch_step(index, gradient_sums, loss_total, element_total):
            x_micro, y_micro, weights_micro = _slice_micro_batch(
                index, micro, batch_size, x, y, row_weights
            )
            with tf.GradientTape() as tape:
                for noise in self.training_noise:
                    noise.active = True
                try:
                    y_pred = self(x_micro, training=True)
                finally:
                    for noise in self.training_noise:
                        noise.active = False
                weighted_sum, elements_per_weight, y_pred = self._weighted_loss_sum(
                    y_micro, y_pred, weights_micro
                )
                loss = tf.math.divide_no_nan(weighted_sum, weight_total * elements_per_weight)
                if self.model.losses:
                    loss += tf.add_n(
                        [tf.cast(l, tf.float32) for l in self.model.losses]
                    ) / tf.cast(num_micro_batches, tf.float32)
                scaled_loss = loss * loss_scale if loss_scale is not None else loss
            gradients = tape.gradient(scaled_loss, variables)
            gradient_sums = [
                _add_gradient(total, g) for total, g in zip(gradient_sums, gradients)
            ]
            if self._compile_metrics is not None:
                self._compile_metrics.update_state(y_micro, y_pred, weights_micro)
            element_total += tf.reduce_sum(weights_micro) * elements_per_weight
            return index + 1, gradient_sums, loss_total + loss, element_total

        zeros = [tf.zeros(v.shape, tf.float32) for v in variables]
        _, gradients, loss, element_total = tf.while_loop(
            lambda index, *_: index < num_micro_batches,
            micro_batch_step,
            (tf.constant(0), zeros, tf.constant(0.0), tf.constant(0.0)),
            # One micro-batch at a time: running them in parallel would hold the
            # activations of several at once, which is what splitting avoids.
            parallel_iterations=1,
        )

        # Phase 2: unscale. The loss scale is a power of two, so dividing by it
        # is exact.
        if loss_scale is not None:
            gradients = [g / loss_scale for g in gradients]

        # Phase 3: global norm in float32, before clipping, on the true gradient.
        grad_norm, variable_norms = _norms(gradients)
        self._gradient_norms.assign(variable_norms)

        # Phase 4: an update with a non-finite loss or gradient is skipped. The
        # norm is non-finite exactly when some gradient element is (or when the
        # sum of squares overflows, which clipping could not repair either).
        finite = tf.logical_and(tf.math.is_finite(loss), tf.math.is_finite(grad_norm))

        # Phase 5: clip the accumulated, unscaled gradient once.
        clipped = tf.constant(False)
        if self.max_grad_norm is not None:
            max_norm = tf.constant(self.max_grad_norm, tf.float32)
            clipped = grad_norm > max_norm
            factor = max_norm / tf.maximum(grad_norm, max_norm)
            gradients = [g * factor for g in gradients]

        # Phase 6: one optimizer update (weight decay included), or a skip.
        learning_rate = tf.cast(self.optimizer.learning_rate, tf.float32)
        used_loss_scale = loss_scale + 0.0 if loss_scale is not None else tf.constant(1.0)
        tf.cond(
            finite,
            lambda: self._apply_update(gradients, variables),
            self._skip_update,
        )

        # Phase 7: bookkeeping and logs.
        self.examples_seen.assign_add(tf.cast(batch_size, tf.int64))
        if isinstance(x, dict) and "padding_mask" in x:
            self.tokens_seen.assign_add(
                tf.reduce_sum(tf.cast(x["padding_mask"], tf.int64))
            )
        # The epoch's running loss counts applied updates only, so one NaN does
        # not turn the rest of the epoch's mean into NaN; `update_loss` shows it.
        tf.cond(
            finite,
            lambda: self._track_loss(loss, element_total),
            lambda: tf.constant(False),
        )
        logs = self.get_metrics_result()
        logs.update(
            update_loss=loss,
            learning_rate=learning_rate,
            grad_norm=grad_norm,
            clipped=tf.cast(clipped, tf.float32),
            loss_scale=used_loss_scale,
            skipped_steps=self.skipped_steps + 0,
            micro_batch_size=micro,
        )
        return logs

    def make_train_function(self, force=False):
        if self.train_function is None or force:
            self.train_function = self._make_retrying_function(self.train_step, "training")
        return self.train_function

    def make_test_function(self, force=False):
        if self.test_function is None or force:
            self.test_function = self._make_retrying_function(self.test_step, "evaluation")
        return self.test_function

    def _make_retrying_function(self, step, kind: str):
        """Builds Keras' train or test function, able to rerun a batch after out of memory.

        Unlike Keras' own, the function takes each batch from the iterator in
        Python and then runs the traced step on it, so that after a
        `tf.errors.ResourceExhaustedError` the same batch can run again, split
        into smaller micro-batches, without skipping data. It traces the step
        anew whenever a micro-batch size changed.
        """
        compiled = {"version": None, "step": None}

        def current_step():
            if compiled["version"] != self._step_version:
                # Dropping the old traced function frees its graphs.
                compiled["step"] = (
                    step
                    if self.run_eagerly
                    else tf.function(step, reduce_retracing=True, jit_compile=self.jit_compile)
                )
                compiled["version"] = self._step_version
            return compiled["step"]

        def run_step(data):
            while True:
                handler = self.out_of_memory_handler
                saved = [v.numpy() for v in self.metrics_variables] if handler else None
                try:
                    return current_step()(data)
                except tf.errors.ResourceExhaustedError as error:
                    if handler is None:
                        raise
                    # The failed attempt may have updated metrics for some
                    # micro-batches; the retry counts the batch once.
                    for variable, value in zip(self.metrics_variables, saved):
                        variable.assign(value)
                    # Raises when no smaller size is left; else sets one.
                    handler.on_out_of_memory(self, error, kind, data)

        def function(iterator):
            outputs = None
            for _ in range(self.steps_per_execution):
                try:
                    data = next(iterator)
                except (StopIteration, tf.errors.OutOfRangeError):
                    if outputs is None:
                        raise StopIteration from None
                    break
                outputs = run_step(data)
            return outputs

        return function

    def fit(self, *args, **kwargs):
        """Trains the model, as `keras.Model.fit`.

        A callback can end training at once by raising `TrainingStopped`;
        `fit` then returns the `History` so far, or raises the error the
        callback attached.
        """
        # Keras' History callback attaches itself at each epoch's end; clear a
        # previous call's, so a stop in the first epoch returns an empty one.
        self.history = None
        try:
            return super().fit(*args, **kwargs)
        except TrainingStopped as stopped:
            if stopped.error is not None:
                raise stopped.error from None
            logger.warning("training stopped: %s", stopped.reason)
            if self.history is None:
                self.history = keras.callbacks.History()
                self.history.set_model(self)
                self.history.epoch = []
            return self.history

    def _track_loss(self, loss, element_weight):
        self._loss_tracker.update_state(loss, sample_weight=element_weight)
        return tf.constant(True)

    def _apply_update(self, gradients, variables):
        self._last_finite_gradient_norms.assign(self._gradient_norms)
        if self._uses_loss_scale:
            # LossScaleOptimizer unscales what it receives and counts clean steps
            # toward growing the scale. It gets the clipped gradient rescaled by
            # the same power of two, which round-trips exactly.
            scale = self.optimizer.dynamic_scale
            self.optimizer.apply([g * scale for g in gradients], variables)
        else:
            self.optimizer.apply(gradients, variables)
        return tf.constant(True)

    def _skip_update(self):
        self.skipped_steps.assign_add(1)
        if self._uses_loss_scale:
            self.optimizer.step_counter.assign(0)
            self.optimizer.dynamic_scale.assign(
                tf.maximum(self.optimizer.dynamic_scale * 0.5, MIN_LOSS_SCALE)
            )
        return tf.constant(False)

    def test_step(self, data):
        self._ensure_built(data)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        batch_size = tf.shape(tf.nest.flatten(x)[0])[0]
        if sample_weight is None:
            row_weights = tf.ones([batch_size], tf.float32)
        else:
            row_weights = tf.cast(sample_weight, tf.float32)
        micro = self._micro_size(self._eval_micro_batch_size, batch_size)
        num_micro_batches = (batch_size + micro - 1) // micro

        # Evaluation splits a batch only to fit in memory (after out of
        # memory); the loss is the same sum over all elements either way.
        def micro_batch_step(index, weighted_total, element_total):
            x_micro, y_micro, weights_micro = _slice_micro_batch(
                index, micro, batch_size, x, y, row_weights
            )
            y_pred = self(x_micro, training=False)
            weighted_sum, elements_per_weight, y_pred = self._weighted_loss_sum(
                y_micro, y_pred, weights_micro
            )
            if self._compile_metrics is not None:
                self._compile_metrics.update_state(y_micro, y_pred, weights_micro)
            element_total += tf.reduce_sum(weights_micro) * elements_per_weight
            return index + 1, weighted_total + weighted_sum, element_total

        _, weighted_total, element_total = tf.while_loop(
            lambda index, *_: index < num_micro_batches,
            micro_batch_step,
            (tf.constant(0), tf.constant(0.0), tf.constant(0.0)),
            parallel_iterations=1,
        )
        loss = tf.math.divide_no_nan(weighted_total, element_total)
        # Weighting each batch's mean by its total weight makes the epoch's loss
        # the mean over all evaluated elements.
        self._loss_tracker.update_state(loss, sample_weight=element_total)
        return self.get_metrics_result()

    def get_config(self):
        config = super().get_config()
        config.update(
            model=keras.saving.serialize_keras_object(self.model),
            micro_batch_size=self._micro_batch_size,
            max_grad_norm=self.max_grad_norm,
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        model = keras.saving.deserialize_keras_object(
            config.pop("model"), custom_objects=custom_objects
        )
        return cls(model, **config)
