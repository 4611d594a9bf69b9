"""segmerge_node with pose (issue #4) and plain-ViT models (issue #5), in its own process over DDS with real rclpy.

The pose node runs the trained SegFormer-B0 (it finds the pedestrians of vtest.avi) with a randomly initialised pose
model (pose.weights: random), so these tests check the plumbing (messages, headers, layout, rays, live
parameters, diagnostics), never keypoint accuracy. Frames are real: a COCO person photo for full_frame mode, vtest
frames for segmentation mode. Every ROS process is on localhost discovery and a private ROS_DOMAIN_ID in 200..229
(test_node.py uses 100..199).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import rclpy
from rclpy.context import Context
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, Image, PointCloud2, PointField
from std_msgs.msg import Header
from visualization_msgs.msg import Marker, MarkerArray

from conftest import ros_domain_id
from segmerge_ros.models.pose.model import COCO_SKELETON
from segmerge_ros.ros.conversions import rgb8_image
from segmerge_ros.apps.client import DiagnosticsWindow, SegmergeClient, node_command, ros_env, stop_process
from segmerge_ros.ros.pose_msgs import read_keypoints_cloud
from segmerge_ros.inference.sources import iter_frames

os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"

CAM = "/pose_cam/image"
VIT_CAM = "/vit_cam/image"
SIZE = (288, 384)  # camera frames (height, width) = the network input: no resize inside the engine
FIELDS = {"x", "y", "z", "u", "v", "score"}
K = dict(fx=310.0, fy=305.0, cx=191.5, cy=143.5)


def domain_id(name: str) -> int:
    return ros_domain_id(name, first=200, count=30)


def quiet_env(name: str) -> dict[str, str]:
    env = ros_env(domain_id(name))
    env["OMP_NUM_THREADS"] = "1"
    return env


def rgb(path: Path) -> np.ndarray:
    image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    return cv2.resize(image, SIZE[::-1], interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def person_photo(shared_data) -> np.ndarray:
    return rgb(shared_data / "mmpose_coco_keypoints" / "000000196141.jpg")


@pytest.fixture(scope="module")
def street(shared_data) -> list[np.ndarray]:
    video = shared_data / "opencv_samples" / "vtest.avi"
    return [cv2.resize(f, SIZE[::-1], interpolation=cv2.INTER_AREA) for f in iter_frames(video, max_frames=8)]


class Collector(list):
    """Messages of one topic, as received."""

    def __init__(self, node, msg_type, topic: str):
        super().__init__()
        node.create_subscription(msg_type, topic, self.append, QoSProfile(depth=20,
                                                                          reliability=ReliabilityPolicy.RELIABLE))

    def stamped(self, stamps: dict[int, Header]) -> list:
        """The messages answering frames sent with these stamps (a MarkerArray by its first marker's header)."""
        return [m for m in self if stamp_ns(header_of(m)) in stamps]


def header_of(msg) -> Header:
    return msg.markers[0].header if isinstance(msg, MarkerArray) else msg.header


@pytest.fixture(scope="module")
def client():
    context = Context()
    rclpy.init(context=context, domain_id=domain_id(__name__))
    ros = SegmergeClient(context, name="test_pose_client")
    ros.pub = ros.node.create_publisher(Image, CAM, QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT))
    ros.info_pub = ros.node.create_publisher(CameraInfo, "/pose_cam/camera_info", qos_profile_sensor_data)
    ros.clouds = Collector(ros.node, PointCloud2, "/pose_cam/pose/keypoints")
    yield ros
    ros.close()
    rclpy.try_shutdown(context=context)


