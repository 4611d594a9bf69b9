"""REP-155 (ROS4HRI) messages for tracked people (message construction only; the node publishes them).

* ``IdsList``: the ids of the bodies tracked in a frame (``/humans/bodies/tracked``).
* ``NormalizedRegionOfInterest2D``: a body's box, as fractions of the image width and height.
* ``Skeleton2D``: a body's 18 points in the message's own order (``Skeleton2D.NOSE`` ... ``RIGHT_EAR``), filled
  from COCO-17 keypoints; REP-155's neck, which COCO lacks, is the midpoint of the shoulders, as sure as the less
  sure of the two. Coordinates are normalised by the image size, ``c`` is the keypoint's score.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from hri_msgs.msg import IdsList, NormalizedPointOfInterest2D, NormalizedRegionOfInterest2D, Skeleton2D
from std_msgs.msg import Header

from segmerge_ros.models.pose.model import COCO_KEYPOINTS
from segmerge_ros.ros.pose_msgs import copy_header

_NECK = "neck"
# REP-155's point names in the message's order: the constant values are the indices into Skeleton2D.skeleton.
SKELETON_POINTS: tuple[str, ...] = tuple(
    name.lower() for name, _ in sorted(((n, getattr(Skeleton2D, n)) for n in dir(Skeleton2D)
                                        if n.isupper() and isinstance(getattr(Skeleton2D, n), int)),
                                       key=lambda item: item[1]))
# For each REP-155 point, its COCO-17 index; the neck, absent from COCO, takes a placeholder that is overwritten.
_COCO_INDEX = np.array([COCO_KEYPOINTS.index("left_shoulder" if name == _NECK else name) for name in SKELETON_POINTS],
                       dtype=np.int64)
_SHOULDERS = [COCO_KEYPOINTS.index("left_shoulder"), COCO_KEYPOINTS.index("right_shoulder")]


def ids_list_message(header: Header, ids: Sequence[str]) -> IdsList:
    """IdsList of the given ids, header copied."""
    return IdsList(header=copy_header(header), ids=[str(i) for i in ids])


def _fraction(values: np.ndarray, extent: int) -> np.ndarray:
    """Pixels -> fractions of ``extent``, clipped to [0, 1] (a zero extent gives 0)."""
    return np.clip(np.asarray(values, dtype=np.float64) / max(int(extent), 1), 0.0, 1.0)


def roi_message(header: Header, box, width: int, height: int) -> NormalizedRegionOfInterest2D:
    """The xyxy box (pixels, x2/y2 exclusive) as a region normalised to the width x height image, clipped to it."""
    x1, y1, x2, y2 = np.asarray(box, dtype=np.float64).reshape(4)
    xmin, xmax = _fraction([x1, x2], width).tolist()
    ymin, ymax = _fraction([y1, y2], height).tolist()
    msg = NormalizedRegionOfInterest2D(header=copy_header(header), xmin=xmin, ymin=ymin, xmax=xmax, ymax=ymax)
    if hasattr(msg, "c"):  # hri_msgs 2 has a confidence; older releases do not
        msg.c = 1.0
    return msg


def skeleton_message(header: Header, keypoints: np.ndarray, scores: np.ndarray, width: int,
                     height: int) -> Skeleton2D:
    """Skeleton2D of one person from COCO-17 keypoints (17, 2) in pixels and their scores (17,)."""
    keypoints = np.asarray(keypoints, dtype=np.float64).reshape(len(COCO_KEYPOINTS), 2)
    scores = np.asarray(scores, dtype=np.float64).reshape(len(COCO_KEYPOINTS))
    points = keypoints[_COCO_INDEX]
    confidence = scores[_COCO_INDEX]
    neck = SKELETON_POINTS.index(_NECK)
    points[neck] = keypoints[_SHOULDERS].mean(axis=0)
    confidence[neck] = scores[_SHOULDERS].min()
    # The message requires x, y and c in [0, 1]: keypoints decoded outside the frame are clipped to its edge.
    xs, ys = _fraction(points[:, 0], width).tolist(), _fraction(points[:, 1], height).tolist()
    return Skeleton2D(header=copy_header(header),
                      skeleton=[NormalizedPointOfInterest2D(x=x, y=y, c=c)
                                for x, y, c in zip(xs, ys, np.clip(confidence, 0.0, 1.0).tolist())])
