"""segmerge_node in its own process, driven over DDS by this test process with real rclpy.

One node (random SegFormer-B0, 128x160 network input, two cameras) serves most tests; the shutdown and start-up
tests start their own. Frames are real (vtest.avi). Every ROS process here is on localhost discovery and a private
ROS_DOMAIN_ID derived from the test's name and the run (conftest.ros_domain_id), so parallel runs do not cross-talk.
"""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import rclpy
from rcl_interfaces.msg import ParameterType, ParameterValue
from rclpy.context import Context
from rclpy.qos import QoSProfile, ReliabilityPolicy
from safetensors.torch import save_file
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Float32, Header

from conftest import ros_domain_id
from segmerge_ros.models.segformer.checkpoints import ours_to_mmseg
from segmerge_ros.models.segformer.model import SegFormer, mit_config
from segmerge_ros.ros.conversions import jpeg_image, rgb8_image
from segmerge_ros.apps.client import SegmergeClient, camera_command, node_command, ros_env, stop_process
from segmerge_ros.inference.sources import iter_frames

os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"

CAM_A = "/cam_a/image"
CAM_B = "/cam_b/image/compressed"
BUDGET_TOPIC = "/compute_budget"
SIZE_A = (240, 320)
SIZE_B = (180, 240)  # a different size, so a mask from the wrong camera would show
NODE_PARAMS = {"image_topics": [CAM_A, CAM_B], "input_size": "128x160", "budget.topic": BUDGET_TOPIC,
               "weights": "random", "backend": "eager", "precision": "fp32",  # auto: test_openvino.py
               # every step a candidate: which steps pay on a random model at 128x160 is timing noise
               # (the skipping itself: test_frame_pipeline.py)
               "budget.skip_slow_steps": False}


def domain_id(name: str) -> int:
    return ros_domain_id(name)


def quiet_env(name: str) -> dict[str, str]:
    env = ros_env(domain_id(name))
    env["OMP_NUM_THREADS"] = "1"  # two cores shared with the test process: one torch thread times more steadily
    return env


@pytest.fixture(scope="module")
def frames(shared_data) -> list[np.ndarray]:
    video = shared_data / "opencv_samples" / "vtest.avi"
    return [cv2.resize(f, SIZE_A[::-1], interpolation=cv2.INTER_AREA) for f in iter_frames(video, max_frames=20)]


@pytest.fixture(scope="module")
def client():
    context = Context()
    rclpy.init(context=context, domain_id=domain_id(__name__))
    ros = SegmergeClient(context, name="test_node_client")
    ros.pub_a = ros.node.create_publisher(Image, CAM_A, QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT))
    ros.pub_b = ros.node.create_publisher(CompressedImage, CAM_B,
                                          QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT))
    ros.pub_budget = ros.node.create_publisher(Float32, BUDGET_TOPIC, 10)
    yield ros
    ros.close()
    rclpy.try_shutdown(context=context)


@pytest.fixture(scope="module")
def node(client, tmp_path_factory):
    logs = tmp_path_factory.mktemp("node")
    stdout, stderr = open(logs / "stdout", "w"), open(logs / "stderr", "w")
    process = subprocess.Popen(node_command(NODE_PARAMS), env=quiet_env(__name__), stdout=stdout, stderr=stderr)
    client.wait_ready(90.0, process)
    client.spin_until(lambda: client.pub_a.get_subscription_count() and client.pub_b.get_subscription_count(), 20)
    process.stderr_path = logs / "stderr"
    yield process
    stop_process(process, signal.SIGINT)
    stdout.close()
    stderr.close()


def header(client: SegmergeClient, frame_id: str) -> Header:
    return Header(stamp=client.node.get_clock().now().to_msg(), frame_id=frame_id)


