"""segmerge_node with a Mask2Former (issue 13), in its own process over DDS with real rclpy: instances and their
info each frame, the merge rate on the encoder knob, pose crops from person instances.

The model is a tiny random Mask2Former written in the hub layout by transformers' own ``save_pretrained``; its class
head is biased towards class 0 ("person") so that its queries make confident person instances. These tests check the
plumbing (messages, headers, ids against info, the knob, one pose crop per instance), never segmentation quality.
Frames are real (vtest.avi). ROS domains 60..79 (test_node.py uses 100..199, test_node_pose.py 200..229).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import cv2
import numpy as np
import pytest
import rclpy
import torch
from rclpy.context import Context
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image, PointCloud2
from std_msgs.msg import Header, String
from vision_msgs.msg import Detection2DArray

from conftest import ros_domain_id
from mask2former_fixtures import hf_mask2former, write_hub_folder
from segmerge_ros.apps.client import SegmergeClient, node_command, ros_env, stop_process
from segmerge_ros.ros.conversions import rgb8_image
from segmerge_ros.inference.sources import iter_frames

os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"

CAM = "/m2f_cam/image"
SIZE = (120, 160)  # camera frames (height, width); the network runs at 96x128
CLASSES = ("person", "car", "road")


def domain_id(name: str) -> int:
    return ros_domain_id(name, first=60, count=20)


class Collector(list):
    """Messages of one topic, as received."""

    def __init__(self, node, msg_type, topic: str):
        super().__init__()
        node.create_subscription(msg_type, topic, self.append,
                                 QoSProfile(depth=20, reliability=ReliabilityPolicy.RELIABLE))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    model = hf_mask2former("swin", class_names=CLASSES)
    with torch.no_grad():
        model.class_predictor.bias[0] += 8.0  # every query: a confident person
    return write_hub_folder(tmp_path_factory.mktemp("m2f_hub"), model)


@pytest.fixture(scope="module")
def street(shared_data) -> list[np.ndarray]:
    video = shared_data / "opencv_samples" / "vtest.avi"
    return [cv2.resize(f, SIZE[::-1], interpolation=cv2.INTER_AREA) for f in iter_frames(video, max_frames=4)]


@pytest.fixture(scope="module")
def client():
    context = Context()
    rclpy.init(context=context, domain_id=domain_id(__name__))
    ros = SegmergeClient(context, name="test_m2f_client")
    ros.pub = ros.node.create_publisher(Image, CAM, QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT))
    ros.instances = Collector(ros.node, Image, "/m2f_cam/segmentation/instances")
    ros.info = Collector(ros.node, String, "/m2f_cam/segmentation/instances/info")
    ros.panoptic = Collector(ros.node, Image, "/m2f_cam/segmentation/panoptic")
    ros.panoptic_info = Collector(ros.node, String, "/m2f_cam/segmentation/panoptic/info")
    ros.clouds = Collector(ros.node, PointCloud2, "/m2f_cam/pose/keypoints")
    ros.detections = Collector(ros.node, Detection2DArray, "/m2f_cam/segmentation/detections")
    yield ros
    ros.close()
    rclpy.try_shutdown(context=context)


@pytest.fixture(scope="module")
def node(client, weights, tmp_path_factory):
    logs = tmp_path_factory.mktemp("m2f_node")
    params = {"image_topics": [CAM], "model": "mask2former-swin-t", "weights": str(weights), "input_size": "96x128",
              "backend": "eager", "precision": "fp32",
              "instances.score_threshold": 0.3, "panoptic.enable": True, "pose.enable": True,
              "pose.min_person_area": 1, "pose.max_persons": 32, "detections.min_area": 1}
    env = ros_env(domain_id(__name__))
    env["OMP_NUM_THREADS"] = "1"
    stderr = open(logs / "stderr", "w")
    process = subprocess.Popen(node_command(params), env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    client.wait_ready(120.0, process)
    client.spin_until(lambda: client.pub.get_subscription_count() > 0, 20)
    client.spin_for(0.5)  # the output subscriptions match too
    yield process
    stop_process(process, signal.SIGINT)
    stderr.close()


def stamp_ns(h: Header) -> int:
    return h.stamp.sec * 1_000_000_000 + h.stamp.nanosec


def send(client, frames: list[np.ndarray], count: int) -> dict[int, Header]:
    """Publish ``count`` frames, each after the previous one's instance info has arrived (none is dropped)."""
    sent = {}
    for i in range(count):
        h = Header(stamp=client.node.get_clock().now().to_msg(), frame_id="m2f_cam_optical")
        client.pub.publish(rgb8_image(frames[i % len(frames)], h))
        sent[stamp_ns(h)] = h
        assert client.spin_until(lambda: any(info_stamp(m) == stamp_ns(h) for m in client.info), 60), \
            "no instance info for a frame"
    return sent


def info_stamp(msg: String) -> int:
    stamp = json.loads(msg.data)["header"]["stamp"]
    return stamp["sec"] * 1_000_000_000 + stamp["nanosec"]


