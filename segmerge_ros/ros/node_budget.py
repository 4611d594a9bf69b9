"""The budget part of ``SegmergeNode`` (``ros/node.py``): budget mode switched on and off, the fps demand of the
cameras, the compute budget topic, and the worker's chosen rate shown as the merge_rate parameter.

A mixin of the node: it uses the node's ``param``, ``get_logger``, ``_set_internally``, ``_budget`` (a
``BudgetController``), ``_budget_lock``, ``_budget_rate``, ``frame_ready`` and ``cameras``.
"""

from __future__ import annotations

import math
import time

from rclpy.parameter import Parameter
from std_msgs.msg import Float32

from segmerge_ros.inference.budget import BudgetMode, fps_demand
from segmerge_ros.ros.params import SPECS


class BudgetParameters:
    """Budget mode as the node's parameters and topics see it (the controller itself: inference/budget.py)."""

    def _set_budget_mode(self, mode: str) -> None:
        mode = BudgetMode.parse(mode)
        was_active = self._budget.active
        self._budget.set_target(mode=mode, target_fps=self._fps_demand())
        self._apply_compiled_limit()
        if mode is BudgetMode.OFF:
            self._budget_rate = None
        elif not was_active:
            self._budget_rate = None
            if not self._budget.calibrated:
                self.get_logger().info(
                    f"budget mode {mode.value}: calibrating merge rates {self._budget.min_rate:.2f}.."
                    f"{self._budget.max_rate:.2f} on the next frames")

    def _apply_compiled_limit(self) -> None:
        """``engine_max_compiled_rungs`` for the segmentation and pose models. In budget mode the count is not
        bounded (the controller moves between rungs, and a bound would compile them again and again); only rungs
        no frame ran for a minute go."""
        limit, count = int(self.param("engine_max_compiled_rungs")), not self._budget.active
        for model in (self.engine, self._pose):
            if model is not None:
                model.limit_compiled(limit, count)

    def _merge_description(self) -> str:
        if self._budget.active:
            return (f"budget mode {self._budget.mode.value} (target {self._budget.target_ms:.1f} ms per frame, "
                    f"merge rate {self._budget.min_rate:.2f}..{self._budget.max_rate:.2f})")
        if self.param("preset") != "none":
            return f"merge preset {self.param('preset')}"
        return f"merge_rate {self.param('merge_rate'):.3f}"

    def _fps_demand(self) -> float:
        """Frames per second the worker owes the cameras in fps mode: budget.target_fps from each camera, or what it
        sends when that is less, each camera's rate measured over several seconds (a camera below 1 Hz counts
        steadily instead of flipping the target every diagnostics window)."""
        now = time.monotonic()
        with self.frame_ready:
            rates = [camera.arrivals.rate(now) for camera in getattr(self, "cameras", [])]
        return fps_demand(rates, self.param("budget.target_fps"))

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
        if not self._configured:
            return
        with self._budget_lock:
            rate = self._budget_rate if self._budget.active else None
        if rate is not None and abs(self.param("merge_rate") - rate) > 1e-9:
            self._set_internally([Parameter("merge_rate", value=rate)])
