"""NEFTune noise on input embeddings: in training steps only, of the documented size."""

import keras
import numpy as np
import tensorflow as tf

from tfft import FineTuneModel
from tfft.models import enable_neftune, load_classifier


def features(count=4, length=8):
    rng = np.random.default_rng(0)
    return {
        "token_ids": tf.constant(rng.integers(5, 30, size=(count, length)), tf.int32),
        "segment_ids": tf.zeros((count, length), tf.int32),
        "padding_mask": tf.ones((count, length), tf.bool),
    }


def test_noise_size_and_switch(tiny_preset):
    classifier = load_classifier(tiny_preset, num_labels=2, max_length=16, dropout=0.0)
    embedding = classifier.backbone.token_embedding
    noise = enable_neftune(classifier, alpha=5.0, seed=1)
    ids = features()["token_ids"]
    clean = embedding(ids).numpy()
    noise.active = True
    noisy = embedding(ids).numpy()
    noise.active = False
    # alpha / sqrt(L * d) = 5 / sqrt(8 * 8) = 0.625
    difference = np.abs(noisy - clean)
    assert difference.max() <= 0.625
    assert difference.max() > 0.5  # 256 uniform draws: the largest is near the bound
    np.testing.assert_array_equal(embedding(ids).numpy(), clean)


def test_only_training_steps_are_noisy(tiny_preset):
    def build(alpha):
        keras.utils.set_random_seed(3)
        classifier = load_classifier(tiny_preset, num_labels=2, max_length=16, dropout=0.0)
        noise = [enable_neftune(classifier, alpha=alpha, seed=1)] if alpha else []
        model = FineTuneModel(classifier, training_noise=noise)
        model.compile(
            optimizer=keras.optimizers.SGD(0.1),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        return model

    x = features()
    y = np.array([0, 1, 0, 1])
    plain, noisy = build(0.0), build(15.0)
    assert plain.evaluate(x, y, verbose=0) == noisy.evaluate(x, y, verbose=0)
    plain.fit(x, y, batch_size=4, epochs=1, verbose=0)
    noisy.fit(x, y, batch_size=4, epochs=1, verbose=0)
    # The noisy update differs; evaluation of one model is deterministic.
    assert not np.allclose(plain.model.get_weights()[-2], noisy.model.get_weights()[-2])
    assert noisy.evaluate(x, y, verbose=0) == noisy.evaluate(x, y, verbose=0)
