"""Offline text augmentation inside `tf.data`: word deletion, swap, insertion and synonyms.

The operations follow EDA (Wei and Zou, 2019, "EDA: Easy Data Augmentation
Techniques for Boosting Performance on Text Classification Tasks"). Synonyms
come from the model's own token embeddings instead of WordNet, so nothing is
downloaded. A word's synonym is the whole-word vocabulary token whose input
embedding is nearest by cosine similarity.

Each training example is augmented with probability `probability`, by one
operation drawn from those configured, changing about a tenth of its words
(at least one). Randomness is stateless and seeded from `tf.data.Dataset.random`,
which draws a new sequence each epoch. Runs with the same seed augment the
same way, and every epoch gets new variants. Evaluation data is never
augmented.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import tensorflow as tf

__all__ = ["OPERATIONS", "TextAugmenter", "embedding_synonyms"]

logger = logging.getLogger(__name__)

OPERATIONS = ("delete", "swap", "insert", "synonym")

# Share of a text's words one operation changes; at least one word.
CHANGE_FRACTION = 0.1


def embedding_synonyms(
    vocabulary: list[str],
    embeddings: np.ndarray,
    words: set[str],
    min_similarity: float = 0.5,
) -> dict[str, str]:
    """Maps each word to its nearest whole-word token in embedding space.

    Args:
        vocabulary: Tokens of the model, in embedding-row order.
        embeddings: The token embedding matrix, one row per token.
        words: The words that need a synonym (those of the training texts).
        min_similarity: Smallest cosine similarity accepted. Defaults to `0.5`.

    Returns:
        Word to synonym, for the words in the vocabulary that have one.
    """
    whole_words = [
        index for index, token in enumerate(vocabulary) if re.fullmatch(r"[a-z]{3,}", token)
    ]
    if not whole_words:
        return {}
    table = embeddings[whole_words].astype(np.float32)
    table /= np.linalg.norm(table, axis=1, keepdims=True) + 1e-12
    position = {vocabulary[index]: row for row, index in enumerate(whole_words)}
    wanted = sorted(word for word in words if word in position)
    synonyms = {}
    for start in range(0, len(wanted), 1024):
        chunk = wanted[start : start + 1024]
        rows = np.array([position[word] for word in chunk])
        similarity = table[rows] @ table.T
        similarity[np.arange(len(chunk)), rows] = -np.inf
        best = similarity.argmax(axis=1)
        for word, row, column in zip(chunk, range(len(chunk)), best):
            if similarity[row, column] >= min_similarity:
                synonyms[word] = vocabulary[whole_words[column]]
    return synonyms


class TextAugmenter:
    """Augments single texts in a `tf.data` pipeline.

    Args:
        operations: Names from `OPERATIONS`.
        probability: Chance that an example is augmented.
        synonyms: Word to synonym, for the `"synonym"` operation. Defaults to
            `None`, no synonyms (the operation then changes nothing).
    """

    def __init__(self, operations: list[str], probability: float, synonyms: dict[str, str] | None = None):
        unknown = [name for name in operations if name not in OPERATIONS]
        if unknown or not operations:
            raise ValueError(
                f"Unknown augmentation {unknown or operations}. Choose from: {', '.join(OPERATIONS)}."
            )
        if not 0 <= probability <= 1:
            raise ValueError(f"`probability` must be in [0, 1]. Received: probability={probability}")
        self.operations = list(operations)
        self.probability = probability
        synonyms = synonyms or {}
        keys = tf.constant(list(synonyms) or [""], tf.string)
        values = tf.constant(list(synonyms.values()) or [""], tf.string)
        self._synonyms = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(keys, values), default_value=""
        )
        self.augmented_count = tf.Variable(0, dtype=tf.int64, trainable=False)

    def __call__(self, text: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        """Returns `text` augmented or unchanged, drawing from the int64 `seed`."""
        seeds = tf.random.experimental.stateless_split(
            tf.stack([seed, tf.constant(0, tf.int64)]), num=3
        )
        augment = tf.random.stateless_uniform([], seeds[0]) < self.probability
        choice = tf.random.stateless_uniform(
            [], seeds[1], maxval=len(self.operations), dtype=tf.int32
        )

        words = tf.strings.split(text)

        def augmented():
            branches = [
                lambda name=name: self._apply(name, words, seeds[2]) for name in self.operations
            ]
            result = tf.switch_case(choice, branches)
            self.augmented_count.assign_add(1)
            return tf.strings.reduce_join(result, separator=" ")

        # A text of fewer than two words is left as it is.
        return tf.cond(tf.logical_and(augment, tf.size(words) >= 2), augmented, lambda: text)

    def _apply(self, name: str, words: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        count = tf.size(words)
        changes = tf.maximum(1, tf.cast(tf.cast(count, tf.float32) * CHANGE_FRACTION, tf.int32))
        if name == "delete":
            # Delete the `changes` words of lowest random priority, keeping at least one.
            deletions = tf.minimum(changes, count - 1)
            priority = tf.random.stateless_uniform([count], seed)
            rank = tf.argsort(tf.argsort(priority))
            return tf.boolean_mask(words, rank >= deletions)
        if name == "swap":
            return self._swap(words, changes, seed)
        if name == "insert":
            return self._insert(words, changes, seed)
        return self._replace_synonyms(words, changes, seed)

    @staticmethod
    def _swap(words, changes, seed):
        count = tf.size(words)
        draws = tf.random.stateless_uniform([changes, 2], seed, maxval=2**30, dtype=tf.int32)
        order = tf.range(count)

        def swap_one(index, order):
            # Two different positions (when there are two words).
            first = draws[index, 0] % count
            second = (first + 1 + draws[index, 1] % tf.maximum(count - 1, 1)) % count
            first_value, second_value = order[first], order[second]
            order = tf.tensor_scatter_nd_update(order, [[first], [second]], [second_value, first_value])
            return index + 1, order

        _, order = tf.while_loop(lambda index, _: index < changes, swap_one, (0, order))
        return tf.gather(words, order)

    @staticmethod
    def _insert(words, changes, seed):
        count = tf.size(words)
        draws = tf.random.stateless_uniform([changes, 2], seed, maxval=tf.maximum(count, 1), dtype=tf.int32)

        def insert_one(index, current):
            word = words[draws[index, 0]]
            position = draws[index, 1] % (tf.size(current) + 1)
            current = tf.concat([current[:position], [word], current[position:]], axis=0)
            return index + 1, current

        _, result = tf.while_loop(
            lambda index, _: index < changes,
            insert_one,
            (0, words),
            shape_invariants=(tf.TensorShape([]), tf.TensorShape([None])),
        )
        return result

    def _replace_synonyms(self, words, changes, seed):
        replacements = self._synonyms.lookup(tf.strings.lower(words))
        has_synonym = tf.not_equal(replacements, "")
        # Random priorities pick `changes` of the words that have a synonym.
        priority = tf.random.stateless_uniform([tf.size(words)], seed)
        priority = tf.where(has_synonym, priority, -1.0)
        threshold_index = tf.minimum(changes, tf.size(words)) - 1
        threshold = tf.sort(priority, direction="DESCENDING")[tf.maximum(threshold_index, 0)]
        chosen = tf.logical_and(has_synonym, priority >= threshold)
        return tf.where(chosen, replacements, words)
