"""Corrections and combinations of pose-teacher keypoints (issue 22), fitted on the train part only.

* Hip correction: BlazePose puts its hips elsewhere than COCO's annotators do. Each hip is moved along the body,
  ``hip + alpha (hip - shoulder) + beta (hip - other hip)`` on the same side (two numbers shared by both sides, so
  the move scales and turns with the person), fitted by least squares on ground-truth hips that the teacher found
  roughly (error under ``max_error`` of the box's longer side: gross misses would steer the fit).
* Ensemble of two teachers, per keypoint: where they agree (distance under ``agree`` of the box's longer side), the
  score-weighted average and the higher score; else the higher-scoring one with its score times ``penalty``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# COCO-17: (hip, shoulder on its side, the other hip).
HIP_AXES = ((11, 5, 12), (12, 6, 11))


@dataclass(frozen=True)
class HipCorrection:
    """``hip + alpha (hip - shoulder) + beta (hip - other hip)`` per side; ``samples``: hips it was fitted on."""

    alpha: float = 0.0
    beta: float = 0.0
    samples: int = 0

    def apply(self, keypoints: np.ndarray) -> np.ndarray:
        """Corrected copy of keypoints (N, 17, 2); only the two hips move."""
        kps = np.asarray(keypoints, dtype=np.float64)
        out = kps.copy()
        for hip, shoulder, other in HIP_AXES:
            out[:, hip] += self.alpha * (kps[:, hip] - kps[:, shoulder]) + self.beta * (kps[:, hip] - kps[:, other])
        return out.astype(np.asarray(keypoints).dtype)

    def as_dict(self) -> dict:
        """Plain fields, for JSON."""
        return asdict(self)


def box_sides(boxes: np.ndarray) -> np.ndarray:
    """Longer side (N,) of xyxy boxes (N, 4)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])


def fit_hip_correction(keypoints: np.ndarray, gts: np.ndarray, visibility: np.ndarray, boxes: np.ndarray,
                       max_error: float = 0.25) -> HipCorrection:
    """Least-squares ``HipCorrection`` of teacher keypoints (N, 17, 2) towards ground truths (N, 17, 2) on the
    labelled hips (``visibility`` (N, 17) > 0) within ``max_error`` box sides of the ground truth."""
    kps = np.asarray(keypoints, dtype=np.float64)
    gts = np.asarray(gts, dtype=np.float64)
    sides = box_sides(boxes)
    rows, targets = [], []
    for hip, shoulder, other in HIP_AXES:
        error = np.linalg.norm(gts[:, hip] - kps[:, hip], axis=1)
        use = (np.asarray(visibility)[:, hip] > 0) & (error < max_error * sides)
        along, across = kps[use, hip] - kps[use, shoulder], kps[use, hip] - kps[use, other]
        rows.append(np.stack([along, across], axis=-1).reshape(-1, 2))  # x and y rows of [alpha, beta]
        targets.append((gts[use, hip] - kps[use, hip]).reshape(-1))
    design, target = np.concatenate(rows), np.concatenate(targets)
    if len(target) < 4:
        return HipCorrection()
    (alpha, beta), *_ = np.linalg.lstsq(design, target, rcond=None)
    return HipCorrection(float(alpha), float(beta), len(target) // 2)


def fuse_teachers(kps_a: np.ndarray, scores_a: np.ndarray, kps_b: np.ndarray, scores_b: np.ndarray,
                  boxes: np.ndarray, agree: float = 0.1, penalty: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """The ensemble of two teachers' keypoints (N, 17, 2) and scores (N, 17) on the same boxes (N, 4)."""
    kps_a, kps_b = np.asarray(kps_a, dtype=np.float64), np.asarray(kps_b, dtype=np.float64)
    sa, sb = np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)
    distance = np.linalg.norm(kps_a - kps_b, axis=-1) / box_sides(boxes)[:, None]
    together = distance < agree
    weight_a = np.where(sa + sb > 0, sa / np.maximum(sa + sb, np.spacing(1)), 0.5)[..., None]
    average = weight_a * kps_a + (1.0 - weight_a) * kps_b
    higher = np.where((sa >= sb)[..., None], kps_a, kps_b)
    best = np.maximum(sa, sb)
    keypoints = np.where(together[..., None], average, higher)
    scores = np.where(together, best, best * penalty)
    return keypoints.astype(np.float32), scores.astype(np.float32)
