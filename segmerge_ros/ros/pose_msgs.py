"""ROS messages for pose results (message construction only; the node publishes them).

* ``<ns>/pose/keypoints``: ``sensor_msgs/PointCloud2``, organised: height = persons, width = 17 (COCO-17 order),
  fields ``x, y, z, u, v, score`` (float32, point_step 24). ``u, v`` are image pixels (OpenCV convention: pixel
  centres at integers), ``score`` the heatmap maximum. With a camera matrix K, ``(x, y, z)`` is the keypoint's ray
  at unit depth in the camera's optical frame, ``((u - cx) / fx, (v - cy) / fy, 1)``; lens distortion is ignored
  (the ray is exact for rectified images, approximate for raw ones). Without K, ``(x, y, z) = (u, v, 0)``.
  The input image's header (stamp, frame_id) is copied. No persons: height 0, empty data.
* ``<ns>/pose/markers``: ``visualization_msgs/MarkerArray``: first a DELETEALL marker (so persons of the previous
  frame vanish), then per person a SPHERE_LIST of its joints (ns ``pose_joints``, id = person index) and a LINE_LIST
  of its COCO limbs (ns ``pose_limbs``), at unit depth in the optical frame (needs K). Only keypoints whose score
  reaches the threshold are drawn; a limb needs both ends. Header copied. In RViz's Camera display these overlay
  the image.
"""

from __future__ import annotations

import sys
from typing import Sequence

import numpy as np
from geometry_msgs.msg import Point
from sensor_msgs.msg import CameraInfo, PointCloud2, PointField
from std_msgs.msg import ColorRGBA, Header
from visualization_msgs.msg import Marker, MarkerArray

from segmerge_ros.models.pose.model import COCO_KEYPOINT_SIDES, COCO_SKELETON
from segmerge_ros.inference.pose import SIDE_COLORS, limb_sides

KEYPOINT_FIELDS = ("x", "y", "z", "u", "v", "score")
KEYPOINT_DTYPE = np.dtype([(name, np.float32) for name in KEYPOINT_FIELDS])


def copy_header(header: Header) -> Header:
    return Header(stamp=header.stamp, frame_id=header.frame_id)


def camera_matrix(info: CameraInfo | None, image_size: tuple[int, int] | None = None) -> np.ndarray | None:
    """The 3x3 K of a CameraInfo, or None when unknown (no message, or fx/fy zero).

    ``image_size`` = (width, height) of the images the keypoints are in; when the CameraInfo states another
    resolution, K is scaled to it (a resized stream with the original calibration).
    """
    if info is None:
        return None
    k = np.asarray(info.k, dtype=np.float64).reshape(3, 3).copy()
    if k[0, 0] <= 0 or k[1, 1] <= 0:
        return None
    if image_size is not None and info.width > 0 and info.height > 0 and (info.width, info.height) != tuple(image_size):
        sx, sy = image_size[0] / info.width, image_size[1] / info.height
        # Pixel centres at integers: u' = (u + 0.5) * s - 0.5.
        k[0, 0] *= sx
        k[0, 2] = (k[0, 2] + 0.5) * sx - 0.5
        k[1, 1] *= sy
        k[1, 2] = (k[1, 2] + 0.5) * sy - 0.5
    return k


