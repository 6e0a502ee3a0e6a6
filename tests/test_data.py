"""Reading files, tokenizing with the model's preprocessor, and padding per batch."""

import keras_hub
import numpy as np
import pytest

from tfft.data.pipeline import encode_examples, make_dataset
from tfft.data.sources import DataSpec, TextExamples, read_examples


def tiny_preprocessor(tiny_preset, sequence_length):
    preprocessor = keras_hub.models.TextClassifierPreprocessor.from_preset(str(tiny_preset))
    preprocessor.sequence_length = sequence_length
    return preprocessor


def test_tsv_is_read_without_quoting(tmp_path):
    # A quote in a GLUE sentence is ordinary text, not the start of a quoted field.
    path = tmp_path / "dev.tsv"
    path.write_text('\ufeffQuality\t#1 String\t#2 String\n1\t"Yes, he said\tHe agreed\n', encoding="utf-8")
    examples, problems = read_examples(DataSpec(path, "--eval-data", ["#1 String", "#2 String"], "Quality"))
    assert problems == []
    assert examples.texts == [['"Yes, he said'], ["He agreed"]]
    assert examples.labels == [1]


def test_jsonl_and_default_columns(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "good", "label": 1}\n\n{"text": "bad", "label": 0}\n', encoding="utf-8")
    examples, problems = read_examples(DataSpec(path, "--train-data", None, None))
    assert problems == []
    assert examples.texts == [["good", "bad"]]
    assert examples.labels == [1, 0]


def test_csv_row_with_extra_field_is_reported(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("text,label\ngood, really good,1\n", encoding="utf-8")
    examples, problems = read_examples(DataSpec(path, "--train-data", None, None))
    assert examples is None
    assert "line 2 has more fields than the header (an unquoted comma in a text?)" in problems[0]


def test_encode_counts_truncated_examples(tiny_preset):
    preprocessor = tiny_preprocessor(tiny_preset, sequence_length=8)
    # Word counts 2, 6 and 7: with [CLS] and [SEP] the lengths are 4, 8 and 9,
    # so only the last exceeds 8 tokens.
    texts = ["good movie", "the food was very very good", "the food was not very very good"]
    examples = TextExamples([texts], [1, 1, 0], "test", ["text"], "label")
    encoded = encode_examples(preprocessor, examples)
    assert encoded.truncated == 1
    assert encoded.features["token_ids"].shape == (3, 8)
    np.testing.assert_array_equal(encoded.features["padding_mask"].sum(axis=1), [4, 8, 8])


def test_pair_truncation_counts_both_segments(tiny_preset):
    preprocessor = tiny_preprocessor(tiny_preset, sequence_length=8)
    # 3 + 3 words and 3 special tokens ([CLS] a [SEP] b [SEP]) make 9 > 8.
    examples = TextExamples([["good food fast"], ["bad room slow"]], [0], "test", ["a", "b"], "label")
    encoded = encode_examples(preprocessor, examples)
    assert encoded.truncated == 1
    # Round-robin trimming keeps tokens a1 b1 a2 b2 a3 of the 5 that fit:
    # [CLS] a1 a2 a3 [SEP] b1 b2 [SEP].
    np.testing.assert_array_equal(encoded.features["segment_ids"][0], [0, 0, 0, 0, 0, 1, 1, 1])


def test_batches_padded_to_their_own_longest(tiny_preset):
    preprocessor = tiny_preprocessor(tiny_preset, sequence_length=32)
    short = "good"  # 3 tokens with [CLS] and [SEP]
    longer = " ".join(["very"] * 9) + " good"  # 12 tokens
    examples = TextExamples([[short, short, longer, short]], [1, 1, 1, 0], "test", ["text"], "label")
    encoded = encode_examples(preprocessor, examples)
    widths = [features["token_ids"].shape[1] for features, _ in make_dataset(encoded, 2, shuffle=False, seed=0)]
    # Longest of batch 1 is 3 tokens -> padded to 8; of batch 2, 12 -> 16.
    assert widths == [8, 16]


def test_training_data_reshuffled_each_epoch(tiny_preset):
    preprocessor = tiny_preprocessor(tiny_preset, sequence_length=8)
    examples = TextExamples([["good"] * 32], list(range(32)), "test", ["text"], "label")
    dataset = make_dataset(encode_examples(preprocessor, examples), 32, shuffle=True, seed=1)
    first = np.concatenate([labels.numpy() for _, labels in dataset])
    second = np.concatenate([labels.numpy() for _, labels in dataset])
    assert sorted(first) == list(range(32))
    assert not np.array_equal(first, second)
