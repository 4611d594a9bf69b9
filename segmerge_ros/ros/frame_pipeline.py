"""One camera frame through the node's whole per-frame path, without DDS: message in, output messages out.

    pipeline = FramePipeline(engine, pose=None, warn=print)
    outputs = pipeline.process(msg, camera_info=None, settings=FrameSettings(), publish=None)

``msg`` is a ``sensor_msgs/Image`` or ``CompressedImage``. The pipeline decodes it (``conversions.py``), refuses it
when the network cannot run on it, runs the engine with its current merge configuration, optionally pose on the
people found, and builds the output messages, each carrying the input header unchanged. ``publish(kind, message)``,
when given, receives every message as soon as it is built (the node publishes the mask before pose runs); the
same messages come back in :class:`FrameOutputs`. A frame that cannot be processed for a reason in the frame itself
raises :class:`~segmerge_ros.ros.conversions.BadFrame` with that reason; anything else that goes wrong (a bug, the
device running out of memory) propagates as it is.

The node (``node.py``) runs every frame through this object; ``segmerge-bag`` runs recorded frames through it.
Budget control stays with the caller: after each frame, :func:`budget_step` feeds the frame's processing time and
the rate it ran at to a :class:`~segmerge_ros.inference.budget.BudgetController` and sets the rate it chooses on the
engine for the next frame.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
from std_msgs.msg import Header, String
from visualization_msgs.msg import MarkerArray

from segmerge_ros.models.labels import overlay
from segmerge_ros.inference.budget import BudgetController
from segmerge_ros.inference.engine import SegmentationEngine, SegmentationResult
from segmerge_ros.inference.detections import Objects, objects_from_class_map, objects_from_instances
from segmerge_ros.inference.pose import PoseEstimator, PoseResult, draw_skeletons
from segmerge_ros.inference.tracking import Tracker
from segmerge_ros.ros.conversions import BadFrame, message_to_rgb, mono8_image, mono16_image, rgb8_image
from segmerge_ros.ros.params import POSE_FOLLOW_SEGMENTATION
from segmerge_ros.ros.pose_msgs import camera_matrix, keypoints_cloud, pose_markers

__all__ = ["BadFrame", "FrameOutputs", "FramePipeline", "FrameSettings", "FrameTimes", "PoseSettings",
           "budget_step", "ids_info_message", "minimum_network_side"]

# Output kinds, as handed to ``publish`` and named in FrameOutputs.
MASK, CONFIDENCE, OVERLAY, KEYPOINTS, MARKERS = "mask", "confidence", "overlay", "keypoints", "markers"
DETECTIONS = "detections"  # vision_msgs/Detection2DArray (where vision_msgs is installed)
INSTANCES, INSTANCES_INFO = "instances", "instances_info"  # models with instance output (Mask2Former)
PANOPTIC, PANOPTIC_INFO = "panoptic", "panoptic_info"  # Mask2Former with panoptic.enable


@dataclass(frozen=True)
class PoseSettings:
    """The pose parameters as one snapshot: the node's executor thread swaps in a new one, the worker reads one per
    frame."""

    enable: bool = False
    mode: str = "segmentation"
    max_persons: int = 4
    min_person_area: int = 400
    keypoint_threshold: float = 0.3
    merge_rate: float = POSE_FOLLOW_SEGMENTATION  # -1: the segmentation's merge configuration of this frame


@dataclass(frozen=True)
class FrameSettings:
    """Which outputs one frame produces (the node asks only for what has subscribers)."""

    confidence: bool = True
    overlay: bool = True
    overlay_alpha: float = 0.5
    markers: bool = True      # pose markers; built only while pose runs and K is known
    pose: PoseSettings = field(default_factory=PoseSettings)
    detections: bool = False  # build the Detection2DArray (someone subscribes)
    track: bool = False       # find and track objects even without detections (REP-155 bodies)
    detection_class_ids: tuple[int, ...] = ()  # empty: the label set's person classes
    detection_min_area: int = 400
    instances: bool = True    # a model's instances (and panoptic segments): only while someone needs them


@dataclass(frozen=True)
class FrameTimes:
    decode_ms: float
    inference_ms: float      # the engine: pre-processing, network, post-processing
    pose_ms: float           # nan when pose did not run
    processing_ms: float     # the whole call, publishing included: what budget mode controls
    merge_rate: float        # the rate this frame ran at (nan for a preset)
    merge_name: str          # the merge configuration's name (ladder rung or preset)
    persons: int = -1        # -1: pose did not run
    preprocess_ms: float = math.nan   # the engine's stages (inference_ms is their sum)
    network_ms: float = math.nan
    postprocess_ms: float = math.nan
    publish_ms: float = math.nan      # the rest: building and publishing messages, overlay and markers
    instances: int = -1               # models with instances: 1 computed this frame, 0 skipped (nobody needed them)


@dataclass
class FrameOutputs:
    header: Header
    mask: Image
    confidence: Image | None
    overlay: Image | None
    keypoints: PointCloud2 | None
    markers: MarkerArray | None
    times: FrameTimes
    segmentation: SegmentationResult
    pose: PoseResult | None
    instances: Image | None = None       # mono16 instance ids, when the model gives instances
    instances_info: String | None = None  # JSON: each id's class and score
    panoptic: Image | None = None       # mono16 panoptic segment ids, with panoptic.enable
    panoptic_info: String | None = None  # JSON: each segment's class, thing or stuff, score
    detections: object | None = None     # vision_msgs/Detection2DArray, when asked for
    objects: Objects | None = None       # what was found (detection classes and, for pose, people), largest first
    track_ids: list[str] | None = None   # each object's track id, when tracked
    posed: np.ndarray | None = None      # for each pose person, the index of its object (segmentation mode)


def minimum_network_side(engine: SegmentationEngine) -> int:
    """The smallest height/width the engine's network runs at (its family's ``minimum_input_side``: 29 px for
    SegFormer's MiT, whose every stage's spatial-reduction convolution needs a grid at least its kernel; plain ViTs
    pad any size)."""
    return engine.family.minimum_input_side


class FramePipeline:
    """The per-frame path: decode, check, segment, pose, build messages. Not thread-safe: one caller at a time.

    ``pose`` may be None (pose frames then run without pose) and may be set later, e.g. once a pose model built in
    the background is ready. ``warn`` receives one-off warnings about the configuration (e.g. a label set without a
    person class in pose segmentation mode).
    """

    def __init__(self, engine: SegmentationEngine, pose: PoseEstimator | None = None,
                 warn: Callable[[str], None] | None = None):
        self.engine = engine
        self.pose = pose
        self._warn = warn or (lambda message: None)
        self._warned_no_person_classes = False
        self.min_side = minimum_network_side(engine)
        # budget mode's cap on the people posed per frame (PoseWork); None: the user's pose.max_persons
        self.pose_people_cap: int | None = None

    def process(self, msg: Image | CompressedImage, camera_info: CameraInfo | None = None,
                settings: FrameSettings = FrameSettings(),
                publish: Callable[[str, object], None] | None = None,
                tracker: Tracker | None = None) -> FrameOutputs:
        """Run one frame; raises BadFrame (with the reason) for a frame that cannot be processed. ``tracker``: the
        camera's, which gives the objects their ids (detections or ``settings.track``)."""
        started = time.perf_counter()
        rgb = message_to_rgb(msg)
        self._check_size(rgb)
        decoded = time.perf_counter()
        header = msg.header  # copied unchanged: consumers sync outputs with frames by stamp and frame_id
        emit = publish or (lambda kind, message: None)

        find = settings.detections or settings.track
        pose_on = settings.pose.enable and self.pose is not None
        pose_crops = pose_on and settings.pose.mode == "segmentation"  # crops from the person objects
        # detection scores need the confidence; people as instances need the instances (Mask2Former)
        result = self.engine.infer(rgb, confidence=settings.confidence or find,
                                   instances=settings.instances or find or pose_crops)
        mask = mono8_image(result.class_map, header)
        emit(MASK, mask)
        confidence = None
        if settings.confidence:
            confidence = mono8_image(result.confidence, header)
            emit(CONFIDENCE, confidence)
        instances = instances_info = None
        if result.instances is not None:
            instances = mono16_image(result.instances.id_map, header)
            emit(INSTANCES, instances)
            instances_info = ids_info_message("instances", result.instances.as_dict(self.engine.labels.classes),
                                              header)
            emit(INSTANCES_INFO, instances_info)
        panoptic = panoptic_info = None
        if result.panoptic is not None:
            panoptic = mono16_image(result.panoptic.segment_map.astype(np.uint16), header)
            emit(PANOPTIC, panoptic)
            panoptic_info = ids_info_message("segments", result.panoptic.as_dict(self.engine.labels.classes), header)
            emit(PANOPTIC_INFO, panoptic_info)

        objects = track_ids = detections = posed = None
        if find or pose_crops:
            objects = self._find_objects(result, settings, pose_on)
            if find and tracker is not None:
                track_ids = tracker.update(objects.boxes, objects.class_ids)
            if settings.detections:
                detections = self._detections_message(header, objects, track_ids, settings)
                emit(DETECTIONS, detections)

        pose = keypoints = markers = None
        if pose_on:
            pose, posed = self._estimate_pose(rgb, result, settings.pose, objects)
            k = camera_matrix(camera_info, (rgb.shape[1], rgb.shape[0]))
            keypoints = keypoints_cloud(header, pose.keypoints, pose.scores, k)
            emit(KEYPOINTS, keypoints)
            if k is not None and settings.markers:
                markers = pose_markers(header, pose.keypoints, pose.scores, k, pose.keypoint_threshold)
                emit(MARKERS, markers)

        overlay_msg = None
        if settings.overlay:
            blended = overlay(rgb, result.class_map, self.engine.labels.palette, settings.overlay_alpha)
            if pose is not None and pose.num_persons:
                draw_skeletons(blended, pose.keypoints, pose.scores, pose.keypoint_threshold, inplace=True)
            overlay_msg = rgb8_image(blended, header)
            emit(OVERLAY, overlay_msg)

        processing_ms = (time.perf_counter() - started) * 1e3  # pose included: the budget controller sees it
        decode_ms = (decoded - started) * 1e3
        pose_ms = pose.pose_ms if pose is not None else math.nan
        times = FrameTimes(
            decode_ms=decode_ms, inference_ms=result.inference_ms, pose_ms=pose_ms, processing_ms=processing_ms,
            merge_rate=result.merge_rate, merge_name=result.merge_name,
            persons=pose.num_persons if pose is not None else -1,
            preprocess_ms=result.preprocess_ms, network_ms=result.network_ms, postprocess_ms=result.postprocess_ms,
            publish_ms=processing_ms - decode_ms - result.inference_ms - (pose_ms if pose is not None else 0.0),
            instances=-1 if not self.engine.family.has_instances else int(result.instances is not None))
        return FrameOutputs(header, mask, confidence, overlay_msg, keypoints, markers, times, result, pose,
                            instances, instances_info, panoptic, panoptic_info, detections, objects, track_ids, posed)

    def _find_objects(self, result: SegmentationResult, settings: FrameSettings, pose_on: bool) -> Objects:
        """The detection classes' regions (instances with Mask2Former) and, for pose, the people's, largest first."""
        person_ids = self.engine.labels.person_ids
        classes = set(self._detection_classes(settings))
        min_area = settings.detection_min_area
        if pose_on or settings.track:  # pose crops and REP-155 bodies are people, whatever detections.classes says
            classes |= set(person_ids)
        if pose_on:
            min_area = min(min_area, settings.pose.min_person_area)
        if result.instances is not None:  # one box per instance: people who touch are still two
            return objects_from_instances(result.instances, sorted(classes), min_area)
        return objects_from_class_map(result.class_map, sorted(classes), min_area, result.confidence)

    def _detection_classes(self, settings: FrameSettings) -> tuple[int, ...]:
        """The classes detections are published for: ``detection_class_ids``, or the label set's person classes."""
        return tuple(settings.detection_class_ids or self.engine.labels.person_ids)

    def _detections_message(self, header: Header, objects: Objects, track_ids: list[str] | None,
                            settings: FrameSettings):
        """The Detection2DArray of the detection classes' objects at least detection_min_area large."""
        from segmerge_ros.ros.detection_msgs import detections_message  # vision_msgs: only where it is installed

        keep = (np.isin(objects.class_ids, self._detection_classes(settings))
                & (objects.areas >= settings.detection_min_area))
        ids = [track_ids[i] for i in np.flatnonzero(keep)] if track_ids is not None else [""] * int(keep.sum())
        return detections_message(header, objects.subset(keep), ids, self.engine.labels.classes)

    def _check_size(self, rgb: np.ndarray) -> None:
        if self.engine.input_size is not None:
            return  # the engine resizes every frame to its input size
        height, width = rgb.shape[:2]
        if min(height, width) < self.min_side:
            raise BadFrame(f"frame {width}x{height} is too small for the network: it needs at least {self.min_side} "
                           f"px per side at its input (or set input_size, which resizes every frame)")

    def _estimate_pose(self, rgb: np.ndarray, result: SegmentationResult, settings: PoseSettings,
                       objects: Objects | None) -> tuple[PoseResult, np.ndarray | None]:
        """Apply this frame's settings snapshot to the estimator, then estimate; in segmentation mode one crop per
        person object (each person class's regions, or instances), largest first, so the pose persons are the
        person detections in order. Returns the result and each person's object index (None: full frame)."""
        pose = self.pose
        pose.mode = settings.mode
        max_persons = settings.max_persons if self.pose_people_cap is None else min(settings.max_persons,
                                                                                    self.pose_people_cap)
        pose.max_persons = max_persons
        pose.min_person_area = settings.min_person_area
        pose.keypoint_threshold = settings.keypoint_threshold
        if settings.merge_rate >= 0:
            pose.set_merge_rate(settings.merge_rate)
        elif self.engine.family.merge_configs:
            # The encoder stages of the rung or preset this frame ran with (head and input scale are the
            # segmentation's own); the config is read after infer(), so a change in between shows a frame later.
            pose.set_merge_config(self.engine.merge_config, result.merge_rate)
        else:
            # ViT methods have no merge configuration to share: their rate selects the pose ladder's rung.
            pose.set_merge_rate(result.merge_rate if math.isfinite(result.merge_rate) else 0.0)
        person_ids = self.engine.labels.person_ids
        if settings.mode == "segmentation" and not person_ids and not self._warned_no_person_classes:
            self._warned_no_person_classes = True
            self._warn(f"pose.mode segmentation: label set {self.engine.labels.name!r} has no person class, so no "
                       "person is ever found; use pose.mode full_frame or a model with a person class")
        if settings.mode != "segmentation":
            return pose.estimate(rgb), None
        posed = np.flatnonzero(np.isin(objects.class_ids, person_ids)
                               & (objects.areas >= settings.min_person_area))[:max_persons]
        return pose.estimate_boxes(rgb, objects.boxes[posed]), posed


