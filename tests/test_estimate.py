"""The memory estimate: exact parameter terms, and activations against the traced training graph."""

import keras
import keras_hub
import pytest
import tensorflow as tf

from tfft import estimate
from tfft.models import enable_lora


@pytest.fixture(scope="module")
def tiny_shape(tiny_preset):
    return estimate.model_shape(tiny_preset)


def test_parameter_terms_equal_exact_counts(tiny_preset, tiny_shape):
    classifier = keras_hub.models.TextClassifier.from_preset(str(tiny_preset), num_classes=3)
    result = estimate.estimate_memory(tiny_shape, 4, 16, num_labels=3)
    assert result.parameters == classifier.count_params()
    assert result.weights == 4 * classifier.count_params()
    # The float32 running sum of the gradients; two AdamW moments; the
    # normalized and the clipped gradients at the update.
    assert result.gradients == 4 * classifier.count_params()
    assert result.optimizer_state == 8 * classifier.count_params()
    # AdamW's temporaries: twice the largest variable, the word embeddings.
    assert result.update == 8 * classifier.count_params() + 2 * 4 * tiny_shape.vocabulary_size * tiny_shape.hidden


def test_lora_trainable_count(tiny_preset, tiny_shape):
    classifier = keras_hub.models.TextClassifier.from_preset(str(tiny_preset), num_classes=2)
    enable_lora(classifier, rank=3)
    trainable = sum(int(v.numpy().size) for v in classifier.trainable_variables)
    result = estimate.estimate_memory(tiny_shape, 4, 16, lora_rank=3)
    assert result.trainable_parameters == trainable
    assert result.optimizer_state == 8 * trainable


def test_activations_linear_in_batch(tiny_shape):
    one = estimate.estimate_memory(tiny_shape, 3, 16).activations
    assert estimate.estimate_memory(tiny_shape, 6, 16).activations == 2 * one
    assert estimate.estimate_memory(tiny_shape, 12, 16).activations == 4 * one


def test_activations_in_sequence_length_as_documented(tiny_shape):
    # A linear term in s and, per layer, the attention term c a s^2 b with
    # c = 2p + 1 when dropout is on (the tiny model's dropout is 0.1):
    # doubling s doubles the linear part and quadruples the quadratic one.
    layers, heads, b, p = tiny_shape.layers, tiny_shape.heads, 2, 4
    s = 16
    single = estimate.estimate_memory(tiny_shape, b, s).activations
    double = estimate.estimate_memory(tiny_shape, b, 2 * s).activations
    quadratic = layers * (2 * p + 1) * heads * s * s * b
    assert double - 2 * single == 2 * quadratic


def test_checkpointing_keeps_layer_inputs_and_one_layer():
    shape = estimate.ModelShape(30522, 384, 6, 12, 1536, 512, 2, 0.0)
    plain = estimate.estimate_memory(shape, 32, 512, gradient_checkpointing=False)
    checkpointed = estimate.estimate_memory(shape, 32, 512, gradient_checkpointing=True)
    sbh = 512 * 32 * 384
    embeddings = 8 * sbh  # the embeddings' layer norm keeps two float32 tensors
    assert checkpointed.activations == 6 * 4 * sbh + plain.activations_per_layer + embeddings
    assert plain.activations == 6 * plain.activations_per_layer + embeddings


VIEWS = {"Reshape", "ExpandDims", "Squeeze", "Identity"}
NOT_ACTIVATIONS = {"ReadVariableOp", "Const", "Placeholder", "Shape"}


def traced_saved_bytes(model, inputs, labels, smallest: int) -> int:
    """Returns the bytes of forward tensors that the gradient ops of one training pass read.

    Forward ops are the ancestors of the loss; any other op that reads one of
    their tensors belongs to the backward pass. A view (reshape and the like)
    counts as the tensor it views, and each tensor counts once. Tensors with
    fewer than `smallest` elements (layer-norm statistics, the pooled
    output) are left out, as the formula leaves them out.
    """
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step(inputs, labels):
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, model(inputs, training=True))
        return loss, tape.gradient(loss, model.trainable_variables)

    graph = step.get_concrete_function(inputs, labels).graph
    loss_op = graph.outputs[0].op
    forward, pending = set(), [loss_op]
    while pending:
        op = pending.pop()
        if op.name not in forward:
            forward.add(op.name)
            pending.extend(t.op for t in op.inputs)
    saved = {}
    for op in graph.get_operations():
        if op.name in forward:
            continue
        for tensor in op.inputs:
            if tensor.op.name not in forward:
                continue
            while tensor.op.type in VIEWS:
                tensor = tensor.op.inputs[0]
            if tensor.op.type in NOT_ACTIVATIONS or tensor.shape.num_elements() < smallest:
                continue
            saved[tensor.name] = tensor.shape.num_elements() * tensor.dtype.size
    return sum(saved.values())


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16", "mixed_float16"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_activations_match_traced_graph(precision, dropout):
    # Sizes chosen so that every modelled tensor has at least 2 s b elements
    # and every left-out one fewer: b = 3, s = 20, h = 16, 2 heads, i = 40.
    b, s = 3, 20
    shape = estimate.ModelShape(50, 16, 2, 2, 40, 32, 2, dropout)
    keras.mixed_precision.set_global_policy(precision)
    try:
        backbone = keras_hub.models.BertBackbone(
            vocabulary_size=shape.vocabulary_size, num_layers=shape.layers, num_heads=shape.heads,
            hidden_dim=shape.hidden, intermediate_dim=shape.intermediate,
            max_sequence_length=shape.max_positions, dropout=dropout,
        )
        model = keras_hub.models.BertTextClassifier(backbone, num_classes=2, preprocessor=None, dropout=dropout)
        inputs = {
            "token_ids": tf.ones((b, s), tf.int32),
            "segment_ids": tf.zeros((b, s), tf.int32),
            "padding_mask": tf.ones((b, s), tf.bool),
        }
        traced = traced_saved_bytes(model, inputs, tf.zeros((b,), tf.int32), smallest=2 * s * b)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert estimate.estimate_memory(shape, b, s, precision).activations == traced


