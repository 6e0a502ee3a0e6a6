import numpy as np
import pytest

from tfft.metrics import ClassF1


def test_class_f1_counts_by_hand():
    labels = np.array([1, 1, 0, 0, 1, 0])
    logits = np.array([[0, 1], [1, 0], [0, 1], [1, 0], [0, 2], [3, 0]], np.float32)
    # Predicted 1, 0, 1, 0, 1, 0: TP 2 (rows 0, 4), FP 1 (row 2), FN 1 (row 1).
    metric = ClassF1(class_id=1)
    metric.update_state(labels[:3], logits[:3])
    metric.update_state(labels[3:], logits[3:])
    assert float(metric.result()) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))


def test_class_f1_weights_and_reset():
    metric = ClassF1(class_id=1)
    # Row 1 (a false negative) has weight 0: TP 1, FP 0, FN 0, F1 1.
    metric.update_state(np.array([1, 1]), np.array([[0, 1], [1, 0]], np.float32), np.array([1.0, 0.0]))
    assert float(metric.result()) == 1.0
    metric.reset_state()
    assert float(metric.result()) == 0.0