def send(client, camera: str, frame: np.ndarray, frame_id: str | None = None) -> Header:
    """Publish one real frame on camera A (rgb8) or B (JPEG, resized to SIZE_B)."""
    if camera == CAM_A:
        h = header(client, frame_id or "cam_a_optical")
        client.pub_a.publish(rgb8_image(frame, h))
    else:
        h = header(client, frame_id or "cam_b_optical")
        client.pub_b.publish(jpeg_image(cv2.resize(frame, SIZE_B[::-1]), h))
    return h


def stream(client, frames, count: int, period_s: float, cameras=(CAM_A,)) -> list[Header]:
    sent = []
    for i in range(count):
        for camera in cameras:
            sent.append(send(client, camera, frames[i % len(frames)]))
        client.spin_for(period_s)
    return sent


def busy_windows(client, camera: str, since: float):
    return [w for w in client.windows_after(camera, since) if w.number("fps") > 0]


def stamp_ns(h: Header) -> int:
    return h.stamp.sec * 1_000_000_000 + h.stamp.nanosec


def set_ok(client, values: dict) -> None:
    results = client.set_parameters(values)
    assert all(r.successful for r in results.values()), {n: r.reason for n, r in results.items()}


def test_outputs_carry_the_input_header_size_and_encoding(client, node, frames):
    masks_a = client.subscribe_images("/cam_a/segmentation/mask")
    confidence = client.subscribe_images("/cam_a/segmentation/confidence")
    overlays = client.subscribe_images("/cam_a/segmentation/overlay")
    masks_b = client.subscribe_images("/cam_b/segmentation/mask")
    client.spin_for(1.0)  # let the new subscriptions match, so the node sees them
    sent = stream(client, frames, 8, 0.25, cameras=(CAM_A, CAM_B))
    assert client.spin_until(lambda: len(masks_a) >= 3 and len(masks_b) >= 3 and confidence and overlays, 20)
    stamps = {stamp_ns(h): h.frame_id for h in sent}

    mask = masks_a[-1].msg
    assert (mask.encoding, mask.height, mask.width, mask.step) == ("mono8", *SIZE_A, SIZE_A[1])
    assert stamps[stamp_ns(mask.header)] == mask.header.frame_id == "cam_a_optical"
    assert np.frombuffer(mask.data, np.uint8).max() < 19
    conf = confidence[-1].msg
    assert (conf.encoding, conf.height, conf.width) == ("mono8", *SIZE_A)
    assert stamp_ns(conf.header) in stamps
    colour = overlays[-1].msg
    assert (colour.encoding, colour.height, colour.width, colour.step) == ("rgb8", *SIZE_A, 3 * SIZE_A[1])
    assert stamp_ns(colour.header) in stamps

    mask_b = masks_b[-1].msg
    assert (mask_b.encoding, mask_b.height, mask_b.width) == ("mono8", *SIZE_B)
    assert stamps[stamp_ns(mask_b.header)] == mask_b.header.frame_id == "cam_b_optical"

    labels = json.loads(client.latched_string("/cam_a/segmentation/labels"))
    assert len(labels["classes"]) == len(labels["palette"]) == 19
    assert labels["randomly_initialised"] is True
    assert json.loads(client.latched_string("/cam_b/segmentation/labels"))["mask_topic"] == "/cam_b/segmentation/mask"


def test_two_cameras_do_not_cross_talk(client, node, frames):
    masks_a = client.subscribe_images("/cam_a/segmentation/mask")
    masks_b = client.subscribe_images("/cam_b/segmentation/mask")
    client.spin_for(1.0)
    start_a = len(masks_a)
    stream(client, frames, 6, 0.2, cameras=(CAM_B,))
    assert client.spin_until(lambda: len(masks_b) >= 4, 15)
    client.spin_for(0.5)
    assert len(masks_a) == start_a, "frames on camera B produced masks on camera A"
    assert all(r.msg is None or (r.msg.height, r.msg.width) == SIZE_B for r in masks_b)
    since = time.monotonic()
    assert client.spin_until(lambda: busy_windows(client, CAM_B, since - 3) and client.latest(CAM_A), 5)
    assert client.latest(CAM_A).number("fps") == 0.0


