"""Callbacks that observe a run and decide; the training step itself stays in `tfft.step`."""

from tfft.callbacks.control import EvaluationTimer, StopAfterSteps
from tfft.callbacks.telemetry import TrainingTelemetry

__all__ = ["EvaluationTimer", "StopAfterSteps", "TrainingTelemetry"]