def ids_info_message(key: str, entries: dict, header: Header) -> String:
    """``<ns>/segmentation/{instances,panoptic}/info``: JSON with the frame's header (String has none) and under
    ``key`` the description of each id of the mono16 image (class id, class name, score; panoptic: thing or stuff)."""
    return String(data=json.dumps({
        "header": {"stamp": {"sec": header.stamp.sec, "nanosec": header.stamp.nanosec}, "frame_id": header.frame_id},
        key: entries,
    }))


def budget_step(controller: BudgetController, engine: SegmentationEngine, processing_ms: float,
                rate_used: float, skip_slow_steps: bool = True, hold: bool = False) -> float | None:
    """After a frame: feed its processing time and the rate it ran at to the controller and set the controller's
    choice on the engine for the next frame. Returns that rate (rounded to 4 decimals: parameter events need no float
    noise), or None while budget mode is off. ``hold``: the frame says nothing about the rate (the thread governor
    is probing other thread counts): the controller neither learns from it nor moves, so the governor's probe stays
    on one rung and the controller works on top of its choice."""
    if skip_slow_steps and controller.active and engine.needs_step_times:  # once per frame size: which steps pay
        engine.time_steps()
    # the steps budget mode may choose (backend auto may have replaced the ladder on this frame)
    controller.set_levels(engine.budget_rates() if skip_slow_steps else engine.ladder_rates)
    if not controller.active:
        return None
    if hold:
        return controller.rate if controller.rate is None else round(controller.rate, 4)
    next_rate = controller.update(processing_ms, rate_used if math.isfinite(rate_used) else None)
    if next_rate is None:
        return None
    next_rate = round(next_rate, 4)
    if next_rate != engine.merge_rate:
        engine.set_merge_rate(next_rate)
    return next_rate
