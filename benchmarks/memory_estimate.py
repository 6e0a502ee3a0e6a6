"""The memory estimate of tfft.estimate against measured peaks, one configuration per fresh process.

Each configuration of the bundled MiniLM (sequence length, micro-batch,
precision, gradient checkpointing, dropout) runs in a child process. The
child loads the model and records its resident memory and TensorFlow's
allocated bytes as the baseline. It then runs two training steps on one
global batch of that micro-batch size, while a thread samples the resident
memory every 5 ms.
Two comparisons, both above the baseline (weights are in it):

- process: the peak resident memory against the estimate's `training`
  (gradients, optimizer state, the step's peak, runtime overhead). This is
  the number that decides whether a run fits on the CPU.
- tensors: TensorFlow's peak allocated bytes (`get_memory_info("CPU:0")`,
  which the oneDNN CPU allocator provides) against the estimate's
  `tensors`, which leaves out the runtime overhead. This checks the
  formula alone.

Gradient checkpointing rejects dropout, so it runs only where dropout is 0.
When a GPU is visible to TensorFlow, the child trains there, and both
comparisons use TensorFlow's peak device memory (`get_memory_info("GPU:0")`)
against the estimate for `device="gpu"`, because the process's resident
memory does not include the GPU's.
NOTE: that GPU path has not run yet (no GPU where it was written).

    python benchmarks/memory_estimate.py [--configs 128x8,512x32,...] [--precisions float32,mixed_bfloat16] [--dropouts 0,0.1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

GIB = 2**30


def resident_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(length: int, micro: int, precision: str, checkpointing: bool, dropout: float) -> dict:
    """Runs in the child process: returns the measured peaks above baseline and step times."""
    import gc

    import keras
    import numpy as np
    import tensorflow as tf

    from tfft import FineTuneModel
    from tfft.models import bundled_model_dir, load_classifier

    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_global_policy(precision)
    classifier = load_classifier(bundled_model_dir(), 2, length, dropout=dropout)
    if checkpointing:
        from tfft.checkpointing import enable_gradient_checkpointing

        enable_gradient_checkpointing(classifier.backbone)
    model = FineTuneModel(classifier, micro_batch_size=micro)
    model.compile(
        optimizer=keras.optimizers.AdamW(2e-5, weight_decay=0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)
    features = {
        "token_ids": rng.integers(1000, 30000, size=(micro, length)).astype(np.int32),
        "segment_ids": np.zeros((micro, length), np.int32),
        "padding_mask": np.ones((micro, length), bool),
    }
    labels = rng.integers(0, 2, size=micro).astype(np.int32)
    data = tf.data.Dataset.from_tensors((features, labels)).repeat(2)
    gc.collect()
    baseline = resident_bytes()
    device = "GPU:0" if tf.config.list_physical_devices("GPU") else "CPU:0"
    tensor_baseline = tf.config.experimental.get_memory_info(device)["current"]
    tf.config.experimental.reset_memory_stats(device)

    peak = [baseline]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], resident_bytes())
            time.sleep(0.005)

    class StepTimes(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.seconds = []

        def on_train_batch_begin(self, batch, logs=None):
            self._start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.seconds.append(time.perf_counter() - self._start)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    times = StepTimes()
    model.fit(data, epochs=1, verbose=0, callbacks=[times])
    done.set()
    sampler.join()
    tensor_peak = tf.config.experimental.get_memory_info(device)["peak"] - tensor_baseline
    on_gpu = device.startswith("GPU")
    return {
        "device": "gpu" if on_gpu else "cpu",
        "measured": tensor_peak if on_gpu else peak[0] - baseline,
        "tensors": tensor_peak,
        "first_step_seconds": times.seconds[0],
        "step_seconds": times.seconds[1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="128x8,128x32,512x8,512x32", help="LENGTHxMICRO, comma-separated.")
    parser.add_argument("--precisions", default="float32,mixed_bfloat16")
    parser.add_argument("--dropouts", default="0", help="Dropout rates, comma-separated.")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(measure(*json.loads(args.child))))
        return

    from tfft.estimate import model_shape
    from tfft.models import bundled_model_dir

    shape = model_shape(bundled_model_dir())
    rows = []
    for dropout in (float(rate) for rate in args.dropouts.split(",")):
        for precision in args.precisions.split(","):
            for config in args.configs.split(","):
                length, micro = (int(part) for part in config.split("x"))
                for checkpointing in (False, True) if dropout == 0 else (False,):
                    row = run_child(shape, length, micro, precision, checkpointing, dropout)
                    if row:
                        rows.append(row)
                        print(json.dumps(row), flush=True)

    print()
    if rows:
        print("Measured on the GPU: device memory in both columns." if rows[0]["device"] == "gpu"
              else "Measured on the CPU: process = peak resident memory, tensors = TensorFlow's peak allocated bytes.")
    print(f"{'precision':<16}{'dropout':>8}{'length':>7}{'micro':>6}{'ckpt':>6}"
          f"{'process: est':>14}{'measured':>10}{'ratio':>7}{'tensors: est':>14}{'measured':>10}{'ratio':>7}{'step s':>8}")
    for row in rows:
        print(f"{row['precision']:<16}{row['dropout']:>8g}{row['length']:>7}{row['micro']:>6}"
              f"{'yes' if row['checkpointing'] else 'no':>6}"
              f"{row['estimate_gib']:>14.3f}{row['measured_gib']:>10.3f}{row['ratio']:>7.2f}"
              f"{row['tensor_estimate_gib']:>14.3f}{row['tensor_measured_gib']:>10.3f}{row['tensor_ratio']:>7.2f}"
              f"{row['step_seconds']:>8.2f}")
    ratios = [row["ratio"] for row in rows]
    if ratios:
        print(f"process ratio from {min(ratios):.2f} to {max(ratios):.2f}; "
              f"{sum(abs(r - 1) <= 0.15 for r in ratios)} of {len(ratios)} within 15%")
    for precision in args.precisions.split(","):
        for micro in sorted({row["micro"] for row in rows if row["length"] == 512}):
            pair = {row["checkpointing"]: row for row in rows if row["precision"] == precision
                    and row["length"] == 512 and row["micro"] == micro and row["dropout"] == 0}
            if len(pair) == 2:
                print(f"{precision}, length 512, micro-batch {micro}: peak with checkpointing / without = "
                      f"{pair[True]['measured_gib'] / pair[False]['measured_gib']:.2f}, step time "
                      f"{pair[True]['step_seconds']:.2f} s / {pair[False]['step_seconds']:.2f} s")


def run_child(shape, length: int, micro: int, precision: str, checkpointing: bool, dropout: float) -> dict | None:
    """Measures one configuration in a fresh process; returns its row, or None when the child failed."""
    from tfft.estimate import estimate_memory

    child = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps([length, micro, precision, checkpointing, dropout])],
        capture_output=True, text=True,
    )
    if child.returncode != 0:
        print(f"{precision} {length}x{micro} checkpointing={checkpointing} dropout={dropout:g}: failed\n"
              f"{child.stderr[-2000:]}")
        return None
    result = json.loads(child.stdout.strip().splitlines()[-1])
    estimate = estimate_memory(
        shape, micro, length, precision, gradient_checkpointing=checkpointing, dropout=dropout,
        device=result["device"],
    )
    return {
        "device": result["device"], "precision": precision, "dropout": dropout, "length": length, "micro": micro,
        "checkpointing": checkpointing,
        "estimate_gib": estimate.training / GIB, "measured_gib": result["measured"] / GIB,
        "ratio": estimate.training / result["measured"],
        "tensor_estimate_gib": estimate.tensors / GIB, "tensor_measured_gib": result["tensors"] / GIB,
        "tensor_ratio": estimate.tensors / result["tensors"],
        "step_seconds": result["step_seconds"],
    }


if __name__ == "__main__":
    main()
