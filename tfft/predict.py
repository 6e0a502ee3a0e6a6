"""Predictions from a finished run: `python -m tfft.predict RUN_DIR --input FILE`, or `Predictor`."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tfft.data.sources import TextExamples, read_texts

__all__ = ["Predictor", "main"]


class Predictor:
    """Predicts labels and class probabilities with a fine-tuned classifier.

    Texts are tokenized exactly as in training, by the preprocessor saved with
    the model, and batched padded to each batch's longest input.

    Args:
        classifier: A keras-hub text classifier with its `preprocessor`.
        text_columns: Names of the text columns the model was trained on.

    Example:

    ```python
    predictor = Predictor.from_run("saved_models/minilm-l6-MRPC-20261204-101500")
    labels, probabilities = predictor.predict([("He left.", "He went away.")])
    ```
    """

    def __init__(self, classifier, text_columns: list[str]):
        import tensorflow as tf

        self.classifier = classifier
        self.text_columns = list(text_columns)
        self._forward = tf.function(
            lambda features: classifier(features, training=False), reduce_retracing=True
        )

    @classmethod
    def from_run(cls, run_dir: str | Path) -> Predictor:
        """Loads the model and options that `tfft.train` saved in `run_dir`.

        Raises:
            FileNotFoundError: when `run_dir` has no `model.keras` or `config.yaml`.
        """
        import yaml

        folder = Path(run_dir)
        missing = [name for name in ("model.keras", "config.yaml") if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{str(run_dir)!r} is not a tfft run folder: {', '.join(missing)} not found. "
                "Pass the folder that python -m tfft.train printed at its end."
            )
        config = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import keras
        import keras_hub  # noqa: F401  (registers the classes stored in model.keras)

        import tfft.metrics  # noqa: F401

        classifier = keras.saving.load_model(folder / "model.keras", compile=False)
        return cls(classifier, config["text_columns"])

    def predict_probabilities(
        self, texts: Sequence[str] | Sequence[Sequence[str]], batch_size: int = 64
    ) -> np.ndarray:
        """Returns the class probabilities of each text or text pair, shape (count, classes)."""
        from tfft.data.pipeline import encode_examples, make_dataset

        columns = _as_columns(texts, len(self.text_columns))
        if not columns[0]:
            return np.zeros((0, self.classifier.num_classes), np.float32)
        examples = TextExamples(
            columns, [0] * len(columns[0]), "predict", self.text_columns, "label"
        )
        encoded = encode_examples(self.classifier.preprocessor, examples)
        logits = [
            self._forward(features).numpy()
            for features, _ in make_dataset(encoded, batch_size, shuffle=False, seed=0)
        ]
        logits = np.concatenate(logits).astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        exponentials = np.exp(logits)
        return (exponentials / exponentials.sum(axis=1, keepdims=True)).astype(np.float32)

    def predict(
        self, texts: Sequence[str] | Sequence[Sequence[str]], batch_size: int = 64
    ) -> tuple[np.ndarray, np.ndarray]:
        """Returns the predicted label and the class probabilities of each input."""
        probabilities = self.predict_probabilities(texts, batch_size)
        return probabilities.argmax(axis=1), probabilities


def _as_columns(texts: Sequence[str] | Sequence[Sequence[str]], column_count: int) -> list[list[str]]:
    """Turns single texts or (text, text) pairs into one list per text column."""
    if isinstance(texts, str):
        raise TypeError("Pass a list of texts, not one string.")
    items = list(texts)
    if column_count == 1:
        if not all(isinstance(item, str) for item in items):
            raise ValueError("This model classifies single texts: pass a list of strings.")
        return [items]
    if not all(not isinstance(item, str) and len(item) == column_count for item in items):
        raise ValueError(
            f"This model classifies text pairs: pass a list of {column_count}-tuples of strings."
        )
    return [[str(item[index]) for item in items] for index in range(column_count)]


def _write_predictions(path: Path, rows, labels, probabilities) -> None:
    fields = ["predicted_label"] + [f"probability_{k}" for k in range(probabilities.shape[1])]
    records = []
    for row, label, probability in zip(rows, labels, probabilities):
        record = dict(row)
        record["predicted_label"] = int(label)
        for k, value in enumerate(probability):
            record[f"probability_{k}"] = round(float(value), 6)
        records.append(record)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jsonl", ".json"):
        with path.open("w", encoding="utf-8") as file:
            for record in records:
                file.write(json.dumps(record, ensure_ascii=False) + "\n")
        return
    tsv = path.suffix.lower() == ".tsv"
    columns = list(dict.fromkeys([key for record in records for key in record if key not in fields])) + fields
    with path.open("w", encoding="utf-8", newline="") as file:
        writer = csv.DictWriter(
            file,
            fieldnames=columns,
            delimiter="\t" if tsv else ",",
            quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL,
            escapechar="\\" if tsv else None,
        )
        writer.writeheader()
        writer.writerows(records)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tfft.predict",
        description="Predict labels for a file of texts with a model trained by tfft.train.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="Run folder written by python -m tfft.train.")
    parser.add_argument("--input", required=True, metavar="FILE", help="CSV, TSV or JSON Lines file of texts to classify.")
    parser.add_argument(
        "--output",
        metavar="FILE",
        help="Where to write the input rows with predicted_label and probability_K columns "
        "(.csv, .tsv or .jsonl). Defaults to RUN_DIR/predictions/INPUT_NAME.",
    )
    parser.add_argument(
        "--text-columns",
        nargs="+",
        metavar="COLUMN",
        help="Text columns of the input file. Defaults to the columns the model was trained on.",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="Examples per batch. Defaults to 64.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing output file.")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the command; returns the process exit status."""
    args = build_parser().parse_args(argv)
    run_dir = Path(args.run_dir)
    output = Path(args.output) if args.output else run_dir / "predictions" / Path(args.input).name
    problems = []
    if not (run_dir / "model.keras").is_file():
        problems.append(
            f"RUN_DIR: {args.run_dir!r} is not a tfft run folder (no model.keras). Pass the "
            "folder that python -m tfft.train printed at its end."
        )
    if output.exists() and not args.overwrite:
        problems.append(
            f"--output: {str(output)!r} already exists. Pass another --output, or --overwrite "
            "to replace it."
        )
    if args.batch_size < 1:
        problems.append(f"--batch-size: must be a positive integer, received {args.batch_size}.")
    if not Path(args.input).is_file():
        problems.append(f"--input: file not found: {args.input!r}. Check the path.")
    if not problems:
        import yaml

        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        text_columns = args.text_columns or config["text_columns"]
        if len(text_columns) != len(config["text_columns"]):
            problems.append(
                f"--text-columns: the model was trained on {len(config['text_columns'])} text "
                f"column(s), received {len(text_columns)}: {text_columns}."
            )
        else:
            try:
                rows, columns = read_texts(args.input, text_columns)
            except ValueError as error:
                problems.append(str(error))
    if problems:
        print("Cannot predict:\n" + "\n".join(f"  - {p}" for p in problems), file=sys.stderr)
        return 2

    predictor = Predictor.from_run(run_dir)
    labels, probabilities = predictor.predict(list(zip(*columns)) if len(columns) > 1 else columns[0], args.batch_size)
    _write_predictions(output, rows, labels, probabilities)
    counts = np.bincount(labels, minlength=probabilities.shape[1])
    per_label = ", ".join(f"label {label}: {count}" for label, count in enumerate(counts.tolist()))
    print(f"Wrote {len(labels)} predictions to {output} ({per_label}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
