"""The memory estimate of tfft.estimate against measured peaks, one configuration per fresh process.

For each configuration of the bundled MiniLM (sequence length, micro-batch,
precision, gradient checkpointing; dropout 0 everywhere, so that
checkpointing is allowed and all rows compare alike), a child process loads
the model, records its resident memory as the baseline, then runs two
training steps on one global batch of that micro-batch size while a thread
samples the resident memory every 5 ms. Measured = peak - baseline, which
holds gradients, optimizer state and activations, the same terms as the
estimate's `training` (weights are in the baseline). On a GPU the child
would read TensorFlow's peak device memory instead; this script measures
the CPU only.

    python benchmarks/memory_estimate.py [--configs 128x8,512x32,...] [--precisions float32,mixed_bfloat16]
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


def measure(length: int, micro: int, precision: str, checkpointing: bool) -> dict:
    """Runs in the child process: returns the measured peak above baseline and step times."""
    import gc

    import keras
    import numpy as np
    import tensorflow as tf

    from tfft import FineTuneModel
    from tfft.models import bundled_model_dir, load_classifier

    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_global_policy(precision)
    classifier = load_classifier(bundled_model_dir(), 2, length, dropout=0.0)
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
    return {"measured": peak[0] - baseline, "first_step_seconds": times.seconds[0], "step_seconds": times.seconds[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="128x8,128x32,512x8,512x32", help="LENGTHxMICRO, comma-separated.")
    parser.add_argument("--precisions", default="float32,mixed_bfloat16")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        length, micro, precision, checkpointing = json.loads(args.child)
        print(json.dumps(measure(length, micro, precision, checkpointing)))
        return

    from tfft.estimate import estimate_memory, model_shape
    from tfft.models import bundled_model_dir

    shape = model_shape(bundled_model_dir())
    rows = []
    for precision in args.precisions.split(","):
        for config in args.configs.split(","):
            length, micro = (int(part) for part in config.split("x"))
            for checkpointing in (False, True):
                child = subprocess.run(
                    [sys.executable, __file__, "--child", json.dumps([length, micro, precision, checkpointing])],
                    capture_output=True, text=True,
                )
                if child.returncode != 0:
                    print(f"{precision} {config} checkpointing={checkpointing}: failed\n{child.stderr[-2000:]}")
                    continue
                result = json.loads(child.stdout.strip().splitlines()[-1])
                estimate = estimate_memory(
                    shape, micro, length, precision, gradient_checkpointing=checkpointing, dropout=0.0
                )
                row = {
                    "precision": precision, "length": length, "micro": micro, "checkpointing": checkpointing,
                    "estimate_gib": estimate.training / GIB, "measured_gib": result["measured"] / GIB,
                    "ratio": estimate.training / result["measured"], "step_seconds": result["step_seconds"],
                }
                rows.append(row)
                print(json.dumps(row), flush=True)

    print()
    print(f"{'precision':<16}{'length':>7}{'micro':>6}{'ckpt':>6}{'estimate GiB':>14}{'measured GiB':>14}"
          f"{'est/meas':>10}{'step s':>8}")
    for row in rows:
        print(f"{row['precision']:<16}{row['length']:>7}{row['micro']:>6}{'yes' if row['checkpointing'] else 'no':>6}"
              f"{row['estimate_gib']:>14.3f}{row['measured_gib']:>14.3f}{row['ratio']:>10.2f}{row['step_seconds']:>8.2f}")
    for precision in args.precisions.split(","):
        for micro in sorted({row["micro"] for row in rows if row["length"] == 512}):
            pair = {row["checkpointing"]: row for row in rows
                    if row["precision"] == precision and row["length"] == 512 and row["micro"] == micro}
            if len(pair) == 2:
                print(f"{precision}, length 512, micro-batch {micro}: peak with checkpointing / without = "
                      f"{pair[True]['measured_gib'] / pair[False]['measured_gib']:.2f}, step time "
                      f"{pair[True]['step_seconds']:.2f} s / {pair[False]['step_seconds']:.2f} s")


if __name__ == "__main__":
    main()
