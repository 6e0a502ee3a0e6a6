"""Callbacks that observe a run and decide; the training step itself stays in `tfft.step`."""

from tfft.callbacks.control import EvaluationTimer, StopAfterSteps
from tfft.callbacks.nonfinite import DivergenceError, NonFiniteGuard
from tfft.callbacks.oom import OOMRetry, OutOfMemoryError
from tfft.callbacks.overfitting import OverfittingMonitor
from tfft.callbacks.telemetry import AugmentationLog, TrainingTelemetry

__all__ = [
    "AugmentationLog",
    "DivergenceError",
    "EvaluationTimer",
    "NonFiniteGuard",
    "OOMRetry",
    "OutOfMemoryError",
    "OverfittingMonitor",
    "StopAfterSteps",
    "TrainingTelemetry",
]
