"""vision_msgs builders (ros/detection_msgs.py) over the real message classes (no node)."""

from __future__ import annotations

import numpy as np
import pytest
from builtin_interfaces.msg import Time
from rclpy.serialization import deserialize_message, serialize_message
from std_msgs.msg import Header
from vision_msgs.msg import Detection2DArray, LabelInfo

from segmerge_ros.inference.detections import Objects
from segmerge_ros.models.labels import CITYSCAPES
from segmerge_ros.ros.detection_msgs import detections_message, label_info_message


def _header() -> Header:
    return Header(stamp=Time(sec=1763712000, nanosec=5), frame_id="camera_optical_frame")


def test_label_info_lists_every_class_with_its_index():
    classes = CITYSCAPES.classes
    msg = label_info_message(classes, _header(), threshold=0.25)
    assert isinstance(msg, LabelInfo)
    assert [(c.class_id, c.class_name) for c in msg.class_map] == list(enumerate(classes))
    assert msg.threshold == pytest.approx(0.25)
    assert msg.header.frame_id == "camera_optical_frame" and msg.header.stamp.sec == 1763712000


def test_detections_carry_box_centre_size_class_name_score_and_track_id():
    objects = Objects(boxes=np.array([[10, 20, 50, 100], [0, 0, 3, 5]], np.float32),
                      class_ids=np.array([11, 12], np.int64), scores=np.array([0.75, 0.5], np.float32),
                      areas=np.array([2400, 10], np.int64))
    header = _header()
    msg = detections_message(header, objects, ["t7", "t9"], CITYSCAPES.classes)
    msg = deserialize_message(serialize_message(msg), Detection2DArray)  # a valid message on the wire
    assert msg.header.frame_id == header.frame_id and msg.header.stamp.nanosec == 5
    assert len(msg.detections) == 2
    first, second = msg.detections
    assert first.id == "t7" and second.id == "t9"
    assert first.header.frame_id == header.frame_id
    assert (first.bbox.center.position.x, first.bbox.center.position.y) == (30.0, 60.0)
    assert (first.bbox.size_x, first.bbox.size_y) == (40.0, 80.0)
    assert (second.bbox.center.position.x, second.bbox.center.position.y) == (1.5, 2.5)
    assert (second.bbox.size_x, second.bbox.size_y) == (3.0, 5.0)
    assert [len(d.results) for d in msg.detections] == [1, 1]
    assert first.results[0].hypothesis.class_id == "person" and second.results[0].hypothesis.class_id == "rider"
    assert first.results[0].hypothesis.score == pytest.approx(0.75)
    assert second.results[0].hypothesis.score == pytest.approx(0.5)


def test_no_objects_give_an_empty_array_and_ids_must_match_objects():
    msg = detections_message(_header(), Objects.empty(), [], CITYSCAPES.classes)
    assert msg.detections == [] and msg.header.frame_id == "camera_optical_frame"
    with pytest.raises(ValueError):
        detections_message(_header(), Objects.empty(), ["t1"], CITYSCAPES.classes)