def test_command_prints_table_and_fit(tiny_preset, capsys):
    assert estimate.main(["--model", str(tiny_preset), "--max-length", "16", "--memory", "2"]) == 0
    printed = capsys.readouterr().out
    assert "optimizer state (AdamW)" in printed
    assert "Largest micro-batch that fits: 32 (the whole batch)." in printed


def test_command_rejects_bad_folder(tmp_path, capsys):
    assert estimate.main(["--model", str(tmp_path)]) == 2
    assert "is not a model checkpoint" in capsys.readouterr().err


def test_largest_micro_batch_against_a_budget():
    shape = estimate.ModelShape(30522, 384, 6, 12, 1536, 512, 2, 0.1)
    options = dict(shape=shape, length=128)
    budget = estimate.estimate_memory(micro_batch_size=10, **options).total
    assert estimate.largest_micro_batch(budget, 64, **options) == 10
    assert estimate.largest_micro_batch(budget - 1, 64, **options) == 9


def test_backward_workspace_and_step_peak():
    shape = estimate.ModelShape(100, 8, 2, 2, 16, 64, 2, 0.0)
    result = estimate.estimate_memory(shape, 4, 32)
    # 4 a s^2 b + p s b i with p = 4, a = 2, s = 32, b = 4, i = 16.
    assert result.backward_workspace == 4 * 2 * 32 * 32 * 4 + 4 * 32 * 4 * 16
    assert result.step_peak == result.activations + result.backward_workspace
    # One sequence of 4 tokens: the update's gradients outweigh the activations.
    small = estimate.estimate_memory(shape, 1, 4)
    assert small.step_peak == small.update == 8 * small.trainable_parameters + 2 * 4 * 100 * 8
    tensors = result.gradients + result.optimizer_state + result.step_peak
    assert result.tensors == tensors
    assert result.runtime_overhead == 2 * estimate.GRAPH_BYTES_PER_LAYER + int(0.09 * tensors)
    assert result.total == estimate.FRAMEWORK_BYTES + result.weights + tensors + result.runtime_overhead
    on_gpu = estimate.estimate_memory(shape, 4, 32, device="gpu")
    assert on_gpu.runtime_overhead == int(0.09 * tensors)
    assert on_gpu.total == on_gpu.weights + tensors + on_gpu.runtime_overhead


def test_command_gpu_without_gpu(tiny_preset, monkeypatch, capsys):
    monkeypatch.setattr(estimate, "gpu_memory", lambda: None)
    assert estimate.main(["--model", str(tiny_preset), "--device", "gpu"]) == 2
    assert "--device gpu: nvidia-smi shows no GPU" in capsys.readouterr().err


def test_command_defaults_to_visible_gpu(tiny_preset, monkeypatch, capsys):
    monkeypatch.setattr(estimate, "gpu_memory", lambda: 16 * estimate.GIB)
    assert estimate.main(["--model", str(tiny_preset), "--max-length", "16"]) == 0
    printed = capsys.readouterr().out
    assert "on the GPU" in printed
    assert "Budget: 16.0 GiB (the GPU's memory)" in printed
    assert "framework" not in printed


def test_command_suggests_micro_batch_that_fits(tiny_preset, capsys):
    shape = estimate.model_shape(tiny_preset)
    budget = estimate.estimate_memory(shape, 10, 16).total
    memory = f"{budget / estimate.GIB:.12f}"
    status = estimate.main(["--model", str(tiny_preset), "--max-length", "16", "--memory", memory])
    printed = capsys.readouterr().out
    assert status == 1
    assert "Largest micro-batch that fits: 10." in printed
    assert "pass --micro-batch-size 10" in printed


def test_command_nothing_fits(tiny_preset, capsys):
    status = estimate.main(["--model", str(tiny_preset), "--max-length", "16", "--memory", "0.5", "--lora-rank", "2"])
    printed = capsys.readouterr().out
    assert status == 1
    assert "Even a micro-batch of 1 does not fit" in printed
    assert "use LoRA" not in printed  # LoRA is already on


@pytest.mark.parametrize(
    "options, message",
    [
        (["--gradient-checkpointing"], "--gradient-checkpointing: needs --dropout 0"),
        (["--micro-batch-size", "64"], "--micro-batch-size: must not exceed --batch-size (32), received 64"),
        (["--max-length", "128"], "has 64 positions, received 128. Pass --max-length 64 or less."),
        (["--max-length", "4"], "--max-length: must be between 8 and 8192 tokens, received 4."),
        (["--memory", "inf"], "--memory: must be a positive number of GiB, received inf."),
        (["--dropout", "2"], "--dropout: must be in [0, 1), received 2.0."),
    ],
)
def test_command_rejects_what_train_rejects(tiny_preset, capsys, options, message):
    assert estimate.main(["--model", str(tiny_preset), *options]) == 2
    assert message in capsys.readouterr().err
