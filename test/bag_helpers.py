"""The small bags segmerge-bag's tests run on, made here from vtest.avi frames, and how they read them back.

Each bag: a raw camera (``/cam_raw/image``, rgb8, with ``/cam_raw/camera_info``), a JPEG camera
(``/cam_jpeg/image/compressed``, another size, one frame cut off: a corrupt frame) and a topic that is no camera
(``/notes``).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import cv2
import numpy as np
from rclpy.serialization import deserialize_message
from rosbags.rosbag2 import Reader
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
from std_msgs.msg import Float32, Header, String
from visualization_msgs.msg import MarkerArray

from segmerge_ros.apps import bag
from segmerge_ros.apps.bag_io import write_messages
from segmerge_ros.ros.conversions import jpeg_image, rgb8_image

RAW, INFO, JPEG, NOTES = "/cam_raw/image", "/cam_raw/camera_info", "/cam_jpeg/image/compressed", "/notes"
RAW_SIZE, JPEG_SIZE = (120, 160), (96, 128)  # (H, W): different sizes, so a mask from the wrong camera shows
FRAMES = 4
CORRUPT_JPEG = 2  # this JPEG frame is cut in half
SMALL = ["--input-size", "64x64"]
DEFAULT_OPTIONS = {"--weights": "random", "--backend": "eager", "--precision": "fp32"}  # compared with eager engines  # random B0 at a tiny input: plumbing tests in a second or two
STORAGE_SUFFIX = {"mcap": ".mcap", "sqlite3": ".db3"}


def stamp_ns(header: Header) -> int:
    return header.stamp.sec * 1_000_000_000 + header.stamp.nanosec


def header_at(ns: int, frame_id: str) -> Header:
    header = Header(frame_id=frame_id)
    header.stamp.sec, header.stamp.nanosec = divmod(ns, 1_000_000_000)
    return header


def camera_info(header: Header) -> CameraInfo:
    info = CameraInfo(header=header, height=RAW_SIZE[0], width=RAW_SIZE[1], distortion_model="plumb_bob")
    info.k = [150.0, 0.0, 79.5, 0.0, 150.0, 59.5, 0.0, 0.0, 1.0]
    return info


write_bag = write_messages  # (path, storage, [(topic, log time ns, rclpy message)]) -> path


def camera_messages(frames: list[np.ndarray]) -> list[tuple[str, int, object]]:
    """The test cameras: stamps 100 ms apart, log times 5 ms after the stamps (transport), camera_info first."""
    start = 1_700_000_000 * 1_000_000_000
    messages = [(INFO, start - 1_000_000, camera_info(header_at(start - 1_000_000, "cam_raw_optical")))]
    for i, frame in enumerate(frames):
        stamp = start + i * 100_000_000
        raw = rgb8_image(cv2.resize(frame, RAW_SIZE[::-1]), header_at(stamp, "cam_raw_optical"))
        jpeg = jpeg_image(cv2.resize(frame, JPEG_SIZE[::-1]), header_at(stamp + 1_000_000, "cam_jpeg_optical"))
        if i == CORRUPT_JPEG:
            jpeg.data = bytes(jpeg.data)[: len(jpeg.data) // 2]
        messages += [(RAW, stamp + 5_000_000, raw), (JPEG, stamp + 6_000_000, jpeg)]
    messages.append((NOTES, start + 7_000_000, String(data="not a camera")))
    return messages


def read_bag(path: Path) -> dict[str, list[tuple[int, object]]]:
    """topic -> [(log time, rclpy message)] of a bag, read with rosbags and deserialized with rclpy."""
    types = {"sensor_msgs/msg/Image": Image, "sensor_msgs/msg/CompressedImage": CompressedImage,
             "sensor_msgs/msg/CameraInfo": CameraInfo, "std_msgs/msg/String": String,
             "std_msgs/msg/Float32": Float32, "sensor_msgs/msg/PointCloud2": PointCloud2,
             "visualization_msgs/msg/MarkerArray": MarkerArray}
    topics: dict[str, list] = {}
    with Reader(path) as reader:
        for connection, log_time, raw in reader.messages():
            message = deserialize_message(raw, types[connection.msgtype])
            topics.setdefault(connection.topic, []).append((log_time, message))
    return topics


def invoke(argv: list) -> tuple[int, str, str]:
    """segmerge-bag in this process: its exit status, stdout and stderr."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):  # rich writes to sys.std*
        code = bag.main([str(a) for a in argv])
    return code, stdout.getvalue(), stderr.getvalue()
