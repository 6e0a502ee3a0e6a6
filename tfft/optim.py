"""Optimizers and learning-rate schedules counted in optimizer updates."""

from __future__ import annotations

import logging
import math
import re

import keras

__all__ = ["WarmupSchedule", "build_optimizer", "split_weight_decay"]

logger = logging.getLogger(__name__)

# Variables that decoupled weight decay leaves alone by default, as regular
# expressions searched in the variable path: biases, and the scale (gamma) and
# offset (beta) of normalization layers. Embedding tables are excluded unless
# asked for.
DEFAULT_NO_DECAY_PATTERNS = (r"(^|/)bias$", r"(^|/)gamma$", r"(^|/)beta$")
EMBEDDING_PATTERN = r"(^|/)embeddings$"


@keras.saving.register_keras_serializable(package="tfft")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to a peak, then constant, linear or cosine decay.

    The schedule is a function of the optimizer's update count (`step` is 0 for
    the first update). Warmup rises linearly and reaches the peak at update
    `warmup_updates`, so the first update already has a non-zero rate,
    peak / warmup_updates. Decay then goes from the peak toward 0 at update
    `total_updates`, as in Hugging Face's linear and cosine schedules.

    Args:
        peak_learning_rate: Learning rate at the end of warmup.
        total_updates: Updates in the whole run.
        warmup_updates: Updates of linear warmup. Defaults to `0`.
        decay: `"constant"`, `"linear"` or `"cosine"`. Defaults to `"linear"`.
    """

    def __init__(
        self,
        peak_learning_rate: float,
        total_updates: int,
        warmup_updates: int = 0,
        decay: str = "linear",
    ):
        if decay not in ("constant", "linear", "cosine"):
            raise ValueError(
                "`decay` must be 'constant', 'linear' or 'cosine'. "
                f"Received: decay={decay!r}"
            )
        if total_updates < 1 or warmup_updates < 0:
            raise ValueError(
                "`total_updates` must be positive and `warmup_updates` not negative. "
                f"Received: total_updates={total_updates}, warmup_updates={warmup_updates}"
            )
        self.peak_learning_rate = float(peak_learning_rate)
        self.total_updates = int(total_updates)
        self.warmup_updates = int(warmup_updates)
        self.decay = decay

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        peak = self.peak_learning_rate
        warmup = float(self.warmup_updates)
        warming = peak * (step + 1.0) / max(warmup, 1.0)
        if self.decay == "constant":
            decayed = keras.ops.full_like(step, peak)
        else:
            span = max(float(self.total_updates - self.warmup_updates), 1.0)
            progress = keras.ops.clip((step - warmup) / span, 0.0, 1.0)
            if self.decay == "linear":
                decayed = peak * (1.0 - progress)
            else:
                decayed = peak * 0.5 * (1.0 + keras.ops.cos(math.pi * progress))
        return keras.ops.where(step < warmup, warming, decayed)

    def get_config(self):
        return {
            "peak_learning_rate": self.peak_learning_rate,
            "total_updates": self.total_updates,
            "warmup_updates": self.warmup_updates,
            "decay": self.decay,
        }


def split_weight_decay(
    variables: list[keras.Variable],
    exclude: list[str] | None = None,
    decay_embeddings: bool = False,
) -> tuple[list[keras.Variable], list[keras.Variable]]:
    """Splits variables into those to decay and those to exclude, by path patterns.

    Args:
        variables: The trainable variables.
        exclude: Regular expressions searched in each variable's path.
            Defaults to `None`, the biases and normalization scales and offsets.
        decay_embeddings: Decay embedding tables too. Defaults to `False`.

    Returns:
        The decayed variables and the excluded ones.

    Raises:
        ValueError: when a pattern given in `exclude` matches no variable, or
            is not a valid regular expression.
    """
    patterns = list(DEFAULT_NO_DECAY_PATTERNS if exclude is None else exclude)
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as error:
            raise ValueError(
                f"Invalid weight-decay exclusion pattern {pattern!r}: {error}."
            ) from None
    if exclude is not None:
        examples = ", ".join(v.path for v in variables[:6])
        for pattern, regex in zip(patterns, compiled):
            if not any(regex.search(v.path) for v in variables):
                raise ValueError(
                    f"Weight-decay exclusion pattern {pattern!r} matches no variable, so it "
                    f"would exclude nothing. Variable paths look like: {examples}."
                )
    if not decay_embeddings:
        compiled.append(re.compile(EMBEDDING_PATTERN))
    decayed, excluded = [], []
    for variable in variables:
        if any(regex.search(variable.path) for regex in compiled):
            excluded.append(variable)
        else:
            decayed.append(variable)
    return decayed, excluded


def build_optimizer(
    learning_rate: float | keras.optimizers.schedules.LearningRateSchedule,
    weight_decay: float,
    variables: list[keras.Variable],
    exclude: list[str] | None = None,
    decay_embeddings: bool = False,
) -> keras.optimizers.Optimizer:
    """Builds AdamW with decay excluded from biases, normalization and embeddings.

    See `split_weight_decay` for `exclude` and `decay_embeddings`.

    Adam's epsilon is 1e-8, as in PyTorch and the Hugging Face Trainer, rather
    than Keras' 1e-7.
    """
    optimizer = keras.optimizers.AdamW(
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-8,
    )
    decayed, excluded = split_weight_decay(variables, exclude, decay_embeddings)
    if weight_decay:
        optimizer.exclude_from_weight_decay(var_list=excluded)
    count = lambda group: sum(math.prod(v.shape) for v in group)  # noqa: E731
    logger.info(
        "weight decay %g on %d variables (%d parameters); %d variables (%d parameters) excluded",
        weight_decay,
        len(decayed),
        count(decayed),
        len(excluded),
        count(excluded),
    )
    return optimizer
