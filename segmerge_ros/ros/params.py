"""The node's parameters in one table: names, defaults, types, ranges, choices and documentation.

The node declares exactly these (plus rclpy's own ``use_sim_time`` and ``qos_overrides.*``); config/segmerge.yaml and
the tests are checked against this table, so a parameter is added or renamed here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..merging.segformerpp import MAX_MERGE_RATE, PRESETS

MODELS = tuple(f"segformer-b{i}" for i in range(6))
BUDGET_MODES = ("off", "latency", "fps")


@dataclass(frozen=True)
class ParamSpec:
    name: str
    default: Any
    description: str
    read_only: bool = False
    float_range: tuple[float, float] | None = None
    choices: tuple[str, ...] | None = None

    def descriptor(self):
        """The rcl_interfaces ParameterDescriptor: ranges are enforced by rclpy itself, choices by the node."""
        from rcl_interfaces.msg import FloatingPointRange, ParameterDescriptor

        descriptor = ParameterDescriptor(description=self.description, read_only=self.read_only)
        if self.float_range is not None:
            descriptor.floating_point_range = [
                FloatingPointRange(from_value=float(self.float_range[0]), to_value=float(self.float_range[1]), step=0.0)
            ]
        if self.choices is not None:
            descriptor.additional_constraints = "one of: " + ", ".join(self.choices)
        return descriptor


PARAMETERS: tuple[ParamSpec, ...] = (
    ParamSpec("image_topics", ["image"],
              "Camera topics. Each takes sensor_msgs/Image, or sensor_msgs/CompressedImage (JPEG/PNG) when the name "
              "ends in /compressed. Outputs go to <ns>/segmentation/* beside each (<ns> = the topic's namespace).",
              read_only=True),
    ParamSpec("model", "segformer-b0", "SegFormer size.", read_only=True, choices=MODELS),
    ParamSpec("weights", "",
              "Checkpoint: a Hugging Face hub folder (config.json + model.safetensors), a .safetensors or an mmseg "
              ".pth. Empty: a randomly initialised model (outputs are meaningless; for plumbing tests only).",
              read_only=True),
    ParamSpec("device", "cpu", "Torch device: cpu, cuda or cuda:N (falls back to cpu without CUDA).", read_only=True),
    ParamSpec("backend", "eager", "Inference backend; unknown ones fall back to eager with a warning.",
              read_only=True),
    ParamSpec("input_size", "",
              "Network input size HEIGHTxWIDTH (e.g. 288x384); empty = the camera's resolution. Outputs are always "
              "at the camera's resolution.", read_only=True),
    ParamSpec("merge_rate", 0.0,
              "Token-merge rate in [0, 0.95]: 0 = unmerged (best quality), higher = faster. Applied from the next "
              "frame. Setting it by hand switches budget mode off; in budget mode the node sets it itself.",
              float_range=(0.0, MAX_MERGE_RATE)),
    ParamSpec("preset", "none",
              "Named Segformer++ merge preset used instead of merge_rate (hq ~ merge_rate 0.6, fast ~ 0.9); "
              "none = use merge_rate. Setting merge_rate or enabling budget mode resets it to none.",
              choices=tuple(PRESETS)),
    ParamSpec("budget.mode", "off",
              "off: merge_rate is fixed. latency: the node picks merge_rate so that per-frame processing time "
              "(decode + inference + publishing) meets budget.target_latency_ms. fps: the same with a target of "
              "1000 / (budget.target_fps * active cameras) ms.", choices=BUDGET_MODES),
    ParamSpec("budget.target_latency_ms", 100.0, "Per-frame processing-time target in latency mode (ms).",
              float_range=(1.0, 60000.0)),
    ParamSpec("budget.target_fps", 10.0, "Output frame-rate target per camera in fps mode.",
              float_range=(0.01, 1000.0)),
    ParamSpec("budget.min_merge_rate", 0.0, "Lowest merge rate budget mode may choose.",
              float_range=(0.0, MAX_MERGE_RATE)),
    ParamSpec("budget.max_merge_rate", 0.9, "Highest merge rate budget mode may choose (quality floor).",
              float_range=(0.0, MAX_MERGE_RATE)),
    ParamSpec("budget.topic", "",
              "std_msgs/Float32 topic carrying a compute budget in ms (e.g. from an onboard compute manager); each "
              "message sets budget.target_latency_ms and switches budget mode to latency. Empty = not subscribed.",
              read_only=True),
    ParamSpec("publish_overlay", True,
              "Publish <ns>/segmentation/overlay (class colours blended over the camera image); it is computed only "
              "while someone subscribes."),
    ParamSpec("overlay_alpha", 0.5, "Weight of the class colours in the overlay.", float_range=(0.0, 1.0)),
)

SPECS: dict[str, ParamSpec] = {spec.name: spec for spec in PARAMETERS}
DEFAULTS: dict[str, Any] = {spec.name: spec.default for spec in PARAMETERS}


def check_choice(name: str, value: Any) -> str | None:
    """Why ``value`` is not allowed for ``name`` (choices and cross-parameter limits aside), or None when fine."""
    spec = SPECS.get(name)
    if spec is None or spec.choices is None:
        return None
    if str(value) not in spec.choices:
        return f"{name} must be one of {', '.join(spec.choices)}; got {value!r}"
    return None
