"""Overfitting monitor: the generalization gap and the validation trend, with warn, stop or restore."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

__all__ = ["OverfittingMonitor"]

logger = logging.getLogger(__name__)

ACTIONS = ("warn", "stop", "restore_best")

REMEDIES = (
    "more dropout (--dropout)",
    "more weight decay (--weight-decay)",
    "data augmentation",
    "fewer epochs",
    "a lower learning rate",
)

_HIGHER_IS_BETTER = ("acc", "f1", "auc", "precision", "recall", "matthews", "correlation")


def infer_mode(metric: str) -> str:
    """Returns "min" or "max" for a metric name: losses fall, accuracy, F1 and AUC rise.

    Raises:
        ValueError: when the name says neither.
    """
    name = metric.lower()
    if "loss" in name or "error" in name:
        return "min"
    if any(part in name for part in _HIGHER_IS_BETTER):
        return "max"
    raise ValueError(
        f"Cannot tell whether {metric!r} should rise or fall. Pass mode='min' or mode='max'."
    )


class OverfittingMonitor(keras.callbacks.Callback):
    """Watches each evaluation for overfitting, and warns, stops, or restores the best weights.

    Two rules, each over `patience` evaluations in a row:

    - Gap: (validation loss - training loss) / training loss above
      `gap_threshold` (default 0.1: a validation loss 10% above the training
      loss).
    - Trend: the monitored validation metric has not improved on its best by
      more than `min_delta`, while the training loss still falls.

    The training loss compared is, by default, the mean of the update losses
    since the previous evaluation (the epoch's, or the window's with
    `eval_every`). With dropout active, those losses overstate the training
    loss the model has in evaluation mode, so the gap is understated. Pass
    `train_gap_data`, a held subset of the training data, to measure the
    training loss in evaluation mode instead. It costs one more evaluation
    pass each time.

    Actions: `"warn"` logs once, with remedies, and goes on; `"stop"` ends
    training; `"restore_best"` ends training and puts back the weights of the
    best evaluation, and also puts them back when training ends without
    stopping.

    Args:
        monitor: Validation metric of the trend rule and of "best". Defaults
            to `"val_loss"`.
        mode: `"min"`, `"max"` or `"auto"` (from the metric name). Defaults
            to `"auto"`.
        gap_threshold: Relative gap above which the gap rule counts an
            evaluation. Defaults to `0.1`.
        patience: Evaluations in a row before a rule fires. Defaults to `3`.
        min_delta: Smallest change that counts as an improvement. Defaults to `0.0`.
        action: `"warn"`, `"stop"` or `"restore_best"`. Defaults to `"warn"`.
        validation_data: Data to evaluate every `eval_every` updates. Defaults
            to `None`, use the validation of `fit` at each epoch's end.
        eval_every: Evaluate every this many updates. Defaults to `None`.
        train_gap_data: Held training examples to measure the training loss
            in evaluation mode. Defaults to `None`.
        log_dir: TensorBoard folder for the gap (under `validation/`).
            Defaults to `None`.
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        mode: str = "auto",
        gap_threshold: float = 0.1,
        patience: int = 3,
        min_delta: float = 0.0,
        action: str = "warn",
        validation_data=None,
        eval_every: int | None = None,
        train_gap_data=None,
        log_dir: str | Path | None = None,
    ):
        super().__init__()
        if action not in ACTIONS:
            raise ValueError(f"`action` must be one of {', '.join(ACTIONS)}. Received: action={action!r}")
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"`mode` must be 'auto', 'min' or 'max'. Received: mode={mode!r}")
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"`patience` must be a positive integer. Received: patience={patience!r}")
        if not gap_threshold > 0:
            raise ValueError(f"`gap_threshold` must be positive. Received: gap_threshold={gap_threshold!r}")
        if eval_every is not None and (validation_data is None or eval_every < 1):
            raise ValueError(
                "`eval_every` needs `validation_data` and must be a positive integer. "
                f"Received: eval_every={eval_every!r}, validation_data={'given' if validation_data is not None else None}"
            )
        self.monitor = monitor
        self.mode = infer_mode(monitor) if mode == "auto" else mode
        self.gap_threshold = gap_threshold
        self.patience = patience
        self.min_delta = min_delta
        self.action = action
        self.validation_data = validation_data
        self.eval_every = eval_every
        self.train_gap_data = train_gap_data
        self.log_dir = Path(log_dir) if log_dir is not None else None

    def on_train_begin(self, logs=None):
        self.evaluations: list[dict[str, float]] = []
        self.fired: list[dict[str, Any]] = []
        self.best_value: float | None = None
        self.best_evaluation: int | None = None
        self._best_weights: list[np.ndarray] | None = None
        self._gap_streak = 0
        self._stale_streak = 0
        self._warned = False
        self._window_losses: list[float] = []
        self._updates = 0
        self.stopped = False
        self._writer = (
            tf.summary.create_file_writer(str(self.log_dir / "validation")) if self.log_dir else None
        )

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        self._updates += 1
        loss = logs.get("update_loss", logs.get("loss"))
        if loss is not None and math.isfinite(float(loss)):
            self._window_losses.append(float(loss))
        if self.eval_every and self._updates % self.eval_every == 0:
            self._evaluate_now()

    def on_epoch_end(self, epoch, logs=None):
        if self.eval_every is None and logs and any(key.startswith("val_") for key in logs):
            self.observe({key: float(value) for key, value in logs.items()})

    def on_train_end(self, logs=None):
        if self.action == "restore_best" and not self.stopped:
            self._restore_best()
        if self._writer is not None:
            self._writer.close()

    def _evaluate(self, data) -> dict[str, float]:
        """Evaluates `data` mid-training without disturbing the epoch's training metrics.

        Keras' `evaluate` resets the metrics it shares with training, so their
        values are put back afterwards.
        """
        metric_variables = self.model.metrics_variables
        saved = [variable.numpy() for variable in metric_variables]
        results = self.model.evaluate(data, verbose=0, return_dict=True)
        for variable, value in zip(metric_variables, saved):
            variable.assign(value)
        return {key: float(value) for key, value in results.items()}

    def _evaluate_now(self) -> None:
        results = self._evaluate(self.validation_data)
        self.observe({f"val_{key}": value for key, value in results.items()})

    def _training_loss(self, logs: dict[str, float]) -> float:
        if self.train_gap_data is not None:
            return self._evaluate(self.train_gap_data)["loss"]
        if self._window_losses:
            return float(np.mean(self._window_losses))
        return float(logs.get("loss", math.nan))

    def observe(self, logs: dict[str, float]) -> None:
        """Takes the results of one evaluation (validation keys start with `val_`) and applies the rules.

        Raises:
            KeyError: when the monitored metric or `val_loss` is not among them.
        """
        for key in (self.monitor, "val_loss"):
            if key not in logs:
                available = ", ".join(sorted(k for k in logs if k.startswith("val_"))) or "none"
                raise KeyError(
                    f"OverfittingMonitor: metric {key!r} not found in the evaluation results. "
                    f"Metrics found: {available}. Pass one of them as monitor."
                )
        train_loss = self._training_loss(logs)
        self._window_losses = []
        value = logs[self.monitor]
        validation_loss = logs["val_loss"]
        gap = (validation_loss - train_loss) / train_loss if train_loss > 0 else math.inf
        number = len(self.evaluations) + 1
        previous_train = self.evaluations[-1]["train_loss"] if self.evaluations else None
        self.evaluations.append(
            {"evaluation": number, "update": self._updates, "train_loss": train_loss,
             "val_loss": validation_loss, "gap": gap, self.monitor: value}
        )

        improved = self.best_value is None or (
            value < self.best_value - self.min_delta
            if self.mode == "min"
            else value > self.best_value + self.min_delta
        )
        if improved:
            self.best_value = value
            self.best_evaluation = number
            self._best_weights = [w.numpy().copy() for w in self._weights()]
            self._stale_streak = 0
        else:
            train_falling = previous_train is not None and train_loss < previous_train
            self._stale_streak = self._stale_streak + 1 if train_falling else 0
        self._gap_streak = self._gap_streak + 1 if gap > self.gap_threshold else 0

        if self._writer is not None:
            with self._writer.as_default(step=self._updates):
                tf.summary.scalar("relative_gap", gap)
            self._writer.flush()

        if self._gap_streak >= self.patience:
            self._fire(
                "gap",
                number,
                f"validation loss {validation_loss:.4g} is {gap:.1%} above the training loss "
                f"{train_loss:.4g} for {self._gap_streak} evaluations (threshold {self.gap_threshold:.0%})",
            )
        elif self._stale_streak >= self.patience:
            self._fire(
                "trend",
                number,
                f"{self.monitor} has not improved on {self.best_value:.4g} (evaluation "
                f"{self.best_evaluation}) for {self._stale_streak} evaluations while the "
                "training loss still falls",
            )

    def _weights(self) -> list[keras.Variable]:
        inner = getattr(self.model, "model", self.model)
        return list(inner.weights)

    def _fire(self, rule: str, evaluation: int, reason: str) -> None:
        self.fired.append({"rule": rule, "evaluation": evaluation, "reason": reason})
        if self.action == "warn":
            if not self._warned:
                logger.warning(
                    "overfitting at evaluation %d: %s. Remedies: %s.", evaluation, reason, "; ".join(REMEDIES)
                )
                self._warned = True
            return
        logger.warning("overfitting at evaluation %d: %s; stopping.", evaluation, reason)
        self.stopped = True
        self.model.stop_training = True
        if self.action == "restore_best":
            self._restore_best()

    def _restore_best(self) -> None:
        if self._best_weights is None:
            return
        for variable, value in zip(self._weights(), self._best_weights):
            variable.assign(value)
        logger.info(
            "restored the weights of evaluation %d (%s %.4g)",
            self.best_evaluation,
            self.monitor,
            self.best_value,
        )
