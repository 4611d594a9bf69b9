"""Stable ids for the objects of one camera across frames: box IoU plus Hungarian assignment (no ROS).

No motion model: a track that is missed keeps its last box and ages, and is dropped once it has been unseen for
more than ``max_age`` frames. Only boxes of the same class are matched, and only at IoU >= ``min_iou``. Ids come
from a ``TrackIds`` that a node's cameras share, so an id names one object across the whole node.
"""

from __future__ import annotations

import itertools
import re
import threading

import numpy as np
from scipy.optimize import linear_sum_assignment

# A ROS topic-name token (REP-155 puts ids in topic names: /humans/bodies/<id>/...).
_ID_PREFIX = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
# Cost of a pair that must not match: above any real cost (1 - IoU <= 1), so the assignment takes as many allowed
# pairs as it can before any forbidden one; forbidden pairs it still returns are dropped afterwards.
_FORBIDDEN = 1e6


def box_iou(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """IoU of every pair of xyxy boxes (x2, y2 exclusive): (M, 4) and (N, 4) -> (M, N) float64; 0 for empty boxes."""
    a = np.asarray(first, dtype=np.float64).reshape(-1, 4)[:, None, :]
    b = np.asarray(second, dtype=np.float64).reshape(-1, 4)[None, :, :]
    width = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    height = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    overlap = width * height

    def area(box: np.ndarray) -> np.ndarray:
        return np.clip(box[..., 2] - box[..., 0], 0, None) * np.clip(box[..., 3] - box[..., 1], 0, None)

    union = area(a) + area(b) - overlap
    return np.divide(overlap, union, out=np.zeros_like(overlap), where=union > 0)


class TrackIds:
    """Unique track ids for one node, shared by its cameras' trackers (thread-safe)."""

    def __init__(self, prefix: str = "t"):
        if not _ID_PREFIX.fullmatch(prefix):
            raise ValueError(f"track id prefix {prefix!r} must start with a letter and hold only letters, digits "
                             "and underscores (ids appear in topic names)")
        self.prefix = prefix
        self._counter = itertools.count(1)
        self._lock = threading.Lock()

    def next(self) -> str:
        """A new id: prefix + 1, 2, ... ("t1", "t2", ...)."""
        with self._lock:
            return f"{self.prefix}{next(self._counter)}"


class Tracker:
    """Stable ids for objects across frames of one camera: box IoU, Hungarian assignment
    (scipy.optimize.linear_sum_assignment), only same-class matches, a track unseen for more than max_age frames is
    dropped."""

    def __init__(self, ids: TrackIds, min_iou: float = 0.3, max_age: int = 10):
        if not 0.0 < min_iou <= 1.0:
            raise ValueError(f"min_iou must be in (0, 1], got {min_iou}")  # 0 would match boxes that do not overlap
        if max_age < 0:
            raise ValueError(f"max_age must be >= 0, got {max_age}")
        self.ids = ids
        self.min_iou = float(min_iou)
        self.max_age = int(max_age)
        self.reset()

    def reset(self) -> None:
        """Forget every track (ids already given out are never reused)."""
        self._track_ids: list[str] = []
        self._boxes = np.zeros((0, 4), np.float64)
        self._classes = np.zeros(0, np.int64)
        self._missed = np.zeros(0, np.int64)  # updates since each track was last seen

    @property
    def tracked(self) -> list[str]:
        """Ids of the tracks seen in the last update."""
        return [track for track, missed in zip(self._track_ids, self._missed.tolist()) if missed == 0]

    def live(self, class_ids=None) -> list[str]:
        """Ids of every track kept (seen within max_age frames), of the given classes only when given."""
        if class_ids is None:
            return list(self._track_ids)
        keep = np.isin(self._classes, np.asarray(list(class_ids), dtype=np.int64))
        return [track for track, ok in zip(self._track_ids, keep.tolist()) if ok]

    def _match(self, boxes: np.ndarray, class_ids: np.ndarray) -> np.ndarray:
        """For each box, the index of the track it continues, or -1."""
        track_of_box = np.full(len(boxes), -1, np.int64)
        if len(boxes) == 0 or len(self._track_ids) == 0:
            return track_of_box
        iou = box_iou(self._boxes, boxes)
        allowed = (iou >= self.min_iou) & (self._classes[:, None] == class_ids[None, :])
        rows, cols = linear_sum_assignment(np.where(allowed, 1.0 - iou, _FORBIDDEN))
        good = allowed[rows, cols]
        track_of_box[cols[good]] = rows[good]
        return track_of_box

    def update(self, boxes: np.ndarray, class_ids: np.ndarray) -> list[str]:
        """Match one frame's boxes (N, 4 xyxy) and classes (N,) to the tracks; return each box's track id, in order.
        Unmatched boxes start new tracks; unmatched tracks keep their box and age."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        class_ids = np.asarray(class_ids, dtype=np.int64).reshape(-1)
        if len(boxes) != len(class_ids):
            raise ValueError(f"{len(boxes)} boxes but {len(class_ids)} class ids")
        track_of_box = self._match(boxes, class_ids)
        matched = track_of_box >= 0
        seen = track_of_box[matched]
        self._missed += 1
        self._missed[seen] = 0
        self._boxes[seen] = boxes[matched]
        ids = [self._track_ids[t] if t >= 0 else "" for t in track_of_box.tolist()]
        new = np.flatnonzero(~matched)
        for box_index in new.tolist():
            ids[box_index] = self.ids.next()
        live = self._missed <= self.max_age
        self._track_ids = [track for track, keep in zip(self._track_ids, live.tolist()) if keep]
        self._track_ids += [ids[i] for i in new.tolist()]
        self._boxes = np.concatenate([self._boxes[live], boxes[new]])
        self._classes = np.concatenate([self._classes[live], class_ids[new]])
        self._missed = np.concatenate([self._missed[live], np.zeros(len(new), np.int64)])
        return ids
