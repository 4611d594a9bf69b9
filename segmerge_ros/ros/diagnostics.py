"""The node's diagnostics as pure functions: a snapshot of one camera's counters and frame timings in, one
``diagnostic_msgs/DiagnosticStatus`` out (no DDS, no node: unit-tested directly), and the throttled failure log.

Levels: ERROR while frames fail inside the worker (``failed_frames`` rose during the window) and, with an expected
frame rate, while no frame arrives; WARN for new bad frames, for no frames in the window, for a received rate outside
the expected one's tolerance (graded as ``diagnostic_updater``'s FrequencyStatus), and whenever budget mode misses
its target at the rate it chose; OK otherwise. An inactive node (lifecycle) is OK: it takes no frames by design.
"""

from __future__ import annotations

import math
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

from segmerge_ros.inference.budget import BudgetMode

FREQUENCY_TOLERANCE = 0.1  # diagnostic_updater's FrequencyStatusParam default
MISSED_BUDGET_MARGIN = 1.15  # a window's mean processing time this far over the target counts as a miss
FAILURE_REPEAT_PERIOD_S = 5.0  # a known cause is logged again (one line, with its count) at most this often


@dataclass
class FrameTiming:
    """One processed frame as the diagnostics see it."""

    latency_ms: float       # now - header.stamp when published (nan for an unstamped frame)
    inference_ms: float
    processing_ms: float    # slot -> published: what the budget controls (pose included)
    merge_rate: float
    persons: int = -1       # -1: pose was off for this frame
    pose_ms: float = math.nan
    # the stages of processing_ms, timed inside the node (nan where a stage did not run)
    decode_ms: float = math.nan
    preprocess_ms: float = math.nan
    network_ms: float = math.nan      # the backend call alone
    postprocess_ms: float = math.nan
    publish_ms: float = math.nan      # building and publishing the messages (overlay and markers included)
    instances: int = -1               # 1: the model's instances computed, 0: skipped (nobody needed them), -1: none


@dataclass(frozen=True)
class CameraSnapshot:
    """One camera over one diagnostics window; counters are totals since start, ``new_*`` the window's increase."""

    topic: str
    timings: list[FrameTiming]
    window_s: float
    received: int
    dropped: int
    published: int
    bad: int
    failed: int
    new_bad: int = 0
    new_failed: int = 0
    last_bad_reason: str = ""
    last_failure: str = ""
    merge_name: str = ""
    new_received: int = 0
    last_stamp_ns: int = 0   # header stamp of the last frame received (0: none, or unstamped)


@dataclass(frozen=True)
class BudgetSnapshot:
    mode: BudgetMode
    target_ms: float | None
    max_rate: float
    calibrating: bool = False


STAGES = ("decode_ms", "preprocess_ms", "network_ms", "postprocess_ms", "publish_ms")


def _mean(values) -> float:
    values = [v for v in values if math.isfinite(v)]
    return sum(values) / len(values) if values else math.nan


def _percentile(values, share: float) -> float:
    """Nearest-rank percentile of the finite values (nan when none)."""
    values = sorted(v for v in values if math.isfinite(v))
    return values[min(len(values) - 1, max(0, math.ceil(share * len(values)) - 1))] if values else math.nan


@dataclass(frozen=True)
class NodeState:
    """What every camera's status shows about the node: its lifecycle state, the expected frame rate, the time."""

    lifecycle_state: str = "active"
    expected_fps: float = 0.0   # 0: not checked
    now_ns: int = 0             # the node clock's now, for the last frame's stamp age


def frequency_level(received_fps: float, expected_fps: float, received: int) -> tuple[int, str]:
    """diagnostic_updater's FrequencyStatus grading of a received rate: ERROR when nothing arrived, WARN outside
    the expected rate +- 10 %, OK otherwise (and OK when no rate is expected)."""
    if expected_fps <= 0:
        return DiagnosticStatus.OK, ""
    if received == 0:
        return DiagnosticStatus.ERROR, f"no frames received (expected {expected_fps:.1f} fps)"
    if received_fps < expected_fps * (1 - FREQUENCY_TOLERANCE):
        return DiagnosticStatus.WARN, f"frame rate too low: {received_fps:.2f} fps received, {expected_fps:.1f} expected"
    if received_fps > expected_fps * (1 + FREQUENCY_TOLERANCE):
        return DiagnosticStatus.WARN, f"frame rate too high: {received_fps:.2f} fps received, {expected_fps:.1f} expected"
    return DiagnosticStatus.OK, ""


def unconfigured_status(node_name: str, lifecycle_state: str, configure_failure: str) -> DiagnosticStatus:
    """The node's one status while it has no cameras (unconfigured): OK, or ERROR with why configure failed."""
    level = DiagnosticStatus.ERROR if configure_failure else DiagnosticStatus.OK
    message = f"configure failed: {configure_failure}" if configure_failure else lifecycle_state
    return DiagnosticStatus(level=level, name=f"{node_name}: lifecycle", message=message, hardware_id=node_name,
                            values=[KeyValue(key="lifecycle_state", value=lifecycle_state),
                                    KeyValue(key="configure_failure", value=configure_failure)])


