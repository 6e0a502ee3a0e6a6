"""Memory of a fine-tuning run, estimated before it starts: `python -m tfft.estimate`.

The estimate, in bytes, for a BERT-family encoder of keras-hub (its
`TransformerEncoder` layers on the TensorFlow backend) with P parameters,
T of them trainable, L layers of width h, a attention heads, feed-forward
width i, and a micro-batch of b sequences of s tokens. p is the bytes of
the compute dtype (4 in float32, 2 under mixed_bfloat16 or mixed_float16),
d is 1 when dropout is on and 0 otherwise.

- weights: 4 P. Variables stay float32 under Keras mixed precision. They
  are loaded before training starts, so `MemoryEstimate.training` leaves
  them out.
- gradients: 4 T, the float32 running sum that `FineTuneModel` keeps
  across micro-batches.
- optimizer state: 8 T, the two float32 moments of AdamW.
- activations: the tensors the forward pass keeps for the backward pass.
  Per transformer layer:

      (16 + 6p + 2d) s b h + 5p s b i + c a s^2 b

  16 s b h: each of the two layer norms keeps its input and its
  normalized value in float32, also under mixed precision. 6p s b h: the
  layer's input, the query, the key, the value, the attention output
  before its projection and the feed-forward input. 2d s b h: the 1-byte
  keep masks of the dropout after the attention and after the
  feed-forward. 5p s b i: the tanh-approximated GELU keeps its input, the
  tanh, two products and its output. c a s^2 b, the attention
  probabilities: without dropout Keras takes `ops.dot_product_attention`,
  which computes the softmax in float32 and casts it to the compute dtype,
  and keeps a 1-byte mask, so c = 4 + 1 in float32 and 4 + p + 1 under
  mixed precision; with dropout, the softmax in the compute dtype, the
  dropped probabilities and a 1-byte keep mask, c = 2p + 1. The
  embeddings add (8 + d) s b h (their layer norm and dropout mask); under
  mixed precision, the kernels of the layers and of the pooler, cast to
  the compute dtype, are kept as well: 2 (L (4h^2 + 2hi) + h^2).
  These counts were read from the traced training graph: the forward
  tensors that its gradient operations consume. `tests/test_estimate.py`
  checks the formula against that graph on tiny backbones. The breakdown
  follows Korthikanti et al., 2022, "Reducing Activation Recomputation in
  Large Transformer Models", section 4.1, which gives 34 s b h + 5 a s^2 b
  per layer for p = 2 and i = 4h; Keras' float32 layer norms and softmax
  and its unfused GELU keep more.
- with gradient checkpointing, each layer keeps only its input (p s b h),
  and one layer's activations exist at a time during its recomputation.
- backward pass of one layer: the float32 gradient of the attention
  probabilities (4 a s^2 b) and the gradient of the GELU output
  (p s b i) exist on top of what is stored.
- update: after the last micro-batch, the normalized and then the clipped
  float32 gradients (8 T) exist at once, with AdamW's temporaries: twice
  the largest trainable variable (the word embeddings, vocabulary x h, in
  full fine-tuning), where 1.2 and 1.5 times it were measured on two model
  sizes. The step's peak is the larger of activations plus the backward
  pass of one layer, and the update.
- runtime overhead, fitted to measurements rather than derived: the
  process's peak resident memory minus TensorFlow's peak allocated bytes,
  over 42 runs of 2-, 4-, 6- and 12-layer models, fits 0.04 GiB per
  transformer layer plus 9% of the tensor memory (least squares; single
  runs scatter from 0.07 to 1.25 GiB). The per-layer part appears in the
  first step only and grows with the layers. It is most likely the
  traced, optimized and instantiated graphs of the step, and the rest is
  allocator slack. `benchmarks/memory_estimate.py` compares the whole
  estimate with measured peaks (results in `benchmarks/RESULTS.md`). On a
  GPU the graphs live in host memory, so only the 9% applies.
  NOTE: the GPU's overhead is an assumption, not measured (no GPU here).
- framework, on the CPU only: TensorFlow, Keras and keras-hub hold about
  0.8 GiB of process memory once imported (measured with TensorFlow 2.21).

LoRA changes T (adapters and head) but not the activations.

`MemoryEstimate.total` is framework + weights + gradients + optimizer state
+ step peak + runtime overhead. `MemoryEstimate.training` leaves out the
framework and the weights, which a process has before its first step; it
is what `tfft.train` logs and what `benchmarks/memory_estimate.py`
compares with the measured peak above the loaded model.
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
        h = self.hidden
        embeddings = (self.vocabulary_size + self.max_positions + self.segments) * h + 2 * h
        pooler = h * h + h
        head = h * num_labels + num_labels
        return embeddings + self.layers * self.layer_parameters() + pooler + head

    def layer_parameters(self) -> int:
        """Returns the parameter count of one transformer layer."""
        h, i = self.hidden, self.intermediate
        attention = 4 * (h * h + h)
        feed_forward = h * i + i + i * h + h
        norms = 2 * 2 * h
        return attention + feed_forward + norms

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


GRAPH_BYTES_PER_LAYER = int(0.04 * GIB)
ALLOCATOR_SLACK = 0.09
FRAMEWORK_BYTES = int(0.8 * GIB)


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
    update: int
    graph_overhead: int
    framework: int

    @property
    def step_peak(self) -> int:
        """Bytes of the step's peak: stored activations and one layer's backward pass, or the update."""
        return max(self.activations + self.backward_workspace, self.update)

    @property
    def tensors(self) -> int:
        """Bytes of tensors that training adds to a loaded model, at the step's peak."""
        return self.gradients + self.optimizer_state + self.step_peak

    @property
    def runtime_overhead(self) -> int:
        """Bytes the process holds beyond its tensors: the step's graphs and allocator slack."""
        return self.graph_overhead + int(ALLOCATOR_SLACK * self.tensors)

    @property
    def training(self) -> int:
        """Bytes that training adds to a loaded model: the tensors and the runtime overhead."""
        return self.tensors + self.runtime_overhead

    @property
    def total(self) -> int:
        """Bytes of the whole run: framework, weights and training."""
        return self.framework + self.weights + self.training


