"""The node's parameters in one table: names, defaults, types, ranges, choices and documentation.

The node declares exactly these (plus rclpy's own ``use_sim_time`` and ``qos_overrides.*``); config/segmerge.yaml and
the tests are checked against this table, so a parameter is added or renamed here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from segmerge_ros.merging.segformerpp import MAX_MERGE_RATE, PRESETS
from segmerge_ros.models.vit.methods import is_vit_model_name
from segmerge_ros.models.mask2former.checkpoints import is_mask2former_name
from segmerge_ros.inference.backends.base import PRECISION_CHOICES
from segmerge_ros.inference.backends.registry import BACKEND_CHOICES
from segmerge_ros.inference.pose import POSE_MODES

MODELS = tuple(f"segformer-b{i}" for i in range(6))  # SegFormer sizes (also the pose model's choices)
VIT_MODEL_PATTERN = "<segmenter|algm|clustvit|dovit>-vit-<t|s|b|l>[-linear|-mask]"
MASK2FORMER_MODEL_PATTERN = "mask2former-<swin-t|swin-s|swin-b|swin-l|r50|r101|mit-b0..mit-b5>[-proscale]"
BUDGET_MODES = ("off", "latency", "fps")
PRECISION_NAMES = PRECISION_CHOICES
POSE_FOLLOW_SEGMENTATION = -1.0  # pose.merge_rate value: use the segmentation's merge configuration


REBUILD_NOTE = ("Set while the node is unconfigured (ros2 lifecycle set /segmerge deactivate, cleanup; then configure, "
                "activate); refused otherwise.")


@dataclass(frozen=True)
class ParamSpec:
    name: str
    default: Any
    description: str
    read_only: bool = False
    rebuild: bool = False  # what configure builds from: writable only while the node is unconfigured (lifecycle)
    float_range: tuple[float, float] | None = None
    int_range: tuple[int, int] | None = None
    choices: tuple[str, ...] | None = None
    strict_choices: bool = True  # False: other values are accepted too (the node falls back, with a warning)
    constraints: str | None = None  # shown as additional_constraints when there are no choices

    def descriptor(self):
        """The rcl_interfaces ParameterDescriptor: ranges are enforced by rclpy itself, choices by the node."""
        from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor

        description = self.description + (f" {REBUILD_NOTE}" if self.rebuild else "")
        descriptor = ParameterDescriptor(description=description, read_only=self.read_only)
        if self.float_range is not None:
            descriptor.floating_point_range = [
                FloatingPointRange(from_value=float(self.float_range[0]), to_value=float(self.float_range[1]), step=0.0)
            ]
        if self.int_range is not None:
            descriptor.integer_range = [
                IntegerRange(from_value=int(self.int_range[0]), to_value=int(self.int_range[1]), step=1)
            ]
        if self.choices is not None:
            descriptor.additional_constraints = "one of: " + ", ".join(self.choices)
            if not self.strict_choices:
                descriptor.additional_constraints += " (others fall back, with a warning)"
        elif self.constraints is not None:
            descriptor.additional_constraints = self.constraints
        return descriptor


PARAMETERS: tuple[ParamSpec, ...] = (
    ParamSpec("autostart", True,
              "Configure and activate at start (ros2 run, ros2 launch); a configure failure then exits with status 1. "
              "False: the node waits unconfigured for a lifecycle manager or `ros2 lifecycle set /segmerge "
              "configure`, then `activate`.", read_only=True),
    ParamSpec("image_topics", ["image"],
              "Camera topics. Each takes sensor_msgs/Image, or sensor_msgs/CompressedImage (JPEG/PNG) when the name "
              "ends in /compressed. Outputs go to <ns>/segmentation/* beside each (<ns> = the topic's namespace).",
              rebuild=True),
    ParamSpec("model", "segformer-b0",
              "Model family and size: segformer-b0 .. segformer-b5 (Segformer++ token merging: the merge_rate "
              f"ladder and the presets), a plain ViT {VIT_MODEL_PATTERN} (e.g. algm-vit-s-linear; merge_rate "
              f"drives the method's own control, no presets), or a Mask2Former {MASK2FORMER_MODEL_PATTERN} (e.g. "
              "mask2former-swin-t, mask2former-mit-b0-proscale; merge_rate runs the first encoder layers on the "
              "coarse scales, no presets; also publishes instances). An unknown name fails configure.",
              rebuild=True,
              constraints=f"segformer-b0 .. segformer-b5, {VIT_MODEL_PATTERN}, or {MASK2FORMER_MODEL_PATTERN}"),
    ParamSpec("weights", "",
              "Checkpoint: a Hugging Face hub folder (config.json + model.safetensors), a .safetensors or an mmseg "
              ".pth; Mask2Former: a hub folder or a detectron2 .pth/.pkl (Mask2Former or PRO-SCALE). Required: "
              "empty fails configure; 'random' runs a randomly initialised model (meaningless outputs, for "
              "plumbing tests only; said in the log and diagnostics).",
              rebuild=True),
    ParamSpec("device", "cpu",
              "Torch device: cpu, cuda or cuda:N (falls back to cpu without CUDA). With backend openvino: an OpenVINO "
              "device (CPU, GPU = Intel graphics, NPU, AUTO).", rebuild=True),
    ParamSpec("backend", "auto",
              "Inference backend: auto, eager, compile (torch.compile per ladder rung), openvino (one compiled "
              "OpenVINO model per rung) or tensorrt (NVIDIA GPUs). auto: on a CPU, OpenVINO where it is installed "
              "and measured faster than eager on this CPU at the input size (timed on the first frame, or at start "
              "with input_size; remembered in engine_cache_dir), else eager; on CUDA TensorRT, else compile, else "
              "eager. Compiled models are cached in engine_cache_dir. An unknown name fails configure; one that "
              "cannot run here falls back to eager with a warning; plain-ViT models run eagerly, Mask2Former on eager or "
              "OpenVINO (one compiled model per knob setting).",
              rebuild=True, choices=BACKEND_CHOICES),
    ParamSpec("precision", "auto",
              "Compute precision: fp32, bf16, fp16 or auto. bf16 runs on CUDA GPUs that support it and on CPUs with "
              "native bf16 (AVX512-BF16/AMX; eager and openvino); fp16 needs CUDA. auto: merge_rate 0 in fp32 "
              "(exact), every faster rung in bf16 (CPU) or fp16 (CUDA), kept only if it agrees with fp32 on at "
              "least 99.5 % of the first frame's pixels. Elsewhere the node runs fp32 with a warning.",
              rebuild=True, choices=PRECISION_NAMES),
    ParamSpec("engine_cache_dir", "",
              "Folder for compiled models: TensorRT engines, OpenVINO models and torch.compile's cache (segmerge-"
              "build-engines fills it ahead of time). Empty = ~/.cache/segmerge_ros/engines.", rebuild=True),
    ParamSpec("engine_cache_max_mb", 4096.0,
              "Size bound of engine_cache_dir's OpenVINO models and TensorRT engines (MB): after each build the least "
              "recently used entries are deleted until the cache fits.", rebuild=True,
              float_range=(10.0, 1.0e7)),
    ParamSpec("engine_max_compiled_rungs", 3,
              "OpenVINO models kept compiled in memory per precision, segmentation and pose each, over all frame "
              "sizes: the most recently used stay, and one no frame ran for a minute goes; another rung is compiled "
              "again from engine_cache_dir when the merge rate needs it (about 0.3-0.5 s for B0 at 576x768 on a CPU: "
              "that frame stalls; /diagnostics counts rung_recompiles, shows compiled_rungs). Each OpenVINO rung of "
              "B0 at 576x768 holds 75-100 MB. In budget mode only the minute rule applies (the controller moves "
              "between rungs). 0 = keep every rung compiled (no stalls, most memory). Applied at once.",
              int_range=(0, 64)),
    ParamSpec("input_size", "",
              "Network input size HEIGHTxWIDTH (e.g. 288x384); empty = the camera's resolution. Outputs are always "
              "at the camera's resolution.", rebuild=True),
    ParamSpec("merge_rate", 0.0,
              "Token-merge rate in [0, 0.95]: 0 = unmerged (best quality), higher = faster. Applied from the next "
              "frame. Setting it by hand switches budget mode off; in budget mode the node sets it itself.",
              float_range=(0.0, MAX_MERGE_RATE)),
    ParamSpec("preset", "none",
              "Named Segformer++ merge preset used instead of merge_rate (SegFormer models only): hq (stages 1-2 "
              "merge 60 % of keys/values on 2x2 cells, stages 3-4 80 % of queries on 4x4), fast (90 % and 90 % on "
              "4x4), 2x2 (queries average-pooled 2x2); none = use merge_rate. The merge_rate ladder "
              "(merging/segformerpp.py LADDER) builds on them: rate 0.15 = head2, 0.3 = head2+hq, "
              "0.45 = head2+fast, 0.6-0.9 hq with the input scaled to 0.875-0.625 as well (backend openvino: "
              "OPENVINO_LADDER, 0.3 = head2+2x2, 0.6-0.9 = the same on the scaled input). Setting merge_rate or "
              "enabling budget mode resets it to none.", choices=tuple(PRESETS)),
    ParamSpec("budget.mode", "off",
              "off: merge_rate is fixed. latency: the node picks merge_rate so that per-frame processing time "
              "(decode + inference + publishing) meets budget.target_latency_ms. fps: the same with a target of "
              "1000 / D ms, D = the sum over cameras of min(budget.target_fps, the camera's frame rate over the last "
              "10 s). Switching it on re-calibrates; while the target is missed the node re-probes faster rates and "
              "diagnostics warn.", choices=BUDGET_MODES),
    ParamSpec("budget.target_latency_ms", 100.0, "Per-frame processing-time target in latency mode (ms).",
              float_range=(1.0, 60000.0)),
    ParamSpec("budget.target_fps", 10.0,
              "Output frame-rate target per camera in fps mode (a camera that sends fewer frames needs only its "
              "own rate).",
              float_range=(0.01, 1000.0)),
    ParamSpec("budget.min_merge_rate", 0.0, "Lowest merge rate budget mode may choose.",
              float_range=(0.0, MAX_MERGE_RATE)),
    ParamSpec("budget.max_merge_rate", 0.9, "Highest merge rate budget mode may choose (quality floor).",
              float_range=(0.0, MAX_MERGE_RATE)),
    ParamSpec("budget.skip_slow_steps", True,
              "Budget mode times the ladder's steps once per frame size and never chooses one that is no faster than "
              "a step with less merging (it would cost accuracy for nothing); false: every step is a candidate. A "
              "manual merge_rate runs every step either way.", rebuild=True),
    ParamSpec("budget.topic", "",
              "std_msgs/Float32 topic carrying a compute budget in ms (e.g. from an onboard compute manager); each "
              "message sets budget.target_latency_ms and switches budget mode to latency. Empty = not subscribed.",
              rebuild=True),
    ParamSpec("threads.adapt", True,
              "Re-choose the thread count (torch's, and OpenVINO's on the CPU) when other processes load the CPU (and "
              "again when it calms): a few frames at each count, the fastest kept; shown in /diagnostics as threads "
              "and cpu_others_cores. False = the thread count torch started with. No effect for a network on a GPU."),
    ParamSpec("instances.score_threshold", 0.5,
              "Mask2Former: instances scoring below this (class probability x mean mask probability) are not "
              "published on <ns>/segmentation/instances (mono16 ids) and <ns>/segmentation/instances/info (JSON); from "
              "the next frame. Instances (and panoptic segments) are computed only while their topics have "
              "subscribers, or pose, detections or REP-155 bodies need the people (diagnostics key "
              "instances_frames).",
              float_range=(0.0, 1.0)),
    ParamSpec("instances.max_instances", 100,
              "Mask2Former: the best (query, class) pairs considered per frame (detectron2's detections per image).",
              rebuild=True, int_range=(1, 1000)),
    ParamSpec("panoptic.enable", False,
              "Mask2Former (panoptic checkpoints): also publish detectron2's panoptic segmentation on "
              "<ns>/segmentation/panoptic (mono16 segment ids, 0 = none) and <ns>/segmentation/panoptic/info (JSON: "
              "class, thing or stuff, score); stuff merges into one segment per class (Cityscapes and COCO panoptic "
              "label sets; every class is a thing otherwise).", rebuild=True),
    ParamSpec("detections.classes", "",
              "Classes published as vision_msgs/Detection2DArray on <ns>/segmentation/detections (one box per "
              "connected region of the class, or per instance with Mask2Former; computed only while subscribed or "
              "with hri.enable): comma-separated class names of the model's label set; empty = its person classes.",
              rebuild=True),
    ParamSpec("detections.min_area", 400, "Smallest region in pixels (camera resolution) published as a detection.",
              int_range=(1, 100_000_000)),
    ParamSpec("tracking.max_age", 10,
              "Frames a tracked object may go unseen before its id is dropped (ids are unique per node, across "
              "cameras).", rebuild=True, int_range=(0, 10_000)),
    ParamSpec("tracking.min_iou", 0.3, "Box overlap (IoU) a detection needs to keep a track's id.", rebuild=True,
              float_range=(0.01, 1.0)),
    ParamSpec("hri.enable", False,
              "REP-155 (ROS4HRI) bodies: /humans/bodies/tracked (hri_msgs/IdsList) and per tracked person "
              "/humans/bodies/<id>/roi and, with pose.enable, /humans/bodies/<id>/skeleton2d. Needs hri_msgs.",
              rebuild=True),
    ParamSpec("diagnostics.expected_fps", 0.0,
              "Frame rate each camera is expected to send: /diagnostics grades the received rate as "
              "diagnostic_updater's frequency status does (10 % tolerance: WARN outside, ERROR for none); 0 = not "
              "checked.", float_range=(0.0, 1000.0)),
    ParamSpec("publish_overlay", True,
              "Publish <ns>/segmentation/overlay (class colours blended over the camera image); it is computed only "
              "while someone subscribes."),
    ParamSpec("overlay_alpha", 0.5, "Weight of the class colours in the overlay.", float_range=(0.0, 1.0)),
    ParamSpec("pose.enable", False,
              "Human pose (COCO-17 keypoints) on the people found: publishes <ns>/pose/keypoints (PointCloud2) and, "
              "while subscribed and with a known camera_info, <ns>/pose/markers, and draws skeletons on the "
              "overlay. The pose model is built in the background on first enable (frames run without pose until "
              "the diagnostics key pose_model says ready); its time counts toward the budget."),
    ParamSpec("pose.model", "segformer-b0", "Pose model (Segformer++ top-down pose, MiT size).", rebuild=True,
              choices=MODELS),
    ParamSpec("pose.weights", "",
              "Segformer++ pose checkpoint (.pth in the mmpose layout, or .safetensors). Empty: the pose student "
              "shipped with the package (weights/pose_b0_people.safetensors, a segformer-b0; its data and scores: "
              "weights/README.md); 'random': a randomly initialised pose model (meaningless keypoints, for plumbing "
              "tests; the node warns loudly). A missing file refuses pose.enable; one that fails to load switches it "
              "back off, with the reason logged and in the diagnostics key pose_model (at configure both fail "
              "configure).",
              rebuild=True),
    ParamSpec("pose.input_size", "384x288",
              "Pose crop size HEIGHTxWIDTH, multiples of 32. 384x288 is the Segformer++ setting the checkpoints are "
              "trained at; smaller crops (e.g. 256x192) run faster on a CPU robot: the shared vtest student keeps "
              "its vtest accuracy there but loses some on other scenes (docs/pose.md).", rebuild=True),
    ParamSpec("pose.mode", "segmentation",
              "segmentation: one crop per connected region of the label set's person classes (largest first; with a "
              "Mask2Former one per person instance, so people who touch get a crop each); full_frame: the whole "
              "frame is one person (single-person cameras).", choices=POSE_MODES),
    ParamSpec("pose.max_persons", 4, "Most people per frame (largest regions first).", int_range=(1, 32)),
    ParamSpec("pose.min_person_area", 400, "Smallest person region in pixels (camera resolution) to estimate.",
              int_range=(0, 100_000_000)),
    ParamSpec("pose.keypoint_threshold", 0.3,
              "Keypoints scoring below this are not drawn (markers, overlay); the keypoint cloud keeps them all with "
              "their scores.", float_range=(0.0, 1.0)),
    ParamSpec("pose.merge_rate", POSE_FOLLOW_SEGMENTATION,
              "Token-merge rate of the pose model: -1 = follow the segmentation's merge configuration (the same "
              "ladder rung or preset; budget mode then steers both), or its own rate in [0, 0.95] on the ladder's "
              "encoder settings.", float_range=(POSE_FOLLOW_SEGMENTATION, MAX_MERGE_RATE),
              constraints=f"-1, or 0 .. {MAX_MERGE_RATE}"),
)

SPECS: dict[str, ParamSpec] = {spec.name: spec for spec in PARAMETERS}
REBUILD_PARAMETERS = frozenset(spec.name for spec in PARAMETERS if spec.rebuild)
DEFAULTS: dict[str, Any] = {spec.name: spec.default for spec in PARAMETERS}


def is_model_name(name: str) -> bool:
    return name in MODELS or is_vit_model_name(name) or is_mask2former_name(name)


def is_segformer_name(name: str) -> bool:
    return name in MODELS


def check_choice(name: str, value: Any) -> str | None:
    """Why ``value`` is not allowed for ``name`` on its own (choices, model names, values a range cannot express;
    cross-parameter limits aside), or None when fine. Types and ranges are rclpy's to check."""
    spec = SPECS.get(name)
    if spec is None:
        return None
    if name == "model":
        if not is_model_name(str(value)):
            return (f"model must be segformer-b0 .. segformer-b5 or a plain ViT {VIT_MODEL_PATTERN}, or a "
                    f"Mask2Former {MASK2FORMER_MODEL_PATTERN}; got {value!r}")
        return None
    if name == "pose.merge_rate":
        if value != POSE_FOLLOW_SEGMENTATION and not 0.0 <= value <= MAX_MERGE_RATE:
            return f"pose.merge_rate must be -1 (follow the segmentation) or in [0, {MAX_MERGE_RATE}]; got {value!r}"
        return None
    if spec.choices is not None and spec.strict_choices and str(value) not in spec.choices:
        return f"{name} must be one of {', '.join(spec.choices)}; got {value!r}"
    return None


def check_preset(model: str, preset: str) -> str | None:
    """Why ``preset`` cannot run with ``model`` (presets are SegFormer's), or None."""
    if preset != "none" and not is_segformer_name(model):
        return (f"preset {preset!r} is a Segformer++ merge preset for SegFormer models; {model} takes merge_rate "
                "(preset must stay none)")
    return None
