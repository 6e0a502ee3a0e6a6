"""The command on the bundled pretrained MiniLM and real MRPC pairs (about two minutes)."""

import csv
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfft import predict, train

pytestmark = pytest.mark.real_model


def write_head(source, target, count):
    """Copies the header and the first `count` rows of a GLUE TSV file."""
    with source.open(encoding="utf-8-sig", newline="") as file:
        rows = list(csv.reader(file, delimiter="\t", quoting=csv.QUOTE_NONE))[: count + 1]
    with target.open("w", encoding="utf-8", newline="") as file:
        csv.writer(file, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\").writerows(rows)
    return target


def test_mrpc_command_on_minilm(glue_dir, tmp_path):
    train_file = write_head(glue_dir / "MRPC" / "train.tsv", tmp_path / "train.tsv", 64)
    dev_file = write_head(glue_dir / "MRPC" / "dev.tsv", tmp_path / "dev.tsv", 32)
    output = tmp_path / "run"
    status = train.main(
        [
            "--train-data", str(train_file),
            "--eval-data", str(dev_file),
            "--text-columns", "#1 String", "#2 String",
            "--label-column", "Quality",
            "--max-length", "64",
            "--batch-size", "16",
            "--epochs", "1",
            "--output-dir", str(output),
        ]
    )
    assert status == 0

    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["updates"] == 4  # 64 pairs in batches of 16
    assert 0.0 <= metrics["final"]["val_accuracy"] <= 1.0
    assert 0.0 <= metrics["final"]["val_f1"] <= 1.0

    scalars = {}
    for path in (output / "logs" / "train").glob("events.out.tfevents.*"):
        for record in tf.data.TFRecordDataset(str(path)):
            for value in tf.compat.v1.Event.FromString(record.numpy()).summary.value:
                scalars.setdefault(value.tag, []).append(float(tf.make_ndarray(value.tensor)))
    for tag in ("loss", "learning_rate", "grad_norm", "loss_scale", "skipped_steps"):
        assert len(scalars[tag]) == 4, tag
    # Linear warmup over 10% of 4 updates (1 update) then linear decay: 5e-5,
    # then (4 - step) / 3 * 5e-5 for steps 1..3.
    np.testing.assert_allclose(scalars["learning_rate"], [5e-5, 5e-5, 5e-5 * 2 / 3, 5e-5 / 3], rtol=1e-5)

    model = keras.saving.load_model(output / "model.keras", compile=False)
    assert model.num_classes == 2
    pairs = [("He said the deal was done.", "The deal is done, he said."),
             ("Stocks fell sharply.", "The weather was sunny.")]
    labels, probabilities = predict.Predictor.from_run(output).predict(pairs)
    assert labels.shape == (2,)
    np.testing.assert_allclose(probabilities.sum(axis=1), [1.0, 1.0], atol=1e-5)
