"""segmerge_node: semantic segmentation of one or more camera streams, with a run-time merge rate and compute budget.

Per camera ``<ns>/<name>`` (a ``/compressed`` suffix is stripped first) it publishes:

- ``<ns>/segmentation/mask``        sensor_msgs/Image mono8, class ids, camera resolution, the input header unchanged
- ``<ns>/segmentation/confidence``  sensor_msgs/Image mono8, max softmax probability * 255 (only while subscribed)
- ``<ns>/segmentation/overlay``     sensor_msgs/Image rgb8, class colours over the frame (only while subscribed)
- ``<ns>/segmentation/labels``      std_msgs/String JSON {classes, palette, ...}, transient local (latched)
- ``<ns>/label_info``               vision_msgs/LabelInfo, transient local, when vision_msgs is installed
- ``<ns>/pose/keypoints``           sensor_msgs/PointCloud2, while pose.enable: every frame, height = persons (0 when
                                    none), width 17, fields x, y, z, u, v, score (``ros/pose_msgs.py``)
- ``<ns>/pose/markers``             visualization_msgs/MarkerArray, while pose.enable, subscribed and K known

and one status per camera on ``/diagnostics``. It subscribes to ``<ns>/camera_info`` (sensor-data QoS) and keeps
the latest per camera: its K turns keypoints into unit-depth rays. Parameters: see ``segmerge_ros/ros/params.py``.

Threading: subscription callbacks only drop the message into the camera's one-frame slot (a newer frame replaces an
unprocessed one, counted as dropped), so stale frames never queue up. One worker thread decodes, infers and
publishes; pose, when enabled, runs there too, after segmentation and inside the time the budget controls. Parameter
changes, the diagnostics timer and the budget topic run on the executor thread; every parameter set, including the
node's own, happens there. Pose settings reach the worker as one immutable snapshot, swapped in per frame.
"""

from __future__ import annotations

import json
import math
import posixpath
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import SetParametersResult
from rclpy.exceptions import NameValidationException, ParameterException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.qos_overriding_options import QoSOverridingOptions
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
from std_msgs.msg import Float32, String
from visualization_msgs.msg import MarkerArray

from ..models.checkpoint_errors import CheckpointError
from ..models.labels import overlay
from ..runtime.budget import BudgetController, BudgetMode
from ..runtime.engine import SegmentationEngine
from ..runtime.pose import PoseEstimator, PoseResult, draw_skeletons
from .conversions import BadFrame, message_to_rgb, mono8_image, rgb8_image
from .params import PARAMETERS, POSE_FOLLOW_SEGMENTATION, SPECS, check_choice, check_preset
from .pose_msgs import camera_matrix, keypoints_cloud, pose_markers

try:  # not installable everywhere (e.g. the pip-only ROS used for tests); String labels always exist
    from vision_msgs.msg import LabelInfo, VisionClass
except ImportError:
    LabelInfo = VisionClass = None

NODE_NAME = "segmerge"
COMPRESSED_SUFFIX = "/compressed"

# Cameras and simulators often publish best effort; a reliable subscription would never match them. Depth 1: only
# the newest frame matters. Overridable with qos_overrides.<topic>.subscription.* parameters.
INPUT_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.BEST_EFFORT,
                       durability=DurabilityPolicy.VOLATILE)
# Reliable publishers match both reliable (RViz's default) and best-effort subscribers.
OUTPUT_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                        durability=DurabilityPolicy.VOLATILE)
LATCHED_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)

DIAGNOSTICS_PERIOD_S = 1.0
BAD_FRAME_WARN_PERIOD_S = 5.0
UNREACHABLE_BUDGET_MARGIN = 1.15  # processing this far over the target at max_merge_rate is reported as WARN


class StartupError(RuntimeError):
    """A configuration the node cannot run with; the message is shown to the user as is (no traceback)."""


def strip_compressed(topic: str) -> str:
    return topic[: -len(COMPRESSED_SUFFIX)] if topic.endswith(COMPRESSED_SUFFIX) else topic


def output_topic(input_topic: str, name: str) -> str:
    """``<ns>/<name>`` for the camera topic ``<ns>/<image>`` (``<ns>/<image>/compressed``); relative stays relative."""
    namespace = posixpath.dirname(strip_compressed(input_topic))
    if namespace == "":
        return name
    return posixpath.join(namespace, name)


