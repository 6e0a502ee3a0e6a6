"""Small callbacks that time a run or end it after a number of steps."""

from __future__ import annotations

import time

import keras

__all__ = ["EvaluationTimer", "StopAfterSteps"]


class EvaluationTimer(keras.callbacks.Callback):
    """Adds up the seconds spent evaluating inside `fit`, to report training speed alone."""

    def on_train_begin(self, logs=None):
        self.seconds = 0.0
        self._start = None

    def on_test_begin(self, logs=None):
        self._start = time.perf_counter()

    def on_test_end(self, logs=None):
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self._start = None


class StopAfterSteps(keras.callbacks.Callback):
    """Ends `fit` after `max_steps` training steps (one step is one optimizer update).

    Args:
        max_steps: Steps to run in each `fit` call.
    """

    def __init__(self, max_steps: int):
        super().__init__()
        if max_steps < 1:
            raise ValueError(f"`max_steps` must be a positive integer. Received: max_steps={max_steps}")
        self.max_steps = max_steps

    def on_train_begin(self, logs=None):
        self.steps = 0

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        if self.steps >= self.max_steps:
            self.model.stop_training = True
