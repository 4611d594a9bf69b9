"""The node's vision_msgs and REP-155 outputs on real frames, in-process over real rclpy: the trained SegFormer-B0
on 20 consecutive vtest frames (576x768) with pose and hri.enable. Detections carry one box per person region of
the published mask, walking people keep their ids, label_info reaches a late subscriber, and the REP-155 topics
carry the tracked ids and valid skeletons."""

from __future__ import annotations

import time

import numpy as np
import pytest
import rclpy
from hri_msgs.msg import IdsList, NormalizedRegionOfInterest2D, Skeleton2D
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
from vision_msgs.msg import Detection2DArray, LabelInfo

from conftest import ros_domain_id
from segmerge_ros.inference.detections import objects_from_class_map
from segmerge_ros.inference.sources import iter_frames
from segmerge_ros.models.labels import CITYSCAPES
from segmerge_ros.ros import node as node_module
from segmerge_ros.ros.conversions import message_to_rgb, rgb8_image

CAMERA = "/det_cam/image"
FRAMES = 20
MIN_AREA = 400


@pytest.fixture(scope="module")
def run(shared_data, student_dir):
    """Runs the node over the frames, one at a time (each waits for its detections), and keeps what arrived."""
    context = Context()
    rclpy.init(context=context, domain_id=ros_domain_id("node_detections"))
    overrides = [Parameter(name, value=value) for name, value in {
        "image_topics": [CAMERA], "weights": str(student_dir), "backend": "eager", "precision": "fp32",
        "pose.enable": True, "hri.enable": True, "detections.min_area": MIN_AREA,
        "pose.min_person_area": MIN_AREA}.items()]
    node = node_module.SegmergeNode(context=context, parameter_overrides=overrides)
    probe = Node("detections_probe", context=context)
    got = {"detections": [], "masks": [], "tracked": [], "skeletons": {}, "rois": {}}
    probe.create_subscription(Detection2DArray, "/det_cam/segmentation/detections", got["detections"].append, 30)
    probe.create_subscription(Image, "/det_cam/segmentation/mask", got["masks"].append, 30)
    probe.create_subscription(IdsList, "/humans/bodies/tracked", got["tracked"].append, 30)
    camera = probe.create_publisher(Image, CAMERA, QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT))
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    executor.add_node(probe)

    def spin_until(condition, timeout_s):
        end = time.monotonic() + timeout_s
        while time.monotonic() < end and not condition():
            executor.spin_once(timeout_sec=0.02)
        return condition()

    def watch_bodies():  # per-body topics appear as bodies do: subscribe to each new one
        for topic, _ in probe.get_topic_names_and_types():
            if topic.endswith("/skeleton2d") and topic not in got["skeletons"]:
                got["skeletons"][topic] = []
                probe.create_subscription(Skeleton2D, topic, got["skeletons"][topic].append, 30)
            if topic.endswith("/roi") and topic not in got["rois"]:
                got["rois"][topic] = []
                probe.create_subscription(NormalizedRegionOfInterest2D, topic, got["rois"][topic].append, 30)

    assert spin_until(lambda: probe.count_subscribers(CAMERA) >= 1 and
                      node.count_subscribers("/det_cam/segmentation/detections") >= 1 and
                      node.count_subscribers("/humans/bodies/tracked") >= 1, 10)
    frames = list(iter_frames(shared_data / "opencv_samples" / "vtest.avi", max_frames=FRAMES))
    for i, frame in enumerate(frames):
        camera.publish(rgb8_image(frame))
        assert spin_until(lambda: len(got["detections"]) > i and len(got["masks"]) > i and len(got["tracked"]) > i,
                          30), f"frame {i}"
        watch_bodies()
        spin_until(lambda: False, 0.2)
    # late subscriber: the latched label info, published at configure, long before this subscription
    got["label_info"] = []
    probe.create_subscription(LabelInfo, "/det_cam/segmentation/label_info", got["label_info"].append,
                              QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL))
    spin_until(lambda: got["label_info"], 10)
    yield got
    executor.shutdown(timeout_sec=0.5)
    node.stop()
    node.destroy_node()
    probe.destroy_node()
    rclpy.try_shutdown(context=context)


def test_detections_are_the_person_regions_of_the_mask_with_boxes_and_names(run):
    assert len(run["detections"]) == FRAMES and len(run["masks"]) == FRAMES
    total = 0
    for detections, mask in zip(run["detections"], run["masks"]):
        assert detections.header.stamp == mask.header.stamp
        class_map = message_to_rgb(mask)[..., 0]
        expected = objects_from_class_map(class_map, CITYSCAPES.person_ids, MIN_AREA)
        boxes = np.array([[d.bbox.center.position.x - d.bbox.size_x / 2, d.bbox.center.position.y - d.bbox.size_y / 2,
                           d.bbox.center.position.x + d.bbox.size_x / 2, d.bbox.center.position.y + d.bbox.size_y / 2]
                          for d in detections.detections]).reshape(-1, 4)
        assert len(detections.detections) == len(expected)
        np.testing.assert_allclose(boxes, expected.boxes, atol=1e-3)
        for d in detections.detections:
            assert d.results[0].hypothesis.class_id in ("person", "rider")
            assert 0.0 < d.results[0].hypothesis.score <= 1.0 and d.id.startswith("t")
        total += len(expected)
    assert total >= FRAMES  # vtest has people in every frame


def test_a_walking_person_keeps_one_id_for_20_frames(run):
    per_frame = [{d.id for d in frame.detections} for frame in run["detections"]]
    kept = set.intersection(*per_frame)
    assert kept, f"no id lasted all {FRAMES} frames: {per_frame}"
    for frame in run["detections"]:  # ids are unique within a frame
        ids = [d.id for d in frame.detections]
        assert len(ids) == len(set(ids))


def test_label_info_reaches_a_late_subscriber(run):
    assert run["label_info"], "no LabelInfo for a transient-local subscriber that joined late"
    info = run["label_info"][0]
    assert [(c.class_id, c.class_name) for c in info.class_map] == list(enumerate(CITYSCAPES.classes))


def test_rep155_bodies_follow_the_tracked_people(run):
    assert len(run["tracked"]) == FRAMES
    for tracked, detections in zip(run["tracked"], run["detections"]):
        # every person seen is tracked; a track missed for a few frames (tracking.max_age) still is
        assert {d.id for d in detections.detections} <= set(tracked.ids)
    seen = {d.id for frame in run["detections"] for d in frame.detections}
    assert set().union(*(set(t.ids) for t in run["tracked"])) == seen  # no body the detections never had
    tracked_ids = set().union(*(set(t.ids) for t in run["tracked"]))
    assert run["rois"] and {t.split("/")[3] for t in run["rois"]} <= tracked_ids
    for messages in run["rois"].values():
        for roi in messages:
            assert 0.0 <= roi.xmin < roi.xmax <= 1.0 and 0.0 <= roi.ymin < roi.ymax <= 1.0
    skeletons = [s for messages in run["skeletons"].values() for s in messages]
    assert skeletons, "pose on, yet no skeleton2d"
    for skeleton in skeletons:
        assert len(skeleton.skeleton) == 18
        assert all(0.0 <= p.x <= 1.0 and 0.0 <= p.y <= 1.0 and 0.0 <= p.c <= 1.0 for p in skeleton.skeleton)
