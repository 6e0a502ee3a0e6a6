"""The `python -m tfft.train` command: fine-tune a text classifier and save the run.

The command only parses options and calls the library. Every option, data
file and the model folder is checked before TensorFlow is imported, and every
problem found is reported in one error.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from tfft.config import (
    ConfigError,
    TrainConfig,
    parse_config,
    default_run_name,
    resolve_warmup_updates,
    validate_options,
)
from tfft.data.sources import (
    DEMO_DIR,
    TextExamples,
    check_labels,
    read_examples,
    resolve_data_paths,
)
from tfft.models import bundled_model_dir, check_max_length, check_model_folder

__all__ = ["RunPlan", "RunResult", "main", "prepare_run", "run"]

logger = logging.getLogger("tfft")

DEFAULT_OUTPUT_ROOT = Path("saved_models")


@dataclasses.dataclass
class RunPlan:
    """A checked configuration with its data read, ready to train."""

    config: TrainConfig
    model_dir: Path
    train: TextExamples
    evaluation: TextExamples | None
    num_labels: int
    output_dir: Path


@dataclasses.dataclass
class RunResult:
    """Output folder and final metrics of a finished run."""

    output_dir: Path
    metrics: dict[str, Any]


def prepare_run(
    config: TrainConfig,
    problems: list[str] | None = None,
    now: datetime.datetime | None = None,
) -> RunPlan:
    """Checks every option, the model folder and the data, without TensorFlow.

    Args:
        config: The options.
        problems: Problems already found while parsing, reported together
            with the rest. Defaults to `None`.
        now: Time stamp of the default run name. Defaults to `None`, now.

    Raises:
        ConfigError: listing every problem found.
    """
    problems = list(problems or []) + validate_options(config)
    model_dir = Path(config.model) if config.model else bundled_model_dir()
    model_problems = check_model_folder(model_dir)
    problems += model_problems
    if not model_problems:
        problems += check_max_length(model_dir, config.max_length)

    train_spec, eval_spec, data_problems = resolve_data_paths(
        config.train_data, config.eval_data, config.text_columns, config.label_column
    )
    problems += data_problems
    train = evaluation = None
    if train_spec is not None:
        train, more = read_examples(train_spec, config.max_train_examples)
        problems += more
    if eval_spec is not None:
        evaluation, more = read_examples(eval_spec, config.max_eval_examples)
        problems += more
    if train is not None and evaluation is not None and len(train.texts) != len(evaluation.texts):
        problems.append(
            f"--text-columns: training data has {len(train.texts)} text column(s) and "
            f"evaluation data {len(evaluation.texts)}; both need the same form."
        )

    num_labels = config.num_labels
    if train is not None:
        for examples, option in ((train, "--train-data"), (evaluation, "--eval-data")):
            if examples is not None:
                problems += check_labels(examples, num_labels, option)
        if num_labels is None:
            seen = train.labels + (evaluation.labels if evaluation is not None else [])
            num_labels = max(max(seen) + 1, 2)

    if problems:
        raise ConfigError(problems)

    if config.output_dir is not None:
        output_dir = Path(config.output_dir)
    else:
        model_name = "minilm-l6" if config.model is None else config.model
        data_name = "demo-sentiment" if config.train_data is None else config.train_data
        stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")
        output_dir = DEFAULT_OUTPUT_ROOT / default_run_name(model_name, data_name, stamp)
        if output_dir.exists() and any(output_dir.iterdir()):
            raise ConfigError(
                [f"--output-dir: {str(output_dir)!r} already exists; pass another --output-dir."]
            )
    return RunPlan(config, model_dir, train, evaluation, num_labels, output_dir)


def run(plan: RunPlan) -> RunResult:
    """Fine-tunes the model of `plan` and saves the run folder.

    The folder contains `model.keras` (the classifier with its preprocessor),
    `preprocessor/` (tokenizer assets), `config.yaml` (the resolved options),
    `metrics.json` (per-epoch metrics, speed and counts) and `logs/` (TensorBoard).
    """
    import keras
    import numpy as np
    import yaml

    from tfft.batch_size import find_micro_batch_size, memory_probe
    from tfft.callbacks import (
        EvaluationTimer,
        NonFiniteGuard,
        AugmentationLog,
        OOMRetry,
        OverfittingMonitor,
        StopAfterSteps,
        TrainingTelemetry,
    )
    from tfft.callbacks.telemetry import UPDATE_SCALARS
    from tfft.data.pipeline import (
        EncodedExamples,
        encode_examples,
        make_augmented_dataset,
        make_dataset,
    )
    from tfft.metrics import ClassF1
    from tfft.models import enable_neftune, load_classifier
    from tfft.optim import WarmupSchedule, build_optimizer
    from tfft.step import FineTuneModel

    config = plan.config
    keras.utils.set_random_seed(config.seed)
    keras.mixed_precision.set_global_policy(config.precision)

    logger.info("loading %s", plan.model_dir)
    logger.info(
        "training data: %s%s",
        plan.train.source,
        " (the demo data: no --train-data given)" if config.train_data is None else "",
    )
    classifier = load_classifier(plan.model_dir, plan.num_labels, config.max_length, config.dropout)
    preprocessor = classifier.preprocessor

    train_encoded = encode_examples(preprocessor, plan.train)
    eval_encoded = encode_examples(preprocessor, plan.evaluation) if plan.evaluation else None
    for name, encoded in (("training", train_encoded), ("evaluation", eval_encoded)):
        if encoded is not None:
            logger.info(
                "%s: %d examples, %d truncated to --max-length %d",
                name,
                len(encoded),
                encoded.truncated,
                config.max_length,
            )

    augmenter = None
    if config.augment:
        augmenter = _build_augmenter(config, classifier, plan.train)
        train_data = make_augmented_dataset(
            plan.train, preprocessor, augmenter, config.batch_size, seed=config.seed
        )
    else:
        train_data = make_dataset(train_encoded, config.batch_size, shuffle=True, seed=config.seed)
    eval_batch_size = config.eval_batch_size or config.batch_size
    eval_data = (
        make_dataset(eval_encoded, eval_batch_size, shuffle=False, seed=config.seed)
        if eval_encoded is not None
        else None
    )

    updates_per_epoch = math.ceil(len(train_encoded) / config.batch_size)
    if config.max_steps is not None:
        total_updates = config.max_steps
        epochs = math.ceil(config.max_steps / updates_per_epoch)
    else:
        total_updates = updates_per_epoch * config.epochs
        epochs = config.epochs
    warmup_updates = resolve_warmup_updates(config.warmup, total_updates)
    schedule = WarmupSchedule(
        config.learning_rate, total_updates, warmup_updates, decay=config.lr_schedule
    )

    if config.lora_rank is not None:
        from tfft.models import enable_lora

        adapted = enable_lora(classifier, config.lora_rank, config.lora_alpha)
        logger.info(
            "LoRA rank %d on %d layers: %d trainable parameters of %d",
            config.lora_rank,
            adapted,
            sum(math.prod(v.shape) for v in classifier.trainable_variables),
            classifier.count_params(),
        )
    if config.gradient_checkpointing:
        from tfft.checkpointing import enable_gradient_checkpointing

        count = enable_gradient_checkpointing(classifier.backbone)
        logger.info("gradient checkpointing on %d transformer layers", count)
    training_noise = []
    if config.neftune_alpha is not None:
        training_noise.append(enable_neftune(classifier, config.neftune_alpha, seed=config.seed))
    model = FineTuneModel(
        classifier,
        micro_batch_size=config.micro_batch_size,
        max_grad_norm=config.max_grad_norm or None,
        training_noise=training_noise,
    )
    try:
        optimizer = build_optimizer(
            schedule,
            config.weight_decay,
            classifier.trainable_variables,
            exclude=config.weight_decay_exclude,
            decay_embeddings=config.decay_embeddings,
        )
    except ValueError as error:
        # The patterns can be checked only against the loaded model's variables.
        raise ConfigError([f"--weight-decay-exclude: {error}"]) from None
    metrics: list[Any] = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
    if plan.num_labels == 2:
        metrics.append(ClassF1(class_id=1, name="f1"))
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=metrics,
        jit_compile=config.jit_compile,
    )

    if config.find_batch_size:
        # Probe with the longest training examples, padded to --max-length.
        lengths = train_encoded.features["padding_mask"].sum(axis=1)
        longest = np.argsort(lengths)[-4:]
        features = {name: value[longest] for name, value in train_encoded.features.items()}
        fits = memory_probe(model, features, train_encoded.labels[longest])
        size = find_micro_batch_size(fits, max_size=config.batch_size)
        model.micro_batch_size = None if size >= config.batch_size else size
        if size >= config.batch_size:
            logger.info(
                "the whole batch of %d fits at %d tokens: no micro-batches", size, config.max_length
            )
        else:
            logger.info(
                "largest micro-batch that fits at %d tokens, with a 10%% margin: %d",
                config.max_length,
                size,
            )

    _log_memory_estimate(plan, model.micro_batch_size or config.batch_size)

    output_dir = plan.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    resolved = config.to_dict()
    resolved.update(
        model=str(plan.model_dir),
        micro_batch_size=model.micro_batch_size,
        train_data=plan.train.source,
        eval_data=plan.evaluation.source if plan.evaluation else None,
        text_columns=plan.train.text_columns,
        label_column=plan.train.label_column,
        num_labels=plan.num_labels,
        output_dir=str(output_dir),
    )
    resolved_text = yaml.safe_dump(resolved, sort_keys=False)
    (output_dir / "config.yaml").write_text(resolved_text, encoding="utf-8")

    timer = EvaluationTimer()
    guard = NonFiniteGuard(
        config.on_divergence,
        max_rollbacks=config.max_rollbacks,
        snapshot_every=config.snapshot_every,
        diagnosis_dir=output_dir,
        log_dir=output_dir / "logs",
    )
    callbacks = [guard, TrainingTelemetry(output_dir / "logs"), timer]
    monitor = None
    if eval_data is not None:
        gap_data = None
        if config.measure_train_gap:
            count = min(len(train_encoded), len(eval_encoded), 512)
            held = EncodedExamples(
                {name: value[:count] for name, value in train_encoded.features.items()},
                train_encoded.labels[:count],
                0,
            )
            gap_data = make_dataset(held, eval_batch_size, shuffle=False, seed=config.seed)
        monitor = OverfittingMonitor(
            monitor=config.monitor,
            gap_threshold=config.gap_threshold,
            action=config.overfitting_action,
            validation_data=eval_data if config.eval_every else None,
            eval_every=config.eval_every,
            train_gap_data=gap_data,
            log_dir=output_dir / "logs",
        )
        callbacks.append(monitor)
    else:
        logger.info("no evaluation data: the overfitting monitor is off")
    if augmenter is not None:
        augmentation_log = AugmentationLog(augmenter, log_dir=output_dir / "logs")
        callbacks.append(augmentation_log)
    oom_retry = OOMRetry(log_dir=output_dir / "logs") if config.oom_retry else None
    if oom_retry is not None:
        callbacks.append(oom_retry)
    if config.max_steps is not None:
        callbacks.append(StopAfterSteps(config.max_steps))
    logger.info(
        "training: %d update(s) (%d per epoch, batch %d, micro-batch %s), warmup %d, "
        "peak learning rate %g, %s",
        total_updates,
        updates_per_epoch,
        config.batch_size,
        model.micro_batch_size or config.batch_size,
        warmup_updates,
        config.learning_rate,
        config.precision,
    )
    start = time.perf_counter()
    history = model.fit(
        train_data,
        validation_data=eval_data,
        epochs=epochs,
        callbacks=callbacks,
        shuffle=False,  # the dataset reshuffles itself each epoch
        verbose=1 if sys.stdout.isatty() else 2,
    )
    fit_seconds = time.perf_counter() - start
    train_seconds = fit_seconds - timer.seconds

    classifier.save(output_dir / "model.keras")
    preprocessor.save_to_preset(str(output_dir / "preprocessor"))

    examples_seen = int(model.examples_seen.numpy())
    epoch_records = []
    for index in range(len(history.epoch)):
        record = {"epoch": index + 1}
        # Per-update signals (gradient norm, learning rate, ...) at an epoch's
        # end describe only its last update; TensorBoard has all of them.
        record.update(
            {
                key: float(values[index])
                for key, values in history.history.items()
                if key not in UPDATE_SCALARS
            }
        )
        epoch_records.append(record)
    final = (
        {key: value for key, value in epoch_records[-1].items() if key != "epoch"}
        if epoch_records
        else {}
    )
    metrics_record = {
        "diverged": guard.diagnosis is not None,
        "augmented_examples_per_epoch": augmentation_log.per_epoch if augmenter is not None else None,
        "overfitting": {
            "fired": monitor.fired,
            "best_evaluation": monitor.best_evaluation,
            "best": monitor.best_value,
            "evaluations": monitor.evaluations,
            "restored_best": config.overfitting_action == "restore_best"
            and monitor.best_evaluation is not None,
        }
        if monitor is not None
        else None,
        "micro_batch_size": model.micro_batch_size,
        "micro_batch_changes": [change["message"] for change in oom_retry.changes]
        if oom_retry is not None
        else [],
        "rollbacks": guard.rollbacks,
        "bad_updates": guard.bad_updates,
        "epochs": epoch_records,
        "final": final,
        "updates": int(model.optimizer.iterations.numpy()),
        "skipped_steps": int(model.skipped_steps.numpy()),
        "train_examples": len(train_encoded),
        "eval_examples": len(eval_encoded) if eval_encoded is not None else 0,
        "truncated_examples": {
            "train": train_encoded.truncated,
            "eval": eval_encoded.truncated if eval_encoded is not None else 0,
        },
        "train_seconds": round(train_seconds, 2),
        "eval_seconds": round(timer.seconds, 2),
        "examples_per_second": round(examples_seen / max(train_seconds, 1e-9), 3),
    }
    (output_dir / "metrics.json").write_text(json.dumps(metrics_record, indent=2) + "\n", encoding="utf-8")
    return RunResult(output_dir, metrics_record)


def _log_memory_estimate(plan: RunPlan, micro_batch_size: int) -> None:
    """Logs `tfft.estimate`'s memory for this run, and warns when it exceeds the memory available now."""
    import tensorflow as tf

    from tfft.estimate import GIB, available_memory, estimate_memory, gpu_memory, model_shape

    config = plan.config
    try:
        shape = model_shape(plan.model_dir)
    except (ValueError, KeyError):
        logger.info("no memory estimate: %s is not a BERT-family encoder, which the estimate covers", plan.model_dir)
        return
    on_gpu = bool(tf.config.list_physical_devices("GPU"))
    estimate = estimate_memory(
        shape,
        micro_batch_size,
        config.max_length,
        config.precision,
        num_labels=plan.num_labels,
        gradient_checkpointing=config.gradient_checkpointing,
        lora_rank=config.lora_rank,
        dropout=config.dropout,
        device="gpu" if on_gpu else "cpu",
    )
    # TensorFlow and the weights are already in this process, so on the CPU
    # only what training adds must fit in the memory available now.
    if on_gpu:
        required, available, budget_label = estimate.weights + estimate.training, gpu_memory(), "on the GPU"
    else:
        required, available, budget_label = estimate.training, available_memory(), "available"
    logger.info(
        "estimated memory for training at micro-batch %d x %d tokens: %.2f GiB (python -m tfft.estimate)",
        micro_batch_size,
        config.max_length,
        required / GIB,
    )
    if available is not None and required > available:
        logger.warning(
            "the estimate, %.2f GiB, exceeds the %.2f GiB %s, so the run may run out of memory%s. "
            "Lower --micro-batch-size or --max-length, or use --precision mixed_bfloat16, "
            "--gradient-checkpointing or --lora-rank.",
            required / GIB,
            available / GIB,
            budget_label,
            " (out-of-memory recovery then halves the micro-batch)" if config.oom_retry else "",
        )


