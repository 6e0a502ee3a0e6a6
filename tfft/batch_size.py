"""Finding the largest micro-batch that fits in memory, before training."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import keras
import tensorflow as tf

__all__ = ["find_micro_batch_size", "memory_probe"]

logger = logging.getLogger(__name__)


def find_micro_batch_size(
    fits: Callable[[int], bool],
    max_size: int,
    start: int = 1,
    margin: float = 0.1,
) -> int:
    """Returns the largest micro-batch size that fits, less a safety margin.

    Doubles the size from `start` until it fails or reaches `max_size`, then
    bisects between the largest size that fit and the smallest that failed.
    The margin leaves room for what one probe does not see: longer batches
    later, memory fragmentation, evaluation.

    Args:
        fits: Returns whether one forward and backward pass at a size fits.
        max_size: Largest size worth trying (the global batch).
        start: First size tried. Defaults to `1`.
        margin: Fraction taken off the largest size that fit. Defaults to `0.1`.

    Raises:
        ValueError: when `max_size` or `start` is below 1, or `margin` outside [0, 1).
        MemoryError: when even `start` examples do not fit.
    """
    if max_size < 1 or start < 1:
        raise ValueError(f"Sizes must be positive. Received: max_size={max_size}, start={start}")
    if not 0 <= margin < 1:
        raise ValueError(f"`margin` must be in [0, 1). Received: margin={margin}")
    start = min(start, max_size)
    if not fits(start):
        if start == 1:
            raise MemoryError(
                "One example does not fit in memory for a forward and backward pass. "
                "Use a shorter --max-length, mixed precision, gradient checkpointing, "
                "or a smaller model."
            )
        return find_micro_batch_size(fits, start - 1, 1, margin)

    largest_fit, smallest_failure = start, None
    size = start
    while size < max_size:
        size = min(size * 2, max_size)
        if fits(size):
            largest_fit = size
        else:
            smallest_failure = size
            break
    if smallest_failure is not None:
        while smallest_failure - largest_fit > 1:
            middle = (largest_fit + smallest_failure) // 2
            if fits(middle):
                largest_fit = middle
            else:
                smallest_failure = middle
    if largest_fit == max_size and smallest_failure is None:
        return max_size
    return max(1, math.floor(largest_fit * (1 - margin)))


def memory_probe(model: keras.Model, features: dict[str, tf.Tensor], labels: tf.Tensor) -> Callable[[int], bool]:
    """Builds `fits(size)` for `find_micro_batch_size` from a model and a few examples.

    Each probe runs one forward and backward pass of `model` on `size` rows
    (the given examples repeated), computing gradients without applying them,
    so no weight changes. It reports a `tf.errors.ResourceExhaustedError` as
    not fitting; any other error propagates.

    Args:
        model: The compiled `FineTuneModel` to train.
        features: Inputs of a few examples, ideally the longest ones, padded
            to the longest length to be trained.
        labels: Their labels.
    """
    count = int(tf.shape(labels)[0])

    @tf.function(reduce_retracing=True)
    def forward_backward(x, y):
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            loss, _, _ = model._weighted_loss_sum(y, y_pred, tf.ones_like(y, tf.float32))
        gradients = tape.gradient(loss, model.trainable_variables)
        return tf.add_n([tf.reduce_sum(g) for g in gradients if g is not None])

    def fits(size: int) -> bool:
        rows = tf.range(size) % count
        x = tf.nest.map_structure(lambda t: tf.gather(t, rows), features)
        y = tf.gather(labels, rows)
        try:
            forward_backward(x, y).numpy()
        except tf.errors.ResourceExhaustedError:
            logger.info("micro-batch %d: out of memory", size)
            return False
        logger.info("micro-batch %d: fits", size)
        return True

    return fits
