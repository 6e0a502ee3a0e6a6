"""Out-of-memory recovery that keeps the effective batch: rerun the batch in smaller micro-batches."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from tfft.step import FineTuneModel, check_fine_tune_model

__all__ = ["OOMRetry", "OutOfMemoryError"]

logger = logging.getLogger(__name__)

REMEDIES = (
    "a shorter --max-length",
    "mixed precision (--precision mixed_bfloat16, or mixed_float16 on older GPUs)",
    "gradient checkpointing",
    "a smaller model, or LoRA",
)


class OutOfMemoryError(RuntimeError):
    """A batch does not fit in memory even at one example per micro-batch."""


def _batch_shape(data) -> tuple[int, int | None]:
    """Returns the batch size and, for token inputs, the sequence length of a batch."""
    x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
    first = tf.nest.flatten(x)[0]
    shape = first.shape
    is_tokens = first.dtype.is_integer or first.dtype.is_bool
    length = int(shape[1]) if is_tokens and len(shape) == 2 and shape[1] is not None else None
    return int(shape[0]), length


class OOMRetry(keras.callbacks.Callback):
    """Reruns a batch that ran out of memory with twice as many micro-batches.

    When a training step raises `tf.errors.ResourceExhaustedError`, and only
    that error, `FineTuneModel` reruns the same global batch with the
    micro-batch size halved (rounded up), inside the same `fit` call. The
    effective batch, the weights, the optimizer state, the update count and
    the schedule carry on untouched: the failed attempt changed nothing but
    metrics, which are restored. Every other exception propagates unchanged.
    At one example per micro-batch, `OutOfMemoryError` ends the run with the
    remedies. An out-of-memory error in evaluation halves only the evaluation
    micro-batch; the training micro-batch stays.

    Each change is logged once, as `micro_batch_size 16 -> 8 (accumulation
    2 -> 4) after out of memory at update 120`, kept in `changes`, and written
    to TensorBoard (`train/oom_micro_batch_size`) when `log_dir` is given.

    Growing back is off by default: after out of memory the allocator's memory
    is fragmented, and a larger micro-batch that failed once tends to fail
    again, each time costing a wasted step and a new trace. With
    `grow_back_after=N`, the previous size is tried again after N clean
    updates, at most once per size.

    Args:
        grow_back_after: Clean updates before trying the previous, larger
            micro-batch size again. Defaults to `None`, never.
        log_dir: TensorBoard folder. Defaults to `None`, no scalars.
    """

    def __init__(self, grow_back_after: int | None = None, log_dir: str | Path | None = None):
        super().__init__()
        if grow_back_after is not None and (not isinstance(grow_back_after, int) or grow_back_after < 1):
            raise ValueError(
                "`grow_back_after` must be a positive integer or None. "
                f"Received: grow_back_after={grow_back_after!r}"
            )
        self.grow_back_after = grow_back_after
        self.log_dir = Path(log_dir) if log_dir is not None else None

    def on_train_begin(self, logs=None):
        check_fine_tune_model(
            self.model, "OOMRetry reruns batches through tfft.FineTuneModel's train function."
        )
        self.model.out_of_memory_handler = self
        self._evaluation_only = False
        self.changes: list[dict[str, Any]] = []
        self.attempts: list[int] = []
        self._clean_updates = 0
        self._larger_sizes: list[int] = []
        self._grown_back_to: set[int] = set()
        self._writer = (
            tf.summary.create_file_writer(str(self.log_dir / "train")) if self.log_dir else None
        )

    def on_train_end(self, logs=None):
        self.model.out_of_memory_handler = None
        if self._writer is not None:
            self._writer.close()

    def on_test_begin(self, logs=None):
        # A standalone `evaluate` call runs no on_train_begin.
        if self.model.out_of_memory_handler is None:
            self.model.out_of_memory_handler = self
            self._evaluation_only = True

    def on_test_end(self, logs=None):
        if getattr(self, "_evaluation_only", False):
            self.model.out_of_memory_handler = None
            self._evaluation_only = False

    def on_train_batch_end(self, batch, logs=None):
        self._clean_updates += 1
        if (
            self.grow_back_after is not None
            and self._larger_sizes
            and self._clean_updates >= self.grow_back_after
        ):
            larger = self._larger_sizes[-1]
            if larger not in self._grown_back_to:
                self._grown_back_to.add(larger)
                self._larger_sizes.pop()
                self._set_size("training", larger, "after %d clean updates" % self._clean_updates, None)

    def on_out_of_memory(self, model: FineTuneModel, error: Exception, kind: str, data) -> None:
        """Halves the micro-batch of `kind` ("training" or "evaluation"), or raises.

        Called by `FineTuneModel` with the batch that failed.

        Raises:
            OutOfMemoryError: when the micro-batch already has one example.
        """
        batch_size, length = _batch_shape(data)
        configured = model.micro_batch_size if kind == "training" else model.eval_micro_batch_size
        current = min(configured or batch_size, batch_size)
        if kind == "training":
            self.attempts.append(current)
        if current <= 1:
            length_text = f" of {length} tokens" if length is not None else ""
            raise OutOfMemoryError(
                f"Out of memory in {kind} even with one example{length_text} per micro-batch "
                f"(batch of {batch_size}). Remedies, in order: {'; '.join(REMEDIES)}."
            ) from error
        smaller = math.ceil(current / 2)
        if kind == "training":
            self._larger_sizes.append(current)
        self._set_size(kind, smaller, "after out of memory", batch_size, previous=current)

    def _set_size(self, kind, size, cause, batch_size, previous=None):
        model = self.model
        if previous is None:
            previous = model.micro_batch_size if kind == "training" else model.eval_micro_batch_size
        if kind == "training":
            model.micro_batch_size = size
        else:
            model.eval_micro_batch_size = size
        update = int(model.optimizer.iterations.numpy())
        prefix = "micro_batch_size" if kind == "training" else "evaluation micro_batch_size"
        message = f"{prefix} {previous} -> {size}"
        if batch_size is not None:
            message += (
                f" (accumulation {math.ceil(batch_size / previous)} -> "
                f"{math.ceil(batch_size / size)})"
            )
        message += f" {cause} at update {update}"
        logger.warning("%s", message)
        self._clean_updates = 0
        self.changes.append({"kind": kind, "update": update, "from": previous, "to": size, "message": message})
        if self._writer is not None and kind == "training":
            with self._writer.as_default(step=update):
                tf.summary.scalar("oom_micro_batch_size", size)
            self._writer.flush()
