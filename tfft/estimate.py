"""Memory of a fine-tuning run, estimated before it starts: `python -m tfft.estimate`.

The estimate, in bytes, for a BERT-family encoder with P parameters, T of
them trainable, L layers of width h, a attention heads, feed-forward width
i, and a micro-batch of b sequences of s tokens:

- weights: 4 P. Variables stay float32 under Keras mixed precision.
- gradients: 8 T. `FineTuneModel` keeps a float32 running sum of the
  gradients and the current micro-batch's float32 gradients.
- optimizer state: 8 T, the two float32 moments of AdamW.
- activations kept for the backward pass, per layer, with p bytes per
  activation element (4 in float32, 2 under mixed_bfloat16 or
  mixed_float16) and 1-byte dropout masks when dropout is on:

      attention  (5p + 1) s b h + (2p + 1) a s^2 b
      feed-forward  p s b h + 2p s b i + s b h
      layer norms  2p s b h

  so (8p + 2) s b h + 2p s b i + (2p + 1) a s^2 b, and without dropout
  8p s b h + 2p s b i + 2p a s^2 b. With i = 4h and p = 2 this is the
  34 s b h + 5 a s^2 b of Korthikanti et al., 2022, "Reducing Activation
  Recomputation in Large Transformer Models", section 4.1, whose
  breakdown it follows. The embeddings add (2p + 1) s b h.
- with gradient checkpointing, each layer keeps only its input (p s b h),
  and one layer's full activations exist at a time during recomputation.
- the backward pass of one layer works on top of what is stored: the
  gradients of its attention scores and softmax output (2p a s^2 b) and of
  its feed-forward activations (2p s b i) exist at the same time.

LoRA changes T (adapters and head) but not the activations. The estimate
leaves out what the formula does not model: temporaries of single
operations (such as the random tensor behind a dropout mask), allocator
overhead, traced graphs, and the memory of the framework itself. Measured
against real peaks by `benchmarks/memory_estimate.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["MemoryEstimate", "ModelShape", "estimate_memory", "main", "model_shape"]

GIB = 2**30
PRECISION_BYTES = {"float32": 4, "mixed_bfloat16": 2, "mixed_float16": 2}


@dataclasses.dataclass
class ModelShape:
    """Sizes of a BERT-family encoder, from its config.json."""

    vocabulary_size: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    max_positions: int
    segments: int
    dropout: float

    def parameters(self, num_labels: int) -> int:
        """Returns the parameter count of the encoder, its pooler and a classification head."""
        h, i = self.hidden, self.intermediate
        embeddings = (self.vocabulary_size + self.max_positions + self.segments) * h + 2 * h
        attention = 4 * (h * h + h)
        feed_forward = h * i + i + i * h + h
        norms = 2 * 2 * h
        layer = attention + feed_forward + norms
        pooler = h * h + h
        head = h * num_labels + num_labels
        return embeddings + self.layers * layer + pooler + head

    def lora_parameters(self, rank: int, num_labels: int) -> int:
        """Returns the trainable count under LoRA on the query and value projections, plus the head.

        Keras factors a projection kernel of shape (h, heads, h / heads) into
        A (h, heads, rank) and B (rank, h / heads).
        """
        head_width = self.hidden // self.heads
        adapter = self.hidden * self.heads * rank + rank * head_width
        return 2 * self.layers * adapter + self.hidden * num_labels + num_labels


def model_shape(folder: str | Path) -> ModelShape:
    """Reads the sizes of a Hugging Face checkpoint or keras-hub preset folder.

    Raises:
        ValueError: when config.json lacks the sizes of a BERT-family encoder.
    """
    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    if "config" in config and isinstance(config["config"], dict):  # keras-hub preset
        c = config["config"]
        return ModelShape(
            c["vocabulary_size"], c["hidden_dim"], c["num_layers"], c["num_heads"],
            c["intermediate_dim"], c["max_sequence_length"], c.get("num_segments", 2),
            float(c.get("dropout", 0.1)),
        )
    try:
        return ModelShape(
            config["vocab_size"], config["hidden_size"], config["num_hidden_layers"],
            config["num_attention_heads"], config["intermediate_size"],
            config["max_position_embeddings"], config.get("type_vocab_size", 2),
            float(config.get("hidden_dropout_prob", 0.1)),
        )
    except KeyError as error:
        raise ValueError(
            f"{folder}/config.json has no {error} entry; the estimate covers BERT-family encoders."
        ) from None


@dataclasses.dataclass
class MemoryEstimate:
    """Estimated bytes of one configuration; see the module docstring for the formula."""

    parameters: int
    trainable_parameters: int
    weights: int
    gradients: int
    optimizer_state: int
    activations_per_layer: int
    activations: int
    backward_workspace: int

    @property
    def training(self) -> int:
        """Bytes that training adds to a loaded model: gradients, optimizer state, activations, workspace."""
        return self.gradients + self.optimizer_state + self.activations + self.backward_workspace

    @property
    def total(self) -> int:
        return self.weights + self.training


def layer_activations(shape: ModelShape, micro_batch_size: int, length: int, precision: str, dropout: float) -> int:
    """Returns the bytes of activations one transformer layer keeps for the backward pass."""
    p = PRECISION_BYTES[precision]
    mask = 1 if dropout > 0 else 0
    sbh = length * micro_batch_size * shape.hidden
    sbi = length * micro_batch_size * shape.intermediate
    scores = shape.heads * length * length * micro_batch_size
    return (8 * p + 2 * mask) * sbh + 2 * p * sbi + (2 * p + mask) * scores


def estimate_memory(
    shape: ModelShape,
    micro_batch_size: int,
    length: int,
    precision: str = "float32",
    num_labels: int = 2,
    gradient_checkpointing: bool = False,
    lora_rank: int | None = None,
    dropout: float | None = None,
) -> MemoryEstimate:
    """Estimates the memory of fine-tuning one configuration.

    Args:
        shape: The model's sizes (`model_shape`).
        micro_batch_size: Sequences per forward and backward pass.
        length: Tokens per sequence (the longest batch).
        precision: Keras precision policy. Defaults to `"float32"`.
        num_labels: Classes of the head. Defaults to `2`.
        gradient_checkpointing: Defaults to `False`.
        lora_rank: Rank of LoRA adapters, or `None` for full fine-tuning.
            Defaults to `None`.
        dropout: Dropout rate; `None` takes the model's. Defaults to `None`.
    """
    rate = shape.dropout if dropout is None else dropout
    parameters = shape.parameters(num_labels)
    trainable = parameters if lora_rank is None else shape.lora_parameters(lora_rank, num_labels)
    per_layer = layer_activations(shape, micro_batch_size, length, precision, rate)
    p = PRECISION_BYTES[precision]
    sbh = length * micro_batch_size * shape.hidden
    embeddings = (2 * p + (1 if rate > 0 else 0)) * sbh
    if gradient_checkpointing:
        activations = shape.layers * p * sbh + per_layer + embeddings
    else:
        activations = shape.layers * per_layer + embeddings
    scores = shape.heads * length * length * micro_batch_size
    workspace = 2 * p * scores + 2 * p * length * micro_batch_size * shape.intermediate
    return MemoryEstimate(
        parameters=parameters,
        trainable_parameters=trainable,
        weights=4 * parameters,
        gradients=8 * trainable,
        optimizer_state=8 * trainable,
        activations_per_layer=per_layer,
        activations=activations,
        backward_workspace=workspace,
    )


def largest_micro_batch(budget_bytes: int, upper: int, **options) -> int:
    """Returns the largest micro-batch size up to `upper` whose total fits `budget_bytes`, or 0."""
    best = 0
    for size in range(1, upper + 1):
        if estimate_memory(micro_batch_size=size, **options).total <= budget_bytes:
            best = size
        else:
            break
    return best


def available_memory() -> tuple[int, str]:
    """Returns the memory to plan for: the first GPU's, or this machine's available memory."""
    if shutil.which("nvidia-smi"):
        try:
            output = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=10, check=True,
            ).stdout.split()
            if output:
                return int(output[0]) * 2**20, "the GPU's memory"
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "this machine's available memory"
    raise RuntimeError("Cannot read MemAvailable from /proc/meminfo; pass --memory.")


def main(argv: list[str] | None = None) -> int:
    """Prints the estimate of one configuration; returns the exit status."""
    from tfft.models import bundled_model_dir, check_model_folder

    parser = argparse.ArgumentParser(
        prog="python -m tfft.estimate",
        description="Estimate the memory of fine-tuning, before the run.",
    )
    parser.add_argument("--model", help="Model folder, as for tfft.train. Defaults to the bundled MiniLM.")
    parser.add_argument("--max-length", type=int, default=128, help="Tokens per sequence. Defaults to 128.")
    parser.add_argument("--batch-size", type=int, default=32, help="Effective batch. Defaults to 32.")
    parser.add_argument("--micro-batch-size", type=int, help="Sequences per pass. Defaults to --batch-size.")
    parser.add_argument("--precision", choices=sorted(PRECISION_BYTES), default="float32", help="Defaults to float32.")
    parser.add_argument("--num-labels", type=int, default=2, help="Classes. Defaults to 2.")
    parser.add_argument("--dropout", type=float, help="Dropout rate. Defaults to the model's.")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="Estimate with gradient checkpointing.")
    parser.add_argument("--lora-rank", type=int, help="Estimate LoRA of this rank.")
    parser.add_argument("--memory", type=float, help="Budget in GiB. Defaults to the GPU's memory, or this machine's available memory.")
    args = parser.parse_args(argv)

    folder = Path(args.model) if args.model else bundled_model_dir()
    problems = check_model_folder(folder)
    for name in ("max_length", "batch_size", "micro_batch_size", "num_labels", "lora_rank"):
        value = getattr(args, name)
        if value is not None and value < 1:
            problems.append(f"--{name.replace('_', '-')}: must be a positive integer, received {value}.")
    if problems:
        print("Cannot estimate:\n" + "\n".join(f"  - {p}" for p in problems), file=sys.stderr)
        return 2
    shape = model_shape(folder)
    micro = min(args.micro_batch_size or args.batch_size, args.batch_size)
    options = dict(
        shape=shape, length=args.max_length, precision=args.precision, num_labels=args.num_labels,
        gradient_checkpointing=args.gradient_checkpointing, lora_rank=args.lora_rank, dropout=args.dropout,
    )
    estimate = estimate_memory(micro_batch_size=micro, **options)
    if args.memory is not None:
        budget, source = int(args.memory * GIB), f"--memory {args.memory:g} GiB"
    else:
        budget, source = available_memory()

    print(f"Model: {folder} ({estimate.parameters:,} parameters, {estimate.trainable_parameters:,} trainable)")
    print(f"Micro-batch {micro} x {args.max_length} tokens, {args.precision}"
          + (", gradient checkpointing" if args.gradient_checkpointing else "")
          + (f", LoRA rank {args.lora_rank}" if args.lora_rank else ""))
    rows = [
        ("weights", estimate.weights),
        ("gradients", estimate.gradients),
        ("optimizer state (AdamW)", estimate.optimizer_state),
        (f"activations ({shape.layers} layers, {estimate.activations_per_layer / GIB:.3f} GiB each)", estimate.activations),
        ("backward pass of one layer", estimate.backward_workspace),
        ("total", estimate.total),
    ]
    for name, value in rows:
        print(f"  {name:<48}{value / GIB:>9.3f} GiB")
    fitting = largest_micro_batch(budget, max(args.batch_size, 1), **options)
    print(f"Budget: {budget / GIB:.1f} GiB ({source}). Largest micro-batch that fits: "
          f"{fitting if fitting else 'none, even 1 does not fit'}"
          + (" (the whole batch)" if fitting == args.batch_size else "") + ".")
    if estimate.total > budget:
        print("This configuration does not fit: lower --micro-batch-size or --max-length, or use "
              "mixed precision, gradient checkpointing or LoRA.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
