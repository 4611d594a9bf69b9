"""The diagnostics part of ``SegmergeNode`` (``ros/node.py``): once a period, one status per camera on
``/diagnostics`` (or one lifecycle status while unconfigured), built by the pure functions of ``ros/diagnostics.py``.

A mixin of the node: it uses the node's ``param``, ``get_clock``, ``lifecycle_state``, ``engine``, ``cameras``,
``_budget``, ``_budget_lock``, ``_threads``, ``_pose_*`` and ``_diagnostics_pub``.
"""

from __future__ import annotations

import time

from diagnostic_msgs.msg import DiagnosticArray

from segmerge_ros.inference.budget import BudgetMode
from segmerge_ros.inference.threads import thread_pool_policy
from segmerge_ros.ros.diagnostics import BudgetSnapshot, NodeState, camera_status, unconfigured_status


class DiagnosticsPublishing:
    """The node's ``/diagnostics`` timer callback and the model and thread values it shows."""

    def _publish_diagnostics(self) -> None:
        now_s = time.monotonic()
        window_s = max(now_s - self._last_diagnostics, 1e-3)
        self._last_diagnostics = now_s
        array = DiagnosticArray()
        now = self.get_clock().now()
        array.header.stamp = now.to_msg()
        if not self._configured:
            array.status.append(unconfigured_status(self.get_name(), self.lifecycle_state, self._configure_failure))
            self._diagnostics_pub.publish(array)
            return
        with self._budget_lock:
            if self._budget.mode is BudgetMode.FPS:  # follow the cameras' rates as they come and go
                self._budget.set_target(target_fps=self._fps_demand())
            budget = BudgetSnapshot(self._budget.mode, self._budget.target_ms, self._budget.max_rate,
                                    calibrating=self._budget.active and not self._budget.calibrated)
        with self.frame_ready:
            snapshots = [c.snapshot(window_s) for c in self.cameras]
        state = NodeState(self.lifecycle_state, float(self.param("diagnostics.expected_fps")), now.nanoseconds)
        for snapshot in snapshots:
            array.status.append(camera_status(self.get_name(), snapshot, budget, self.engine.merge_rate,
                                              self.engine.merge_config.name, self._pose_settings.enable,
                                              self._pose_state, {**self._thread_values(), **self._model_values()},
                                              state))
        self._diagnostics_pub.publish(array)

    def _model_values(self) -> dict[str, str]:
        """The backend, precision and ladder in use, and why (backend auto's choice; random weights)."""
        engine, pose = self.engine, self._pose
        choice = engine.backend_choice
        values = {"backend": engine.backend,
                  "backend_choice": choice.reason if choice is not None else
                  ("timing on the first frame" if engine.backend_pending else f"{self.param('backend')} (asked for)"),
                  "precision_plan": engine.precision_plan,
                  "eager_fallbacks": engine.eager_fallbacks or "none",
                  "compiled_rungs": str(engine.compiled_rungs + (pose.compiled_rungs if pose is not None else 0)),
                  "rung_recompiles": str(engine.recompiles + (pose.recompiles if pose is not None else 0)),
                  "ladder": engine.ladder_description()}
        if engine.randomly_initialised:
            values["weights"] = "random: the masks are meaningless"
        return values

    def _thread_values(self) -> dict[str, str]:
        state = self._threads.state if self._threads is not None else None
        if state is None:
            return {}
        others = state.others_cores
        cap = self._pose_work.cap
        return {"pose_people_cap": "max_persons" if cap is None else str(cap), "threads": str(state.threads), "threads_adapt": str(self._threads.enabled).lower(),
                "cpu_others_cores": f"{others:.2f}" if others is not None else "nan",
                "thread_choice": state.last_choice, "thread_pools": thread_pool_policy()}