@pytest.fixture(scope="module")
def node(client, student_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("pose_node")
    params = {"image_topics": [CAM], "weights": str(student_dir), "input_size": f"{SIZE[0]}x{SIZE[1]}",
              "backend": "eager", "precision": "fp32", "pose.enable": True, "pose.mode": "full_frame", "pose.min_person_area": 300,
              "pose.weights": "random"}  # plumbing: a random pose model (the packaged student: test_pose_weights.py)
    stderr = open(logs / "stderr", "w")
    process = subprocess.Popen(node_command(params), env=quiet_env(__name__), stdout=subprocess.DEVNULL,
                               stderr=stderr)
    client.wait_ready(90.0, process)
    client.spin_until(lambda: client.pub.get_subscription_count() > 0, 20)
    client.spin_for(0.5)  # the keypoints subscription matches too
    process.stderr_path = logs / "stderr"
    yield process
    stop_process(process, signal.SIGINT)
    stderr.close()


def stamp_ns(h: Header) -> int:
    return h.stamp.sec * 1_000_000_000 + h.stamp.nanosec


def send(client, frames: list[np.ndarray], count: int, period_s: float, frame_id: str = "pose_cam_optical",
         publisher=None, answered_by: list | None = None) -> dict[int, Header]:
    """Publish ``count`` frames ``period_s`` apart; with ``answered_by`` (a list of received messages), each next
    frame waits until the previous one is answered there, so a machine slowed by other processes drops none."""
    sent = {}
    for i in range(count):
        h = Header(stamp=client.node.get_clock().now().to_msg(), frame_id=frame_id)
        (publisher or client.pub).publish(rgb8_image(frames[i % len(frames)], h))
        sent[stamp_ns(h)] = h
        client.spin_for(period_s)
        if answered_by is not None:
            client.spin_until(lambda: any(received_stamp(m) == stamp_ns(h) for m in answered_by), 15)
    return sent


def received_stamp(msg) -> int:
    """The stamp of a message from a Collector, or of a client's Received entry."""
    return msg.stamp_ns if hasattr(msg, "stamp_ns") else stamp_ns(header_of(msg))


def set_ok(client, values: dict) -> None:
    results = client.set_parameters(values)
    assert all(r.successful for r in results.values()), {n: r.reason for n, r in results.items()}


def check_layout(cloud: PointCloud2) -> np.ndarray:
    """The PointCloud2 layout promised in the README; returns the points (height x 17)."""
    assert cloud.width == 17
    assert {f.name for f in cloud.fields} == FIELDS and len(cloud.fields) == 6
    assert all(f.datatype == PointField.FLOAT32 and f.count == 1 for f in cloud.fields)
    assert cloud.point_step == 24 and cloud.row_step == cloud.point_step * cloud.width
    assert len(cloud.data) == cloud.row_step * cloud.height
    points = read_keypoints_cloud(cloud)
    assert points.shape == (cloud.height, 17)
    for name in FIELDS:
        assert np.isfinite(points[name]).all(), name
    return points


def test_full_frame_keypoints_carry_the_input_header_and_the_layout(client, node, person_photo):
    since = time.monotonic()
    sent = send(client, [person_photo], 4, 0.3, answered_by=client.clouds)
    assert client.spin_until(lambda: len(client.clouds.stamped(sent)) >= 3, 20), "no keypoint clouds"
    for cloud in client.clouds.stamped(sent):
        h = sent[stamp_ns(cloud.header)]
        assert cloud.header.frame_id == h.frame_id and cloud.header.stamp == h.stamp
        assert cloud.height == 1  # full_frame: the frame is one person
        points = check_layout(cloud)
        # No camera_info yet: x, y, z = u, v, 0.
        np.testing.assert_array_equal(points["x"], points["u"])
        np.testing.assert_array_equal(points["y"], points["v"])
        assert (points["z"] == 0).all()
    assert client.spin_until(lambda: any(w.number("fps") > 0 for w in client.windows_after(CAM, since)), 5)
    window = [w for w in client.windows_after(CAM, since) if w.number("fps") > 0][-1]
    assert window.values["persons"] == "1"
    assert window.number("pose_ms") > 0
    assert window.number("processing_ms") > window.number("pose_ms")  # pose is inside the budgeted time


def test_camera_info_turns_keypoints_into_rays_and_markers_arrive(client, node, person_photo):
    markers = Collector(client.node, MarkerArray, "/pose_cam/pose/markers")
    info = CameraInfo(width=SIZE[1], height=SIZE[0], distortion_model="plumb_bob",
                      k=[K["fx"], 0.0, K["cx"], 0.0, K["fy"], K["cy"], 0.0, 0.0, 1.0])
    info.header.frame_id = "pose_cam_optical"
    client.spin_for(1.0)  # the markers subscription matches, so the node sees a subscriber
    for _ in range(3):
        client.info_pub.publish(info)
        client.spin_for(0.1)
    sent = send(client, [person_photo], 4, 0.3, answered_by=client.clouds)
    assert client.spin_until(lambda: len(markers.stamped(sent)) >= 2, 20), "no markers with a known K"
    rays = [c for c in client.clouds.stamped(sent) if read_keypoints_cloud(c)["z"].all()]
    assert rays, "camera_info did not reach the keypoints"
    for cloud in rays:
        p = check_layout(cloud)
        u, v = p["u"].astype(np.float64), p["v"].astype(np.float64)
        np.testing.assert_allclose(p["x"], (u - K["cx"]) / K["fx"], atol=1e-5)
        np.testing.assert_allclose(p["y"], (v - K["cy"]) / K["fy"], atol=1e-5)
        np.testing.assert_array_equal(p["z"], 1.0)
    clouds = clouds_for(client, markers.stamped(sent))
    for array in markers.stamped(sent):
        assert array.markers[0].action == Marker.DELETEALL
        assert all(m.header.frame_id == "pose_cam_optical" for m in array.markers)
        assert all(m.header.stamp == sent[stamp_ns(header_of(array))].stamp for m in array.markers)
        check_markers(array, clouds[stamp_ns(header_of(array))], threshold=0.3)

    # The random model's scores are ~1e-5: at threshold 0.3 nothing is drawn; at 0 (set live) the joints with a
    # non-negative score are, as the frame's own cloud says.
    set_ok(client, {"pose.keypoint_threshold": 0.0})
    sent = send(client, [person_photo], 3, 0.3, answered_by=client.clouds)
    assert client.spin_until(lambda: len(markers.stamped(sent)) >= 2, 20)
    clouds = clouds_for(client, markers.stamped(sent))
    drawn = [check_markers(a, clouds[stamp_ns(header_of(a))], threshold=0.0) for a in markers.stamped(sent)]
    assert sum(drawn) > 0, "threshold 0 drew no joint"
    set_ok(client, {"pose.keypoint_threshold": 0.3})


def clouds_for(client, arrays: list[MarkerArray]) -> dict[int, PointCloud2]:
    """The keypoint clouds of the frames these markers belong to, by stamp (waiting for any still in flight)."""
    wanted = {stamp_ns(header_of(a)) for a in arrays}
    client.spin_until(lambda: wanted <= {stamp_ns(c.header) for c in client.clouds}, 5)
    return {stamp_ns(c.header): c for c in client.clouds}


def check_markers(array: MarkerArray, cloud: PointCloud2, threshold: float) -> int:
    """The markers draw exactly the joints and limbs of the cloud whose scores reach the threshold, as unit-depth
    rays equal to the cloud's x, y, z; returns the number of joints drawn."""
    points = read_keypoints_cloud(cloud)
    ok = points["score"] >= threshold
    joints = {m.id: m for m in array.markers if m.ns == "pose_joints"}
    limbs = {m.id: m for m in array.markers if m.ns == "pose_limbs"}
    for person in range(cloud.height):
        visible = np.flatnonzero(ok[person])
        if not len(visible):
            assert person not in joints
            continue
        marker = joints[person]
        assert marker.type == Marker.SPHERE_LIST and len(marker.points) == len(visible)
        xyz = np.array([[q.x, q.y, q.z] for q in marker.points])
        expected = np.stack([points[n][person, visible] for n in ("x", "y", "z")], axis=1)
        np.testing.assert_allclose(xyz, expected, atol=1e-5)
        limb_count = sum(bool(ok[person, a] and ok[person, b]) for a, b in COCO_SKELETON)
        assert len(limbs[person].points) == 2 * limb_count if limb_count else person not in limbs
    return int(ok.sum())


def persons(clouds: list[PointCloud2]) -> list[int]:
    return [c.height for c in clouds]


def test_segmentation_mode_and_max_persons_set_live(client, node, street):
    overlays = client.subscribe_images("/pose_cam/segmentation/overlay")
    set_ok(client, {"pose.mode": "segmentation", "pose.max_persons": 4})
    client.spin_for(0.5)
    since = time.monotonic()
    sent = send(client, street, 6, 0.45, answered_by=client.clouds)
    assert client.spin_until(lambda: len(client.clouds.stamped(sent)) >= 4, 20)
    counts = persons(client.clouds.stamped(sent))
    assert max(counts) >= 2, f"the trained B0 found fewer than 2 pedestrians in vtest: {counts}"
    assert max(counts) <= 4
    for cloud in client.clouds.stamped(sent):
        check_layout(cloud)
        assert cloud.header.frame_id == "pose_cam_optical"
    assert overlays and overlays[-1].msg is not None
    assert (overlays[-1].msg.height, overlays[-1].msg.width) == SIZE

    set_ok(client, {"pose.max_persons": 1})
    after = send(client, street, 5, 0.3, answered_by=client.clouds)
    assert client.spin_until(lambda: len(client.clouds.stamped(after)) >= 3, 20)
    assert persons(client.clouds.stamped(after)) and max(persons(client.clouds.stamped(after))) == 1
    client.spin_for(1.1)
    windows = [w for w in client.windows_after(CAM, since) if w.number("fps") > 0]
    assert windows and all("persons" in w.values and "pose_ms" in w.values for w in windows)
    assert max(int(w.values["persons"]) for w in windows) >= 1
    # 0 is outside pose.max_persons's IntegerRange: rclpy refuses it.
    result = client.set_parameters({"pose.max_persons": 0})["pose.max_persons"]
    assert not result.successful and result.reason
    set_ok(client, {"pose.max_persons": 4, "pose.mode": "full_frame"})


def test_budget_mode_poses_fewer_people_when_pose_keeps_it_from_its_target(client, node, street):
    """Issue 19: at its highest merge rate and still over the target, with pose a large share of the frame, budget
    mode lowers the people posed per frame (never the user's pose.max_persons), and lifts that when switched off."""
    set_ok(client, {"pose.mode": "segmentation", "pose.max_persons": 4})
    before = send(client, street, 4, 0.2, answered_by=client.clouds)
    assert client.spin_until(lambda: len(client.clouds.stamped(before)) >= 3, 20)
    assert max(persons(client.clouds.stamped(before))) >= 2  # several people posed without budget mode
    since = time.monotonic()
    # out of reach, with the merge rate held at 0.9 (min = max: no probes, no re-calibration to wait for)
    set_ok(client, {"budget.min_merge_rate": 0.9})
    set_ok(client, {"budget.target_latency_ms": 1.0, "budget.mode": "latency"})
    for _ in range(6):  # calibration, then the rate settles (a re-probe may move it): at most 90 frames
        send(client, street, 15, 0.02, answered_by=client.clouds)
        client.spin_for(1.1)
        if any(w.values.get("pose_people_cap") == "1" for w in client.windows_after(CAM, since)):
            break
    capped = send(client, street, 5, 0.02, answered_by=client.clouds)
    assert client.spin_until(lambda: len(client.clouds.stamped(capped)) >= 4, 20)
    assert max(persons(client.clouds.stamped(capped))) == 1, persons(client.clouds.stamped(capped))
    client.spin_for(1.1)
    windows = client.windows_after(CAM, since)
    assert any(w.values.get("pose_people_cap") == "1" for w in windows), [w.values.get("pose_people_cap")
                                                                             for w in windows]
    assert client.get_parameters("pose.max_persons")["pose.max_persons"] == 4  # the user's value is untouched
    set_ok(client, {"budget.mode": "off", "merge_rate": 0.0})
    after = send(client, street, 4, 0.2, answered_by=client.clouds)
    assert client.spin_until(lambda: len(client.clouds.stamped(after)) >= 3, 20)
    assert max(persons(client.clouds.stamped(after))) >= 2  # the cap went with budget mode
    set_ok(client, {"pose.mode": "full_frame", "budget.target_latency_ms": 100.0, "budget.min_merge_rate": 0.0})


@pytest.mark.parametrize("name,value", [
    ("pose.mode", "bottom_up"),
    ("pose.merge_rate", -0.5),       # -1 or [0, 0.95]
    ("pose.merge_rate", 0.99),
    ("pose.keypoint_threshold", 1.5),
    ("pose.max_persons", 33),
    ("pose.max_persons", 2.0),       # an integer parameter
    ("pose.weights", "/tmp/x.pth"),  # unconfigured only
    ("pose.model", "segformer-b1"),  # unconfigured only
])
def test_invalid_pose_values_are_rejected(client, node, name, value):
    before = client.get_parameters(name)
    result = client.set_parameters({name: value})[name]
    assert not result.successful and result.reason
    assert client.get_parameters(name) == before


def overlay_of(received, sent: dict[int, Header]) -> np.ndarray | None:
    got = [r.msg for r in received if r.stamp_ns in sent and r.msg is not None]
    return np.frombuffer(got[-1].data, np.uint8).reshape(got[-1].height, got[-1].width, 3) if got else None


def test_skeletons_on_the_overlay_and_pose_off_stops_keypoints_but_not_masks(client, node, person_photo):
    masks = client.subscribe_images("/pose_cam/segmentation/mask")
    overlays = client.subscribe_images("/pose_cam/segmentation/overlay")
    client.spin_for(0.5)
    # Threshold 0 draws the random model's joints; its own merge rate is accepted and frames keep flowing.
    set_ok(client, {"pose.keypoint_threshold": 0.0, "pose.merge_rate": 0.6, "pose.mode": "full_frame"})
    sent = send(client, [person_photo], 2, 0.4, answered_by=overlays)
    assert client.spin_until(lambda: overlay_of(overlays, sent) is not None, 10)
    with_pose = overlay_of(overlays, sent).copy()

    set_ok(client, {"pose.enable": False})
    sent = send(client, [person_photo], 4, 0.25, answered_by=masks)
    assert client.spin_until(lambda: len([m for m in masks if m.stamp_ns in sent]) >= 3
                             and overlay_of(overlays, sent) is not None, 20)
    without_pose = overlay_of(overlays, sent)
    client.spin_for(0.5)
    assert not client.clouds.stamped(sent), "keypoints published with pose.enable false"
    # The same frame, model and merge rate give the same classes: only the skeleton differs, and it is drawn.
    changed = np.any(with_pose != without_pose, axis=2)
    assert 50 < changed.sum() < 0.5 * changed.size, changed.sum()
    set_ok(client, {"pose.enable": True, "pose.merge_rate": -1.0, "pose.keypoint_threshold": 0.3})


def test_node_log_has_one_random_pose_warning_and_no_traceback(client, node):
    text = Path(node.stderr_path).read_text()
    assert text.count("POSE MODEL IS RANDOMLY INITIALISED") == 1, text[-3000:]
    assert "RANDOMLY INITIALISED. The masks" not in text  # the segmentation weights are the trained ones
    assert "Traceback" not in text and "frame failed" not in text


def test_vit_model_segments_refuses_presets_and_enables_pose_live(tmp_path, person_photo):
    """A plain-ViT model name (issue #5): masks at the camera's size, presets refused with a reason, pose built
    on first enable (the node starts with pose off)."""
    name = "vit_node"
    context = Context()
    rclpy.init(context=context, domain_id=domain_id(name))
    probe = SegmergeClient(context, name="vit_probe")
    publisher = probe.node.create_publisher(Image, VIT_CAM, QoSProfile(depth=1,
                                                                      reliability=ReliabilityPolicy.BEST_EFFORT))
    masks = probe.subscribe_images("/vit_cam/segmentation/mask")
    clouds = Collector(probe.node, PointCloud2, "/vit_cam/pose/keypoints")
    err = open(tmp_path / "vit.stderr", "w+")
    process = subprocess.Popen(node_command({"image_topics": [VIT_CAM], "model": "segmenter-vit-t", "weights": "random",
                                             "input_size": "128x160", "pose.mode": "full_frame"}),
                               env=quiet_env(name), stdout=subprocess.DEVNULL, stderr=err)
    try:
        probe.wait_ready(90.0, process)
        probe.spin_until(lambda: publisher.get_subscription_count() > 0, 20)
        probe.spin_for(0.5)
        small = cv2.resize(person_photo, (200, 150))  # not the network's input size
        sent = send(probe, [small], 4, 0.2, frame_id="vit_optical", publisher=publisher, answered_by=masks)
        assert probe.spin_until(lambda: len([m for m in masks if m.stamp_ns in sent]) >= 3, 20)
        mask = next(r.msg for r in reversed(masks) if r.msg is not None)
        assert (mask.encoding, mask.height, mask.width, mask.header.frame_id) == ("mono8", 150, 200, "vit_optical")
        assert np.frombuffer(mask.data, np.uint8).max() < 19
        assert not clouds, "pose is off: no keypoints"

        result = probe.set_parameters({"preset": "hq"})["preset"]
        assert not result.successful and "SegFormer" in result.reason
        assert probe.get_parameters("preset") == {"preset": "none"}
        set_ok(probe, {"merge_rate": 0.5})

        set_ok(probe, {"pose.enable": True})  # answered at once: the pose model builds off the executor
        assert probe.spin_until(lambda: (probe.latest(VIT_CAM) or DiagnosticsWindow(0, {}, 0, "")).values.get(
            "pose_model") == "ready", 30), "the pose model was not built"
        sent = send(probe, [small], 4, 0.3, frame_id="vit_optical", publisher=publisher, answered_by=clouds)
        assert probe.spin_until(lambda: len(clouds.stamped(sent)) >= 2, 20), "no keypoints after pose.enable"
        assert all(c.height == 1 and c.header.frame_id == "vit_optical" for c in clouds.stamped(sent))
        check_layout(clouds.stamped(sent)[-1])
        assert process.poll() is None
    finally:
        stop_process(process, signal.SIGINT)
        probe.close()
        rclpy.try_shutdown(context=context)
    err.seek(0)
    stderr = err.read()
    # pose.weights left empty: the packaged student (weights/), not a random pose model
    assert "POSE MODEL IS RANDOMLY INITIALISED" not in stderr and "pose model ready" in stderr
    assert "Traceback" not in stderr and "frame failed" not in stderr


@pytest.mark.parametrize("params,message", [
    ({"model": "segmenter-vit-t", "preset": "hq"}, "Segformer++ merge preset for SegFormer models"),
    ({"model": "segformer-b9"}, "model must be segformer-b0 .. segformer-b5 or a plain ViT"),
    ({"pose.enable": True, "pose.weights": "/nonexistent/pose.pth", "input_size": "64x64"},
     "cannot load pose.weights"),
    ({"pose.enable": True, "pose.input_size": "300x200", "input_size": "64x64"}, "must be a multiple of 32"),
    # issue 20: these ran (eager for a misspelled backend, B0 under B5's name) or ended in a traceback
    ({"backend": "openvnio"}, "backend must be one of eager, compile, openvino, tensorrt, auto; got 'openvnio'"),
    ({"device": "GPU"}, "device 'GPU' is an OpenVINO device name: it needs backend openvino"),
    ({"model": "segformer-b5", "weights": "STUDENT", "input_size": "64x64"},
     "holds segformer-b0, not segformer-b5: set model to segformer-b0"),
    ({"weights": "OTHER_ARCHITECTURE", "input_size": "64x64"}, "holds a 'mask2former' model (config.json), not a SegFormer"),
    ({"weights": "", "input_size": "64x64"}, "weights is empty: set it to a checkpoint for segformer-b0"),
], ids=["preset_on_vit", "unknown_model", "missing_pose_weights", "pose_input_size", "backend_typo",
        "openvino_device_on_eager", "size_mismatch", "other_architecture", "empty_weights"])
def test_bad_configuration_is_fatal_with_a_clear_message(params, message, tmp_path, student_dir):
    other = tmp_path / "mask2former_hub"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "mask2former", "backbone_config": {}}')
    (other / "model.safetensors").write_bytes(b"")
    replace = {"STUDENT": str(student_dir), "OTHER_ARCHITECTURE": str(other)}
    params = {k: replace.get(v, v) if isinstance(v, str) else v for k, v in {"weights": "random", **params}.items()}
    err = open(tmp_path / "stderr", "w+")
    process = subprocess.Popen(node_command(params), env=quiet_env("fatal_" + message[:10]),
                               stdout=subprocess.DEVNULL, stderr=err)
    assert process.wait(60) != 0
    err.seek(0)
    stderr = err.read()
    assert "FATAL" in stderr and message in stderr, stderr
    assert "Traceback" not in stderr
