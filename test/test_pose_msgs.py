"""Pose message builders over real rclpy message types (no node)."""

from __future__ import annotations

import numpy as np
import pytest
from builtin_interfaces.msg import Time
from rclpy.serialization import deserialize_message, serialize_message
from sensor_msgs.msg import CameraInfo, PointCloud2, PointField
from std_msgs.msg import Header
from visualization_msgs.msg import Marker, MarkerArray

from segmerge_ros.models.pose.model import COCO_SKELETON
from segmerge_ros.inference.pose import PoseResult
from segmerge_ros.ros.pose_msgs import (
    camera_matrix,
    keypoints_cloud,
    pixel_rays,
    pose_markers,
    pose_messages,
    read_keypoints_cloud,
)

K = np.array([[500.0, 0.0, 320.0], [0.0, 400.0, 240.0], [0.0, 0.0, 1.0]])


def _header() -> Header:
    return Header(stamp=Time(sec=1763712000, nanosec=123456789), frame_id="camera_optical_frame")


def _people(rng: np.random.Generator):
    kpts = rng.uniform([0, 0], [640, 480], size=(2, 17, 2)).astype(np.float32)
    scores = rng.uniform(0.5, 1.0, size=(2, 17)).astype(np.float32)
    return kpts, scores


def test_keypoints_cloud_layout_and_values_with_k():
    kpts, scores = _people(np.random.default_rng(0))
    msg = keypoints_cloud(_header(), kpts, scores, K)
    assert (msg.height, msg.width) == (2, 17)
    assert [f.name for f in msg.fields] == ["x", "y", "z", "u", "v", "score"]
    assert [f.offset for f in msg.fields] == [0, 4, 8, 12, 16, 20]
    assert all(f.datatype == PointField.FLOAT32 and f.count == 1 for f in msg.fields)
    assert msg.point_step == 24 and msg.row_step == 24 * 17 and len(msg.data) == 2 * 24 * 17
    assert msg.is_dense and not msg.is_bigendian
    assert msg.header.frame_id == "camera_optical_frame"
    assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == (1763712000, 123456789)

    # Read the bytes back independently of the builder's dtype.
    raw = np.frombuffer(bytes(msg.data), dtype="<f4").reshape(2, 17, 6)
    np.testing.assert_allclose(raw[..., 3:5], kpts)
    np.testing.assert_allclose(raw[..., 5], scores)
    np.testing.assert_allclose(raw[..., 0], (kpts[..., 0] - 320.0) / 500.0, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(raw[..., 1], (kpts[..., 1] - 240.0) / 400.0, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(raw[..., 2], 1.0)
    cloud = read_keypoints_cloud(msg)
    np.testing.assert_allclose(cloud["u"], kpts[..., 0])
    np.testing.assert_allclose(cloud["z"], 1.0)

    # Survives serialisation (the types rclpy publishes).
    again = deserialize_message(serialize_message(msg), PointCloud2)
    np.testing.assert_array_equal(np.frombuffer(bytes(again.data), "<f4"), raw.reshape(-1))


def test_keypoints_cloud_without_k_threshold_and_empty():
    kpts, scores = _people(np.random.default_rng(1))
    scores[1, 3] = 0.1
    msg = keypoints_cloud(_header(), kpts, scores)
    raw = np.frombuffer(bytes(msg.data), dtype="<f4").reshape(2, 17, 6)
    np.testing.assert_allclose(raw[..., 0:2], kpts)
    np.testing.assert_array_equal(raw[..., 2], 0.0)
    msg = keypoints_cloud(_header(), kpts, scores, K, threshold=0.3)
    raw = np.frombuffer(bytes(msg.data), dtype="<f4").reshape(2, 17, 6)
    assert not msg.is_dense
    assert np.isnan(raw[1, 3, :3]).all() and np.isfinite(raw[1, 3, 3:]).all()
    assert np.isfinite(np.delete(raw.reshape(34, 6), 17 + 3, axis=0)).all()
    empty = keypoints_cloud(_header(), np.zeros((0, 17, 2)), np.zeros((0, 17)), K)
    assert (empty.height, empty.width, len(empty.data), empty.row_step) == (0, 17, 0, 408)
    serialize_message(empty)


def test_pose_markers_geometry_at_unit_depth():
    kpts, scores = _people(np.random.default_rng(2))
    scores[0, [5, 9]] = 0.1  # left shoulder and left wrist hidden
    scores[1, :] = 0.0  # second person: nothing to draw
    arr = pose_markers(_header(), kpts, scores, K, threshold=0.3)
    assert isinstance(arr, MarkerArray)
    first, rest = arr.markers[0], arr.markers[1:]
    assert first.action == Marker.DELETEALL
    assert [(m.ns, m.id, m.type) for m in rest] == [("pose_joints", 0, Marker.SPHERE_LIST),
                                                   ("pose_limbs", 0, Marker.LINE_LIST)]
    for m in arr.markers:
        assert m.header.frame_id == "camera_optical_frame" and m.header.stamp.nanosec == 123456789
    joints, limbs = rest
    shown = np.flatnonzero(scores[0] >= 0.3)
    pts = np.array([[p.x, p.y, p.z] for p in joints.points])
    assert len(pts) == len(shown) == 15 and len(joints.colors) == 15
    np.testing.assert_allclose(pts[:, 2], 1.0)
    # Projecting the unit-depth points with K gives back the pixels.
    np.testing.assert_allclose(pts[:, 0] * 500 + 320, kpts[0, shown, 0], atol=1e-3)
    np.testing.assert_allclose(pts[:, 1] * 400 + 240, kpts[0, shown, 1], atol=1e-3)
    drawn = [(a, b) for a, b in COCO_SKELETON if scores[0, a] >= 0.3 and scores[0, b] >= 0.3]
    assert len(limbs.points) == 2 * len(drawn) == len(limbs.colors)
    lp = np.array([[p.x, p.y] for p in limbs.points]).reshape(-1, 2, 2)
    expect = pixel_rays(kpts[0][np.array(drawn)], K)[..., :2]
    np.testing.assert_allclose(lp, expect, atol=1e-6)
    assert joints.scale.x > 0 and limbs.scale.x > 0 and joints.pose.orientation.w == 1.0
    deserialize_message(serialize_message(arr), MarkerArray)
    # No persons: only the DELETEALL.
    assert len(pose_markers(_header(), np.zeros((0, 17, 2)), np.zeros((0, 17)), K).markers) == 1
    with pytest.raises(ValueError):
        pose_markers(_header(), kpts, scores, None)


def test_camera_matrix_from_camera_info():
    info = CameraInfo(width=640, height=480)
    assert camera_matrix(info) is None  # all-zero K: uncalibrated
    assert camera_matrix(None) is None
    info.k = K.reshape(-1).tolist()
    np.testing.assert_array_equal(camera_matrix(info), K)
    np.testing.assert_array_equal(camera_matrix(info, (640, 480)), K)
    half = camera_matrix(info, (320, 240))
    np.testing.assert_allclose(half, [[250, 0, 159.75], [0, 200, 119.75], [0, 0, 1]])


def test_pose_messages_from_result():
    kpts, scores = _people(np.random.default_rng(3))
    result = PoseResult(kpts, scores, np.zeros((2, 4), np.float32), 12.0, keypoint_threshold=0.6)
    cloud, markers = pose_messages(_header(), result, K)
    assert (cloud.height, cloud.width) == (2, 17)
    joints = [m for m in markers.markers if m.ns == "pose_joints"]
    assert sum(len(m.points) for m in joints) == int((scores >= 0.6).sum())
    cloud, markers = pose_messages(_header(), result, None)
    assert markers is None and cloud.height == 2
