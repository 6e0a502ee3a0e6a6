"""Tokenizing examples once, and batching them padded to each batch's longest input."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import tensorflow as tf

from tfft.data.sources import TextExamples

__all__ = ["EncodedExamples", "encode_examples", "make_augmented_dataset", "make_dataset"]

logger = logging.getLogger(__name__)

# Batches are padded to a multiple of this many tokens: a handful of distinct
# shapes keeps retracing (and XLA recompilation) rare, for little padding.
PAD_MULTIPLE = 8

_ENCODE_CHUNK = 2048


@dataclasses.dataclass
class EncodedExamples:
    """Packed model inputs of `max_length`, with labels and truncation counts."""

    features: dict[str, np.ndarray]
    labels: np.ndarray
    truncated: int

    def __len__(self) -> int:
        return len(self.labels)


def _text_inputs(texts: list[list[str]], start: int, stop: int) -> tuple[tf.Tensor, ...]:
    return tuple(tf.constant(column[start:stop]) for column in texts)


def encode_examples(preprocessor, examples: TextExamples) -> EncodedExamples:
    """Tokenizes and packs every example with the model's own preprocessor.

    Also counts the examples whose full tokenized length (special tokens
    included) exceeds the preprocessor's `sequence_length` and were truncated.
    """
    special_tokens = _count_special_tokens(preprocessor, len(examples.texts))
    chunks: dict[str, list[np.ndarray]] = {}
    truncated = 0
    for start in range(0, len(examples), _ENCODE_CHUNK):
        stop = min(start + _ENCODE_CHUNK, len(examples))
        inputs = _text_inputs(examples.texts, start, stop)
        packed = preprocessor(x=inputs)
        for name, value in packed.items():
            chunks.setdefault(name, []).append(np.asarray(value))
        lengths = sum(_token_counts(preprocessor.tokenizer, column) for column in inputs)
        truncated += int(np.sum(lengths + special_tokens > preprocessor.sequence_length))
    features = {name: np.concatenate(parts) for name, parts in chunks.items()}
    labels = np.asarray(examples.labels, dtype=np.int32)
    return EncodedExamples(features, labels, truncated)


def _token_counts(tokenizer, texts: tf.Tensor) -> np.ndarray:
    """Returns the number of tokens of each text, before packing and truncation."""
    tokens = tokenizer(texts)
    if isinstance(tokens, tf.RaggedTensor):
        return tokens.row_lengths().numpy()
    # keras-hub returns ragged results as nested lists when run eagerly.
    return np.array([len(ids) for ids in tokens], dtype=np.int64)


def _count_special_tokens(preprocessor, segments: int) -> int:
    """Returns how many special tokens packing adds ([CLS] and [SEP]s for BERT)."""
    inputs = tuple(tf.constant(["a"]) for _ in range(segments))
    packed = preprocessor(x=inputs)
    used = int(np.sum(np.asarray(packed["padding_mask"])))
    content = sum(int(_token_counts(preprocessor.tokenizer, column)[0]) for column in inputs)
    return used - content


def _trim_to_longest(features: dict[str, tf.Tensor], labels: tf.Tensor):
    """Cuts a batch's padding to its longest input, rounded up to PAD_MULTIPLE."""
    lengths = tf.reduce_sum(tf.cast(features["padding_mask"], tf.int32), axis=1)
    longest = tf.reduce_max(lengths)
    full = tf.shape(features["padding_mask"])[1]
    width = tf.minimum(full, (longest + PAD_MULTIPLE - 1) // PAD_MULTIPLE * PAD_MULTIPLE)
    trimmed = {name: value[:, :width] for name, value in features.items()}
    return trimmed, labels


def make_dataset(
    encoded: EncodedExamples,
    batch_size: int,
    shuffle: bool,
    seed: int,
) -> tf.data.Dataset:
    """Batches encoded examples; training data is reshuffled every epoch.

    The last batch of an epoch keeps its remaining examples (it may be
    smaller): the training step normalizes each update by its own count.
    """
    dataset = tf.data.Dataset.from_tensor_slices((encoded.features, encoded.labels))
    if shuffle:
        dataset = dataset.shuffle(len(encoded), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size)
    dataset = dataset.map(_trim_to_longest, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)


def make_augmented_dataset(
    examples: TextExamples,
    preprocessor,
    augmenter,
    batch_size: int,
    seed: int,
) -> tf.data.Dataset:
    """Batches training texts augmented afresh each epoch, then tokenized.

    Unlike `make_dataset`, tokenization runs inside the pipeline, after
    augmentation. Each text column draws its own randomness.
    """
    texts = tuple(tf.constant(column) for column in examples.texts)
    labels = np.asarray(examples.labels, dtype=np.int32)
    dataset = tf.data.Dataset.from_tensor_slices((texts, labels))
    dataset = dataset.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
    randomness = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    dataset = tf.data.Dataset.zip((dataset, randomness))

    def augment(pair, draw):
        columns, label = pair
        augmented = tuple(augmenter(text, draw + index) for index, text in enumerate(columns))
        return augmented, label

    # Sequential on purpose: the augmenter counts examples in a variable.
    dataset = dataset.map(augment)
    dataset = dataset.batch(batch_size)
    dataset = dataset.map(
        lambda columns, label: (preprocessor(x=columns), label),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    dataset = dataset.map(_trim_to_longest, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)
