"""segmerge_node as a managed (lifecycle) node, in-process over real rclpy: configure, activate, deactivate, cleanup,
a configure that fails and is retried after fixing a parameter, parameters that need a rebuild, and frames checked
on receipt. (The same through the real `ros2 lifecycle` CLI: test_ros2_cli.py.)"""

from __future__ import annotations

import threading
import time

import cv2
import numpy as np
import pytest
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from lifecycle_msgs.msg import State
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image

from conftest import ros_domain_id
from segmerge_ros.inference.engine import SegmentationEngine
from segmerge_ros.inference.sources import iter_frames
from segmerge_ros.ros import node as node_module
from segmerge_ros.ros.conversions import rgb8_image
from segmerge_ros.ros.startup import StartupError

CAMERA = "/lifecycle_cam/image"
MASK = "/lifecycle_cam/segmentation/mask"
SUCCESS, FAILURE = TransitionCallbackReturn.SUCCESS, TransitionCallbackReturn.FAILURE


@pytest.fixture
def ros(shared_data):
    """A context, a probe node (camera publisher, mask and diagnostics subscribers) and an executor spinning both."""
    context = Context()
    rclpy.init(context=context, domain_id=ros_domain_id("node_lifecycle"))
    probe = Node("lifecycle_probe", context=context)
    probe.masks, probe.diagnostics = [], []
    probe.create_subscription(Image, MASK, probe.masks.append, 10)
    probe.create_subscription(DiagnosticArray, "/diagnostics", probe.diagnostics.append, 10)
    probe.camera = probe.create_publisher(Image, CAMERA, QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT))
    video = shared_data / "opencv_samples" / "vtest.avi"
    probe.frames = [cv2.resize(f, (128, 96), interpolation=cv2.INTER_AREA) for f in iter_frames(video, max_frames=4)]
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(probe)
    probe.executor_ = executor
    yield probe
    executor.shutdown(timeout_sec=0.5)
    probe.destroy_node()
    rclpy.try_shutdown(context=context)


def make_node(ros, **values) -> node_module.SegmergeNode:
    overrides = [Parameter(name, value=value) for name, value in
                 {"image_topics": [CAMERA], "input_size": "64x96", "weights": "random", "backend": "eager",
                  "precision": "fp32", **values}.items()]
    node = node_module.SegmergeNode(context=ros.context, parameter_overrides=overrides)
    ros.executor_.add_node(node)
    return node


