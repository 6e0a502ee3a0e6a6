"""`python -m tfft.train` and `python -m tfft.predict` end to end, on a tiny BERT preset."""

import csv
import json

import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml

from tfft import estimate, predict, train
from tfft.data.sources import DEMO_DIR


@pytest.fixture(scope="module")
def tiny_run(tiny_preset, tmp_path_factory):
    output = tmp_path_factory.mktemp("runs") / "tiny"
    status = train.main(
        [
            "--model", str(tiny_preset),
            "--max-length", "32",
            "--batch-size", "16",
            "--micro-batch-size", "8",
            "--epochs", "2",
            "--learning-rate", "1e-3",
            "--output-dir", str(output),
        ]
    )
    assert status == 0
    return output


def test_run_folder_contents(tiny_run, capsys):
    assert {p.name for p in tiny_run.iterdir()} >= {
        "model.keras", "preprocessor", "config.yaml", "metrics.json", "logs"
    }
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    # 240 demo examples in batches of 16: 15 updates per epoch.
    assert metrics["updates"] == 30
    assert metrics["train_examples"] == 240
    assert [record["epoch"] for record in metrics["epochs"]] == [1, 2]
    for key in ("loss", "accuracy", "f1", "val_loss", "val_accuracy", "val_f1"):
        assert key in metrics["final"]
    assert "grad_norm" not in metrics["final"]
    assert metrics["diverged"] is False
    assert metrics["rollbacks"] == 0
    assert metrics["micro_batch_changes"] == []
    assert metrics["micro_batch_size"] == 8
    config = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert config["num_labels"] == 2
    assert config["text_columns"] == ["text"]
    assert config["train_data"] == str(DEMO_DIR / "train.csv")


def test_existing_run_is_not_overwritten(tiny_run, tiny_preset, capsys):
    before = (tiny_run / "metrics.json").read_text()
    status = train.main(["--model", str(tiny_preset), "--output-dir", str(tiny_run)])
    assert status == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert (tiny_run / "metrics.json").read_text() == before


def test_predictions_match_the_saved_model(tiny_run):
    texts = ["the food was good", "rude service and a broken room", "good"]
    labels, probabilities = predict.Predictor.from_run(tiny_run).predict(texts)

    # Independent path: the saved model, with inputs padded to the full
    # --max-length instead of each batch's longest.
    model = keras.saving.load_model(tiny_run / "model.keras", compile=False)
    logits = model(model.preprocessor(x=(tf.constant(texts),)), training=False)
    expected = keras.ops.convert_to_numpy(keras.ops.softmax(logits))
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)  # float32 attention over padding
    np.testing.assert_array_equal(labels, expected.argmax(axis=1))