@dataclass
class FrameTiming:
    latency_ms: float       # now - header.stamp when published (nan for an unstamped frame)
    inference_ms: float
    processing_ms: float    # slot -> published: what the budget controls (pose included)
    merge_rate: float
    persons: int = -1       # -1: pose was off for this frame
    pose_ms: float = math.nan


@dataclass(frozen=True)
class PoseSettings:
    """The pose parameters as one snapshot: the executor thread swaps in a new one, the worker reads one per frame."""

    enable: bool = False
    mode: str = "segmentation"
    max_persons: int = 4
    min_person_area: int = 400
    keypoint_threshold: float = 0.3
    merge_rate: float = POSE_FOLLOW_SEGMENTATION


class Camera:
    """One input topic: its frame slot, its publishers and its counters."""

    def __init__(self, node: "SegmergeNode", topic: str):
        self.node = node
        self.compressed = topic.endswith(COMPRESSED_SUFFIX)
        message_type = CompressedImage if self.compressed else Image
        overridable = QoSOverridingOptions.with_default_policies()
        self.subscription = node.create_subscription(message_type, topic, self._on_frame, INPUT_QOS,
                                                     qos_overriding_options=overridable)
        self.topic = self.subscription.topic_name  # fully resolved, for logs and diagnostics

        def publisher(msg_type, name, qos, overrides=True):
            kwargs = {"qos_overriding_options": overridable} if overrides else {}
            return node.create_publisher(msg_type, output_topic(topic, name), qos, **kwargs)

        self.mask_pub = publisher(Image, "segmentation/mask", OUTPUT_QOS)
        self.confidence_pub = publisher(Image, "segmentation/confidence", OUTPUT_QOS)
        self.overlay_pub = publisher(Image, "segmentation/overlay", OUTPUT_QOS)
        self.labels_pub = publisher(String, "segmentation/labels", LATCHED_QOS, overrides=False)
        self.label_info_pub = publisher(LabelInfo, "label_info", LATCHED_QOS, overrides=False) if LabelInfo else None
        self.keypoints_pub = publisher(PointCloud2, "pose/keypoints", OUTPUT_QOS)
        self.markers_pub = publisher(MarkerArray, "pose/markers", OUTPUT_QOS)
        self.output_namespace = posixpath.dirname(posixpath.dirname(self.mask_pub.topic_name))
        # The latest calibration of this camera (set on the executor thread, read by the worker: one reference).
        self.camera_info: CameraInfo | None = None
        self.camera_info_sub = node.create_subscription(CameraInfo, output_topic(topic, "camera_info"),
                                                        self._on_camera_info, qos_profile_sensor_data,
                                                        qos_overriding_options=overridable)

        # Guarded by node.frame_ready.
        self.pending: Image | CompressedImage | None = None
        self.received = 0
        self.dropped = 0
        # Written by the worker only; read by diagnostics under node.frame_ready.
        self.published = 0
        self.bad = 0
        self.last_bad_reason = ""
        self.last_bad_warning = -math.inf
        self.timings: deque[FrameTiming] = deque(maxlen=2000)
        self.last_merge = ""
        self.reported_bad = 0

    def _on_frame(self, msg) -> None:
        with self.node.frame_ready:
            self.received += 1
            if self.pending is not None:
                self.dropped += 1  # the worker has not taken the previous frame: it is stale now
            self.pending = msg
            self.node.frame_ready.notify()

    def _on_camera_info(self, msg: CameraInfo) -> None:
        self.camera_info = msg

    def publish_labels(self, labels, model_info: dict) -> None:
        table = {
            "label_set": labels.name,
            "classes": list(labels.classes),
            "palette": labels.palette.tolist(),
            "person_ids": list(labels.person_ids),
            "mask_topic": self.mask_pub.topic_name,
            **model_info,
        }
        self.labels_pub.publish(String(data=json.dumps(table)))
        if self.label_info_pub is not None:
            info = LabelInfo()
            info.class_map = [VisionClass(class_id=i, class_name=name) for i, name in enumerate(labels.classes)]
            self.label_info_pub.publish(info)

    def take_timings(self) -> list[FrameTiming]:
        """The timings since the last call (diagnostics window)."""
        taken = list(self.timings)
        self.timings.clear()
        return taken


