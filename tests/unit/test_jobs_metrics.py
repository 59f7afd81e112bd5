"""Classification metrics against a hand computation on a fixed fixture."""

from __future__ import annotations

import numpy as np
import pytest

from jobs.evaluate import classification_metrics

# 3 classes, 8 samples.
Y_TRUE = np.array([0, 0, 0, 1, 1, 2, 2, 2])
Y_PRED = np.array([0, 0, 1, 1, 2, 2, 2, 0])


def test_metrics_equal_hand_computation() -> None:
    metrics = classification_metrics(Y_TRUE, Y_PRED, 3)
    # Confusion (rows true, cols predicted):
    #   [[2, 1, 0],
    #    [0, 1, 1],
    #    [1, 0, 2]]
    assert metrics["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [1, 0, 2]]
    assert metrics["accuracy"] == pytest.approx(5 / 8)
    # precision per class: 2/3, 1/2, 2/3 ; recall: 2/3, 1/2, 2/3
    precision = (2 / 3 + 1 / 2 + 2 / 3) / 3
    assert metrics["precision_macro"] == pytest.approx(precision)
    assert metrics["recall_macro"] == pytest.approx(precision)
    f1 = [2 * p * r / (p + r) for p, r in ((2 / 3, 2 / 3), (1 / 2, 1 / 2), (2 / 3, 2 / 3))]
    assert metrics["f1_macro"] == pytest.approx(sum(f1) / 3)


def test_class_never_predicted_counts_as_zero_precision() -> None:
    metrics = classification_metrics(np.array([0, 1, 2]), np.array([0, 0, 0]), 3)
    assert metrics["precision_macro"] == pytest.approx((1 / 3) / 3)
    assert metrics["recall_macro"] == pytest.approx(1 / 3)
    assert metrics["f1_macro"] == pytest.approx((2 * (1 / 3) / (1 / 3 + 1)) / 3)


def test_mismatched_lengths_are_rejected() -> None:
    with pytest.raises(ValueError, match="same length"):
        classification_metrics(np.array([0, 1]), np.array([0]), 2)
