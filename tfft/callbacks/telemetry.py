"""Per-update training signals and per-evaluation metrics, written to TensorBoard."""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path

import keras
import tensorflow as tf

__all__ = ["AugmentationLog", "TrainingTelemetry", "memory_in_use"]

logger = logging.getLogger(__name__)

# Per-batch log entries of `FineTuneModel` written as scalars each update, with
# the TensorBoard tag each one gets.
UPDATE_SCALARS = {
    "update_loss": "loss",
    "learning_rate": "learning_rate",
    "grad_norm": "grad_norm",
    "clipped": "clipped",
    "loss_scale": "loss_scale",
    "skipped_steps": "skipped_steps",
    "micro_batch_size": "micro_batch_size",
}


@functools.cache
def _gpu_visible() -> bool:
    return bool(tf.config.list_logical_devices("GPU"))


def memory_in_use() -> float | None:
    """Returns the memory in use in bytes: the GPU's when one is visible, else this process's resident memory."""
    if _gpu_visible():
        return float(tf.config.experimental.get_memory_info("GPU:0")["current"])
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            resident_pages = int(statm.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return float(resident_pages * os.sysconf("SC_PAGE_SIZE"))


class TrainingTelemetry(keras.callbacks.Callback):
    """Writes every signal of the training step to TensorBoard.

    Under `LOG_DIR/train`, per training step (the x axis counts steps of this
    `fit` call, skipped updates included, so each gets its point):
    loss, learning rate, pre-clip gradient norm, whether the update was
    clipped, loss scale, skipped updates so far, micro-batch size, examples
    and tokens per second, and memory in use. Under `LOG_DIR/validation`, per
    evaluation: the validation loss and metrics, and the generalization gap
    (validation loss minus the epoch's training loss).

    Args:
        log_dir: Folder of the event files.
        update_freq: Write update scalars every this many updates. Defaults to `1`.
    """

    def __init__(self, log_dir: str | Path, update_freq: int = 1):
        super().__init__()
        if update_freq < 1:
            raise ValueError(
                f"`update_freq` must be a positive integer. Received: update_freq={update_freq}"
            )
        self.log_dir = Path(log_dir)
        self.update_freq = update_freq
        self._train_writer = None
        self._validation_writer = None

    def on_train_begin(self, logs=None):
        self._train_writer = tf.summary.create_file_writer(str(self.log_dir / "train"))
        self._validation_writer = tf.summary.create_file_writer(str(self.log_dir / "validation"))
        self._last_time = time.perf_counter()
        self._last_examples = self._read_counter("examples_seen")
        self._last_tokens = self._read_counter("tokens_seen")
        self._updates = 0

    def _read_counter(self, name: str) -> int | None:
        counter = getattr(self.model, name, None)
        return None if counter is None else int(counter.numpy())

    def on_train_batch_end(self, batch, logs=None):
        self._updates += 1
        if self._updates % self.update_freq:
            return
        logs = logs or {}
        now = time.perf_counter()
        elapsed = max(now - self._last_time, 1e-9)
        step = self._updates
        with self._train_writer.as_default(step=step):
            for key, tag in UPDATE_SCALARS.items():
                if key in logs:
                    tf.summary.scalar(tag, float(logs[key]))
            examples = self._read_counter("examples_seen")
            if examples is not None:
                tf.summary.scalar("examples_per_second", (examples - self._last_examples) / elapsed)
                self._last_examples = examples
            tokens = self._read_counter("tokens_seen")
            if tokens is not None and tokens > 0:
                tf.summary.scalar("tokens_per_second", (tokens - self._last_tokens) / elapsed)
                self._last_tokens = tokens
            memory = memory_in_use()
            if memory is not None:
                tf.summary.scalar("memory_in_use_bytes", memory)
        self._last_time = now

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        step = self._updates
        with self._train_writer.as_default(step=step):
            for key, value in logs.items():
                if not key.startswith("val_") and key not in UPDATE_SCALARS:
                    tf.summary.scalar(f"epoch_{key}", float(value))
        validation = {key[4:]: float(value) for key, value in logs.items() if key.startswith("val_")}
        if validation:
            with self._validation_writer.as_default(step=step):
                for key, value in validation.items():
                    tf.summary.scalar(key, value)
                if "loss" in validation and "loss" in logs:
                    tf.summary.scalar("generalization_gap", validation["loss"] - float(logs["loss"]))
        self._train_writer.flush()
        self._validation_writer.flush()

    def on_train_end(self, logs=None):
        for writer in (self._train_writer, self._validation_writer):
            if writer is not None:
                writer.close()


class AugmentationLog(keras.callbacks.Callback):
    """Logs how many training examples were augmented in each epoch.

    Args:
        augmenter: The `tfft.data.augment.TextAugmenter` of the training data.
        log_dir: TensorBoard folder (scalar `augmented_examples` under
            `train/`). Defaults to `None`.
    """

    def __init__(self, augmenter, log_dir: str | Path | None = None):
        super().__init__()
        self.augmenter = augmenter
        self.log_dir = Path(log_dir) if log_dir is not None else None

    def on_train_begin(self, logs=None):
        self.per_epoch: list[int] = []
        self._writer = (
            tf.summary.create_file_writer(str(self.log_dir / "train")) if self.log_dir else None
        )

    def on_epoch_begin(self, epoch, logs=None):
        self.augmenter.augmented_count.assign(0)

    def on_epoch_end(self, epoch, logs=None):
        count = int(self.augmenter.augmented_count.numpy())
        self.per_epoch.append(count)
        logger.info("epoch %d: %d training examples augmented", epoch + 1, count)
        if self._writer is not None:
            with self._writer.as_default(step=epoch + 1):
                tf.summary.scalar("augmented_examples", count)
            self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
