"""Metrics for classification with integer labels and logits."""

from __future__ import annotations

import keras
import tensorflow as tf

__all__ = ["ClassF1"]


@keras.saving.register_keras_serializable(package="tfft")
class ClassF1(keras.metrics.Metric):
    """F1 score of one class, from integer labels and per-class scores.

    The predicted class is the argmax of the scores (logits or probabilities).
    F1 = 2 TP / (2 TP + FP + FN) over all examples seen, as GLUE reports it for
    MRPC and QQP with class 1; 0 when the class never occurs nor is predicted.
    Keras' `F1Score` needs one-hot labels and thresholds probabilities, which
    does not fit sparse labels and logits.

    Args:
        class_id: The class whose F1 is measured. Defaults to `1`.
        name: Defaults to `"f1"`.
    """

    def __init__(self, class_id: int = 1, name: str = "f1", **kwargs):
        super().__init__(name=name, **kwargs)
        self.class_id = class_id
        self.true_positives = self.add_variable(shape=(), initializer="zeros", name="tp")
        self.false_positives = self.add_variable(shape=(), initializer="zeros", name="fp")
        self.false_negatives = self.add_variable(shape=(), initializer="zeros", name="fn")

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true = tf.reshape(tf.cast(y_true, tf.int64), [-1])
        predicted = tf.reshape(tf.argmax(y_pred, axis=-1), [-1])
        weights = (
            tf.ones_like(y_true, tf.float32)
            if sample_weight is None
            else tf.reshape(tf.cast(sample_weight, tf.float32), [-1])
        )
        is_true = tf.cast(tf.equal(y_true, self.class_id), tf.float32)
        is_predicted = tf.cast(tf.equal(predicted, self.class_id), tf.float32)
        self.true_positives.assign_add(tf.reduce_sum(weights * is_true * is_predicted))
        self.false_positives.assign_add(tf.reduce_sum(weights * (1 - is_true) * is_predicted))
        self.false_negatives.assign_add(tf.reduce_sum(weights * is_true * (1 - is_predicted)))

    def result(self):
        tp = self.true_positives
        return tf.math.divide_no_nan(
            2 * tp, 2 * tp + self.false_positives + self.false_negatives
        )

    def reset_state(self):
        for variable in self.variables:
            variable.assign(tf.zeros_like(variable))

    def get_config(self):
        return {**super().get_config(), "class_id": self.class_id}