def spin_until(ros, condition, timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if condition():
            return True
        ros.executor_.spin_once(timeout_sec=0.05)
    return condition()


def send_frames(ros, count: int, period_s: float = 0.3) -> None:
    for i in range(count):
        ros.camera.publish(rgb8_image(ros.frames[i % len(ros.frames)]))
        spin_until(ros, lambda: False, period_s)


def close(ros, node) -> None:
    ros.executor_.remove_node(node)
    node.stop()
    node.destroy_node()


def test_autostart_false_waits_unconfigured_and_each_transition_does_its_part(ros):
    node = make_node(ros, autostart=False)
    try:
        assert node.lifecycle_state == "unconfigured" and node.engine is None
        assert node.count_subscribers(CAMERA) == 0 and ros.count_publishers(MASK) == 0
        assert spin_until(ros, lambda: any(s.name == "segmerge: lifecycle" for a in ros.diagnostics
                                           for s in a.status), 5)

        assert node.trigger_configure() == SUCCESS and node.lifecycle_state == "inactive"
        assert node.engine is not None and ros.count_publishers(MASK) == 1
        assert node.count_subscribers(CAMERA) == 0  # inactive: no camera subscription yet
        send_frames(ros, 3)
        assert not ros.masks, "an inactive node published masks"

        assert node.trigger_activate() == SUCCESS and node.lifecycle_state == "active"
        assert spin_until(ros, lambda: ros.count_subscribers(CAMERA) == 1, 5)
        send_frames(ros, 4)
        assert spin_until(ros, lambda: len(ros.masks) >= 2, 10), "no masks while active"

        assert node.trigger_deactivate() == SUCCESS and node.lifecycle_state == "inactive"
        spin_until(ros, lambda: False, 0.5)  # masks already on their way
        before = len(ros.masks)
        send_frames(ros, 3)
        assert len(ros.masks) == before, "masks published after deactivate"
        assert node.engine is not None  # models kept

        assert node.trigger_activate() == SUCCESS  # and again
        assert spin_until(ros, lambda: ros.count_subscribers(CAMERA) == 1, 5)
        send_frames(ros, 3)
        assert spin_until(ros, lambda: len(ros.masks) > before, 10), "no masks after re-activation"

        assert node.trigger_deactivate() == SUCCESS and node.trigger_cleanup() == SUCCESS
        assert node.lifecycle_state == "unconfigured" and node.engine is None and node.cameras == []
        assert spin_until(ros, lambda: ros.count_publishers(MASK) == 0, 5)
        assert not node._worker.is_alive()
    finally:
        close(ros, node)


def test_a_failed_configure_is_reported_and_retried_after_fixing_the_parameter(ros, tmp_path):
    missing = str(tmp_path / "missing.safetensors")
    node = make_node(ros, autostart=False, weights=missing)
    try:
        assert node.trigger_configure() == FAILURE
        assert node.lifecycle_state == "unconfigured" and "cannot load weights" in node._configure_failure

        def failure_status():
            return [s for a in ros.diagnostics for s in a.status
                    if s.name == "segmerge: lifecycle" and s.level == DiagnosticStatus.ERROR]
        assert spin_until(ros, failure_status, 5)
        assert "cannot load weights" in failure_status()[-1].message

        # a rebuild parameter may change while unconfigured, and configure then succeeds in the same process
        assert node.set_parameters([Parameter("weights", value="random")])[0].successful
        assert node.trigger_configure() == SUCCESS and node._configure_failure == ""
        # ... but not once configured: the reason says how
        refused = node.set_parameters([Parameter("model", value="segformer-b1")])[0]
        assert not refused.successful and "unconfigured" in refused.reason and "cleanup" in refused.reason
        assert node.get_parameter("model").value == "segformer-b0"
        assert node.set_parameters([Parameter("merge_rate", value=0.6)])[0].successful  # live ones still are
        assert node.trigger_activate() == SUCCESS
    finally:
        close(ros, node)


def test_autostart_raises_the_configure_failure(ros, tmp_path):
    with pytest.raises(StartupError, match="cannot load weights"):
        make_node(ros, weights=str(tmp_path / "missing.safetensors"))


def test_deactivate_waits_for_the_frame_in_progress_which_publishes_nothing(ros, monkeypatch):
    entered, release = threading.Event(), threading.Event()
    real_infer = SegmentationEngine.infer

    def slow_infer(engine, rgb, **options):
        if threading.current_thread().name == "segmerge-worker" and options.get("calibrate", True):
            entered.set()
            release.wait(10)
        return real_infer(engine, rgb, **options)

    node = make_node(ros)
    monkeypatch.setattr(SegmentationEngine, "infer", slow_infer)
    try:
        assert spin_until(ros, lambda: ros.count_subscribers(CAMERA) == 1, 5)
        ros.camera.publish(rgb8_image(ros.frames[0]))
        assert spin_until(ros, entered.is_set, 10), "the frame never reached the engine"
        threading.Timer(1.0, release.set).start()  # the frame finishes while deactivate waits for it
        started = time.monotonic()
        assert node.trigger_deactivate() == SUCCESS
        assert time.monotonic() - started >= 0.8, "deactivate did not wait for the frame in progress"
        assert node._in_flight is None
        spin_until(ros, lambda: False, 1.0)
        assert not ros.masks, "the frame in progress published after deactivate"
        assert node._worker.is_alive()  # inactive, not stopped
    finally:
        release.set()
        close(ros, node)


def test_a_bad_frame_replaced_before_processing_is_still_counted(ros):
    node = make_node(ros)
    try:
        camera = node.cameras[0]
        good = rgb8_image(np.zeros((96, 128, 3), np.uint8))
        truncated = rgb8_image(np.zeros((96, 128, 3), np.uint8))
        truncated.data = bytes(truncated.data)[:-10]
        with node.frame_ready:  # the worker cannot take a frame meanwhile
            camera._on_frame(truncated)
            camera._on_frame(good)
            assert camera.bad == 1 and "data length" in camera.last_bad_reason
            assert camera.pending is good and camera.received == 1
    finally:
        close(ros, node)


def test_lifecycle_state_ids_match_the_labels(ros):
    node = make_node(ros, autostart=False)
    try:
        assert node._state_machine.current_state[0] == State.PRIMARY_STATE_UNCONFIGURED
        node.trigger_configure()
        assert node._state_machine.current_state == (State.PRIMARY_STATE_INACTIVE, "inactive")
        assert node.lifecycle_state == "inactive"
    finally:
        close(ros, node)


def test_an_invalid_budget_topic_fails_configure_with_the_reason(ros):
    node = make_node(ros, autostart=False, **{"budget.topic": "bad topic"})
    try:
        assert node.trigger_configure() == FAILURE
        assert node.lifecycle_state == "unconfigured" and "budget.topic" in node._configure_failure
        assert node.set_parameters([Parameter("budget.topic", value="/compute_budget")])[0].successful
        assert node.trigger_configure() == SUCCESS and node.trigger_activate() == SUCCESS
        assert node.count_subscribers("/compute_budget") == 1
    finally:
        close(ros, node)


def test_pose_weights_random_can_be_enabled_live(ros):
    node = make_node(ros, **{"pose.weights": "random"})
    try:
        result = node.set_parameters([Parameter("pose.enable", value=True)])[0]
        assert result.successful, result.reason
        assert spin_until(ros, lambda: node._pose_state in ("ready",) or node._pose_state.startswith("failed"), 60)
        assert node._pose_state == "ready" and node._pose.randomly_initialised
    finally:
        close(ros, node)


def test_a_pose_model_finished_after_cleanup_is_dropped(ros):
    node = make_node(ros, autostart=False)
    try:
        assert node.trigger_configure() == SUCCESS
        stale = node._stop_event
        assert node.trigger_cleanup() == SUCCESS and stale.is_set()
        assert node._build_pose(stale) == "stopped" and node._pose is None  # an old builder's model never lands
        assert node.trigger_configure() == SUCCESS and not node._stop_event.is_set()
    finally:
        close(ros, node)