def _build_augmenter(config: TrainConfig, classifier, examples: TextExamples):
    """Builds the text augmenter, with synonyms from the model's token embeddings."""
    import re

    from tfft.data.augment import TextAugmenter, embedding_synonyms

    synonyms = {}
    if "synonym" in config.augment:
        words = {
            word
            for column in examples.texts
            for text in column
            for word in re.findall(r"[a-z]+", text.lower())
        }
        vocabulary = classifier.preprocessor.tokenizer.get_vocabulary()
        embeddings = classifier.backbone.token_embedding.embeddings.numpy()
        synonyms = embedding_synonyms(vocabulary, embeddings, words)
        logger.info("synonyms from the token embeddings for %d of %d words", len(synonyms), len(words))
    return TextAugmenter(config.augment, config.augment_prob, synonyms)


def _format_summary(result: RunResult) -> str:
    if result.metrics["diverged"]:
        return "\n".join(
            [
                f"Training diverged and stopped; the diagnosis is in {result.output_dir}/diagnosis.json.",
                f"The model saved in {result.output_dir}/model.keras is the last good state.",
            ]
        )
    final = result.metrics["final"]
    shown = ", ".join(
        f"{key} {value:.4f}"
        for key, value in final.items()
        if key.startswith("val_") or key in ("loss", "accuracy")
    )
    folder = result.output_dir
    return "\n".join(
        [
            f"Fine-tuning finished: {shown}.",
            f"  updates: {result.metrics['updates']}, skipped: {result.metrics['skipped_steps']}, "
            f"{result.metrics['examples_per_second']:.1f} training examples per second.",
            f"Outputs in {folder}/:",
            f"  model.keras        the fine-tuned classifier (keras.saving.load_model)",
            f"  preprocessor/      the tokenizer assets",
            f"  metrics.json       per-epoch metrics, speed and counts",
            f"  config.yaml        the resolved options",
            f"  logs/              tensorboard --logdir {folder}/logs",
            f"Predict with: {_python_command()} -m tfft.predict {folder} --input FILE",
        ]
    )


def _python_command() -> str:
    """Returns how to call this Python: relative when it lives under the working folder."""
    executable = Path(sys.executable)
    try:
        return str(executable.relative_to(Path.cwd()))
    except ValueError:
        return str(executable)


def main(argv: list[str] | None = None) -> int:
    """Runs the command; returns the process exit status."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, format="tfft: %(message)s")
    try:
        plan = prepare_run(*parse_config(argv))
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    try:
        result = run(plan)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    print(_format_summary(result))
    return 1 if result.metrics["diverged"] else 0


if __name__ == "__main__":
    sys.exit(main())
