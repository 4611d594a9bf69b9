"""The node's diagnostics as a pure function (snapshot -> DiagnosticStatus) and the throttled failure log."""

from __future__ import annotations

import math

from diagnostic_msgs.msg import DiagnosticStatus

from segmerge_ros.ros.diagnostics import BudgetSnapshot, CameraSnapshot, FailureLog, FrameTiming, camera_status
from segmerge_ros.inference.budget import BudgetMode

OFF = BudgetSnapshot(BudgetMode.OFF, None, 0.9)


def snapshot(processing_ms=(50.0, 52.0), rate=0.3, **counters) -> CameraSnapshot:
    timings = [FrameTiming(latency_ms=80.0, inference_ms=p - 5, processing_ms=p, merge_rate=rate)
               for p in processing_ms]
    values = dict(topic="/cam/image", timings=timings, window_s=1.0, received=10, dropped=1, published=len(timings),
                  bad=0, failed=0)
    values.update(counters)
    return CameraSnapshot(**values)


def status(camera: CameraSnapshot, budget: BudgetSnapshot = OFF, pose: bool = False) -> DiagnosticStatus:
    return camera_status("segmerge", camera, budget, current_rate=0.45, current_merge_name="head2+fast",
                         pose_enabled=pose)


def values(s: DiagnosticStatus) -> dict[str, str]:
    return {kv.key: kv.value for kv in s.values}


def test_a_healthy_window_is_ok_with_the_means_and_counters():
    s = status(snapshot(merge_name="head2+hq"))
    v = values(s)
    assert s.level == DiagnosticStatus.OK and s.name == "segmerge: /cam/image" and s.hardware_id == "/cam/image"
    assert v["processing_ms"] == "51.00" and v["inference_ms"] == "46.00" and v["fps"] == "2.00"
    assert (v["merge_rate"], v["merge_config"]) == ("0.3000", "head2+hq")
    assert (v["frames_in"], v["frames_out"], v["dropped_frames"], v["bad_frames"], v["failed_frames"]) == \
        ("10", "2", "1", "0", "0")
    assert v["budget_mode"] == "off" and v["budget_target_ms"] == "nan"
    assert "persons" not in v


def test_an_empty_window_warns_and_shows_the_engines_setting():
    s = status(snapshot(processing_ms=()))
    v = values(s)
    assert s.level == DiagnosticStatus.WARN and "no frames" in s.message
    assert (v["merge_rate"], v["merge_config"], v["fps"]) == ("0.4500", "head2+fast", "0.00")


def test_failed_frames_are_an_error_while_they_rise_and_bad_frames_a_warning():
    failing = status(snapshot(failed=3, new_failed=2, last_failure="RuntimeError: boom", bad=1, new_bad=1))
    assert failing.level == DiagnosticStatus.ERROR
    assert "2 frame(s) failed" in failing.message and "boom" in failing.message
    assert values(failing)["failed_frames"] == "3" and values(failing)["last_failure"] == "RuntimeError: boom"
    # The count stays visible, but a window without new failures is no longer an error.
    assert status(snapshot(failed=3, new_failed=0)).level == DiagnosticStatus.OK
    bad = status(snapshot(bad=4, new_bad=2, last_bad_reason="truncated JPEG"))
    assert bad.level == DiagnosticStatus.WARN and "truncated JPEG" in bad.message


def test_a_missed_budget_warns_at_any_chosen_rate_but_not_while_calibrating():
    latency = BudgetSnapshot(BudgetMode.LATENCY, 40.0, 0.9)
    missed = status(snapshot(rate=0.0), latency)
    assert missed.level == DiagnosticStatus.WARN and "missed at merge rate 0.00" in missed.message
    at_max = status(snapshot(rate=0.9), latency)
    assert at_max.level == DiagnosticStatus.WARN and "not met even at max_merge_rate" in at_max.message
    assert values(at_max)["budget_target_ms"] == "40.00"
    met = status(snapshot(processing_ms=(44.0, 45.0)), latency)  # within the 15 % margin
    assert met.level == DiagnosticStatus.OK
    calibrating = BudgetSnapshot(BudgetMode.LATENCY, 40.0, 0.9, calibrating=True)
    assert status(snapshot(rate=0.0), calibrating).level == DiagnosticStatus.OK


