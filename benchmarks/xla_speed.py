"""Training-step speed of the bundled MiniLM with and without XLA, side by side.

Both variants run in this one process on the same batches: a global batch of
16 pairs padded to the full max length, micro-batches of 8, AdamW, clipping at
1.0. Each variant first runs warmup steps (tracing, and XLA compilation), then
the timed steps; the ratio of the two medians is what to compare across
machines, not the seconds.

    python benchmarks/xla_speed.py [--max-length 128] [--steps 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfft import FineTuneModel  # noqa: E402
from tfft.models import bundled_model_dir, load_classifier  # noqa: E402


def make_batch(max_length: int, batch_size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    features = {
        "token_ids": rng.integers(1000, 30000, size=(batch_size, max_length)).astype(np.int32),
        "segment_ids": np.zeros((batch_size, max_length), np.int32),
        "padding_mask": np.ones((batch_size, max_length), bool),
    }
    labels = rng.integers(0, 2, size=batch_size).astype(np.int32)
    return features, labels


def time_steps(jit_compile: bool, max_length: int, warmup: int, steps: int) -> tuple[float, float]:
    """Returns the seconds of the warmup steps and the median seconds of one timed step."""
    keras.utils.set_random_seed(0)
    classifier = load_classifier(bundled_model_dir(), num_labels=2, max_length=max_length)
    model = FineTuneModel(classifier, micro_batch_size=8, max_grad_norm=1.0)
    model.compile(
        optimizer=keras.optimizers.AdamW(2e-5, weight_decay=0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    features, labels = make_batch(max_length, batch_size=16)
    dataset = tf.data.Dataset.from_tensors((features, labels)).repeat()
    iterator = iter(dataset)
    model.make_train_function()

    start = time.perf_counter()
    for _ in range(warmup):
        logs = model.train_function(iterator)
    float(logs["loss"])
    warmup_seconds = time.perf_counter() - start

    durations = []
    for _ in range(steps):
        start = time.perf_counter()
        logs = model.train_function(iterator)
        float(logs["loss"])  # waits for the step to finish
        durations.append(time.perf_counter() - start)
    return warmup_seconds, statistics.median(durations)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    results = {}
    for jit_compile in (False, True):
        results[jit_compile] = time_steps(jit_compile, args.max_length, args.warmup, args.steps)
    print(f"MiniLM-L6, batch 16 (micro-batch 8) x {args.max_length} tokens, {args.steps} timed steps")
    print(f"{'variant':<10}{'warmup s':>10}{'median step s':>15}{'examples/s':>12}")
    for jit_compile, (warmup_seconds, median) in results.items():
        name = "XLA" if jit_compile else "graph"
        print(f"{name:<10}{warmup_seconds:>10.1f}{median:>15.3f}{16 / median:>12.1f}")
    print(f"XLA step time / graph step time: {results[True][1] / results[False][1]:.3f}")


if __name__ == "__main__":
    main()
