"""Divergence guard: skip, roll back with a lower learning rate, or stop with a diagnosis."""

from __future__ import annotations

import collections
import json
import logging
import math
import statistics
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfft.step import TrainingStopped, check_fine_tune_model

__all__ = ["DivergenceError", "NonFiniteGuard"]

logger = logging.getLogger(__name__)

POLICIES = ("skip", "rollback", "stop")

REMEDIES = (
    "lower --learning-rate (or a longer --warmup)",
    "keep --max-grad-norm on (1.0 is usual)",
    "use mixed_bfloat16 instead of mixed_float16",
    "check the data for empty, very long or corrupted examples",
)


class DivergenceError(RuntimeError):
    """Training diverged and the guard stopped it.

    Args:
        diagnosis: What happened, as written to `diagnosis.json`.
    """

    def __init__(self, diagnosis: dict[str, Any]):
        super().__init__(format_diagnosis(diagnosis))
        self.diagnosis = diagnosis


def format_diagnosis(diagnosis: dict[str, Any]) -> str:
    """Formats a diagnosis as a few lines for a log or an error message."""
    lines = [
        f"Training diverged at update {diagnosis['update']}: {diagnosis['reason']}.",
        f"  loss {diagnosis['loss']:.6g}, learning rate {diagnosis['learning_rate']:.6g}, "
        f"loss scale {diagnosis['loss_scale']:g}, rollbacks {diagnosis['rollbacks']}, "
        f"learning-rate multiplier {diagnosis['learning_rate_multiplier']:g}.",
    ]
    if diagnosis["first_non_finite_layer"] is not None:
        lines.append(
            f"  First layer (in model order) with a non-finite gradient: "
            f"{diagnosis['first_non_finite_layer']} ({diagnosis['first_non_finite_variable']})."
        )
    largest = diagnosis["largest_gradient_norms"]
    if largest:
        shown = ", ".join(f"{item['variable']} {item['norm']:.4g}" for item in largest)
        lines.append(f"  Largest gradient norms of the last finite update: {shown}.")
    if diagnosis.get("restored_update") is not None:
        lines.append(
            f"  Weights and optimizer state restored to update {diagnosis['restored_update']}, "
            "the last good snapshot."
        )
    else:
        lines.append("  Weights are those of the last applied update; bad updates were skipped.")
    lines.append("  Remedies: " + "; ".join(REMEDIES) + ".")
    return "\n".join(lines)


def _owning_layers(model: keras.Model) -> dict[int, str]:
    """Maps each trainable variable (by id) to the name of the innermost layer that owns it."""
    owners = {}
    # Layers come parents first, so a sublayer overwrites its parent's claim.
    for layer in model._flatten_layers(include_self=True):
        for variable in layer.trainable_weights:
            owners[id(variable)] = layer.name
    return owners


