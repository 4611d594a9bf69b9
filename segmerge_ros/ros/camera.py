"""One input camera of the node: its subscriptions, its one-frame slot, its publishers and its counters.

For a camera topic ``<ns>/<name>`` (``<ns>/<name>/compressed`` for JPEG/PNG) the outputs go to
``<ns>/segmentation/*`` and ``<ns>/pose/*``, and the calibration is read from ``<ns>/camera_info``. The publishers
exist from configure to cleanup, the subscriptions only while the node is active (``subscribe``/``unsubscribe``).
Models with
instance output (Mask2Former) also publish ``<ns>/segmentation/instances`` and ``<ns>/segmentation/instances/info``,
with ``panoptic.enable`` ``<ns>/segmentation/panoptic`` and ``<ns>/segmentation/panoptic/info``.
"""

from __future__ import annotations

import math
import posixpath
import threading
import time
from collections import deque
from typing import Callable

from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.qos_overriding_options import QoSOverridingOptions
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
from std_msgs.msg import String
from visualization_msgs.msg import MarkerArray

from segmerge_ros.inference.budget import ArrivalRate
from segmerge_ros.ros.diagnostics import CameraSnapshot, FrameTiming
from segmerge_ros.inference.families.registry import family_for
from segmerge_ros.ros.frame_pipeline import (CONFIDENCE, DETECTIONS, INSTANCES, INSTANCES_INFO, KEYPOINTS, MARKERS,
                                             MASK, OVERLAY, PANOPTIC, PANOPTIC_INFO)
from segmerge_ros.ros.conversions import BadFrame, check_message
from segmerge_ros.ros.startup import labels_message
from segmerge_ros.ros.topics import COMPRESSED_SUFFIX, output_topic

try:  # a rosdep of the package, built by make setup; without it these two outputs are left out (logged at configure)
    from vision_msgs.msg import Detection2DArray, LabelInfo
except ImportError:
    Detection2DArray = LabelInfo = None
HAVE_VISION_MSGS = LabelInfo is not None

# Cameras and simulators often publish best effort; a reliable subscription would never match them. Depth 1: only
# the newest frame matters. Overridable with qos_overrides.<topic>.subscription.* parameters.
INPUT_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.BEST_EFFORT,
                       durability=DurabilityPolicy.VOLATILE)
# Reliable publishers match both reliable (RViz's default) and best-effort subscribers.
OUTPUT_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                        durability=DurabilityPolicy.VOLATILE)
LATCHED_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)


