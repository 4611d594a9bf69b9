"""What the node builds from its parameters, as functions of a parameter reader ``param(name) -> value``.

The node passes its own ``self.param``; ``segmerge-bag`` passes the values its options amount to. So both build the
same engine (warmed up), pose estimator, pose settings snapshot, merge setting and labels message, with the same
messages when something cannot be built.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
from std_msgs.msg import String

from segmerge_ros.models.checkpoint_errors import CheckpointError
from segmerge_ros.models.labels import LabelSet
from segmerge_ros.inference.engine import SegmentationEngine, parse_size
from segmerge_ros.inference.ladder import merge_rungs
from segmerge_ros.inference.pose import POSE_INPUT_SIZE, PoseEstimator
from segmerge_ros.ros.frame_pipeline import PoseSettings
from segmerge_ros.ros.parameter_policy import label_count_refusal

Param = Callable[[str], Any]
RANDOM_WEIGHTS = "random"  # the one way to ask for a randomly initialised model (empty weights are refused)
PACKAGE = "segmerge_ros"
# The pose student trained and shipped with the package (weights/README.md): what an empty pose.weights runs.
PACKAGED_POSE_WEIGHTS = "pose_b0_people.safetensors"
PACKAGED_POSE_MODEL = "segformer-b0"
Warn = Callable[[str], None]
BANNER = "!" * 78


class StartupError(RuntimeError):
    """A configuration that cannot run; the message is shown to the user as is (no traceback)."""


def build_engine(param: Param, warn: Warn) -> SegmentationEngine:
    """The segmentation engine of parameters model, weights, device, backend, input_size, precision and
    engine_cache_dir, after one warm-up pass at input_size, or at 240x320 for eager without one (so the first frame
    does not pay torch's one-off start-up costs). A compiled backend without input_size is not warmed: it prepares
    every rung for the first frame's own size, and a dummy size would cost a ladder's compile time and memory."""
    model, weights = param("model"), param("weights")
    if not weights:
        raise StartupError(f"weights is empty: set it to a checkpoint for {model} (a Hugging Face hub folder, a "
                           f".safetensors or an mmseg .pth), or to '{RANDOM_WEIGHTS}' for a randomly initialised "
                           f"model (meaningless masks, for plumbing tests only)")
    try:
        engine = SegmentationEngine(model=model, weights=None if weights == RANDOM_WEIGHTS else weights,
                                    device=param("device"),
                                    backend=param("backend"), input_size=param("input_size") or None,
                                    precision=param("precision"), cache_dir=param("engine_cache_dir") or None,
                                    cache_max_mb=param("engine_cache_max_mb"),
                                    instance_score_threshold=param("instances.score_threshold"),
                                    max_instances=param("instances.max_instances"),
                                    panoptic=param("panoptic.enable"))
        engine.limit_compiled(param("engine_max_compiled_rungs"))  # warmed with the current step last: it stays
    except (CheckpointError, FileNotFoundError) as error:
        raise StartupError(f"cannot load weights {weights!r} for {model}: {error}") from None
    except ValueError as error:
        raise StartupError(f"invalid model settings: {error}") from None
    reason = label_count_refusal(len(engine.labels.classes))
    if reason:
        raise StartupError(reason)
    if engine.randomly_initialised:
        warn(f"\n{BANNER}\n  weights: {RANDOM_WEIGHTS}: {model} IS RANDOMLY INITIALISED. The masks are meaningless.\n"
             f"  Set the 'weights' parameter to a checkpoint (hub folder, .safetensors or .pth).\n{BANNER}")
    if engine.input_size is None and engine.backend != "eager":
        return engine  # compiled backends prepare every rung for the first frame's own size: none for a dummy size
    height, width = engine.input_size or (240, 320)
    # a black frame agrees in any precision: precision auto decides on the first camera frame instead
    engine.infer(np.zeros((height, width, 3), dtype=np.uint8), calibrate=False)
    return engine


def pose_settings(param: Param) -> PoseSettings:
    """The pose.* parameters as one snapshot."""
    return PoseSettings(
        enable=bool(param("pose.enable")), mode=str(param("pose.mode")), max_persons=int(param("pose.max_persons")),
        min_person_area=int(param("pose.min_person_area")),
        keypoint_threshold=float(param("pose.keypoint_threshold")), merge_rate=float(param("pose.merge_rate")))


def packaged_pose_weights() -> Path:
    """The package's pose student: in the installed share folder (colcon, ros2 run), else beside the sources (a
    checkout or an editable install)."""
    candidates = [Path(__file__).resolve().parents[2] / "weights" / PACKAGED_POSE_WEIGHTS]
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
    except ImportError:  # the pip-only ROS has no ament index module
        pass
    else:
        try:
            candidates.insert(0, Path(get_package_share_directory(PACKAGE)) / "weights" / PACKAGED_POSE_WEIGHTS)
        except (PackageNotFoundError, OSError):  # not installed with colcon, or no AMENT_PREFIX_PATH: the sources'
            pass
    found = next((path for path in candidates if path.is_file()), None)
    if found is None:
        raise StartupError(f"the packaged pose student {PACKAGED_POSE_WEIGHTS} is missing (looked in "
                           f"{', '.join(str(c.parent) for c in candidates)}): set pose.weights to a checkpoint, "
                           f"or to '{RANDOM_WEIGHTS}'")
    return found


def pose_weights_path(weights: str, model: str = PACKAGED_POSE_MODEL) -> str | None:
    """What pose.weights names: '' the packaged student, 'random' none (a random model), else the path given."""
    if weights == RANDOM_WEIGHTS:
        return None
    if not weights and model != PACKAGED_POSE_MODEL:
        raise StartupError(f"pose.weights is empty, and the packaged pose student is a {PACKAGED_POSE_MODEL}: set "
                           f"pose.weights to a checkpoint for {model}, or to '{RANDOM_WEIGHTS}'")
    return weights or str(packaged_pose_weights())


def build_pose(param: Param, warn: Warn) -> PoseEstimator:
    """The pose estimator of pose.model and pose.weights (slow: seconds); StartupError says why it cannot be built."""
    model = param("pose.model")
    weights = pose_weights_path(param("pose.weights"), model)
    settings = pose_settings(param)
    try:
        crop = parse_size(param("pose.input_size"))  # HEIGHTxWIDTH; the estimator takes (w, h)
        pose = PoseEstimator(model, weights, device=param("device"),
                             input_size=(crop[1], crop[0]) if crop else POSE_INPUT_SIZE,
                             max_persons=settings.max_persons,
                             min_person_area=settings.min_person_area,
                             keypoint_threshold=settings.keypoint_threshold, mode=settings.mode,
                             backend=param("backend"), precision=param("precision"),
                             cache_dir=param("engine_cache_dir") or None,
                             cache_max_mb=param("engine_cache_max_mb"))
    except (CheckpointError, OSError, ValueError, RuntimeError) as error:
        raise StartupError(f"cannot load pose.weights {weights!r} for {model}: {error}" if weights
                           else f"cannot build the {model} pose model: {error}") from None
    pose.limit_compiled(param("engine_max_compiled_rungs"))
    # Compiled backends: the encoder settings of the segmentation's ladder (what pose follows) prepared now.
    pose.warm([rung.config for rung in merge_rungs(param("backend"))])
    if pose.randomly_initialised:
        warn(f"\n{BANNER}\n  pose.weights: {RANDOM_WEIGHTS}: THE {model} POSE MODEL IS RANDOMLY INITIALISED. The "
             f"keypoints are meaningless.\n  Leave 'pose.weights' empty for the packaged student, or set a "
             f"Segformer++ pose checkpoint (.pth or .safetensors).\n{BANNER}")
    return pose


def apply_merge_settings(engine: SegmentationEngine, param: Param) -> None:
    """The preset parameter when set, else merge_rate."""
    preset = param("preset")
    if preset != "none":
        engine.set_preset(preset)
    else:
        engine.set_merge_rate(param("merge_rate"))


def model_info(param: Param, engine: SegmentationEngine) -> dict:
    """What the labels message says about the model that made the masks."""
    info = {key: param(key) for key in ("model", "weights", "device", "backend", "input_size", "precision")}
    info["backend_in_use"] = engine.backend
    info["randomly_initialised"] = engine.randomly_initialised
    return info


def labels_message(labels: LabelSet, info: dict, mask_topic: str) -> String:
    """``<ns>/segmentation/labels``: JSON with the label set, class names, palette, person classes and the model."""
    table = {
        "label_set": labels.name,
        "classes": list(labels.classes),
        "palette": labels.palette.tolist(),
        "person_ids": list(labels.person_ids),
        "mask_topic": mask_topic,
        **info,
    }
    return String(data=json.dumps(table))
