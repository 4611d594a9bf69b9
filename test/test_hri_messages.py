"""REP-155 builders (ros/hri_messages.py) over the real hri_msgs classes (no node)."""

from __future__ import annotations

import numpy as np
import pytest
from builtin_interfaces.msg import Time
from hri_msgs.msg import IdsList, NormalizedRegionOfInterest2D, Skeleton2D
from rclpy.serialization import deserialize_message, serialize_message
from std_msgs.msg import Header

from segmerge_ros.models.pose.model import COCO_KEYPOINTS
from segmerge_ros.ros.hri_messages import ids_list_message, roi_message, skeleton_message

WIDTH, HEIGHT = 200, 100


def _header() -> Header:
    return Header(stamp=Time(sec=42, nanosec=7), frame_id="cam")


def test_ids_list():
    msg = ids_list_message(_header(), ["t1", "t5"])
    msg = deserialize_message(serialize_message(msg), IdsList)
    assert list(msg.ids) == ["t1", "t5"]
    assert msg.header.frame_id == "cam" and msg.header.stamp.sec == 42
    assert list(ids_list_message(_header(), []).ids) == []


def test_roi_is_normalised_and_clipped():
    msg = roi_message(_header(), np.array([20, 10, 120, 90], np.float32), WIDTH, HEIGHT)
    msg = deserialize_message(serialize_message(msg), NormalizedRegionOfInterest2D)
    assert (msg.xmin, msg.ymin, msg.xmax, msg.ymax) == pytest.approx((0.1, 0.1, 0.6, 0.9))
    assert msg.c == pytest.approx(1.0)
    assert msg.header.frame_id == "cam"
    outside = roi_message(_header(), [-10, -5, 250, 150], WIDTH, HEIGHT)
    assert (outside.xmin, outside.ymin, outside.xmax, outside.ymax) == (0.0, 0.0, 1.0, 1.0)


def _person() -> tuple[np.ndarray, np.ndarray]:
    """COCO-17 keypoints with distinct positions and scores: keypoint i at (5 + 10 i, 2 + 5 i), score i / 20."""
    index = np.arange(len(COCO_KEYPOINTS), dtype=np.float64)
    return np.stack([5 + 10 * index, 2 + 5 * index], axis=1), index / 20


def test_skeleton_has_the_18_rep155_points_in_message_order():
    keypoints, scores = _person()
    msg = skeleton_message(_header(), keypoints, scores, WIDTH, HEIGHT)
    msg = deserialize_message(serialize_message(msg), Skeleton2D)
    assert len(msg.skeleton) == 18 and msg.header.frame_id == "cam"
    rep155 = {"NOSE": "nose", "RIGHT_SHOULDER": "right_shoulder", "RIGHT_ELBOW": "right_elbow",
              "RIGHT_WRIST": "right_wrist", "LEFT_SHOULDER": "left_shoulder", "LEFT_ELBOW": "left_elbow",
              "LEFT_WRIST": "left_wrist", "RIGHT_HIP": "right_hip", "RIGHT_KNEE": "right_knee",
              "RIGHT_ANKLE": "right_ankle", "LEFT_HIP": "left_hip", "LEFT_KNEE": "left_knee",
              "LEFT_ANKLE": "left_ankle", "LEFT_EYE": "left_eye", "RIGHT_EYE": "right_eye", "LEFT_EAR": "left_ear",
              "RIGHT_EAR": "right_ear"}
    for constant, coco_name in rep155.items():
        point = msg.skeleton[getattr(Skeleton2D, constant)]
        coco = COCO_KEYPOINTS.index(coco_name)
        assert (point.x, point.y) == pytest.approx((keypoints[coco, 0] / WIDTH, keypoints[coco, 1] / HEIGHT)), constant
        assert point.c == pytest.approx(scores[coco]), constant
    # Spot values, so a wrong table in both places would still fail: Skeleton2D.RIGHT_SHOULDER is 2, COCO's 6.
    assert msg.skeleton[2].x == pytest.approx(65 / WIDTH) and msg.skeleton[2].c == pytest.approx(0.3)


def test_neck_is_the_shoulder_midpoint_as_sure_as_the_less_sure_shoulder():
    keypoints, scores = _person()
    msg = skeleton_message(_header(), keypoints, scores, WIDTH, HEIGHT)
    left, right = COCO_KEYPOINTS.index("left_shoulder"), COCO_KEYPOINTS.index("right_shoulder")
    neck = msg.skeleton[Skeleton2D.NECK]
    assert neck.x == pytest.approx((keypoints[left, 0] + keypoints[right, 0]) / 2 / WIDTH)
    assert neck.y == pytest.approx((keypoints[left, 1] + keypoints[right, 1]) / 2 / HEIGHT)
    assert neck.c == pytest.approx(min(scores[left], scores[right]))


def test_skeleton_points_and_scores_stay_in_unit_range():
    keypoints, scores = _person()
    keypoints[0] = (-20, 500)  # nose decoded outside the frame
    scores[0] = 1.2  # heatmap maxima can exceed 1
    msg = skeleton_message(_header(), keypoints, scores, WIDTH, HEIGHT)
    nose = msg.skeleton[Skeleton2D.NOSE]
    assert (nose.x, nose.y, nose.c) == (0.0, 1.0, 1.0)
    assert all(0.0 <= v <= 1.0 for p in msg.skeleton for v in (p.x, p.y, p.c))
