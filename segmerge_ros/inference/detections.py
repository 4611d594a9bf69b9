"""Objects in one frame (boxes, classes, scores, areas) from a class map or a Mask2Former instance map (no ROS).

Boxes follow ``inference.pose.person_boxes_from_segmentation``: (N, 4) float32 xyxy in input pixels, x2 and y2
exclusive. Objects are ordered largest first; equal areas keep class order, then position (raster order of a
component's first pixel, or the instance's id).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from segmerge_ros.inference.postprocess.mask2former import InstanceMap, instance_boxes


@dataclass(frozen=True)
class Objects:
    """Objects found in one frame, largest first."""

    boxes: np.ndarray  # (N, 4) float32 xyxy in input pixels, x2/y2 exclusive
    class_ids: np.ndarray  # (N,) int64
    scores: np.ndarray  # (N,) float32 in [0, 1]
    areas: np.ndarray  # (N,) int64 pixels

    def __len__(self) -> int:
        """The number of objects."""
        return int(self.class_ids.shape[0])

    def subset(self, keep: np.ndarray) -> "Objects":
        """The objects selected by a boolean mask or an index array, in the order given."""
        keep = np.asarray(keep)
        if keep.dtype != bool:
            keep = keep.astype(np.int64)  # an empty list arrives as float64
        return Objects(self.boxes[keep], self.class_ids[keep], self.scores[keep], self.areas[keep])

    @staticmethod
    def empty() -> "Objects":
        """No objects (arrays of length 0 with the usual dtypes)."""
        return Objects(np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32),
                       np.zeros(0, np.int64))


def _largest_first(areas: np.ndarray) -> np.ndarray:
    """Indices ordering ``areas`` descending; a stable sort, so ties keep the incoming order."""
    return np.argsort(-areas, kind="stable")


def _class_components(mask: np.ndarray, min_area: int,
                      confidence: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes, areas and mean confidence (0..1) of the 8-connected components of one class's mask that reach
    ``min_area``, in label order (raster order of their first pixel)."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8, ltype=cv2.CV_32S)
    stats = stats[1:count].astype(np.int64)  # label 0 is the background
    areas = stats[:, cv2.CC_STAT_AREA]
    keep = areas >= min_area
    if confidence is None:
        scores = np.ones(count - 1, np.float64)
    else:
        # One weighted bincount gives every component's confidence sum in a single pass over the frame.
        sums = np.bincount(labels.ravel(), weights=confidence.ravel(), minlength=count)[1:count]
        scores = sums / np.maximum(areas, 1) / 255.0
    x, y = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
    boxes = np.stack([x, y, x + stats[:, cv2.CC_STAT_WIDTH], y + stats[:, cv2.CC_STAT_HEIGHT]], axis=1)
    return boxes[keep].reshape(-1, 4), areas[keep], scores[keep]


def objects_from_class_map(class_map: np.ndarray, class_ids: Sequence[int], min_area: int,
                           confidence: np.ndarray | None = None) -> Objects:
    """One object per 8-connected component of each class in ``class_ids`` (classes apart: touching regions of two
    classes are two objects; touching people of one class are one).

    Components smaller than ``max(min_area, 1)`` pixels are dropped. ``confidence`` is the engine's (H, W) uint8
    map (max softmax probability x 255); an object's score is its mean over the component / 255, or 1.0 without it.
    """
    class_map = np.asarray(class_map)
    if class_map.ndim != 2:
        raise ValueError(f"class_map must be (H, W), got shape {class_map.shape}")
    if confidence is not None:
        confidence = np.asarray(confidence)
        if confidence.shape != class_map.shape:
            raise ValueError(f"confidence {confidence.shape} and class_map {class_map.shape} differ in shape")
    min_area = max(int(min_area), 1)
    wanted = np.unique(np.asarray(list(class_ids), dtype=np.int64))
    wanted = wanted[wanted >= 0]
    if wanted.size == 0 or class_map.size == 0:
        return Objects.empty()
    # A class with fewer pixels than min_area in the whole frame cannot have a component that large: skip it
    # without labelling.
    pixels = np.bincount(class_map.ravel(), minlength=int(wanted.max()) + 1)
    present = wanted[pixels[wanted] >= min_area]
    found = []
    for class_id in present.tolist():
        mask = (class_map == class_id).view(np.uint8)
        boxes, areas, scores = _class_components(mask, min_area, confidence)
        found.append((boxes, np.full(len(areas), class_id, np.int64), scores, areas))
    if not found:
        return Objects.empty()
    boxes, classes, scores, areas = (np.concatenate(parts) for parts in zip(*found))
    order = _largest_first(areas)
    return Objects(boxes[order].astype(np.float32).reshape(-1, 4), classes[order],
                   scores[order].astype(np.float32), areas[order])


def objects_from_instances(instance_map: InstanceMap, class_ids: Sequence[int], min_area: int) -> Objects:
    """Objects from a Mask2Former instance id map: the instances of ``class_ids`` with at least
    ``max(min_area, 1)`` visible pixels, largest first, each scored with its instance score."""
    boxes, areas = instance_boxes(instance_map)
    classes = np.array([item.class_id for item in instance_map.info], dtype=np.int64)
    scores = np.array([item.score for item in instance_map.info], dtype=np.float32)
    keep = np.isin(classes, np.asarray(list(class_ids), dtype=np.int64)) & (areas >= max(int(min_area), 1))
    kept = np.flatnonzero(keep)
    order = kept[_largest_first(areas[kept])]
    return Objects(boxes[order].reshape(-1, 4), classes[order], scores[order], areas[order])