def test_predict_command_writes_a_file(tiny_run, tmp_path, capsys):
    source = tmp_path / "reviews.jsonl"
    source.write_text('{"text": "good food", "id": 7}\n{"text": "stale and slow", "id": 8}\n')
    output = tmp_path / "out.csv"
    assert predict.main([str(tiny_run), "--input", str(source), "--output", str(output)]) == 0
    lines = output.read_text().splitlines()
    assert lines[0] == "text,id,predicted_label,probability_0,probability_1"
    assert len(lines) == 3
    probability = [float(v) for v in lines[1].split(",")[3:]]
    assert sum(probability) == pytest.approx(1.0, abs=1e-5)

    # A second run refuses to replace the file.
    assert predict.main([str(tiny_run), "--input", str(source), "--output", str(output)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_predict_reports_missing_column(tiny_run, tmp_path, capsys):
    source = tmp_path / "reviews.csv"
    source.write_text("review\ngood\n")
    assert predict.main([str(tiny_run), "--input", str(source)]) == 2
    error = capsys.readouterr().err
    assert "lacks the text column(s) ['text']" in error
    assert "Columns found: 'review'" in error


def test_max_steps_stops_mid_epoch(tiny_preset, tmp_path):
    output = tmp_path / "run"
    assert train.main(
        ["--model", str(tiny_preset), "--max-steps", "3", "--max-length", "16",
         "--output-dir", str(output)]
    ) == 0
    assert json.loads((output / "metrics.json").read_text())["updates"] == 3


def test_find_batch_size_option(tiny_preset, tmp_path, caplog):
    output = tmp_path / "run"
    caplog.set_level("INFO")
    assert train.main(
        ["--model", str(tiny_preset), "--max-steps", "1", "--max-length", "16", "--batch-size", "8",
         "--find-batch-size", "--output-dir", str(output)]
    ) == 0
    # Everything fits on this tiny model, so the whole batch is one pass.
    assert "the whole batch of 8 fits at 16 tokens: no micro-batches" in caplog.text
    assert json.loads((output / "metrics.json").read_text())["micro_batch_size"] is None


def test_summary_names_this_python(tiny_run, capsys, tiny_preset, tmp_path):
    train.main(["--model", str(tiny_preset), "--max-steps", "1", "--max-length", "16",
                "--output-dir", str(tmp_path / "run")])
    printed = capsys.readouterr().out
    assert f"Predict with: {train._python_command()} -m tfft.predict" in printed
    assert "preprocessor/" in printed


def test_regularization_options_together(tiny_preset, tmp_path):
    output = tmp_path / "run"
    assert train.main(
        ["--model", str(tiny_preset), "--epochs", "1", "--max-length", "16",
         "--dropout", "0.2", "--weight-decay", "0.1", "--augment", "delete", "swap",
         "--augment-prob", "0.5", "--neftune-alpha", "5", "--eval-every", "5",
         "--overfitting-action", "warn", "--output-dir", str(output)]
    ) == 0
    metrics = json.loads((output / "metrics.json").read_text())
    # Evaluation data is never augmented: the saved model on the plain dev
    # texts gives the validation loss that fit reported.
    predictor = predict.Predictor.from_run(output)
    with (DEMO_DIR / "dev.csv").open(newline="") as file:
        dev = list(csv.DictReader(file))
    texts = [row["text"] for row in dev]
    labels = np.array([int(row["label"]) for row in dev])
    probabilities = predictor.predict_probabilities(texts)
    loss = -np.mean(np.log(probabilities[np.arange(len(labels)), labels]))
    assert loss == pytest.approx(metrics["final"]["val_loss"], abs=1e-4)
    # 240 demo examples at probability 0.5: mean 120, standard deviation 7.7.
    assert abs(metrics["augmented_examples_per_epoch"][0] - 120) < 35
    # 15 updates, evaluated after updates 5, 10 and 15.
    assert [e["update"] for e in metrics["overfitting"]["evaluations"]] == [5, 10, 15]


def test_unmatched_decay_pattern_is_reported(tiny_preset, tmp_path, capsys):
    status = train.main(
        ["--model", str(tiny_preset), "--max-steps", "1", "--max-length", "16",
         "--weight-decay-exclude", "LayerNorm.weight", "--output-dir", str(tmp_path / "run")]
    )
    assert status == 2
    error = capsys.readouterr().err
    assert "--weight-decay-exclude: Weight-decay exclusion pattern 'LayerNorm.weight' matches no variable" in error


def test_gradient_checkpointing_option(tiny_preset, tmp_path, caplog):
    caplog.set_level("INFO")
    assert train.main(
        ["--model", str(tiny_preset), "--max-steps", "2", "--max-length", "16", "--dropout", "0",
         "--batch-size", "8", "--gradient-checkpointing", "--output-dir", str(tmp_path / "run")]
    ) == 0
    assert "gradient checkpointing on 2 transformer layers" in caplog.text
    expected = estimate.estimate_memory(
        estimate.model_shape(tiny_preset), 8, 16, gradient_checkpointing=True, dropout=0.0
    )
    assert (
        f"estimated memory for training at micro-batch 8 x 16 tokens: {expected.training / estimate.GIB:.2f} GiB"
        in caplog.text
    )


def test_train_warns_when_estimate_exceeds_memory(tiny_preset, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(estimate, "available_memory", lambda: 2**20)
    caplog.set_level("INFO")
    assert train.main(
        ["--model", str(tiny_preset), "--max-steps", "1", "--max-length", "16",
         "--output-dir", str(tmp_path / "run")]
    ) == 0
    assert "exceeds the 0.00 GiB available, so the run may run out of memory" in caplog.text
    assert "out-of-memory recovery then halves the micro-batch" in caplog.text


def test_lora_option_saves_a_merged_model(tiny_preset, tmp_path, caplog):
    caplog.set_level("INFO")
    output = tmp_path / "run"
    assert train.main(
        ["--model", str(tiny_preset), "--max-steps", "2", "--max-length", "16",
         "--lora-rank", "2", "--output-dir", str(output)]
    ) == 0
    assert "LoRA rank 2 on 4 layers" in caplog.text
    model = keras.saving.load_model(output / "model.keras", compile=False)
    assert not any("lora" in v.path for v in model.weights)
