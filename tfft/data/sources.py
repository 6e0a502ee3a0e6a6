"""Reading labelled text from files and GLUE task folders, without TensorFlow.

Each check here reports a problem as one sentence that names the option, the
value received and the fix, so that `tfft.train` can list every problem with
the data before it loads a model.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

__all__ = [
    "DEMO_DIR",
    "read_texts",
    "GLUE_TASKS",
    "TextExamples",
    "read_examples",
    "resolve_data_paths",
]

DEMO_DIR = Path(__file__).resolve().parent / "demo"

# Columns of the GLUE tasks as the benchmark distributes them (tab-separated,
# one header row, no quoting).
GLUE_TASKS = {
    "MRPC": {"text_columns": ["#1 String", "#2 String"], "label_column": "Quality"},
    "SST-2": {"text_columns": ["sentence"], "label_column": "label"},
    "QQP": {"text_columns": ["question1", "question2"], "label_column": "is_duplicate"},
}

SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")
DEFAULT_TEXT_COLUMNS = ("text", "sentence")
DEFAULT_LABEL_COLUMN = "label"


@dataclasses.dataclass
class TextExamples:
    """Texts (one column, or two for pairs) and their integer labels."""

    texts: list[list[str]]
    labels: list[int]
    source: str
    text_columns: list[str]
    label_column: str

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, count: int | None) -> TextExamples:
        """Returns the first `count` examples, or all when `count` is None."""
        if count is None:
            return self
        return dataclasses.replace(
            self,
            texts=[column[:count] for column in self.texts],
            labels=self.labels[:count],
        )


@dataclasses.dataclass
class DataSpec:
    """Source file and columns of one data split."""

    path: Path
    option: str
    text_columns: list[str] | None
    label_column: str | None


def glue_task_name(folder: Path) -> str | None:
    """Returns the GLUE task a folder holds, matched on its name, or None."""
    for task in GLUE_TASKS:
        if folder.name.upper() == task.upper():
            return task
    return None


def resolve_data_paths(
    train_data: str | None,
    eval_data: str | None,
    text_columns: list[str] | None,
    label_column: str | None,
) -> tuple[DataSpec | None, DataSpec | None, list[str]]:
    """Turns `--train-data` and `--eval-data` into files and columns to read.

    The demo data is used when `--train-data` is absent. A GLUE task folder
    gives its train.tsv for training and its dev.tsv for evaluation.

    Returns:
        The training spec, the evaluation spec (None when there is no
        evaluation data), and the problems found.
    """
    problems: list[str] = []
    if train_data is None:
        # Columns the user names still apply, and are checked, as for any file.
        columns = text_columns or ["text"]
        label = label_column or "label"
        train = DataSpec(DEMO_DIR / "train.csv", "--train-data", columns, label)
        evaluation = DataSpec(DEMO_DIR / "dev.csv", "--eval-data", columns, label)
        if eval_data is not None:
            evaluation, more = _resolve_one(eval_data, "--eval-data", "dev", text_columns, label_column)
            problems += more
        return train, evaluation, problems

    train, more = _resolve_one(train_data, "--train-data", "train", text_columns, label_column)
    problems += more
    if eval_data is not None:
        evaluation, more = _resolve_one(eval_data, "--eval-data", "dev", text_columns, label_column)
        problems += more
    elif Path(train_data).is_dir() and train is not None:
        dev = train.path.parent / "dev.tsv"
        evaluation = dataclasses.replace(train, path=dev, option="--eval-data") if dev.is_file() else None
    else:
        evaluation = None
    return train, evaluation, problems


def _resolve_one(
    value: str,
    option: str,
    split: str,
    text_columns: list[str] | None,
    label_column: str | None,
) -> tuple[DataSpec | None, list[str]]:
    path = Path(value)
    if not path.exists():
        return None, [f"{option}: file or folder not found: {value!r}. Check the path."]
    if path.is_dir():
        task = glue_task_name(path)
        if task is None:
            return None, [
                f"{option}: {value!r} is a folder but not a known GLUE task folder "
                f"({', '.join(GLUE_TASKS)}). Pass a CSV, TSV or JSON Lines file, "
                "or one of those task folders."
            ]
        file = path / f"{split}.tsv"
        if not file.is_file():
            return None, [
                f"{option}: the GLUE folder {value!r} has no {split}.tsv. "
                "Pass the folder as the benchmark distributes it."
            ]
        # The task's columns, unless the user names others.
        columns = GLUE_TASKS[task]
        return DataSpec(
            file,
            option,
            text_columns or list(columns["text_columns"]),
            label_column or columns["label_column"],
        ), []
    if path.suffix.lower() not in SUFFIXES:
        return None, [
            f"{option}: unsupported file type {path.suffix or '(none)'!r} of {value!r}. "
            "Use .csv, .tsv or .jsonl."
        ]
    return DataSpec(path, option, text_columns, label_column), []


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, object]]]:
    """Reads a file's column names and rows.

    TSV files are read without quoting: a tab-separated file has no escape
    mechanism, so a quote character is ordinary text (as in the GLUE files).
    """
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = []
        columns: dict[str, None] = {}
        with path.open(encoding="utf-8-sig") as file:
            for line_number, line in enumerate(file, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"line {line_number} is not valid JSON: {error}") from None
                if not isinstance(row, dict):
                    raise ValueError(f"line {line_number} is not a JSON object")
                rows.append(row)
                columns.update(dict.fromkeys(row))
        return list(columns), rows
    delimiter = "\t" if suffix == ".tsv" else ","
    quoting = csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL
    with path.open(encoding="utf-8-sig", newline="") as file:
        reader = csv.DictReader(file, delimiter=delimiter, quoting=quoting)
        rows = []
        for row in reader:
            if None in row:
                hint = "an unquoted comma in a text?" if delimiter == "," else "a tab in a text?"
                raise ValueError(
                    f"line {reader.line_num} has more fields than the header ({hint})"
                )
            rows.append(row)
        return list(reader.fieldnames or []), rows


def read_examples(spec: DataSpec, max_examples: int | None = None) -> tuple[TextExamples | None, list[str]]:
    """Reads and checks one split: columns exist, labels are integers.

    Returns:
        The examples (None when a problem prevents reading them) and the
        problems found.
    """
    option = spec.option
    try:
        columns, rows = _read_rows(spec.path)
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as error:
        return None, [f"{option}: cannot read {str(spec.path)!r}: {error}."]
    if not rows:
        return None, [
            f"{option}: {str(spec.path)!r} contains no examples. Pass a file with a header "
            "row and at least one example."
        ]

    problems = []
    text_columns = spec.text_columns
    if text_columns is None:
        found = [name for name in DEFAULT_TEXT_COLUMNS if name in columns]
        if not found:
            return None, [
                f"--text-columns: no text column given, and {str(spec.path)!r} has no "
                f"column named {' or '.join(DEFAULT_TEXT_COLUMNS)}. Columns found: "
                f"{', '.join(map(repr, columns))}. Pass --text-columns with one or two of them."
            ]
        text_columns = found[:1]
    label_column = spec.label_column or DEFAULT_LABEL_COLUMN
    for name, flag in [(name, "--text-columns") for name in text_columns] + [
        (label_column, "--label-column")
    ]:
        if name not in columns:
            problems.append(
                f"{flag}: column {name!r} not found in {str(spec.path)!r}. Columns found: "
                f"{', '.join(map(repr, columns))}."
            )
    if problems:
        return None, problems

    if max_examples is not None:
        rows = rows[:max_examples]
    texts: list[list[str]] = [[] for _ in text_columns]
    labels: list[int] = []
    bad_labels = []
    for row_number, row in enumerate(rows, start=2):
        for column, name in zip(texts, text_columns):
            value = row.get(name)
            column.append("" if value is None else str(value))
        label = _parse_label(row.get(label_column))
        if label is None:
            bad_labels.append((row_number, row.get(label_column)))
        labels.append(label if label is not None else -1)
    if bad_labels:
        shown = ", ".join(f"row {number}: {value!r}" for number, value in bad_labels[:5])
        more = f" and {len(bad_labels) - 5} more" if len(bad_labels) > 5 else ""
        problems.append(
            f"--label-column: column {label_column!r} of {str(spec.path)!r} must hold "
            f"integer labels 0, 1, ...; found {shown}{more}. Map the labels to integers "
            "first, or pass the right --label-column."
        )
        return None, problems
    examples = TextExamples(texts, labels, str(spec.path), list(text_columns), label_column)
    return examples, []


def _parse_label(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def check_labels(
    examples: TextExamples, num_labels: int | None, option: str
) -> list[str]:
    """Checks that every label is below `--num-labels`."""
    if num_labels is None:
        return []
    outside = sorted({label for label in examples.labels if label >= num_labels})
    if not outside:
        return []
    return [
        f"--num-labels: {option} {examples.source!r} has labels {outside[:10]} outside "
        f"0..{num_labels - 1} (--num-labels {num_labels}). Raise --num-labels, or omit "
        "it to infer it from the data."
    ]


def read_texts(path: str | Path, text_columns: list[str], option: str = "--input") -> tuple[list[dict[str, object]], list[list[str]]]:
    """Reads the text columns of an unlabelled file, for prediction.

    Returns:
        The rows as read, and one list of texts per text column.

    Raises:
        ValueError: when the file cannot be read, is empty, or lacks a column.
    """
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"{option}: file not found: {str(path)!r}. Check the path.")
    if file.suffix.lower() not in SUFFIXES:
        raise ValueError(
            f"{option}: unsupported file type {file.suffix or '(none)'!r} of {str(path)!r}. "
            "Use .csv, .tsv or .jsonl."
        )
    try:
        columns, rows = _read_rows(file)
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as error:
        raise ValueError(f"{option}: cannot read {str(path)!r}: {error}.") from None
    if not rows:
        raise ValueError(f"{option}: {str(path)!r} contains no rows to predict.")
    missing = [name for name in text_columns if name not in columns]
    if missing:
        raise ValueError(
            f"{option}: {str(path)!r} lacks the text column(s) {missing} that the model was "
            f"trained on. Columns found: {', '.join(map(repr, columns))}. Pass --text-columns "
            "to name the columns of this file."
        )
    texts = [["" if row.get(name) is None else str(row.get(name)) for row in rows] for name in text_columns]
    return rows, texts