def pixel_rays(uv: np.ndarray, k: np.ndarray) -> np.ndarray:
    """(..., 2) pixels -> (..., 3) rays at unit depth (z = 1) in the optical frame (no undistortion)."""
    uv = np.asarray(uv, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    x = (uv[..., 0] - k[0, 2] - k[0, 1] * (uv[..., 1] - k[1, 2]) / k[1, 1]) / k[0, 0]  # k[0,1]: skew (normally 0)
    y = (uv[..., 1] - k[1, 2]) / k[1, 1]
    return np.stack([x, y, np.ones_like(x)], axis=-1)


def keypoints_cloud(header: Header, keypoints: np.ndarray, scores: np.ndarray, k: np.ndarray | None = None,
                    threshold: float | None = None) -> PointCloud2:
    """Organised PointCloud2 (height = persons, width = keypoints) of a frame's keypoints.

    ``threshold``: when given, the x, y, z of keypoints scoring below it are NaN (RViz skips them) and
    ``is_dense`` is False; u, v and score stay.
    """
    keypoints = np.asarray(keypoints, dtype=np.float64).reshape(-1, np.shape(keypoints)[-2], 2)
    scores = np.asarray(scores, dtype=np.float32).reshape(keypoints.shape[:2])
    persons, joints = keypoints.shape[:2]
    cloud = np.empty((persons, joints), dtype=KEYPOINT_DTYPE)
    cloud["u"] = keypoints[..., 0]
    cloud["v"] = keypoints[..., 1]
    cloud["score"] = scores
    if k is not None:
        rays = pixel_rays(keypoints, k)
        cloud["x"], cloud["y"], cloud["z"] = rays[..., 0], rays[..., 1], rays[..., 2]
    else:
        cloud["x"], cloud["y"], cloud["z"] = keypoints[..., 0], keypoints[..., 1], 0.0
    dense = True
    if threshold is not None:
        low = scores < threshold
        if low.any():
            dense = False
            for name in ("x", "y", "z"):
                cloud[name][low] = np.nan
    msg = PointCloud2()
    msg.header = copy_header(header)
    msg.height = persons
    msg.width = joints
    msg.fields = [PointField(name=name, offset=KEYPOINT_DTYPE.fields[name][1], datatype=PointField.FLOAT32, count=1)
                  for name in KEYPOINT_FIELDS]
    msg.is_bigendian = sys.byteorder == "big"
    msg.point_step = KEYPOINT_DTYPE.itemsize
    msg.row_step = KEYPOINT_DTYPE.itemsize * joints
    msg.data = cloud.tobytes()
    msg.is_dense = dense
    return msg


def read_keypoints_cloud(msg: PointCloud2) -> np.ndarray:
    """(height, width) structured array with fields x, y, z, u, v, score (for tests and consumers)."""
    offsets = {f.name: f.offset for f in msg.fields}
    dtype = np.dtype({"names": list(offsets), "formats": [np.float32] * len(offsets),
                      "offsets": list(offsets.values()), "itemsize": msg.point_step})
    if msg.is_bigendian != (sys.byteorder == "big"):
        dtype = dtype.newbyteorder()
    return np.frombuffer(bytes(msg.data), dtype=dtype).reshape(msg.height, msg.width)


def _color(rgb: Sequence[int], alpha: float = 1.0) -> ColorRGBA:
    return ColorRGBA(r=rgb[0] / 255.0, g=rgb[1] / 255.0, b=rgb[2] / 255.0, a=float(alpha))


_SIDE_RGBA = [_color(c) for c in SIDE_COLORS]
_LIMB_SIDES = limb_sides(COCO_SKELETON)


def _points(xyz: np.ndarray) -> list[Point]:
    return [Point(x=float(a), y=float(b), z=float(c)) for a, b, c in xyz]


def pose_markers(header: Header, keypoints: np.ndarray, scores: np.ndarray, k: np.ndarray,
                 threshold: float = 0.3, joint_diameter: float = 0.012, line_width: float = 0.005,
                 skeleton: Sequence[tuple[int, int]] = COCO_SKELETON) -> MarkerArray:
    """MarkerArray: DELETEALL, then joints (SPHERE_LIST) and limbs (LINE_LIST) per person at unit depth.

    Sizes are in metres at 1 m depth (0.012 is about 7 px at fx = 600).
    """
    if k is None:
        raise ValueError("pose markers need the camera matrix K (subscribe to camera_info)")
    head = copy_header(header)
    out = MarkerArray()
    clear = Marker()
    clear.header = head
    clear.action = Marker.DELETEALL
    out.markers.append(clear)
    keypoints = np.asarray(keypoints, dtype=np.float64)
    scores = np.asarray(scores)
    if keypoints.size == 0:
        return out
    rays = pixel_rays(keypoints, k)  # (P, K, 3)
    ok = scores >= threshold
    limbs = np.asarray(skeleton, dtype=np.int64)
    limb_sides_ = _LIMB_SIDES if skeleton is COCO_SKELETON else limb_sides(skeleton)
    for person in range(len(rays)):
        joints = np.flatnonzero(ok[person])
        if joints.size == 0:
            continue
        m = Marker()
        m.header = head
        m.ns = "pose_joints"
        m.id = person
        m.type = Marker.SPHERE_LIST
        m.action = Marker.ADD
        m.pose.orientation.w = 1.0
        m.scale.x = m.scale.y = m.scale.z = float(joint_diameter)
        m.color = _color((255, 255, 255))
        m.points = _points(rays[person, joints])
        m.colors = [_SIDE_RGBA[COCO_KEYPOINT_SIDES[j]] if j < len(COCO_KEYPOINT_SIDES) else _SIDE_RGBA[0]
                    for j in joints]
        out.markers.append(m)
        drawn = ok[person, limbs[:, 0]] & ok[person, limbs[:, 1]]
        if not drawn.any():
            continue
        line = Marker()
        line.header = head
        line.ns = "pose_limbs"
        line.id = person
        line.type = Marker.LINE_LIST
        line.action = Marker.ADD
        line.pose.orientation.w = 1.0
        line.scale.x = float(line_width)
        line.color = _color((255, 255, 255))
        line.points = _points(rays[person, limbs[drawn].reshape(-1)])
        line.colors = [_SIDE_RGBA[s] for s in np.repeat(limb_sides_[drawn], 2)]
        out.markers.append(line)
    return out


def pose_messages(header: Header, result, k: np.ndarray | None,
                  threshold: float | None = None) -> tuple[PointCloud2, MarkerArray | None]:
    """Both pose outputs of a frame from a ``PoseResult``: the keypoint cloud, and the markers when K is known.

    ``threshold`` defaults to the result's ``keypoint_threshold`` (markers only draw keypoints reaching it; the
    cloud keeps every keypoint with its score).
    """
    threshold = result.keypoint_threshold if threshold is None else threshold
    cloud = keypoints_cloud(header, result.keypoints, result.scores, k)
    markers = pose_markers(header, result.keypoints, result.scores, k, threshold) if k is not None else None
    return cloud, markers
