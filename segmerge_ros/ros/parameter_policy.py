"""What the node accepts as parameters, as pure functions of the values (no node, no spinning: unit-tested directly).

rclpy checks types, ranges and read-only flags against the descriptors of ``params.py``; this adds what a
descriptor cannot say: choices and model names, cross-parameter limits, the camera topic list, and how merge_rate,
preset and budget.mode stay consistent within one atomic set.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

from rclpy.parameter import Parameter

from segmerge_ros.inference.budget import BudgetMode
from segmerge_ros.ros.topics import output_topic
from segmerge_ros.ros.params import PARAMETERS, REBUILD_PARAMETERS, SPECS, check_choice, check_preset

MAX_MASK_CLASSES = 256  # the mask is mono8: class ids 0..255


def as_declared_type(parameter: Parameter) -> Parameter:
    """An integer for a double parameter becomes a double (``ros2 param set /segmerge merge_rate 0`` sends one)."""
    spec = SPECS.get(parameter.name)
    if spec is not None and isinstance(spec.default, float) and parameter.type_ == Parameter.Type.INTEGER:
        return Parameter(parameter.name, Parameter.Type.DOUBLE, float(parameter.value))
    return parameter


def complete_parameter_set(parameters: Iterable[Parameter], current: Callable[[str], Any],
                           manual: bool) -> list[Parameter]:
    """The parameters one set really changes: integers for doubles converted; a hand-set merge_rate or preset
    (``manual``) switches budget mode off in the same atomic set; a rate taking over (merge_rate, or budget mode on)
    resets the preset to none. ``current(name)`` reads a parameter's present value."""
    result = [as_declared_type(p) for p in parameters]
    names = {p.name: p.value for p in result}
    if manual and ("merge_rate" in names or "preset" in names):
        if "budget.mode" not in names and current("budget.mode") != BudgetMode.OFF.value:
            result.append(Parameter("budget.mode", value=BudgetMode.OFF.value))
            names["budget.mode"] = BudgetMode.OFF.value
    rate_takes_over = "merge_rate" in names or names.get("budget.mode", "off") != BudgetMode.OFF.value
    if rate_takes_over and "preset" not in names and current("preset") != "none":
        result.append(Parameter("preset", value="none"))
    return result


def refusal_reason(values: Mapping[str, Any], current: Callable[[str], Any], model: str) -> str | None:
    """Why a set of new values is refused (choices, limits, presets for the model), or None to accept it."""
    for name, value in values.items():
        reason = check_choice(name, value)
        if reason:
            return reason
    low = values.get("budget.min_merge_rate", current("budget.min_merge_rate"))
    high = values.get("budget.max_merge_rate", current("budget.max_merge_rate"))
    if low > high:
        return f"budget.min_merge_rate {low} exceeds budget.max_merge_rate {high}"
    if "preset" in values:
        return check_preset(model, values["preset"])
    return None


def lifecycle_refusal(names: Iterable[str], state: str) -> str | None:
    """Why parameters that configure builds from cannot change in lifecycle ``state`` (only while unconfigured:
    the models, cameras and publishers are built from them), or None."""
    locked = sorted(set(names) & REBUILD_PARAMETERS)
    if not locked or state == "unconfigured":
        return None
    return (f"{', '.join(locked)} can change only while the node is unconfigured (it is {state}): "
            "`ros2 lifecycle set /segmerge deactivate` (when active), then `cleanup`, set it, then `configure` and "
            "`activate`")


def detection_class_ids(spec: str, classes: list[str], person_ids: Iterable[int]) -> tuple[list[int], str | None]:
    """The class ids a ``detections.classes`` value names (comma-separated names; empty: the person classes), and
    why it is refused (an unknown name), or None."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        return sorted(person_ids), None
    unknown = [name for name in names if name not in classes]
    if unknown:
        return [], f"detections.classes: {', '.join(unknown)} not in the model's classes ({', '.join(classes)})"
    return sorted({classes.index(name) for name in names}), None


def startup_refusal(values: Mapping[str, Any]) -> str | None:
    """Why the values given at start-up cannot run (rclpy checked types and ranges while declaring), or None."""
    for spec in PARAMETERS:
        reason = check_choice(spec.name, values[spec.name])
        if reason:
            return reason
    reason = check_preset(values["model"], values["preset"])
    if reason:
        return reason
    if values["budget.min_merge_rate"] > values["budget.max_merge_rate"]:
        return (f"budget.min_merge_rate {values['budget.min_merge_rate']} exceeds budget.max_merge_rate "
                f"{values['budget.max_merge_rate']}")
    device, backend = str(values["device"]), str(values["backend"])
    if backend != "openvino" and device != "cpu" and not device.startswith("cuda"):
        return (f"device {device!r} is an OpenVINO device name: it needs backend openvino (backend {backend} runs "
                "on cpu, cuda or cuda:N)")
    return None


def topics_refusal(topics: list[str]) -> tuple[list[str], str | None]:
    """The camera topics without blanks, and why they cannot run (empty, a duplicate, two cameras that would share
    their outputs), or None."""
    topics = [t.strip() for t in topics if t.strip()]
    if not topics:
        return topics, "image_topics is empty: give at least one camera topic"
    if len(set(topics)) != len(topics):
        return topics, f"image_topics lists a topic twice: {topics}"
    outputs: dict[str, str] = {}
    for topic in topics:
        mask = output_topic(topic, "segmentation/mask")
        if mask in outputs:
            return topics, (f"cameras {outputs[mask]!r} and {topic!r} would both publish {mask!r}: put each camera in "
                            "its own namespace (e.g. /left/image, /right/image)")
        outputs[mask] = topic
    return topics, None


def label_count_refusal(num_classes: int) -> str | None:
    """The mask is mono8: a model with more than 256 classes would wrap class ids silently, so it is refused."""
    if num_classes > MAX_MASK_CLASSES:
        return (f"the model has {num_classes} classes, but the mask is mono8 (class ids 0..{MAX_MASK_CLASSES - 1}): "
                f"use a model with at most {MAX_MASK_CLASSES} classes")
    return None