def test_pose_keys_while_pose_runs():
    camera = snapshot()
    camera.timings[-1].persons, camera.timings[-1].pose_ms = 2, 12.0
    v = values(status(camera, pose=True))
    assert (v["persons"], v["pose_ms"]) == ("2", "12.00")
    v = values(status(snapshot(), pose=True))  # enabled, but no frame of the window ran pose
    assert v["persons"] == "0" and math.isnan(float(v["pose_ms"]))
    assert "pose_model" not in v
    building = camera_status("segmerge", snapshot(), OFF, 0.0, "none", pose_enabled=True, pose_model="building")
    assert values(building)["pose_model"] == "building"
    failed = camera_status("segmerge", snapshot(), OFF, 0.0, "none", pose_enabled=False,
                           pose_model="failed: cannot load pose.weights 'x.pth'")
    assert values(failed)["pose_model"].startswith("failed: ") and "persons" not in values(failed)


def raise_here(error: Exception):
    raise error


def caught(error: Exception) -> Exception:
    try:
        raise_here(error)
    except Exception as raised:  # noqa: BLE001 - the test needs the traceback
        return raised


def test_failure_log_gives_a_traceback_once_per_cause_then_throttled_counts():
    now = [100.0]
    log = FailureLog(repeat_period_s=5.0, clock=lambda: now[0])
    first = log.record("/cam/image", caught(RuntimeError("out of memory")))
    assert "frame failed" in first and "Traceback" in first and "raise_here" in first
    assert log.record("/cam/image", caught(RuntimeError("out of memory again"))) is None  # same cause, throttled
    other = log.record("/cam/image", caught(ValueError("shape")))
    assert other is not None and "Traceback" in other  # a new cause gets its own traceback at once
    now[0] += 5.0
    repeat = log.record("/cam/image", caught(RuntimeError("out of memory")))
    assert repeat is not None and "3 times so far" in repeat and "Traceback" not in repeat


def test_received_rate_is_graded_against_the_expected_rate_like_diagnostic_updater():
    from segmerge_ros.ros.diagnostics import NodeState

    def graded(received: int, expected: float) -> DiagnosticStatus:
        return camera_status("segmerge", snapshot(new_received=received), OFF, 0.45, "head2", False,
                             node=NodeState("active", expected, 0))

    assert graded(10, 10.0).level == DiagnosticStatus.OK and values(graded(10, 10.0))["received_fps"] == "10.00"
    low = graded(8, 10.0)
    assert low.level == DiagnosticStatus.WARN and "too low" in low.message
    assert graded(12, 10.0).level == DiagnosticStatus.WARN and "too high" in graded(12, 10.0).message
    none = graded(0, 10.0)
    assert none.level == DiagnosticStatus.ERROR and "no frames received" in none.message
    assert graded(0, 0.0).level == DiagnosticStatus.OK  # 0: not checked
    assert graded(9, 10.0).level == DiagnosticStatus.OK  # within 10 %


def test_stamp_age_lifecycle_state_and_an_inactive_camera():
    from segmerge_ros.ros.diagnostics import NodeState

    now_ns = 5_000_000_000
    active = camera_status("segmerge", snapshot(last_stamp_ns=now_ns - 250_000_000), OFF, 0.45, "head2", False,
                           node=NodeState("active", 0.0, now_ns))
    assert values(active)["stamp_age_s"] == "0.250" and values(active)["lifecycle_state"] == "active"
    idle = camera_status("segmerge", snapshot(processing_ms=()), OFF, 0.45, "head2", False,
                         node=NodeState("inactive", 10.0, now_ns))
    assert idle.level == DiagnosticStatus.OK and idle.message.startswith("inactive")
    assert values(idle)["stamp_age_s"] == "nan"


def test_unconfigured_status_shows_why_configure_failed():
    from segmerge_ros.ros.diagnostics import unconfigured_status

    ok = unconfigured_status("segmerge", "unconfigured", "")
    assert ok.level == DiagnosticStatus.OK and values(ok)["lifecycle_state"] == "unconfigured"
    failed = unconfigured_status("segmerge", "unconfigured", "cannot load weights 'x'")
    assert failed.level == DiagnosticStatus.ERROR and "cannot load weights" in failed.message
