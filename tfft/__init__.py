"""tfft: fine-tune language models with Keras 3 on TensorFlow, and keep the run healthy.

The training model and callbacks load TensorFlow, so they are imported on
first use: `python -m tfft.train --help` and option checks then return at once.
"""

from __future__ import annotations

import importlib

__all__ = ["FineTuneModel", "WarmupSchedule", "__version__"]

__version__ = "0.1.0"

_LAZY = {
    "FineTuneModel": "tfft.step",
    "WarmupSchedule": "tfft.optim",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in ("callbacks", "step", "optim", "models", "metrics", "predict", "train"):
        return importlib.import_module(f"tfft.{name}")
    raise AttributeError(f"module 'tfft' has no attribute {name!r}")
