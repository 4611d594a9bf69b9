"""Segmentation metrics from a confusion matrix: mIoU, per-class IoU, pixel accuracy. Ignore index 255.

``ConfusionMatrix.update`` accumulates over frames; rows are ground truth, columns predictions. IoU of class c is
TP / (TP + FP + FN); classes that appear neither in the labels nor in the predictions (union 0) have no IoU (NaN)
and are left out of the mean ("mIoU over present classes"). Pixel accuracy counts every non-ignored pixel.
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = 255


def confusion_matrix(
    pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """``(num_classes, num_classes)`` int64 counts, ``[target, pred]``. Pixels whose target is ``ignore_index`` or
    outside ``[0, num_classes)`` are skipped; a prediction outside that range is a ValueError."""
    pred = np.asarray(pred).astype(np.int64).ravel()
    target = np.asarray(target).astype(np.int64).ravel()
    if pred.shape != target.shape:
        raise ValueError(f"prediction has {pred.size} pixels, target {target.size}")
    valid = (target != ignore_index) & (target >= 0) & (target < num_classes)
    if np.any((pred[valid] < 0) | (pred[valid] >= num_classes)):
        raise ValueError(f"prediction holds class ids outside [0, {num_classes})")
    flat = target[valid] * num_classes + pred[valid]
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_per_class(matrix: np.ndarray) -> np.ndarray:
    """IoU of every class; NaN where the class is absent from both labels and predictions."""
    matrix = np.asarray(matrix, dtype=np.float64)
    true_positive = np.diag(matrix)
    union = matrix.sum(0) + matrix.sum(1) - true_positive
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, true_positive / np.where(union > 0, union, 1), np.nan)


def mean_iou(matrix: np.ndarray) -> float:
    """Mean IoU over the classes present in labels or predictions (NaN if there are none)."""
    ious = iou_per_class(matrix)
    return float(np.nanmean(ious)) if np.any(~np.isnan(ious)) else float("nan")


def pixel_accuracy(matrix: np.ndarray) -> float:
    matrix = np.asarray(matrix)
    total = matrix.sum()
    return float(np.trace(matrix) / total) if total else float("nan")


class ConfusionMatrix:
    """Accumulates a confusion matrix over many frames (numpy or torch inputs of equal shape)."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred, target) -> None:
        self.matrix += confusion_matrix(_to_numpy(pred), _to_numpy(target), self.num_classes, self.ignore_index)

    @property
    def miou(self) -> float:
        return mean_iou(self.matrix)

    @property
    def pixel_accuracy(self) -> float:
        return pixel_accuracy(self.matrix)

    def per_class_iou(self) -> np.ndarray:
        return iou_per_class(self.matrix)

    def summary(self, class_names: list[str] | tuple[str, ...] | None = None) -> dict:
        """JSON-ready: mIoU, pixel accuracy and the IoU of each present class (by name when given)."""
        ious = self.per_class_iou()
        names = class_names or [str(i) for i in range(self.num_classes)]
        return {
            "miou": self.miou,
            "pixel_accuracy": self.pixel_accuracy,
            "per_class_iou": {names[i]: float(v) for i, v in enumerate(ious) if not np.isnan(v)},
        }


def _to_numpy(array) -> np.ndarray:
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    return np.asarray(array)