def test_instances_and_their_info_every_frame(client, node, street):
    sent = send(client, street, 3)
    assert client.spin_until(lambda: sum(stamp_ns(m.header) in sent for m in client.instances) == 3, 10)
    ids_seen = 0
    for image in [m for m in client.instances if stamp_ns(m.header) in sent]:
        h = sent[stamp_ns(image.header)]
        assert image.header.frame_id == h.frame_id and image.header.stamp == h.stamp
        assert image.encoding == "mono16" and (image.height, image.width) == SIZE
        assert image.step == 2 * SIZE[1] and image.is_bigendian == 0
        id_map = np.frombuffer(bytes(image.data), dtype="<u2").reshape(SIZE)
        info = next(json.loads(m.data) for m in client.info if info_stamp(m) == stamp_ns(h))
        assert info["header"]["frame_id"] == h.frame_id
        entries = info["instances"]
        ids = sorted(int(i) for i in entries)
        assert set(np.unique(id_map).tolist()) - {0} == set(ids)  # every id in the image is described, and only those
        assert ids == list(range(1, len(ids) + 1))
        scores = [entries[str(i)]["score"] for i in ids]
        assert scores == sorted(scores, reverse=True) and all(0.3 <= s <= 1 for s in scores)
        assert all(entries[str(i)]["class"] == CLASSES[entries[str(i)]["class_id"]] for i in ids)
        ids_seen += len(ids)
    assert ids_seen > 0, "the biased model made no instance in any frame"


def test_panoptic_segments_and_their_info(client, node, street):
    sent = send(client, street, 2)
    assert client.spin_until(lambda: sum(info_stamp(m) in sent for m in client.panoptic_info) == 2, 10)
    images = [m for m in client.panoptic if stamp_ns(m.header) in sent]
    assert len(images) == 2
    segments_seen = 0
    for image in images:
        assert image.encoding == "mono16" and (image.height, image.width) == SIZE
        segment_map = np.frombuffer(bytes(image.data), dtype="<u2").reshape(SIZE)
        info = next(json.loads(m.data) for m in client.panoptic_info if info_stamp(m) == stamp_ns(image.header))
        segments = info["segments"]
        assert set(np.unique(segment_map).tolist()) - {0} == {int(i) for i in segments}
        # Unknown thing/stuff split for this label set: every class is a thing; detectron2 keeps scores > 0.8.
        assert all(s["is_thing"] and s["score"] > 0.8 and s["class"] == CLASSES[s["class_id"]]
                   for s in segments.values())
        segments_seen += len(segments)
    assert segments_seen > 0, "the biased model made no panoptic segment"


def test_pose_takes_one_crop_per_person_instance(client, node, street):
    sent = send(client, street, 2)
    assert client.spin_until(lambda: sum(stamp_ns(c.header) in sent for c in client.clouds) == 2, 20)
    for cloud in [c for c in client.clouds if stamp_ns(c.header) in sent]:
        info = next(json.loads(m.data) for m in client.info if info_stamp(m) == stamp_ns(cloud.header))
        persons = sum(entry["class"] == "person" for entry in info["instances"].values())
        assert cloud.height == persons  # one keypoint row per person instance


def test_detections_are_the_person_instances_in_the_order_of_the_keypoint_rows(client, node, street):
    sent = send(client, street, 2)
    assert client.spin_until(lambda: sum(stamp_ns(d.header) in sent for d in client.detections) == 2 and
                             sum(stamp_ns(c.header) in sent for c in client.clouds) == 2, 20)
    for detections in [d for d in client.detections if stamp_ns(d.header) in sent]:
        info = next(json.loads(m.data) for m in client.info if info_stamp(m) == stamp_ns(detections.header))
        persons = sorted(entry["score"] for entry in info["instances"].values() if entry["class"] == "person")
        assert len(detections.detections) == len(persons) > 0  # one per instance, though people touch
        scores = sorted(d.results[0].hypothesis.score for d in detections.detections)
        np.testing.assert_allclose(scores, persons, atol=1e-4)  # the instance's own score (info rounds to 4)
        assert all(d.results[0].hypothesis.class_id == "person" and d.id for d in detections.detections)
        cloud = next(c for c in client.clouds if stamp_ns(c.header) == stamp_ns(detections.header))
        assert cloud.height == len(detections.detections)


def test_score_threshold_is_live_and_diagnostics_count_the_frames_with_instances(client, node, street):
    def instances_in(stamps):
        infos = [json.loads(m.data) for m in client.info if info_stamp(m) in stamps]
        return [len(info["instances"]) for info in infos]

    set_ok = client.set_parameters({"instances.score_threshold": 1.0})["instances.score_threshold"]
    assert set_ok.successful, set_ok.reason
    sent = send(client, street, 2)
    assert client.spin_until(lambda: len(instances_in(sent)) == 2, 20)
    assert instances_in(sent) == [0, 0]  # no score reaches 1
    assert client.set_parameters({"instances.score_threshold": 0.3})["instances.score_threshold"].successful
    sent = send(client, street, 2)
    assert client.spin_until(lambda: len(instances_in(sent)) == 2, 20)
    assert min(instances_in(sent)) > 0
    started = time.monotonic()
    send(client, street, 2)
    assert client.spin_until(lambda: any("instances_frames" in w.values and w.values["instances_frames"] != "0/0"
                                         for w in client.windows_after(CAM, started)), 10)
    window = next(w for w in client.windows_after(CAM, started) if "instances_frames" in w.values)
    computed, frames = (int(v) for v in window.values["instances_frames"].split("/"))
    assert computed == frames > 0  # subscribed (and pose needs them): computed on every frame


def test_merge_rate_selects_the_encoder_knob(client, node, street):
    # The tiny model's encoder has 2 layers: rate 0.15 runs the first on the coarse scales (the knob's last setting).
    results = client.set_parameters({"merge_rate": 0.15})
    assert all(r.successful for r in results.values()), {n: r.reason for n, r in results.items()}
    send(client, street, 2)
    assert client.spin_until(lambda: (client.latest(CAM) is not None
                                      and client.latest(CAM).values.get("merge_config") == "mask2former coarse_layers=1"),
                             10), client.latest(CAM).values if client.latest(CAM) else "no diagnostics"
    refused = client.set_parameters({"preset": "hq"})["preset"]
    assert not refused.successful and "merge preset" in refused.reason
