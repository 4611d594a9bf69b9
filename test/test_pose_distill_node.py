"""A checkpoint written by a short pose distillation (issue 11) is what segmerge_node loads with pose.enable and
publishes keypoints from: the node's keypoints for a frame equal those of PoseEstimator with the same checkpoint.

The node runs in its own process over DDS with real rclpy, on localhost discovery and ROS_DOMAIN_ID 231 (test_node
uses 100..199, test_node_pose 200..229, the transport probe 230).
"""

from __future__ import annotations

import os
import signal
import subprocess

import cv2
import numpy as np
import pytest
import rclpy
import torch
from rclpy.context import Context
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image, PointCloud2
from std_msgs.msg import Header

from segmerge_ros.models.pose.model import SegformerPose
from segmerge_ros.apps.client import SegmergeClient, node_command, ros_env, stop_process
from segmerge_ros.ros.conversions import rgb8_image
from segmerge_ros.ros.pose_msgs import read_keypoints_cloud
from segmerge_ros.training.movenet import MoveNetTeacher
from segmerge_ros.inference.pose import PoseEstimator
from segmerge_ros.inference.sources import iter_frames, read_rgb
from segmerge_ros.training.pose_people import People, PersonFinder, teacher_keypoints
from segmerge_ros.training.train_pose import PoseTrainSettings, train_pose

os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"

DOMAIN_ID = 231
CAM = "/distilled_cam/image"
SIZE = (288, 384)  # (height, width) of the frames sent = the segmentation input: no resize in the engine


@pytest.fixture(scope="module")
def distilled(shared_data, student_dir, tmp_path_factory):
    """pose.pth of a 3-step distillation on the people of vtest frame 0 (small crops: the weights are size-free)."""
    torch.set_num_threads(1)
    frame = next(iter_frames(shared_data / "opencv_samples" / "vtest.avi"))
    boxes = PersonFinder(student_dir)(frame)
    teacher = MoveNetTeacher(shared_data / "coral_movenet_pose" / "movenet_single_pose_lightning_ptq.tflite")
    kps, scores = teacher_keypoints(teacher, frame, boxes)
    n = len(boxes)
    people = People(np.zeros(n, np.int64), np.zeros(n, np.int64), boxes, kps, scores)
    out = tmp_path_factory.mktemp("distilled")
    torch.manual_seed(1)
    model = SegformerPose("b0", input_size=(96, 128))
    train_pose(model, people, {(0, 0): frame}, PoseTrainSettings(steps=3, batch=2, warmup=1, save_every=0), out,
               progress=False)
    return out / "pose.pth"


@pytest.fixture(scope="module")
def person_photo(shared_data) -> np.ndarray:
    image = read_rgb(shared_data / "mmpose_coco_keypoints" / "000000000785.jpg")
    return cv2.resize(image, SIZE[::-1], interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def client():
    context = Context()
    rclpy.init(context=context, domain_id=DOMAIN_ID)
    ros = SegmergeClient(context, name="test_distilled_pose_client")
    ros.pub = ros.node.create_publisher(Image, CAM, QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT))
    ros.clouds = []
    ros.node.create_subscription(PointCloud2, "/distilled_cam/pose/keypoints", ros.clouds.append,
                                 QoSProfile(depth=20, reliability=ReliabilityPolicy.RELIABLE))
    yield ros
    ros.close()
    rclpy.try_shutdown(context=context)


@pytest.fixture(scope="module")
def node(client, student_dir, distilled, tmp_path_factory):
    logs = tmp_path_factory.mktemp("distilled_node")
    params = {"image_topics": [CAM], "weights": str(student_dir), "input_size": f"{SIZE[0]}x{SIZE[1]}",
              "backend": "eager", "precision": "fp32",  # the keypoints, not the backend, are tested here
              "pose.enable": True, "pose.mode": "full_frame", "pose.weights": str(distilled),
              "pose.input_size": "128x96"}  # HEIGHTxWIDTH: the crops it was distilled at
    env = ros_env(DOMAIN_ID)
    env["OMP_NUM_THREADS"] = "1"
    stderr = open(logs / "stderr", "w")
    process = subprocess.Popen(node_command(params), env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    client.wait_ready(90.0, process)
    client.spin_until(lambda: client.pub.get_subscription_count() > 0, 20)
    client.spin_for(0.5)
    process.stderr_path = logs / "stderr"
    yield process
    stop_process(process, signal.SIGINT)
    stderr.close()


def test_the_node_publishes_the_distilled_checkpoints_keypoints(client, node, distilled, person_photo):
    stamps = set()
    for _ in range(3):
        h = Header(stamp=client.node.get_clock().now().to_msg(), frame_id="distilled_cam_optical")
        client.pub.publish(rgb8_image(person_photo, h))
        stamps.add((h.stamp.sec, h.stamp.nanosec))
        client.spin_for(0.5)

    def answered():
        return [c for c in client.clouds if (c.header.stamp.sec, c.header.stamp.nanosec) in stamps]

    assert client.spin_until(lambda: len(answered()) >= 1, 30), "no keypoints from the node"
    points = read_keypoints_cloud(answered()[-1])
    assert points.shape == (1, 17)  # full_frame: one person
    offline = PoseEstimator("segformer-b0", weights=distilled, mode="full_frame",
                            input_size=(96, 128)).estimate(person_photo)
    # pose.input_size took effect: the default crop size gives other keypoints.
    default_size = PoseEstimator("segformer-b0", weights=distilled, mode="full_frame").estimate(person_photo)
    assert np.abs(default_size.keypoints[0] - offline.keypoints[0]).max() > 2.0
    np.testing.assert_allclose(points["u"][0], offline.keypoints[0, :, 0], atol=1.0)
    np.testing.assert_allclose(points["v"][0], offline.keypoints[0, :, 1], atol=1.0)
    np.testing.assert_allclose(points["score"][0], offline.scores[0], atol=1e-3)
    text = open(node.stderr_path).read()
    assert "RANDOMLY INITIALISED" not in text, text[-2000:]
    assert "Traceback" not in text