class Camera:
    """One input topic: its frame slot, its publishers and its counters.

    The subscription callback only drops the message into the slot (a newer frame replaces an unprocessed one and
    counts as dropped) and wakes the worker through ``frame_ready``, which also guards the counters.
    """

    def __init__(self, node: Node, topic: str, frame_ready: threading.Condition,
                 on_bad: Callable[["Camera", str], None]):
        self.frame_ready = frame_ready
        self._node, self._on_bad = node, on_bad
        self.compressed = topic.endswith(COMPRESSED_SUFFIX)
        self._given_topic = topic
        self._overridable = QoSOverridingOptions.with_default_policies()
        self.topic = node.resolve_topic_name(topic)  # fully resolved, for logs and diagnostics
        self.subscription = self.camera_info_sub = None  # while active

        def publisher(msg_type, name, qos, overrides=True):
            kwargs = {"qos_overriding_options": self._overridable} if overrides else {}
            return node.create_publisher(msg_type, output_topic(topic, name), qos, **kwargs)

        self.mask_pub = publisher(Image, "segmentation/mask", OUTPUT_QOS)
        self.confidence_pub = publisher(Image, "segmentation/confidence", OUTPUT_QOS)
        self.overlay_pub = publisher(Image, "segmentation/overlay", OUTPUT_QOS)
        self.labels_pub = publisher(String, "segmentation/labels", LATCHED_QOS, overrides=False)
        self.keypoints_pub = publisher(PointCloud2, "pose/keypoints", OUTPUT_QOS)
        self.markers_pub = publisher(MarkerArray, "pose/markers", OUTPUT_QOS)
        self.publishers = {MASK: self.mask_pub, CONFIDENCE: self.confidence_pub, OVERLAY: self.overlay_pub,
                           KEYPOINTS: self.keypoints_pub, MARKERS: self.markers_pub}
        self.label_info_pubs = []
        if HAVE_VISION_MSGS:
            # <ns>/label_info is the deprecated alias of one release (the class map used to be published there)
            self.label_info_pubs = [publisher(LabelInfo, name, LATCHED_QOS, overrides=False)
                                    for name in ("segmentation/label_info", "label_info")]
            self.publishers[DETECTIONS] = publisher(Detection2DArray, "segmentation/detections", OUTPUT_QOS)
        if family_for(node.get_parameter("model").value).has_instances:  # the models that give instances
            self.publishers[INSTANCES] = publisher(Image, "segmentation/instances", OUTPUT_QOS)
            self.publishers[INSTANCES_INFO] = publisher(String, "segmentation/instances/info", OUTPUT_QOS)
            if node.get_parameter("panoptic.enable").value:
                self.publishers[PANOPTIC] = publisher(Image, "segmentation/panoptic", OUTPUT_QOS)
                self.publishers[PANOPTIC_INFO] = publisher(String, "segmentation/panoptic/info", OUTPUT_QOS)
        self.output_namespace = posixpath.dirname(posixpath.dirname(self.mask_pub.topic_name))
        # The latest calibration of this camera (set on the executor thread, read by the worker: one reference).
        self.camera_info: CameraInfo | None = None

        # Guarded by frame_ready.
        self.pending: Image | CompressedImage | None = None
        self.received = 0
        self.dropped = 0
        self.arrivals = ArrivalRate()  # the camera's frame rate over several seconds (fps budget mode)
        # Written by the worker only (under frame_ready); read by diagnostics under frame_ready.
        self.published = 0
        self.bad = 0
        self.failed = 0
        self.last_bad_reason = ""
        self.last_failure = ""
        self.last_bad_warning = -math.inf
        self.timings: deque[FrameTiming] = deque(maxlen=2000)
        self.last_merge = ""
        self.reported_bad = 0
        self.reported_failed = 0
        self.reported_received = 0
        self.last_stamp_ns = 0  # header stamp of the last frame received (0: none or unstamped)

    def subscribe(self) -> None:
        """Start taking frames and calibrations (activate)."""
        node, overridable = self._node, self._overridable
        message_type = CompressedImage if self.compressed else Image
        self.subscription = node.create_subscription(message_type, self._given_topic, self._on_frame, INPUT_QOS,
                                                     qos_overriding_options=overridable)
        self.camera_info_sub = node.create_subscription(CameraInfo, output_topic(self._given_topic, "camera_info"),
                                                        self._on_camera_info, qos_profile_sensor_data,
                                                        qos_overriding_options=overridable)

    def unsubscribe(self) -> None:
        """Stop taking frames (deactivate); an unprocessed frame in the slot is dropped."""
        for subscription in (self.subscription, self.camera_info_sub):
            if subscription is not None:
                self._node.destroy_subscription(subscription)
        self.subscription = self.camera_info_sub = None
        with self.frame_ready:
            if self.pending is not None:
                self.pending = None
                self.dropped += 1

    def destroy(self) -> None:
        """Subscriptions and publishers gone (cleanup)."""
        self.unsubscribe()
        for pub in {*self.publishers.values(), self.labels_pub, *self.label_info_pubs}:
            self._node.destroy_publisher(pub)

    def _on_frame(self, msg) -> None:
        try:
            check_message(msg)  # here, so that a frame a newer one replaces before decoding is still counted
        except BadFrame as bad:
            self._on_bad(self, str(bad))
            return
        with self.frame_ready:
            self.received += 1
            self.arrivals.record(time.monotonic())
            self.last_stamp_ns = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
            if self.pending is not None:
                self.dropped += 1  # the worker has not taken the previous frame: it is stale now
            self.pending = msg
            self.frame_ready.notify()

    def _on_camera_info(self, msg: CameraInfo) -> None:
        self.camera_info = msg

    def publish(self, kind: str, message) -> None:
        self.publishers[kind].publish(message)

    def has_subscribers(self, kind: str) -> bool:
        publisher = self.publishers.get(kind)
        return publisher is not None and publisher.get_subscription_count() > 0

    def wants_instances(self) -> bool:
        """Whether anyone subscribes to the instance or panoptic outputs (pose crops, detections and REP-155
        bodies ask for instances on their own: ``FramePipeline``)."""
        return any(self.has_subscribers(kind) for kind in (INSTANCES, INSTANCES_INFO, PANOPTIC, PANOPTIC_INFO))

    def publish_labels(self, labels, model_info: dict, label_info=None) -> None:
        """The latched labels: JSON always, vision_msgs/LabelInfo (``label_info``) where vision_msgs is installed."""
        self.labels_pub.publish(labels_message(labels, model_info, self.mask_pub.topic_name))
        if label_info is not None:
            for pub in self.label_info_pubs:
                pub.publish(label_info)

    def snapshot(self, window_s: float) -> CameraSnapshot:
        """The diagnostics window since the last call (call under frame_ready): takes the timings, marks the bad and
        failed frames as reported."""
        timings = list(self.timings)
        self.timings.clear()
        snapshot = CameraSnapshot(
            topic=self.topic, timings=timings, window_s=window_s, received=self.received, dropped=self.dropped,
            published=self.published, bad=self.bad, failed=self.failed, new_bad=self.bad - self.reported_bad,
            new_failed=self.failed - self.reported_failed, last_bad_reason=self.last_bad_reason,
            last_failure=self.last_failure, merge_name=self.last_merge,
            new_received=self.received - self.reported_received, last_stamp_ns=self.last_stamp_ns)
        self.reported_bad, self.reported_failed, self.reported_received = self.bad, self.failed, self.received
        return snapshot
