"""The node's parameter rules as pure functions (parameter_policy.py): no node, no spinning."""

from __future__ import annotations

from rclpy.parameter import Parameter

from segmerge_ros.ros.parameter_policy import (complete_parameter_set, detection_class_ids, label_count_refusal,
                                               lifecycle_refusal, refusal_reason, startup_refusal, topics_refusal)
from segmerge_ros.ros.params import DEFAULTS


def reader(**overrides):
    values = dict(DEFAULTS, **overrides)
    return values.__getitem__


def names_values(parameters) -> dict:
    return {p.name: p.value for p in parameters}


def test_integers_become_doubles_for_double_parameters_only():
    done = complete_parameter_set([Parameter("merge_rate", value=0), Parameter("pose.max_persons", value=2)],
                                  reader(), manual=False)
    by_name = {p.name: p for p in done}
    assert by_name["merge_rate"].type_ == Parameter.Type.DOUBLE and by_name["merge_rate"].value == 0.0
    assert by_name["pose.max_persons"].type_ == Parameter.Type.INTEGER


def test_a_hand_set_rate_switches_budget_mode_off_and_the_preset_to_none():
    current = reader(**{"budget.mode": "latency", "preset": "hq"})
    done = names_values(complete_parameter_set([Parameter("merge_rate", value=0.3)], current, manual=True))
    assert done == {"merge_rate": 0.3, "budget.mode": "off", "preset": "none"}
    # The node's own rate choice (budget mode) is not a manual override.
    done = names_values(complete_parameter_set([Parameter("merge_rate", value=0.3)], current, manual=False))
    assert done == {"merge_rate": 0.3, "preset": "none"}
    # A hand-set preset also ends budget mode, and stays as set.
    done = names_values(complete_parameter_set([Parameter("preset", value="fast")], current, manual=True))
    assert done == {"preset": "fast", "budget.mode": "off"}
    # Budget mode on resets a preset; with no preset active nothing is added.
    done = names_values(complete_parameter_set([Parameter("budget.mode", value="fps")], current, manual=True))
    assert done == {"budget.mode": "fps", "preset": "none"}
    assert names_values(complete_parameter_set([Parameter("budget.mode", value="fps")], reader(), manual=True)) == \
        {"budget.mode": "fps"}


def test_refusals_name_the_reason():
    current = reader()
    assert refusal_reason({"merge_rate": 0.5}, current, "segformer-b0") is None
    assert "budget.mode must be one of" in refusal_reason({"budget.mode": "always"}, current, "segformer-b0")
    assert "exceeds" in refusal_reason({"budget.min_merge_rate": 0.95}, current, "segformer-b0")
    assert refusal_reason({"budget.min_merge_rate": 0.5, "budget.max_merge_rate": 0.6}, current, "segformer-b0") \
        is None
    assert "SegFormer" in refusal_reason({"preset": "hq"}, current, "segmenter-vit-t")
    assert refusal_reason({"preset": "hq"}, current, "segformer-b2") is None


def test_startup_values_are_checked_together():
    assert startup_refusal(dict(DEFAULTS)) is None
    assert "model must be" in startup_refusal(dict(DEFAULTS, model="segformer-b9"))
    assert "exceeds" in startup_refusal(dict(DEFAULTS, **{"budget.min_merge_rate": 0.9, "budget.max_merge_rate": 0.5}))
    assert "SegFormer" in startup_refusal(dict(DEFAULTS, model="algm-vit-s-linear", preset="fast"))


def test_camera_topics_need_their_own_namespaces():
    assert topics_refusal([" /a/image ", "", "/b/image/compressed"]) == (["/a/image", "/b/image/compressed"], None)
    assert "empty" in topics_refusal(["  "])[1]
    assert "twice" in topics_refusal(["/a/image", "/a/image"])[1]
    assert "own namespace" in topics_refusal(["/a/image", "/a/other/compressed"])[1]


def test_more_classes_than_a_mono8_mask_holds_are_refused():
    assert label_count_refusal(256) is None and label_count_refusal(19) is None
    assert "257 classes" in label_count_refusal(257)


def test_rebuild_parameters_change_only_while_unconfigured():
    from segmerge_ros.ros.params import REBUILD_PARAMETERS, SPECS

    assert {"model", "weights", "backend", "precision", "input_size", "engine_cache_dir", "pose.model",
            "pose.weights", "device"} <= REBUILD_PARAMETERS
    assert not any(SPECS[name].read_only for name in REBUILD_PARAMETERS)  # rclpy would refuse them in any state
    assert lifecycle_refusal({"weights": "x"}, "unconfigured") is None
    reason = lifecycle_refusal({"weights": "x", "merge_rate": 0.3}, "active")
    assert reason and reason.startswith("weights can change only") and "merge_rate" not in reason
    assert "cleanup" in lifecycle_refusal({"model": "segformer-b1"}, "inactive")
    assert lifecycle_refusal({"merge_rate": 0.3, "pose.enable": True}, "active") is None


def test_detection_classes_name_the_model_classes():
    classes = ["road", "person", "rider", "car"]
    assert detection_class_ids("", classes, (1, 2)) == ([1, 2], None)
    assert detection_class_ids(" car , person", classes, (1, 2)) == ([1, 3], None)
    ids, reason = detection_class_ids("car,truck", classes, (1, 2))
    assert ids == [] and "truck" in reason and "car" not in reason.split(" not in")[0]