def test_camera_process_feeds_the_node(client, node, shared_data):
    """segmerge_camera -> segmerge_node -> this process: three processes over DDS, JPEG on the /compressed topic."""
    masks = client.subscribe_images("/cam_b/segmentation/mask")
    camera = subprocess.Popen(
        camera_command({"source": shared_data / "opencv_samples" / "vtest.avi", "topic": "/cam_b/image",
                        "encoding": "jpeg", "fps": 10, "max_frames": 25, "resize": "180x240",
                        "frame_id": "cam_b_optical"}),
        env=quiet_env(__name__), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert client.spin_until(lambda: len(masks) >= 5, 30), "no masks from the camera process's frames"
    _, stderr = camera.communicate(timeout=30)
    assert camera.returncode == 0, stderr
    assert "published 25 frames" in stderr
    last = next(r.msg for r in reversed(masks) if r.msg is not None)
    assert (last.header.frame_id, last.height, last.width, last.encoding) == ("cam_b_optical", *SIZE_B, "mono8")


def test_merge_rate_set_through_the_parameter_service_applies_to_the_next_frames(client, node, frames):
    set_ok(client, {"budget.mode": "off", "merge_rate": 0.0})
    stream(client, frames, 4, 0.2)
    set_ok(client, {"merge_rate": 0.5})
    # A diagnostics window published just after the set may still hold frames processed before it; windows that
    # arrive a full period (1 s) later hold only frames processed after it.
    since = time.monotonic() + 1.2
    stream(client, frames, 12, 0.2)
    assert client.spin_until(lambda: len(busy_windows(client, CAM_A, since)) >= 1, 10)
    windows = busy_windows(client, CAM_A, since)
    assert {w.values["merge_rate"] for w in windows} == {"0.5000"}, [w.values for w in windows]
    assert client.get_parameters("merge_rate")["merge_rate"] == 0.5
    # An integer is accepted for the double parameter, as `ros2 param set /segmerge merge_rate 0` sends it.
    set_ok(client, {"merge_rate": 0})
    assert client.get_parameters("merge_rate")["merge_rate"] == 0.0


@pytest.mark.parametrize("name,value", [
    ("merge_rate", 1.5),
    ("merge_rate", -0.1),
    ("merge_rate", "fast"),
    ("merge_rate", True),
    ("overlay_alpha", 2.0),
    ("preset", "turbo"),
    ("budget.mode", "always"),
    ("budget.min_merge_rate", 0.95),   # above budget.max_merge_rate (0.9)
    ("budget.target_latency_ms", 0.0),
    ("model", "segformer-b1"),         # read-only
    ("input_size", "64x64"),           # read-only
])
def test_invalid_values_are_rejected_with_a_reason(client, node, name, value):
    before = client.get_parameters(name, "merge_rate")
    result = client.set_parameters({name: value})[name]
    assert not result.successful
    assert result.reason
    assert client.get_parameters(name, "merge_rate") == before
    assert node.poll() is None


def test_wrongly_typed_value_message_is_rejected(client, node):
    result = client.set_raw("merge_rate", ParameterValue(type=ParameterType.PARAMETER_STRING, string_value="0.3"))
    assert not result.successful and "type" in result.reason.lower()


def bad_messages(frame: np.ndarray) -> tuple[list[Image], list[CompressedImage]]:
    good = rgb8_image(frame)
    unknown = rgb8_image(frame)
    unknown.encoding = "bayer_rggb8"
    empty = Image(encoding="rgb8")
    short = rgb8_image(frame)
    short.data = bytes(short.data[:-100])
    small_step = rgb8_image(frame)
    small_step.step = good.step - 3
    odd_yuv = Image(height=2, width=3, encoding="yuv422", step=6, data=bytes(12))
    jpeg = jpeg_image(frame).data.tobytes()
    truncated = CompressedImage(format="jpeg", data=jpeg[: len(jpeg) // 2])
    corrupt = CompressedImage(format="jpeg", data=jpeg[:2] + bytes(range(256)) * 8 + jpeg[-2:])
    not_image = CompressedImage(format="jpeg", data=b"GIF89a" + bytes(64))
    nothing = CompressedImage(format="jpeg")
    return [unknown, empty, short, small_step, odd_yuv], [truncated, corrupt, not_image, nothing]


def test_every_bad_input_is_counted_and_the_node_keeps_running(client, node, frames):
    set_ok(client, {"budget.mode": "off", "merge_rate": 0.0})
    client.spin_for(1.2)
    bad_before = {cam: int(client.latest(cam).number("bad_frames")) for cam in (CAM_A, CAM_B)}
    raw, compressed = bad_messages(frames[0])
    for msg in raw:
        msg.header = header(client, "cam_a_optical")
        client.pub_a.publish(msg)
        client.spin_for(0.15)  # spaced out: a bad frame replacing another in the slot would count as dropped
    for msg in compressed:
        msg.header = header(client, "cam_b_optical")
        client.pub_b.publish(msg)
        client.spin_for(0.15)

    def counted():
        a, b = client.latest(CAM_A), client.latest(CAM_B)
        return (int(a.number("bad_frames")) - bad_before[CAM_A] == len(raw)
                and int(b.number("bad_frames")) - bad_before[CAM_B] == len(compressed))

    assert client.spin_until(counted, 10), (client.latest(CAM_A).values, client.latest(CAM_B).values)
    assert node.poll() is None
    masks_a = client.subscribe_images("/cam_a/segmentation/mask")
    masks_b = client.subscribe_images("/cam_b/segmentation/mask")
    client.spin_for(1.0)
    stream(client, frames, 4, 0.25, cameras=(CAM_A, CAM_B))
    assert client.spin_until(lambda: masks_a and masks_b, 10), "the node stopped segmenting after bad frames"


def processing_ms(client, frames, rate: float, count: int = 8, period_s: float = 0.15) -> float:
    set_ok(client, {"budget.mode": "off", "merge_rate": rate})
    stream(client, frames, 2, period_s)  # the first frames at a new rate may pay one-off costs
    since = time.monotonic()
    stream(client, frames, count, period_s)
    client.spin_for(1.1)
    return statistics.median(w.number("processing_ms") for w in busy_windows(client, CAM_A, since))


def speeds(client, frames) -> tuple[float, float]:
    """Processing time unmerged and at merge rate 0.9 (the budget's range), each set by hand."""
    return processing_ms(client, frames, 0.0), processing_ms(client, frames, 0.9)


def achievable_target(unmerged_ms: float, merged_ms: float) -> float:
    """Halfway between the two speeds is achievable by construction. Where merging does not pay (B0 at a small
    input on a CPU), the unmerged speed is, and the controller must then not merge for nothing."""
    return round((unmerged_ms + merged_ms) / 2 if merged_ms < 0.85 * unmerged_ms else unmerged_ms, 1)


def budget_attempt(client, frames, calibrated_before: bool) -> tuple[bool, str]:
    """One run of budget mode against a target measured just before; returns (settled within 15 %, report).
    Other processes share the two cores, and the machine's speed can change by a third within seconds, so a
    target measured again just after the phase also counts."""
    unmerged, merged = speeds(client, frames)
    target = achievable_target(unmerged, merged)
    period = max(0.15, 1.6 * max(unmerged, merged) / 1000)  # the worker keeps up: no drops, one frame at a time
    client.rate_changes.clear()
    set_ok(client, {"budget.target_latency_ms": target, "budget.mode": "latency"})
    started = time.monotonic()
    stream(client, frames, 30, period)
    settled_since = time.monotonic()
    stream(client, frames, 15, period)
    client.spin_for(1.1)
    windows = busy_windows(client, CAM_A, settled_since)
    assert windows, "no diagnostics after 30 frames"
    assert all(w.values["budget_mode"] == "latency" for w in windows)
    assert float(windows[-1].values["budget_target_ms"]) == pytest.approx(target)
    # The controller's choices show up as the merge_rate parameter, and they did not count as manual sets.
    params = client.get_parameters("budget.mode", "merge_rate")
    assert params["budget.mode"] == "latency"
    # It is the rate of the last frame, or the one the controller picked for the next frame.
    shown = {round(float(windows[-1].values["merge_rate"]), 4)} | {round(r, 4) for _, r in client.rate_changes[-1:]}
    assert round(params["merge_rate"], 4) in shown
    if not calibrated_before:
        assert len(client.rate_changes) >= 3, "budget mode did not try merge rates to calibrate"
    late_changes = [r for t, r in client.rate_changes if t > settled_since]
    assert len(late_changes) <= 3, f"merge rate still moving after 30 frames: {late_changes}"
    settled = statistics.median(w.number("processing_ms") for w in windows)
    report = (f"target {target} ms (unmerged {unmerged:.1f}, merge 0.9 {merged:.1f}); settled {settled:.1f} ms at "
              f"merge rates {[w.values['merge_rate'] for w in windows]}; all windows "
              f"{[(w.values['merge_rate'], w.values['processing_ms']) for w in busy_windows(client, CAM_A, started)]}")
    if abs(settled - target) <= 0.15 * target:
        return True, report
    # The machine's speed may have moved since: what is achievable right after the phase counts as well.
    unmerged_after, merged_after = speeds(client, frames)
    target_after = achievable_target(unmerged_after, merged_after)
    report += f"; measured again: unmerged {unmerged_after:.1f}, merge 0.9 {merged_after:.1f} -> {target_after} ms"
    return abs(settled - target_after) <= 0.15 * target_after, report


def test_budget_mode_settles_near_an_achievable_target_within_30_frames(client, node, frames):
    # Up to three attempts: a controller bug misses every time, a burst of load from other processes once.
    reports = []
    for attempt in range(3):
        settled, report = budget_attempt(client, frames, calibrated_before=attempt > 0)
        reports.append(report)
        print(reports[-1])  # shown with pytest -s
        if settled:
            break
    else:
        pytest.fail("budget mode missed the target in all three attempts:\n" + "\n".join(reports))

    # A manual set switches budget mode off.
    set_ok(client, {"budget.mode": "latency"})
    set_ok(client, {"merge_rate": 0.3})
    assert client.get_parameters("budget.mode", "merge_rate") == {"budget.mode": "off", "merge_rate": 0.3}


def test_budget_topic_sets_the_latency_target(client, node):
    set_ok(client, {"budget.mode": "off"})
    client.spin_until(lambda: client.pub_budget.get_subscription_count() > 0, 5)
    client.pub_budget.publish(Float32(data=123.0))
    assert client.spin_until(
        lambda: client.get_parameters("budget.mode", "budget.target_latency_ms")
        == {"budget.mode": "latency", "budget.target_latency_ms": 123.0}, 5)
    set_ok(client, {"budget.mode": "off"})


def test_node_log_has_one_random_weights_warning_and_no_traceback_or_failed_frame(client, node):
    text = Path(node.stderr_path).read_text()
    assert text.count("RANDOMLY INITIALISED") == 1
    assert "Traceback" not in text and "frame failed" not in text
    assert client.spin_until(lambda: client.latest(CAM_A) and client.latest(CAM_B), 5)
    assert all(w.values["failed_frames"] == "0" for w in client.diagnostics[CAM_A] + client.diagnostics[CAM_B])


def start_node(name: str, params: dict, tmp_path: Path):
    err = open(tmp_path / f"{name}.stderr", "w+")
    process = subprocess.Popen(node_command({"weights": "random", "backend": "eager", "precision": "fp32", **params}),
                               env=quiet_env(name),
                               stdout=subprocess.DEVNULL, stderr=err)
    return process, err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_clean_exit_on_signal_within_2_s_while_frames_flow(sig, frames, tmp_path):
    name = f"shutdown_{sig.name}"
    context = Context()
    rclpy.init(context=context, domain_id=domain_id(name))
    probe = SegmergeClient(context, name="shutdown_probe")
    publisher = probe.node.create_publisher(Image, "image", QoSProfile(depth=1,
                                                                       reliability=ReliabilityPolicy.BEST_EFFORT))
    masks = probe.subscribe_images("/segmentation/mask")
    process, err = start_node(name, {"input_size": "128x160"}, tmp_path)
    try:
        probe.wait_ready(90.0, process)
        for i in range(30):
            publisher.publish(rgb8_image(frames[i % len(frames)], header(probe, "cam")))
            probe.spin_for(0.1)
            if len(masks) >= 2:
                break
        assert masks, "the node produced no mask before the signal"
        publisher.publish(rgb8_image(frames[0], header(probe, "cam")))  # likely mid-inference now
        probe.spin_for(0.02)
        took = stop_process(process, sig, timeout_s=10.0)
    finally:
        stop_process(process, signal.SIGKILL)
        probe.close()
        rclpy.try_shutdown(context=context)
    err.seek(0)
    stderr = err.read()
    assert process.returncode == 0, stderr
    assert took < 2.0, f"exit took {took:.2f} s"
    assert "Traceback" not in stderr and "Error" not in stderr and "frame failed" not in stderr, stderr


def test_weights_that_fail_to_load_are_fatal_without_traceback(tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"this is not a checkpoint")
    process, err = start_node("fatal_weights", {"weights": str(broken)}, tmp_path)
    assert process.wait(60) != 0
    err.seek(0)
    stderr = err.read()
    assert "FATAL" in stderr and "cannot load weights" in stderr and str(broken) in stderr
    assert "Traceback" not in stderr


def test_a_model_with_more_classes_than_a_mono8_mask_holds_is_refused_at_start(tmp_path):
    model = SegFormer(mit_config("segformer-b0", head="mmseg", layer_norm_eps=1e-6, num_classes=300))
    weights = tmp_path / "300_classes.safetensors"
    save_file({k: v.contiguous() for k, v in ours_to_mmseg(model.state_dict()).items()}, str(weights))
    process, err = start_node("many_classes", {"weights": str(weights), "input_size": "64x64"}, tmp_path)
    assert process.wait(90) != 0
    err.seek(0)
    stderr = err.read()
    assert "FATAL" in stderr and "300 classes" in stderr and "mono8" in stderr, stderr
    assert "Traceback" not in stderr


# -- a node at the camera's own resolution (no input_size), with pose weights that exist but do not load ---------
PLAIN_CAM = "/plain_cam/image/compressed"


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """(client, node process, camera publisher): one node the next three tests share; the last one stops it."""
    name = "plain_node"
    logs = tmp_path_factory.mktemp("plain")
    broken = logs / "broken_pose.pth"
    broken.write_bytes(b"not a checkpoint")
    context = Context()
    rclpy.init(context=context, domain_id=domain_id(name))
    probe = SegmergeClient(context, name="plain_probe")
    publisher = probe.node.create_publisher(CompressedImage, PLAIN_CAM,
                                            QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT))
    stderr = open(logs / "stderr", "w+")
    process = subprocess.Popen(node_command({"image_topics": [PLAIN_CAM], "pose.weights": str(broken), "weights": "random",
                                             "backend": "eager", "precision": "fp32",
                                             "pose.mode": "full_frame"}),
                               env=quiet_env(name), stdout=subprocess.DEVNULL, stderr=stderr)
    probe.wait_ready(90.0, process)
    probe.spin_until(lambda: publisher.get_subscription_count() > 0, 20)
    process.stderr_file = stderr
    yield probe, process, publisher
    stop_process(process, signal.SIGKILL)
    probe.close()
    rclpy.try_shutdown(context=context)
    stderr.close()


def plain_counter(probe, key: str) -> int:
    window = probe.latest(PLAIN_CAM)
    return int(window.number(key)) if window else 0


def test_frames_too_small_for_the_network_are_bad_frames_with_the_reason(plain, frames):
    probe, process, publisher = plain
    masks = probe.subscribe_images("/plain_cam/segmentation/mask")
    probe.spin_for(1.0)
    publisher.publish(jpeg_image(cv2.resize(frames[0], (200, 28)), header(probe, "plain")))
    assert probe.spin_until(lambda: plain_counter(probe, "bad_frames") == 1, 10)
    window = probe.latest(PLAIN_CAM)
    assert "too small for the network" in window.values["last_bad_reason"], window.values
    assert window.values["failed_frames"] == "0"
    publisher.publish(jpeg_image(cv2.resize(frames[0], (200, 29)), header(probe, "plain")))  # just large enough
    assert probe.spin_until(lambda: masks, 20), "a 200x29 frame gave no mask"
    assert (masks[-1].msg.height, masks[-1].msg.width) == (29, 200)
    assert process.poll() is None


def test_a_pose_model_that_fails_to_build_switches_pose_enable_back_off(plain):
    probe, process, _ = plain
    # The set returns at once (the model builds off the executor); the failure turns the parameter back off.
    set_ok(probe, {"pose.enable": True})
    assert probe.spin_until(lambda: probe.get_parameters("pose.enable") == {"pose.enable": False}, 30)
    assert probe.spin_until(lambda: probe.latest(PLAIN_CAM).values.get("pose_model", "")
                            .startswith("failed: cannot load pose.weights"), 5), probe.latest(PLAIN_CAM)
    assert process.poll() is None


def test_shutdown_waits_for_the_frame_in_progress(plain, frames):
    """A frame that takes seconds (1280x960 at full resolution, one thread) is in progress when SIGINT arrives: the
    node waits for it before destroying itself, and exits cleanly."""
    probe, process, publisher = plain
    probe.spin_for(1.2)
    before_in, before_out = plain_counter(probe, "frames_in"), plain_counter(probe, "frames_out")
    publisher.publish(jpeg_image(cv2.resize(frames[1], (1280, 960)), header(probe, "plain")))
    # Received but not yet published: the worker, idle before, is processing it.
    assert probe.spin_until(lambda: plain_counter(probe, "frames_in") == before_in + 1, 10)
    assert plain_counter(probe, "frames_out") == before_out, "the frame was done before the signal: not in flight"
    took = stop_process(process, signal.SIGINT, timeout_s=60.0)
    stderr_file = process.stderr_file
    stderr_file.seek(0)
    stderr = stderr_file.read()
    assert process.returncode == 0, stderr
    assert "waiting for the frame in progress on /plain_cam/image" in stderr, stderr
    assert "Traceback" not in stderr and "frame failed" not in stderr, stderr
    print(f"exit took {took:.2f} s")


def test_diagnostics_time_each_stage_inside_the_node_and_show_the_threads(client, node, frames):
    set_ok(client, {"budget.mode": "off", "merge_rate": 0.0})
    stream(client, frames, 2, 0.15)
    since = time.monotonic()
    stream(client, frames, 6, 0.15)
    client.spin_for(1.1)
    windows = busy_windows(client, CAM_A, since)
    assert windows
    last = windows[-1]
    stages = [last.number(f"{stage}_p50_ms") for stage in ("decode", "preprocess", "network", "postprocess", "publish")]
    assert all(math.isfinite(v) and v >= 0 for v in stages), last.values
    assert last.number("network_p50_ms") > 0
    # the stages are the parts of processing: their medians add up to about the median whole (medians of parts
    # need not add exactly)
    assert 0.5 * last.number("processing_p50_ms") <= sum(stages) <= 1.5 * last.number("processing_p50_ms")
    assert last.number("processing_p90_ms") >= last.number("processing_p50_ms")
    assert int(last.values["threads"]) >= 1 and last.values["threads_adapt"] == "true"
    assert "thread_pools" in last.values
    set_ok(client, {"threads.adapt": False})
    stream(client, frames, 2, 0.15)
    client.spin_for(1.1)
    assert client.latest(CAM_A).values["threads_adapt"] == "false"
    set_ok(client, {"threads.adapt": True})