def _score_bytes(p: int, dropout: bool) -> int:
    """Bytes per attention-probability element kept for the backward pass."""
    if dropout:
        return 2 * p + 1
    return 4 + (p if p < 4 else 0) + 1


def layer_activations(shape: ModelShape, micro_batch_size: int, length: int, precision: str, dropout: float) -> int:
    """Returns the bytes of activations one transformer layer keeps for the backward pass.

    Weight casts under mixed precision are not included; see `estimate_memory`.
    """
    p = PRECISION_BYTES[precision]
    d = 1 if dropout > 0 else 0
    sbh = length * micro_batch_size * shape.hidden
    sbi = length * micro_batch_size * shape.intermediate
    scores = shape.heads * length * length * micro_batch_size
    return (16 + 6 * p + 2 * d) * sbh + 5 * p * sbi + _score_bytes(p, d == 1) * scores


def estimate_memory(
    shape: ModelShape,
    micro_batch_size: int,
    length: int,
    precision: str = "float32",
    num_labels: int = 2,
    gradient_checkpointing: bool = False,
    lora_rank: int | None = None,
    dropout: float | None = None,
    device: str = "cpu",
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
        device: `"cpu"` to estimate the process's memory, `"gpu"` for the
            GPU's memory, which holds no graphs. Defaults to `"cpu"`.
    """
    if device not in ("cpu", "gpu"):
        raise ValueError(f'device must be "cpu" or "gpu", received {device!r}.')
    rate = shape.dropout if dropout is None else dropout
    d = 1 if rate > 0 else 0
    parameters = shape.parameters(num_labels)
    trainable = parameters if lora_rank is None else shape.lora_parameters(lora_rank, num_labels)
    per_layer = layer_activations(shape, micro_batch_size, length, precision, rate)
    p = PRECISION_BYTES[precision]
    sbh = length * micro_batch_size * shape.hidden
    sbi = length * micro_batch_size * shape.intermediate
    scores = shape.heads * length * length * micro_batch_size
    embeddings = (8 + d) * sbh
    h, i = shape.hidden, shape.intermediate
    kernels = shape.layers * (4 * h * h + 2 * h * i) + h * h  # transformer layers and pooler
    weight_casts = 2 * kernels if p < 4 else 0
    if gradient_checkpointing:
        activations = shape.layers * p * sbh + per_layer + embeddings + weight_casts
    else:
        activations = shape.layers * per_layer + embeddings + weight_casts
    workspace = 4 * scores + p * sbi
    # LoRA freezes the embeddings; its largest trainable variable is an adapter or the head.
    largest = shape.vocabulary_size * h if lora_rank is None else max(h * shape.heads * lora_rank, h * num_labels)
    update = 8 * trainable + 2 * 4 * largest
    return MemoryEstimate(
        parameters=parameters,
        trainable_parameters=trainable,
        weights=4 * parameters,
        gradients=4 * trainable,
        optimizer_state=8 * trainable,
        activations_per_layer=per_layer,
        activations=activations,
        backward_workspace=workspace,
        update=update,
        graph_overhead=GRAPH_BYTES_PER_LAYER * shape.layers if device == "cpu" else 0,
        framework=FRAMEWORK_BYTES if device == "cpu" else 0,
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


def gpu_memory() -> int | None:
    """Returns the first visible GPU's memory in bytes, or `None` when `nvidia-smi` shows none."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        output = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    try:
        return int(output[0]) * 2**20 if output else None
    except ValueError:
        return None


def available_memory() -> int:
    """Returns this machine's available memory in bytes, from /proc/meminfo."""
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("Cannot read MemAvailable from /proc/meminfo; pass --memory.")


def main(argv: list[str] | None = None) -> int:
    """Prints the estimate of one configuration.

    Returns:
        0 when the configuration fits the budget, 1 when it does not, and
        2 for invalid options.
    """
    from tfft.config import TrainConfig, validate_options
    from tfft.models import bundled_model_dir, check_max_length, check_model_folder

    parser = argparse.ArgumentParser(
        prog="python -m tfft.estimate",
        description="Estimate the memory of fine-tuning, before the run. Exits with 0 when the "
        "configuration fits the budget, 1 when it does not, 2 for invalid options.",
    )
    parser.add_argument("--model", help="Model folder, as for tfft.train. Defaults to the bundled MiniLM.")
    parser.add_argument("--max-length", type=int, default=128, help="Tokens per sequence. Defaults to 128.")
    parser.add_argument("--batch-size", type=int, default=32, help="Effective batch. Defaults to 32.")
    parser.add_argument("--micro-batch-size", type=int, help="Sequences per pass. Defaults to --batch-size.")
    parser.add_argument("--precision", choices=sorted(PRECISION_BYTES), default="float32", help="Defaults to float32.")
    parser.add_argument("--num-labels", type=int, default=2, help="Classes. Defaults to 2.")
    parser.add_argument("--dropout", type=float, help="Dropout rate. Defaults to the model's.")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="Estimate with gradient checkpointing (needs --dropout 0).")
    parser.add_argument("--lora-rank", type=int, help="Estimate LoRA of this rank.")
    parser.add_argument("--memory", type=float, help="Budget in GiB. Defaults to the GPU's memory, or this machine's available memory.")
    parser.add_argument("--device", choices=("cpu", "gpu"), help="Where the run trains. Defaults to gpu when nvidia-smi shows one, else cpu.")
    args = parser.parse_args(argv)

    # The options shared with tfft.train get the same checks, so the estimate
    # does not describe a run that tfft.train rejects.
    shared = TrainConfig(
        max_length=args.max_length, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
        precision=args.precision, num_labels=args.num_labels, dropout=args.dropout,
        gradient_checkpointing=args.gradient_checkpointing, lora_rank=args.lora_rank,
    )
    problems = validate_options(shared)
    folder = Path(args.model) if args.model else bundled_model_dir()
    model_problems = check_model_folder(folder)
    problems += model_problems
    shape = None
    if not model_problems:
        problems += check_max_length(folder, args.max_length)
        try:
            shape = model_shape(folder)
        except ValueError as error:
            problems.append(f"--model: {error}")
    if args.memory is not None and not (args.memory > 0 and math.isfinite(args.memory)):
        problems.append(f"--memory: must be a positive number of GiB, received {args.memory:g}.")
    gpu = gpu_memory()
    device = args.device or ("gpu" if gpu else "cpu")
    if device == "gpu" and gpu is None and args.memory is None:
        problems.append("--device gpu: nvidia-smi shows no GPU here, so its memory is unknown; pass --memory GiB.")
    if problems:
        print("Cannot estimate:\n" + "\n".join(f"  - {p}" for p in problems), file=sys.stderr)
        return 2

    micro = args.micro_batch_size or args.batch_size
    options = dict(
        shape=shape, length=args.max_length, precision=args.precision, num_labels=args.num_labels,
        gradient_checkpointing=args.gradient_checkpointing, lora_rank=args.lora_rank, dropout=args.dropout,
        device=device,
    )
    estimate = estimate_memory(micro_batch_size=micro, **options)
    if args.memory is not None:
        budget, source = int(args.memory * GIB), f"--memory {args.memory:g} GiB"
    elif device == "gpu":
        budget, source = gpu, "the GPU's memory"
    else:
        budget, source = available_memory(), "this machine's available memory"

    print(f"Model: {folder} ({estimate.parameters:,} parameters, {estimate.trainable_parameters:,} trainable)")
    print(f"Micro-batch {micro} x {args.max_length} tokens, {args.precision}"
          + (", gradient checkpointing" if args.gradient_checkpointing else "")
          + (f", LoRA rank {args.lora_rank}" if args.lora_rank else "") + f", on the {device.upper()}")
    backward_peak = estimate.activations + estimate.backward_workspace
    if args.gradient_checkpointing:
        stored = f"layer inputs + 1 recomputed layer of {estimate.activations_per_layer / GIB:.3f} GiB"
    else:
        stored = f"{shape.layers} layers of {estimate.activations_per_layer / GIB:.3f} GiB"
    peak_source = "activations + backward pass" if backward_peak >= estimate.update else "update"
    rows = [
        ("weights", estimate.weights),
        ("gradients (running sum)", estimate.gradients),
        ("optimizer state (AdamW)", estimate.optimizer_state),
        (f"step peak: larger of (a) and (b), here {peak_source}", estimate.step_peak),
        (f"  (a) activations ({stored})", estimate.activations),
        ("      + backward pass of one layer", estimate.backward_workspace),
        ("  (b) update (normalized and clipped gradients)", estimate.update),
        ("runtime overhead (" + ("graphs and allocator" if device == "cpu" else "allocator") + ")",
         estimate.runtime_overhead),
    ]
    if device == "cpu":
        rows.append(("framework (TensorFlow, Keras, keras-hub)", estimate.framework))
    for name, value in rows:
        print(f"  {name:<66}{value / GIB:>9.3f} GiB")
    print(f"  {'total (the rows without an indent)':<66}{estimate.total / GIB:>9.3f} GiB")
    print(f"  {'of which training adds to the loaded model (tfft.train logs it)':<66}"
          f"{estimate.training / GIB:>9.3f} GiB")

    fitting = largest_micro_batch(budget, args.batch_size, **options)
    print(f"Budget: {budget / GIB:.1f} GiB ({source}). Largest micro-batch that fits: "
          f"{fitting if fitting else 'none, even 1 does not fit'}"
          + (" (the whole batch)" if fitting == args.batch_size else "") + ".")
    if estimate.total <= budget:
        return 0
    if fitting:
        print(f"This configuration does not fit: pass --micro-batch-size {fitting}, or lower "
              "--max-length, or use mixed precision, gradient checkpointing or LoRA.")
    else:
        fixed = estimate_memory(micro_batch_size=1, **{**options, "length": 8})
        print(f"Even a micro-batch of 1 does not fit. The parts that no batch option lowers "
              f"(framework, weights, gradients, optimizer state, runtime) take about "
              f"{fixed.total / GIB:.2f} GiB. Raise --memory"
              + ("." if args.lora_rank else ", or use LoRA (--lora-rank) to shrink the gradients and optimizer state."))
    return 1

if __name__ == "__main__":
    sys.exit(main())