def camera_status(node_name: str, camera: CameraSnapshot, budget: BudgetSnapshot, current_rate: float,
                  current_merge_name: str, pose_enabled: bool, pose_model: str = "",
                  threads: dict[str, str] | None = None, node: NodeState = NodeState()) -> DiagnosticStatus:
    """The DiagnosticStatus of one camera for one window. ``current_rate``/``current_merge_name``: the engine's
    setting, shown when the window processed no frame. ``pose_model``: "building", "ready" or "failed: <reason>"
    ("" while no pose model was ever asked for). ``threads``: further values shown as they are (the thread
    governor's state: threads in use, the other processes' load; the backend and ladder in use). ``node``: the
    lifecycle state, expected rate and clock."""
    timings = camera.timings
    rate = timings[-1].merge_rate if timings else current_rate
    processing_ms = _mean(t.processing_ms for t in timings)
    values = {
        "merge_rate": f"{rate:.4f}",
        "merge_config": camera.merge_name or current_merge_name,
        "latency_ms": f"{_mean(t.latency_ms for t in timings):.2f}",
        "inference_ms": f"{_mean(t.inference_ms for t in timings):.2f}",
        "processing_ms": f"{processing_ms:.2f}",
        "processing_p50_ms": f"{_percentile((t.processing_ms for t in timings), 0.5):.2f}",
        "processing_p90_ms": f"{_percentile((t.processing_ms for t in timings), 0.9):.2f}",
        **{f"{stage[:-3]}_p50_ms": f"{_percentile((getattr(t, stage) for t in timings), 0.5):.2f}" for stage in STAGES},
        "fps": f"{len(timings) / camera.window_s:.2f}",
        "dropped_frames": str(camera.dropped),
        "bad_frames": str(camera.bad),
        "failed_frames": str(camera.failed),
        "frames_in": str(camera.received),
        "frames_out": str(camera.published),
        "received_fps": f"{camera.new_received / camera.window_s:.2f}",
        "expected_fps": f"{node.expected_fps:.2f}",
        "stamp_age_s": (f"{(node.now_ns - camera.last_stamp_ns) / 1e9:.3f}" if camera.last_stamp_ns and node.now_ns
                        else "nan"),
        "lifecycle_state": node.lifecycle_state,
        "budget_mode": budget.mode.value,
        "budget_target_ms": f"{budget.target_ms:.2f}" if budget.target_ms is not None else "nan",
        "last_bad_reason": camera.last_bad_reason,
        "last_failure": camera.last_failure,
    }
    with_instances = [t for t in timings if t.instances >= 0]
    if with_instances:  # a model with instances: on how many frames they were computed (only while needed)
        values["instances_frames"] = f"{sum(t.instances for t in with_instances)}/{len(with_instances)}"
    posed = [t for t in timings if t.persons >= 0]
    if pose_enabled or posed:
        values["persons"] = str(posed[-1].persons) if posed else "0"  # in the window's last frame
        values["pose_ms"] = f"{_mean(t.pose_ms for t in posed):.2f}"
    if pose_model:
        values["pose_model"] = pose_model
    values.update(threads or {})

    if node.lifecycle_state != "active":
        return DiagnosticStatus(level=DiagnosticStatus.OK, name=f"{node_name}: {camera.topic}",
                                message=f"{node.lifecycle_state}: not taking frames", hardware_id=camera.topic,
                                values=[KeyValue(key=k, value=v) for k, v in values.items()])
    level, message = DiagnosticStatus.OK, f"{len(timings)} frames in {camera.window_s:.1f} s"
    if not timings:
        level, message = DiagnosticStatus.WARN, "no frames processed in the last period"
    missed = (budget.target_ms is not None and timings and not budget.calibrating
              and processing_ms > MISSED_BUDGET_MARGIN * budget.target_ms)
    if camera.new_failed:
        level, message = DiagnosticStatus.ERROR, f"{camera.new_failed} frame(s) failed: {camera.last_failure}"
    elif camera.new_bad:
        level, message = DiagnosticStatus.WARN, f"{camera.new_bad} bad frame(s): {camera.last_bad_reason}"
    elif missed and rate >= budget.max_rate - 1e-6:
        level, message = DiagnosticStatus.WARN, (f"budget {budget.target_ms:.1f} ms not met even at max_merge_rate "
                                                 f"({processing_ms:.1f} ms)")
    elif missed:
        level, message = DiagnosticStatus.WARN, (f"budget {budget.target_ms:.1f} ms missed at merge rate {rate:.2f} "
                                                 f"({processing_ms:.1f} ms)")
    rate_level, rate_message = frequency_level(camera.new_received / camera.window_s, node.expected_fps,
                                               camera.new_received)
    if rate_level > level:  # levels are bytes b"\x00" < b"\x01" < b"\x02"
        level, message = rate_level, rate_message
    return DiagnosticStatus(level=level, name=f"{node_name}: {camera.topic}", message=message,
                            hardware_id=camera.topic, values=[KeyValue(key=k, value=v) for k, v in values.items()])


def failure_cause(error: BaseException) -> str:
    """What identifies a failure's cause: its type and where it was raised (the message may vary per frame)."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
    return f"{type(error).__name__} at {where}"


@dataclass
class FailureLog:
    """Frames that fail inside the worker: the first failure of each cause is logged with its traceback, later ones
    of the same cause as one line with their count, at most every ``repeat_period_s``."""

    repeat_period_s: float = FAILURE_REPEAT_PERIOD_S
    clock: Callable[[], float] = time.monotonic
    _counts: dict[str, int] = field(default_factory=dict)
    _last_logged: dict[str, float] = field(default_factory=dict)

    def record(self, where: str, error: BaseException) -> str | None:
        """Count one failure; returns the text to log now, or None while this cause is throttled."""
        cause = failure_cause(error)
        count = self._counts.get(cause, 0) + 1
        self._counts[cause] = count
        now = self.clock()
        if count == 1:
            self._last_logged[cause] = now
            trace = "".join(traceback.format_exception(type(error), error, error.__traceback__))
            return f"{where}: frame failed ({cause}): {error!r}\n{trace.rstrip()}"
        if now - self._last_logged[cause] >= self.repeat_period_s:
            self._last_logged[cause] = now
            return f"{where}: frame failed again ({cause}, {count} times so far): {error!r}"
        return None
