"""The memory estimate: exact parameter terms, and activations as the documented formula."""

import keras
import keras_hub
import pytest

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
    # float32 running sum and one micro-batch's gradients; two AdamW moments.
    assert result.gradients == 8 * classifier.count_params()
    assert result.optimizer_state == 8 * classifier.count_params()


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
    # A linear term in s and the attention term a s^2 b (2p + 1) per layer:
    # doubling s doubles the linear part and quadruples the quadratic one.
    layers, heads, b, p = tiny_shape.layers, tiny_shape.heads, 2, 4
    s = 16
    single = estimate.estimate_memory(tiny_shape, b, s).activations
    double = estimate.estimate_memory(tiny_shape, b, 2 * s).activations
    quadratic = layers * (2 * p + 1) * heads * s * s * b  # the model's dropout is 0.1: masks count
    assert double - 2 * single == 2 * quadratic


def test_checkpointing_keeps_layer_inputs_and_one_layer():
    shape = estimate.ModelShape(30522, 384, 6, 12, 1536, 512, 2, 0.0)
    plain = estimate.estimate_memory(shape, 32, 512, gradient_checkpointing=False)
    checkpointed = estimate.estimate_memory(shape, 32, 512, gradient_checkpointing=True)
    sbh = 512 * 32 * 384
    embeddings = 2 * 4 * sbh
    assert checkpointed.activations == 6 * 4 * sbh + plain.activations_per_layer + embeddings
    assert plain.activations == 6 * plain.activations_per_layer + embeddings


def test_precision_halves_activation_bytes_without_dropout():
    shape = estimate.ModelShape(100, 8, 2, 2, 16, 64, 2, 0.0)
    float32 = estimate.estimate_memory(shape, 4, 32, "float32")
    bfloat16 = estimate.estimate_memory(shape, 4, 32, "mixed_bfloat16")
    assert bfloat16.activations * 2 == float32.activations
    assert bfloat16.weights == float32.weights  # variables stay float32


def test_command_prints_table_and_fit(tiny_preset, capsys):
    assert estimate.main(["--model", str(tiny_preset), "--max-length", "16", "--memory", "1"]) == 0
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


def test_backward_workspace_term():
    shape = estimate.ModelShape(100, 8, 2, 2, 16, 64, 2, 0.0)
    result = estimate.estimate_memory(shape, 4, 32)
    # 2p a s^2 b + 2p s b i with p = 4, a = 2, s = 32, b = 4, i = 16.
    assert result.backward_workspace == 2 * 4 * 2 * 32 * 32 * 4 + 2 * 4 * 32 * 4 * 16
    assert result.total == result.weights + result.gradients + result.optimizer_state + result.activations + result.backward_workspace