class NonFiniteGuard(keras.callbacks.Callback):
    """Detects a diverging run and repairs it: skip, roll back, or stop with a diagnosis.

    `FineTuneModel` already skips every update whose loss or gradient is not
    finite, without touching weights or optimizer state. This callback counts
    bad updates and acts on a streak of them. An update is bad when:

    - it was skipped (NaN or Inf in the loss or any gradient);
    - its loss exceeds `spike_factor` times the median of the last `window`
      finite losses; the rule starts once `window` losses were seen;
    - under `mixed_float16`, the loss scale has fallen below `min_loss_scale`.

    After `patience` bad updates in a row, the policy decides:

    - `"skip"`: log a warning and go on; the step keeps skipping.
    - `"rollback"`: restore the last good snapshot of weights and optimizer
      state (the update count too, so the schedule returns with it), multiply
      the learning rate by `backoff` on top of its schedule, and continue with
      the next data. After `max_rollbacks` rollbacks, stop.
    - `"stop"`: stop at once.

    Snapshots are taken every `snapshot_every` updates, only when no update
    since the previous snapshot was bad, in host memory or in `snapshot_dir`.
    The first is taken before the first update.

    Stopping restores the last good snapshot when a bad update of the final
    streak was applied (a spike; skipped updates change nothing), writes
    `diagnosis.json` to
    `diagnosis_dir`, logs the diagnosis, and ends `fit` at once, the way an
    error would (see `tfft.step.TrainingStopped`): other callbacks'
    `on_train_end` does not run, so `BackupAndRestore` keeps its backup and no
    callback restores "best" weights. `fit` returns, or raises
    `DivergenceError` when `raise_on_stop` is true.

    Args:
        policy: `"skip"`, `"rollback"` or `"stop"`. Defaults to `"rollback"`.
        patience: Bad updates in a row before acting. Defaults to `3`.
        spike_factor: A loss above this many times the rolling median is a
            spike. Defaults to `3.0`.
        window: Finite losses in the rolling median. Defaults to `50`.
        min_loss_scale: Loss scale under which float16 training counts as
            unstable. Defaults to `1.0`.
        snapshot_every: Updates between snapshots. Defaults to `100`.
        snapshot_dir: Folder for the snapshot file; in host memory when
            `None`. Defaults to `None`.
        backoff: Factor applied to the learning rate at each rollback.
            Defaults to `0.5`.
        max_rollbacks: Rollbacks before stopping. Defaults to `3`.
        diagnosis_dir: Folder for `diagnosis.json`. Defaults to `None`, no file.
        log_dir: TensorBoard folder for bad updates, rollbacks and the
            learning-rate multiplier (under `train/`). Defaults to `None`.
        raise_on_stop: Raise `DivergenceError` from `fit` when stopping.
            Defaults to `False`.
    """

    def __init__(
        self,
        policy: str = "rollback",
        *,
        patience: int = 3,
        spike_factor: float = 3.0,
        window: int = 50,
        min_loss_scale: float = 1.0,
        snapshot_every: int = 100,
        snapshot_dir: str | Path | None = None,
        backoff: float = 0.5,
        max_rollbacks: int = 3,
        diagnosis_dir: str | Path | None = None,
        log_dir: str | Path | None = None,
        raise_on_stop: bool = False,
    ):
        super().__init__()
        if policy not in POLICIES:
            raise ValueError(
                f"`policy` must be one of {', '.join(POLICIES)}. Received: policy={policy!r}"
            )
        for name, value in (
            ("patience", patience),
            ("window", window),
            ("snapshot_every", snapshot_every),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
        if not isinstance(max_rollbacks, int) or max_rollbacks < 0:
            raise ValueError(
                f"`max_rollbacks` must be 0 or a positive integer. Received: max_rollbacks={max_rollbacks!r}"
            )
        if not spike_factor > 1:
            raise ValueError(f"`spike_factor` must be above 1. Received: spike_factor={spike_factor!r}")
        if not 0 < backoff < 1:
            raise ValueError(f"`backoff` must be between 0 and 1. Received: backoff={backoff!r}")
        if not min_loss_scale > 0:
            raise ValueError(
                f"`min_loss_scale` must be positive. Received: min_loss_scale={min_loss_scale!r}"
            )
        self.policy = policy
        self.patience = patience
        self.spike_factor = spike_factor
        self.window = window
        self.min_loss_scale = min_loss_scale
        self.snapshot_every = snapshot_every
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir is not None else None
        self.backoff = backoff
        self.max_rollbacks = max_rollbacks
        self.diagnosis_dir = Path(diagnosis_dir) if diagnosis_dir is not None else None
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.raise_on_stop = raise_on_stop

    # Per-run state. Reset in on_train_begin so one instance serves several fits.

    def on_train_begin(self, logs=None):
        check_fine_tune_model(self.model, "NonFiniteGuard needs the per-update logs of tfft.FineTuneModel.")
        self._recent_losses: collections.deque[float] = collections.deque(maxlen=self.window)
        self._consecutive_bad = 0
        # Whether a bad update of the current streak was applied (a spike),
        # so the weights may be damaged; skipped updates change nothing.
        self._streak_applied = False
        self._window_clean = True
        self._skipped_seen = int(self.model.skipped_steps.numpy())
        self._snapshot: dict[str, Any] | None = None
        self._steps = 0
        self.bad_updates = 0
        self.rollbacks = 0
        self.events: list[dict[str, Any]] = []
        self.diagnosis: dict[str, Any] | None = None
        self.model.learning_rate_multiplier.assign(1.0)
        self._writer = (
            tf.summary.create_file_writer(str(self.log_dir / "train")) if self.log_dir else None
        )

    def on_train_batch_begin(self, batch, logs=None):
        if self._snapshot is None and self._variables_exist():
            self._take_snapshot()

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        self._steps += 1
        update = self._update_count()
        loss = float(logs.get("update_loss", logs.get("loss", math.nan)))
        skipped_total = int(logs.get("skipped_steps", self._skipped_seen))
        skipped = skipped_total > self._skipped_seen
        self._skipped_seen = skipped_total

        reason = self._bad_update_reason(loss, skipped, logs)
        if reason is None:
            self._consecutive_bad = 0
            self._streak_applied = False
            self._recent_losses.append(loss)
            if self._snapshot is None:
                self._take_snapshot()
            elif update - self._snapshot["update"] >= self.snapshot_every:
                if self._window_clean:
                    self._take_snapshot()
                self._window_clean = True
        else:
            self.bad_updates += 1
            self._consecutive_bad += 1
            self._streak_applied = self._streak_applied or not skipped
            self._window_clean = False
            self.events.append({"step": self._steps, "update": update, "loss": loss, "reason": reason})
            logger.warning("bad update at step %d: %s", self._steps, reason)
            if self._consecutive_bad >= self.patience:
                self._act(loss, reason, logs)
        self._write_scalars()

    def _update_count(self) -> int:
        return int(self.model.optimizer.iterations.numpy())

    def _bad_update_reason(self, loss: float, skipped: bool, logs) -> str | None:
        if skipped or not math.isfinite(loss):
            return f"non-finite loss or gradient (loss {loss:g}), update skipped"
        scale = float(logs.get("loss_scale", 1.0))
        if scale < self.min_loss_scale:
            return f"loss scale {scale:g} below min_loss_scale {self.min_loss_scale:g}"
        if len(self._recent_losses) == self.window:
            median = statistics.median(self._recent_losses)
            if loss > self.spike_factor * median:
                return (
                    f"loss spike {loss:.6g} above {self.spike_factor:g} x the median "
                    f"{median:.6g} of the last {self.window} losses"
                )
        return None

    def _act(self, loss: float, reason: str, logs) -> None:
        if self.policy == "skip":
            logger.warning(
                "%d bad updates in a row (policy skip: the step keeps skipping them): %s",
                self._consecutive_bad,
                reason,
            )
            self._consecutive_bad = 0
            return
        if self.policy == "rollback" and self.rollbacks < self.max_rollbacks and self._snapshot:
            self._restore_snapshot()
            multiplier = self.model.scale_learning_rate(self.backoff)
            self.rollbacks += 1
            self._consecutive_bad = 0
            self._streak_applied = False
            self._window_clean = True
            self.events.append(
                {"step": self._steps, "update": self._snapshot["update"], "rollback": self.rollbacks,
                 "learning_rate_multiplier": multiplier}
            )
            logger.warning(
                "rolled back to update %d (rollback %d of %d); learning-rate multiplier now %g",
                self._snapshot["update"],
                self.rollbacks,
                self.max_rollbacks,
                multiplier,
            )
            return
        self._stop(loss, reason, logs)

    def _stop(self, loss: float, reason: str, logs) -> None:
        diagnosis = self._diagnose(loss, reason, logs)
        if self._streak_applied and self._snapshot is not None:
            self._restore_snapshot()
            diagnosis["restored_update"] = self._snapshot["update"]
        self.diagnosis = diagnosis
        if self.diagnosis_dir is not None:
            self.diagnosis_dir.mkdir(parents=True, exist_ok=True)
            path = self.diagnosis_dir / "diagnosis.json"
            path.write_text(json.dumps(diagnosis, indent=2) + "\n", encoding="utf-8")
        message = format_diagnosis(diagnosis)
        logger.error("%s", message)
        self._write_scalars()
        if self._writer is not None:
            self._writer.close()
        error = DivergenceError(diagnosis) if self.raise_on_stop else None
        raise TrainingStopped(message.splitlines()[0], error=error)

    def _diagnose(self, loss: float, reason: str, logs) -> dict[str, Any]:
        norms = self.model.gradient_norms()
        owners = _owning_layers(self.model.model)
        first_layer = first_variable = None
        for variable, norm in zip(self.model.trainable_variables, norms.values()):
            if not math.isfinite(norm):
                first_layer = owners.get(id(variable), variable.path.rsplit("/", 1)[0])
                first_variable = variable.path
                break
        finite_norms = self.model.gradient_norms(finite_only=True)
        largest = sorted(finite_norms.items(), key=lambda item: item[1], reverse=True)[:5]
        return {
            "update": self._update_count() + 1,
            "step": self._steps,
            "reason": reason,
            "policy": self.policy,
            "loss": loss,
            "learning_rate": float(logs.get("learning_rate", math.nan)),
            "loss_scale": float(logs.get("loss_scale", 1.0)),
            "rollbacks": self.rollbacks,
            "learning_rate_multiplier": float(self.model.learning_rate_multiplier.numpy()),
            "bad_updates": self.bad_updates,
            "first_non_finite_layer": first_layer,
            "first_non_finite_variable": first_variable,
            "largest_gradient_norms": [{"variable": k, "norm": v} for k, v in largest],
            "events": self.events[-20:],
            "restored_update": None,
        }

    # Snapshots.

    def _state_variables(self) -> list[keras.Variable]:
        return self.model.training_state()

    def _variables_exist(self) -> bool:
        optimizer = self.model.optimizer
        if not self.model.model.built:
            return False
        if not optimizer.built:
            # The same build Keras does lazily inside the first trace.
            optimizer.build(self.model.trainable_variables)
        return True

    def _take_snapshot(self) -> None:
        values = [variable.numpy().copy() for variable in self._state_variables()]
        update = self._update_count()
        if self.snapshot_dir is not None:
            self.snapshot_dir.mkdir(parents=True, exist_ok=True)
            path = self.snapshot_dir / "snapshot.npz"
            np.savez(path, *values)
            self._snapshot = {"update": update, "path": path}
        else:
            self._snapshot = {"update": update, "values": values}

    def _restore_snapshot(self) -> None:
        if "path" in self._snapshot:
            with np.load(self._snapshot["path"]) as stored:
                values = [stored[f"arr_{i}"] for i in range(len(stored.files))]
        else:
            values = self._snapshot["values"]
        for variable, value in zip(self._state_variables(), values, strict=True):
            variable.assign(value)

    def _write_scalars(self) -> None:
        if self._writer is None:
            return
        with self._writer.as_default(step=self._steps):
            tf.summary.scalar("bad_updates", self.bad_updates)
            tf.summary.scalar("rollbacks", self.rollbacks)
            tf.summary.scalar(
                "learning_rate_multiplier", float(self.model.learning_rate_multiplier.numpy())
            )

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
