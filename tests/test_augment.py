"""Text augmentation in tf.data: seeded, at the configured rate, labels and evaluation untouched."""

import numpy as np
import tensorflow as tf

from tfft.data.augment import TextAugmenter, embedding_synonyms
from tfft.data.pipeline import make_augmented_dataset
from tfft.data.sources import TextExamples

POSITIVE = ["good", "great", "fine", "nice", "lovely", "superb", "happy", "bright"]
NEGATIVE = ["bad", "awful", "poor", "grim", "dull", "weak", "sad", "dark"]


def examples(count, seed=0):
    """Texts of six distinct words, all from the class's own word list.

    Each label is 2 * index + class, so an output row can be matched to its
    original text whatever the shuffle.
    """
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for index in range(count):
        positive = int(rng.integers(0, 2))
        words = rng.choice(POSITIVE if positive else NEGATIVE, size=6, replace=False)
        texts.append(" ".join(words))
        labels.append(2 * index + positive)
    return TextExamples([texts], labels, "test", ["text"], "label")


def identity_preprocessor(x):
    """Stands in for the tokenizer, to look at the augmented strings themselves."""
    return {"text": x[0][:, tf.newaxis], "padding_mask": tf.ones([tf.shape(x[0])[0], 1], tf.bool)}


def synonyms():
    # Each word maps to the next one of its own list.
    pairs = {}
    for words in (POSITIVE, NEGATIVE):
        pairs.update({word: words[(i + 1) % len(words)] for i, word in enumerate(words)})
    return pairs


def augmented_epochs(data, probability, seed, epochs=2, operations=("delete", "swap", "insert", "synonym")):
    augmenter = TextAugmenter(list(operations), probability, synonyms())
    dataset = make_augmented_dataset(data, identity_preprocessor, augmenter, 50, seed)
    results = []
    for _ in range(epochs):
        augmenter.augmented_count.assign(0)
        texts, labels = [], []
        for features, label in dataset:
            texts += [t.decode() for t in features["text"].numpy()[:, 0]]
            labels += label.numpy().tolist()
        results.append((texts, labels, int(augmenter.augmented_count.numpy())))
    return results


def test_same_seed_same_augmentations_new_ones_each_epoch():
    data = examples(200)
    first = augmented_epochs(data, 0.5, seed=7)
    second = augmented_epochs(data, 0.5, seed=7)
    assert first[0][0] == second[0][0]
    assert first[1][0] == second[1][0]
    assert sorted(first[0][0]) != sorted(first[1][0])
    other_seed = augmented_epochs(data, 0.5, seed=8, epochs=1)
    assert sorted(other_seed[0][0]) != sorted(first[0][0])


def test_rate_labels_and_changes():
    data = examples(1000)
    (texts, labels, count), = augmented_epochs(data, 0.4, seed=3, epochs=1)
    # Binomial(1000, 0.4): mean 400, standard deviation 15.5; 60 is almost 4 of them.
    assert abs(count - 400) < 60
    assert sorted(labels) == sorted(data.labels)
    # Every operation changes a text of six distinct words.
    changed = sum(text != data.texts[0][label // 2] for text, label in zip(texts, labels))
    assert changed == count
    # Words stay within the class's list, so the label still holds.
    for text, label in zip(texts, labels):
        vocabulary = POSITIVE if label % 2 else NEGATIVE
        assert all(word in vocabulary for word in text.split()), (text, label)


def test_probability_zero_changes_nothing():
    data = examples(100)
    (texts, _, count), = augmented_epochs(data, 0.0, seed=1, epochs=1)
    assert count == 0
    assert sorted(texts) == sorted(data.texts[0])


def test_each_operation_alone():
    data = examples(50)
    originals = data.texts[0]
    for operation, length_change in (("delete", -1), ("swap", 0), ("insert", 1), ("synonym", 0)):
        (texts, labels, count), = augmented_epochs(data, 1.0, seed=2, epochs=1, operations=(operation,))
        assert count == 50
        # Six words: a tenth rounds down to the minimum of one change.
        assert {len(t.split()) - 6 for t in texts} == {length_change}, operation
        for text, label in zip(texts, labels):
            assert text != originals[label // 2], operation


def test_synonyms_are_nearest_whole_words():
    vocabulary = ["[PAD]", "good", "great", "bad", "awful", "##ing", "xy"]
    embeddings = np.array(
        [[0, 0, 1], [1, 0.1, 0], [1, 0.2, 0], [-1, 0.1, 0], [-1, 0.2, 0], [1, 0.15, 0], [0, 1, 0]],
        np.float32,
    )
    found = embedding_synonyms(vocabulary, embeddings, {"good", "great", "bad", "awful", "missing"})
    # "##ing" is a word piece and "xy" too short: never a synonym.
    assert found == {"good": "great", "great": "good", "bad": "awful", "awful": "bad"}
