"""Confusion-matrix metrics on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from segmerge_ros.inference.metrics import ConfusionMatrix, confusion_matrix, iou_per_class, mean_iou, pixel_accuracy


def test_hand_computed_case():
    target = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 2]])
    matrix = confusion_matrix(pred, target, num_classes=4)
    # rows = target: class 0 -> [0, 1]; class 1 -> [1, 1, 2]; class 2 -> [2, 0]; the 255 pixel is skipped
    expected = np.zeros((4, 4), dtype=np.int64)
    expected[0, 0], expected[0, 1] = 1, 1
    expected[1, 1], expected[1, 2] = 2, 1
    expected[2, 2], expected[2, 0] = 1, 1
    assert np.array_equal(matrix, expected)
    ious = iou_per_class(matrix)
    # class 0: TP 1, FP 1 (a 2 predicted as 0), FN 1 -> 1/3; class 1: TP 2, FP 1, FN 1 -> 1/2; class 2: TP 1,
    # FP 1, FN 1 -> 1/3; class 3 absent everywhere -> NaN, left out of the mean
    assert ious[:3] == pytest.approx([1 / 3, 1 / 2, 1 / 3])
    assert math.isnan(ious[3])
    assert mean_iou(matrix) == pytest.approx((1 / 3 + 1 / 2 + 1 / 3) / 3)
    assert pixel_accuracy(matrix) == pytest.approx(4 / 7)


def test_accumulates_and_accepts_torch():
    metric = ConfusionMatrix(3)
    metric.update(torch.tensor([[0, 1]]), torch.tensor([[0, 1]]))
    metric.update(np.array([2, 2]), np.array([2, 255]))
    assert metric.miou == pytest.approx(1.0)
    assert metric.pixel_accuracy == pytest.approx(1.0)
    summary = metric.summary(["a", "b", "c"])
    assert summary["per_class_iou"] == {"a": 1.0, "b": 1.0, "c": 1.0}


def test_predicted_but_absent_class_counts_as_zero():
    metric = ConfusionMatrix(3)
    metric.update(np.array([0, 2]), np.array([0, 0]))
    assert metric.per_class_iou()[2] == 0.0
    assert metric.miou == pytest.approx((0.5 + 0.0) / 2)


def test_errors_and_empty():
    with pytest.raises(ValueError):
        confusion_matrix(np.zeros(3), np.zeros(4), 2)
    with pytest.raises(ValueError):
        confusion_matrix(np.array([5]), np.array([0]), 2)
    assert math.isnan(ConfusionMatrix(2).miou) and math.isnan(ConfusionMatrix(2).pixel_accuracy)
