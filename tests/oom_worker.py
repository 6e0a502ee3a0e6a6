"""Runs training or the batch-size finder under an address-space limit (a real CPU out of memory).

Run by tests/test_oom.py in a fresh process, because the limit cannot be
lifted again. The model's activations take about 6 MB per example, so a
micro-batch of 64 does not fit in 250 MB above the warmed-up process while 8
does. Everything else that needs memory (data arrays, datasets, thread
pools) is made before the limit is set, and thread pools are kept small,
because each new thread reserves stack address space. Prints one JSON line.
"""

import argparse
import json
import os
import resource

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfft import FineTuneModel  # noqa: E402
from tfft.batch_size import find_micro_batch_size, memory_probe  # noqa: E402
from tfft.callbacks import OOMRetry  # noqa: E402

HEADROOM_BYTES = 250 * 2**20


def virtual_memory_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmSize not found in /proc/self/status")


def build_model(micro_batch_size):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((128, 256))
    hidden = keras.layers.Dense(4096, activation="relu")(inputs)
    pooled = keras.layers.GlobalAveragePooling1D()(hidden)
    outputs = keras.layers.Dense(2)(pooled)
    model = FineTuneModel(keras.Model(inputs, outputs), micro_batch_size=micro_batch_size)
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def make_data():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(128, 128, 256)).astype(np.float32)
    y = rng.integers(0, 2, size=128)
    return x, y


def limit_address_space() -> None:
    limit = virtual_memory_bytes() + HEADROOM_BYTES
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def warm_up(model, x, y):
    """Runs one small step so that TensorFlow's own start-up allocations are in the baseline."""
    model.fit(x[:8], y[:8], batch_size=8, epochs=1, verbose=0)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["train", "find"])
    parser.add_argument("--output")
    parser.add_argument("--limited", action="store_true")
    parser.add_argument("--micro-batch-size", type=int)
    args = parser.parse_args()
    x, y = make_data()

    tf.config.threading.set_inter_op_parallelism_threads(2)
    tf.config.threading.set_intra_op_parallelism_threads(2)
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(64).with_options(options)
    if args.mode == "train":
        model = build_model(args.micro_batch_size)
        warm_probe = build_model(8)
        warm_up(warm_probe, x, y)
        del warm_probe
        if args.limited:
            limit_address_space()
        retry = OOMRetry()
        model.fit(data, epochs=1, verbose=0, shuffle=False, callbacks=[retry])
        np.savez(args.output, *model.model.get_weights())
        result = {
            "attempts": retry.attempts,
            "micro_batch_size": model.micro_batch_size,
            "changes": [change["message"] for change in retry.changes],
        }
    else:
        model = build_model(None)
        warm_up(model, x, y)
        features, labels = tf.constant(x[:4]), tf.constant(y[:4])
        if args.limited:
            limit_address_space()
        fits = memory_probe(model, features, labels)
        size = find_micro_batch_size(fits, max_size=64)
        model.micro_batch_size = size
        model.fit(data, epochs=1, verbose=0, shuffle=False)
        result = {"micro_batch_size": size, "trained": True}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