class SegmergeNode(Node):
    def __init__(self, **node_kwargs):
        super().__init__(NODE_NAME, **node_kwargs)
        self._declare_parameters()
        self._setting_internally = False  # parameter sets all run on the executor thread, so a flag suffices
        self._stopping = False
        self.frame_ready = threading.Condition()
        self._budget_lock = threading.Lock()  # controller + engine rate changes from worker and executor

        topics = self._checked_topics(self.param("image_topics"))  # cheap checks before the slow model load
        self._check_startup_values()
        self._pose: PoseEstimator | None = None  # built on first enable: no cost while pose is off
        self._pose_lock = threading.Lock()  # two enables in a row build it once
        self._pose_settings = self._read_pose_settings()
        self._warned_no_person_classes = False
        if self._pose_settings.enable:
            reason = self._ensure_pose()  # before the segmentation model: bad pose weights fail fast
            if reason:
                raise StartupError(reason)
        self.engine = self._build_engine()
        self._publish_overlay = bool(self.param("publish_overlay"))
        self._overlay_alpha = float(self.param("overlay_alpha"))
        self._budget = BudgetController(
            mode=BudgetMode.OFF,
            target_latency_ms=self.param("budget.target_latency_ms"),
            target_fps=self.param("budget.target_fps"),
            min_rate=self.param("budget.min_merge_rate"),
            max_rate=self.param("budget.max_merge_rate"),
            # The engine maps rates onto a ladder of configurations; choosing between rungs would be pointless.
            levels=getattr(self.engine, "ladder_rates", None),
        )
        self._budget_rate: float | None = None
        if self.param("budget.mode") != BudgetMode.OFF.value and self.param("preset") != "none":
            self.get_logger().warning(f"preset {self.param('preset')!r} ignored: budget mode chooses merge rates")
            self.set_parameters([Parameter("preset", value="none")])  # callbacks are not registered yet
        self._apply_merge_settings()
        self._set_budget_mode(self.param("budget.mode"))

        self.cameras = self._create_cameras(topics)
        model_info = {key: self.param(key) for key in ("model", "weights", "device", "backend", "input_size",
                                                        "precision")}
        model_info["backend_in_use"] = self.engine.backend
        model_info["randomly_initialised"] = self.engine.randomly_initialised
        for camera in self.cameras:
            camera.publish_labels(self.engine.labels, model_info)

        self.add_pre_set_parameters_callback(self._before_parameters_set)
        self.add_on_set_parameters_callback(self._validate_parameters)
        self.add_post_set_parameters_callback(self._after_parameters_set)

        budget_topic = self.param("budget.topic")
        if budget_topic:
            self.create_subscription(Float32, budget_topic, self._on_budget_message, 10)
        self._reflect_rate = self.create_guard_condition(self._reflect_budget_rate)
        self._diagnostics_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._last_diagnostics = time.monotonic()
        self.create_timer(DIAGNOSTICS_PERIOD_S, self._publish_diagnostics)

        self._worker = threading.Thread(target=self._work, name="segmerge-worker", daemon=True)
        self._worker.start()
        outputs = ", ".join(sorted({c.output_namespace for c in self.cameras}))
        self.get_logger().info(
            f"ready: {len(self.cameras)} camera(s) [{', '.join(c.topic for c in self.cameras)}] -> "
            f"segmentation/* in [{outputs}]; {self.param('model')} on {self.engine.device} ({self.engine.backend}), "
            f"input_size {self.param('input_size') or 'camera resolution'}, {self._merge_description()}; "
            f"{self._pose_description()}")

    # -- parameters (the one place that reads them) ---------------------------------------------------------------
    def param(self, name: str):
        return self.get_parameter(name).value

    def _declare_parameters(self) -> None:
        for spec in PARAMETERS:
            # `-p merge_rate:=0` arrives as an integer; rclpy would refuse it for a double parameter.
            override = self._parameter_overrides.get(spec.name)
            if isinstance(spec.default, float) and override is not None and override.type_ == Parameter.Type.INTEGER:
                self._parameter_overrides[spec.name] = Parameter(spec.name, Parameter.Type.DOUBLE,
                                                                 float(override.value))
            try:
                self.declare_parameter(spec.name, spec.default, spec.descriptor())
            except ParameterException as error:
                raise StartupError(f"parameter {spec.name}: {error}") from None

    def _check_startup_values(self) -> None:
        """Choices, model names and cross-parameter limits of the values given at start-up (rclpy checked types
        and ranges while declaring)."""
        for spec in PARAMETERS:
            reason = check_choice(spec.name, self.param(spec.name))
            if reason:
                raise StartupError(reason)
        reason = check_preset(self.param("model"), self.param("preset"))
        if reason:
            raise StartupError(reason)
        if self.param("budget.min_merge_rate") > self.param("budget.max_merge_rate"):
            raise StartupError(f"budget.min_merge_rate {self.param('budget.min_merge_rate')} exceeds "
                               f"budget.max_merge_rate {self.param('budget.max_merge_rate')}")

    def _build_engine(self) -> SegmentationEngine:
        model, weights = self.param("model"), self.param("weights")
        try:
            engine = SegmentationEngine(model=model, weights=weights or None, device=self.param("device"),
                                        backend=self.param("backend"), input_size=self.param("input_size") or None,
                                        precision=self.param("precision"),
                                        cache_dir=self.param("engine_cache_dir") or None)
        except (CheckpointError, FileNotFoundError) as error:
            raise StartupError(f"cannot load weights {weights!r} for {model}: {error}") from None
        except ValueError as error:
            raise StartupError(f"invalid model settings: {error}") from None
        if engine.randomly_initialised:
            banner = "!" * 78
            self.get_logger().warning(
                f"\n{banner}\n  NO WEIGHTS GIVEN: {model} IS RANDOMLY INITIALISED. The masks are meaningless.\n"
                f"  Set the 'weights' parameter to a checkpoint (hub folder, .safetensors or .pth).\n{banner}")
        # One warm-up pass, so the first camera frame does not pay torch's one-off start-up costs.
        height, width = engine.input_size or (240, 320)
        engine.infer(np.zeros((height, width, 3), dtype=np.uint8))
        return engine

    # -- pose -----------------------------------------------------------------------------------------------------
    def _read_pose_settings(self) -> PoseSettings:
        return PoseSettings(
            enable=bool(self.param("pose.enable")), mode=str(self.param("pose.mode")),
            max_persons=int(self.param("pose.max_persons")), min_person_area=int(self.param("pose.min_person_area")),
            keypoint_threshold=float(self.param("pose.keypoint_threshold")),
            merge_rate=float(self.param("pose.merge_rate")))

    def _ensure_pose(self) -> str | None:
        """Build the pose estimator unless it exists; returns why it cannot be built, or None."""
        with self._pose_lock:
            if self._pose is not None:
                return None
            model, weights = self.param("pose.model"), self.param("pose.weights")
            settings = self._read_pose_settings()
            try:
                pose = PoseEstimator(model, weights or None, device=self.param("device"),
                                     max_persons=settings.max_persons, min_person_area=settings.min_person_area,
                                     keypoint_threshold=settings.keypoint_threshold, mode=settings.mode)
            except (CheckpointError, OSError, ValueError, RuntimeError) as error:
                if weights:
                    return f"cannot load pose.weights {weights!r} for {model}: {error}"
                return f"cannot build the {model} pose model: {error}"
            if pose.randomly_initialised:
                banner = "!" * 78
                self.get_logger().warning(
                    f"\n{banner}\n  NO POSE WEIGHTS GIVEN: THE {model} POSE MODEL IS RANDOMLY INITIALISED. The "
                    f"keypoints are meaningless.\n  Set 'pose.weights' to a Segformer++ mmpose pose checkpoint "
                    f"(.pth).\n{banner}")
            self._pose = pose
        return None

    def _pose_description(self) -> str:
        settings = self._pose_settings
        if not settings.enable:
            return "pose off"
        rate = "following segmentation" if settings.merge_rate < 0 else f"{settings.merge_rate:.2f}"
        return (f"pose on ({self.param('pose.model')}, mode {settings.mode}, at most {settings.max_persons} "
                f"person(s), merge rate {rate})")

    def _estimate_pose(self, rgb: np.ndarray, class_map: np.ndarray, rate_used: float,
                       settings: PoseSettings) -> PoseResult:
        """Worker side: apply this frame's settings snapshot to the estimator, then estimate."""
        pose = self._pose
        pose.mode = settings.mode
        pose.max_persons = settings.max_persons
        pose.min_person_area = settings.min_person_area
        pose.keypoint_threshold = settings.keypoint_threshold
        if settings.merge_rate >= 0:
            pose.set_merge_rate(settings.merge_rate)
        elif self.engine.is_segformer:
            # The encoder stages of the rung or preset this frame ran with (head and input scale are the
            # segmentation's own); the config is read after infer(), so a change in between shows a frame later.
            pose.set_merge_config(self.engine.merge_config, rate_used)
        else:
            # ViT methods have no merge configuration to share: their rate selects the pose ladder's rung.
            pose.set_merge_rate(rate_used if math.isfinite(rate_used) else 0.0)
        person_ids = self.engine.labels.person_ids
        if settings.mode == "segmentation" and not person_ids and not self._warned_no_person_classes:
            self._warned_no_person_classes = True
            self.get_logger().warning(
                f"pose.mode segmentation: label set {self.engine.labels.name!r} has no person class, so no person "
                "is ever found; use pose.mode full_frame or a model with a person class")
        return pose.estimate(rgb, class_map, person_ids)

    def _publish_pose(self, camera: "Camera", pose: PoseResult, header, image_size: tuple[int, int]) -> None:
        """Keypoints every frame (height 0 without persons); markers only while subscribed and with a known K."""
        k = camera_matrix(camera.camera_info, image_size)
        camera.keypoints_pub.publish(keypoints_cloud(header, pose.keypoints, pose.scores, k))
        if k is not None and camera.markers_pub.get_subscription_count():
            camera.markers_pub.publish(pose_markers(header, pose.keypoints, pose.scores, k,
                                                    pose.keypoint_threshold))

    @staticmethod
    def _checked_topics(topics: list[str]) -> list[str]:
        topics = [t.strip() for t in topics if t.strip()]
        if not topics:
            raise StartupError("image_topics is empty: give at least one camera topic")
        if len(set(topics)) != len(topics):
            raise StartupError(f"image_topics lists a topic twice: {topics}")
        outputs = {}
        for topic in topics:
            mask = output_topic(topic, "segmentation/mask")
            if mask in outputs:
                raise StartupError(f"cameras {outputs[mask]!r} and {topic!r} would both publish {mask!r}: put each "
                                   "camera in its own namespace (e.g. /left/image, /right/image)")
            outputs[mask] = topic
        return topics

    def _create_cameras(self, topics: list[str]) -> list[Camera]:
        try:
            return [Camera(self, topic) for topic in topics]
        except NameValidationException as error:
            raise StartupError(f"image_topics: {error}") from None

    def _set_internally(self, parameters: list[Parameter]) -> SetParametersResult:
        """Set parameters as the node itself (budget decisions, budget topic): not a manual override."""
        self._setting_internally = True
        try:
            return self.set_parameters_atomically(parameters)
        finally:
            self._setting_internally = False

    def _before_parameters_set(self, parameters: list[Parameter]) -> list[Parameter]:
        """Accept integers for double parameters, and keep merge_rate, preset and budget.mode consistent."""
        result = []
        for parameter in parameters:
            spec = SPECS.get(parameter.name)
            if spec is not None and isinstance(spec.default, float) and parameter.type_ == Parameter.Type.INTEGER:
                parameter = Parameter(parameter.name, Parameter.Type.DOUBLE, float(parameter.value))
            result.append(parameter)
        names = {p.name: p.value for p in result}
        if not self._setting_internally and ("merge_rate" in names or "preset" in names):
            # A hand-set rate or preset is a manual override: budget mode goes off in the same atomic set.
            if "budget.mode" not in names and self.param("budget.mode") != BudgetMode.OFF.value:
                result.append(Parameter("budget.mode", value=BudgetMode.OFF.value))
                names["budget.mode"] = BudgetMode.OFF.value
        rate_takes_over = "merge_rate" in names or names.get("budget.mode", "off") != BudgetMode.OFF.value
        if rate_takes_over and "preset" not in names and self.param("preset") != "none":
            result.append(Parameter("preset", value="none"))
        return result

    def _validate_parameters(self, parameters: list[Parameter]) -> SetParametersResult:
        # Types and ranges were already checked by rclpy against the descriptors; this adds choices and limits.
        values = {p.name: p.value for p in parameters}
        for name, value in values.items():
            reason = check_choice(name, value)
            if reason:
                return SetParametersResult(successful=False, reason=reason)
        low = values.get("budget.min_merge_rate", self.param("budget.min_merge_rate"))
        high = values.get("budget.max_merge_rate", self.param("budget.max_merge_rate"))
        if low > high:
            return SetParametersResult(
                successful=False, reason=f"budget.min_merge_rate {low} exceeds budget.max_merge_rate {high}")
        if "preset" in values:
            reason = check_preset(self.param("model"), values["preset"])
            if reason:
                return SetParametersResult(successful=False, reason=reason)
        if values.get("pose.enable") is True:
            reason = self._ensure_pose()  # first enable: build now, so a failure refuses the set with its reason
            if reason:
                return SetParametersResult(successful=False, reason=reason)
        return SetParametersResult(successful=True)

    def _after_parameters_set(self, parameters: list[Parameter]) -> None:
        names = {p.name for p in parameters}
        manual = not self._setting_internally
        if "publish_overlay" in names:
            self._publish_overlay = bool(self.param("publish_overlay"))
        if "overlay_alpha" in names:
            self._overlay_alpha = float(self.param("overlay_alpha"))
        if any(name.startswith("pose.") for name in names):
            was_enabled = self._pose_settings.enable
            self._pose_settings = self._read_pose_settings()  # the worker picks it up from the next frame
            if manual and (self._pose_settings.enable != was_enabled or "pose.mode" in names):
                self.get_logger().info(f"now {self._pose_description()}")
        with self._budget_lock:
            if names & {"budget.target_latency_ms", "budget.target_fps"}:
                self._budget.set_target(target_latency_ms=self.param("budget.target_latency_ms"),
                                        target_fps=self.param("budget.target_fps") * self._active_cameras())
            if names & {"budget.min_merge_rate", "budget.max_merge_rate"}:
                self._budget.set_limits(self.param("budget.min_merge_rate"), self.param("budget.max_merge_rate"))
            budget_off = "budget.mode" in names and self.param("budget.mode") == BudgetMode.OFF.value
            # Leaving budget mode, the engine takes the merge_rate parameter again: the controller's last choice may
            # not have been reflected into the parameter yet, and what the parameter says must be what runs.
            if (names & {"merge_rate", "preset"} and manual) or budget_off:
                self._apply_merge_settings()
            if "budget.mode" in names:
                self._set_budget_mode(self.param("budget.mode"))
        if manual and "merge_rate" in names and "budget.mode" in names and self.param("budget.mode") == "off":
            self.get_logger().info(f"merge_rate set to {self.param('merge_rate'):.3f} by hand: budget mode is off now")
        elif manual and names & {"merge_rate", "preset", "budget.mode"}:
            self.get_logger().info(f"now {self._merge_description()}")

    def _apply_merge_settings(self) -> None:
        preset = self.param("preset")
        if preset != "none":
            self.engine.set_preset(preset)
        else:
            self.engine.set_merge_rate(self.param("merge_rate"))

    def _set_budget_mode(self, mode: str) -> None:
        mode = BudgetMode.parse(mode)
        was_active = self._budget.active
        self._budget.set_target(mode=mode, target_fps=self.param("budget.target_fps") * self._active_cameras())
        if mode is BudgetMode.OFF:
            self._budget_rate = None
        elif not was_active:
            self._budget_rate = None
            if not self._budget.calibrated:
                self.get_logger().info(
                    f"budget mode {mode.value}: calibrating merge rates {self._budget.min_rate:.2f}.."
                    f"{self._budget.max_rate:.2f} on the next frames")

    def _merge_description(self) -> str:
        if self._budget.active:
            return (f"budget mode {self._budget.mode.value} (target {self._budget.target_ms:.1f} ms per frame, "
                    f"merge rate {self._budget.min_rate:.2f}..{self._budget.max_rate:.2f})")
        if self.param("preset") != "none":
            return f"merge preset {self.param('preset')}"
        return f"merge_rate {self.param('merge_rate'):.3f}"

    def _active_cameras(self) -> int:
        """Cameras that delivered frames lately: in fps mode the worker's frame budget is shared among them."""
        cameras = getattr(self, "cameras", [])
        active = sum(1 for c in cameras if c.timings or c.pending is not None)
        return max(1, active)

    def _on_budget_message(self, msg: Float32) -> None:
        budget_ms = float(msg.data)
        low, high = SPECS["budget.target_latency_ms"].float_range
        if not math.isfinite(budget_ms) or budget_ms <= 0:
            self.get_logger().warning(f"ignoring compute budget {budget_ms} ms", throttle_duration_sec=5.0)
            return
        changes = [Parameter("budget.target_latency_ms", value=min(max(budget_ms, low), high))]
        if self.param("budget.mode") != BudgetMode.LATENCY.value:
            changes.append(Parameter("budget.mode", value=BudgetMode.LATENCY.value))
            self.get_logger().info(f"compute budget {budget_ms:.1f} ms received: budget mode latency")
        result = self._set_internally(changes)
        if not result.successful:
            self.get_logger().warning(f"compute budget not applied: {result.reason}", throttle_duration_sec=5.0)

    def _reflect_budget_rate(self) -> None:
        """Executor side of a budget decision: show the rate the worker chose as the merge_rate parameter."""
        with self._budget_lock:
            rate = self._budget_rate if self._budget.active else None
        if rate is not None and abs(self.param("merge_rate") - rate) > 1e-9:
            self._set_internally([Parameter("merge_rate", value=rate)])

    # -- the worker -----------------------------------------------------------------------------------------------
    def _work(self) -> None:
        next_camera = 0
        while True:
            with self.frame_ready:
                while not self._stopping and all(c.pending is None for c in self.cameras):
                    self.frame_ready.wait()
                if self._stopping:
                    return
                # Round robin, so a fast camera cannot starve a slow one.
                order = self.cameras[next_camera:] + self.cameras[:next_camera]
                camera = next(c for c in order if c.pending is not None)
                next_camera = (self.cameras.index(camera) + 1) % len(self.cameras)
                msg, camera.pending = camera.pending, None
            try:
                self._process(camera, msg)
            except Exception as error:  # noqa: BLE001 - one bad frame must not kill the worker
                if self._stopping or not self.context.ok():
                    return
                self.get_logger().error(f"{camera.topic}: frame failed: {error!r}", throttle_duration_sec=5.0)

    def _process(self, camera: Camera, msg) -> None:
        started = time.perf_counter()
        try:
            rgb = message_to_rgb(msg)
        except BadFrame as bad:
            self._count_bad(camera, str(bad))
            return
        result = self.engine.infer(rgb)
        header = msg.header  # copied unchanged: consumers sync masks with frames by stamp and frame_id
        camera.mask_pub.publish(mono8_image(result.class_map, header))
        if camera.confidence_pub.get_subscription_count():
            camera.confidence_pub.publish(mono8_image(result.confidence, header))
        settings = self._pose_settings  # one snapshot for the whole frame
        pose = None
        if settings.enable and self._pose is not None:
            pose = self._estimate_pose(rgb, result.class_map, result.merge_rate, settings)
            self._publish_pose(camera, pose, header, (rgb.shape[1], rgb.shape[0]))
        if self._publish_overlay and camera.overlay_pub.get_subscription_count():
            blended = overlay(rgb, result.class_map, self.engine.labels.palette, self._overlay_alpha)
            if pose is not None and pose.num_persons:
                draw_skeletons(blended, pose.keypoints, pose.scores, pose.keypoint_threshold, inplace=True)
            camera.overlay_pub.publish(rgb8_image(blended, header))
        processing_ms = (time.perf_counter() - started) * 1e3  # pose included: the budget controller sees it

        stamp_ns = header.stamp.sec * 1_000_000_000 + header.stamp.nanosec
        latency_ms = (self.get_clock().now().nanoseconds - stamp_ns) / 1e6 if stamp_ns else math.nan
        with self.frame_ready:
            camera.published += 1
            camera.last_merge = result.merge_name
            camera.timings.append(FrameTiming(latency_ms, result.inference_ms, processing_ms, result.merge_rate,
                                              pose.num_persons if pose is not None else -1,
                                              pose.pose_ms if pose is not None else math.nan))
        self._budget_step(processing_ms, result.merge_rate)

    def _budget_step(self, processing_ms: float, rate_used: float) -> None:
        with self._budget_lock:
            if not self._budget.active:
                return
            next_rate = self._budget.update(processing_ms, rate_used if math.isfinite(rate_used) else None)
            if next_rate is None:
                return
            next_rate = round(next_rate, 4)  # parameter events need not carry float noise
            if next_rate != self.engine.merge_rate:
                self.engine.set_merge_rate(next_rate)
            changed = next_rate != self._budget_rate
            self._budget_rate = next_rate
        if changed:
            self._reflect_rate.trigger()

    def _count_bad(self, camera: Camera, reason: str) -> None:
        with self.frame_ready:
            camera.bad += 1
            camera.last_bad_reason = reason
        now = time.monotonic()
        # Per-camera throttle: one broken camera must not hide another's warnings.
        if now - camera.last_bad_warning >= BAD_FRAME_WARN_PERIOD_S:
            camera.last_bad_warning = now
            self.get_logger().warning(f"{camera.topic}: dropped a bad frame ({reason}); {camera.bad} bad so far")

    # -- diagnostics ----------------------------------------------------------------------------------------------
    def _publish_diagnostics(self) -> None:
        now = time.monotonic()
        window_s = max(now - self._last_diagnostics, 1e-3)
        self._last_diagnostics = now
        with self._budget_lock:
            mode = self._budget.mode
            if mode is BudgetMode.FPS:  # keep the per-camera fps target right as cameras come and go
                self._budget.set_target(target_fps=self.param("budget.target_fps") * self._active_cameras())
            target_ms = self._budget.target_ms
        array = DiagnosticArray()
        array.header.stamp = self.get_clock().now().to_msg()
        with self.frame_ready:
            snapshots = [(c, c.take_timings(), c.received, c.dropped, c.published, c.bad, c.last_bad_reason,
                          c.last_merge) for c in self.cameras]
        for camera, timings, received, dropped, published, bad, bad_reason, merge_name in snapshots:
            array.status.append(self._camera_status(camera, timings, window_s, received, dropped, published, bad,
                                                    bad_reason, merge_name, mode, target_ms))
            camera.reported_bad = bad
        self._diagnostics_pub.publish(array)

    def _camera_status(self, camera, timings, window_s, received, dropped, published, bad, bad_reason, merge_name,
                       mode, target_ms) -> DiagnosticStatus:
        def mean(values):
            values = [v for v in values if math.isfinite(v)]
            return sum(values) / len(values) if values else math.nan

        rate = timings[-1].merge_rate if timings else self.engine.merge_rate
        processing_ms = mean(t.processing_ms for t in timings)
        values = {
            "merge_rate": f"{rate:.4f}",
            "merge_config": merge_name or self.engine.merge_config.name,
            "latency_ms": f"{mean(t.latency_ms for t in timings):.2f}",
            "inference_ms": f"{mean(t.inference_ms for t in timings):.2f}",
            "processing_ms": f"{processing_ms:.2f}",
            "fps": f"{len(timings) / window_s:.2f}",
            "dropped_frames": str(dropped),
            "bad_frames": str(bad),
            "frames_in": str(received),
            "frames_out": str(published),
            "budget_mode": mode.value,
            "budget_target_ms": f"{target_ms:.2f}" if target_ms is not None else "nan",
            "last_bad_reason": bad_reason,
        }
        posed = [t for t in timings if t.persons >= 0]
        if self._pose_settings.enable or posed:
            values["persons"] = str(posed[-1].persons) if posed else "0"  # in the window's last frame
            values["pose_ms"] = f"{mean(t.pose_ms for t in posed):.2f}"
        level, message = DiagnosticStatus.OK, f"{len(timings)} frames in {window_s:.1f} s"
        if not timings:
            level, message = DiagnosticStatus.WARN, "no frames processed in the last period"
        if bad > camera.reported_bad:
            level, message = DiagnosticStatus.WARN, f"{bad - camera.reported_bad} bad frame(s): {bad_reason}"
        elif (target_ms is not None and timings and processing_ms > UNREACHABLE_BUDGET_MARGIN * target_ms
              and rate >= self._budget.max_rate - 1e-6):
            level, message = DiagnosticStatus.WARN, (f"budget {target_ms:.1f} ms not met even at max_merge_rate "
                                                     f"({processing_ms:.1f} ms)")
        return DiagnosticStatus(
            level=level, name=f"{self.get_name()}: {camera.topic}", message=message, hardware_id=camera.topic,
            values=[KeyValue(key=k, value=v) for k, v in values.items()])

    # -- shutdown -------------------------------------------------------------------------------------------------
    def stop(self, timeout_s: float = 1.0) -> None:
        """Stop the worker; a frame in the middle of inference is abandoned (the thread is a daemon)."""
        with self.frame_ready:
            self._stopping = True
            self.frame_ready.notify_all()
        if self._worker.is_alive() and self._worker is not threading.current_thread():
            self._worker.join(timeout_s)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``segmerge_node``; returns the exit code (non-zero on a fatal configuration error)."""
    try:
        rclpy.init(args=argv)
        try:
            node = SegmergeNode()
        except StartupError as error:
            rclpy.logging.get_logger(NODE_NAME).fatal(str(error))
            return 1
        except Exception:  # noqa: BLE001 - re-raised unless it only reflects a shutdown during start-up
            if not rclpy.ok():
                return 0  # SIGINT/SIGTERM while the model was loading: the context is gone, nothing to report
            raise
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        try:
            executor.spin()  # returns or raises once SIGINT/SIGTERM shut the context down
        except (KeyboardInterrupt, ExternalShutdownException):
            pass
        finally:
            node.stop()
            executor.shutdown(timeout_sec=0.5)
            node.destroy_node()
        return 0
    except KeyboardInterrupt:  # Ctrl-C while torch or the model was still loading
        return 130
    finally:
        rclpy.try_shutdown()


if __name__ == "__main__":
    sys.exit(main())
