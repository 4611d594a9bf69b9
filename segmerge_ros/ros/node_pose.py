"""The pose part of ``SegmergeNode`` (``ros/node.py``): the pose model built at configure or, on a live enable, on
a short-lived thread of its own, and switched back off when it cannot be built.

A mixin of the node: it uses the node's ``param``, ``get_logger``, ``_set_internally``, ``pipeline``, ``_stop_event``,
``_pose*`` attributes and the ``_pose_failed`` guard condition.
"""

from __future__ import annotations

import threading
import traceback

from rclpy.parameter import Parameter

from segmerge_ros.ros.startup import StartupError, build_pose


class PoseOnDemand:
    """Builds the pose estimator when pose is first enabled; frames run without pose until it is ready."""

    def _build_pose(self, stop: threading.Event) -> str | None:
        """Build the pose estimator (slow: seconds); returns why it cannot be built, or None. Runs at configure, or
        on the pose builder thread after a live enable: never on the executor, which must keep serving. A model
        finished after ``stop`` (its configure was cleaned up) is dropped."""
        self._pose_state = "building"
        try:
            pose = build_pose(self.param, self.get_logger().warning)
        except StartupError as error:
            reason = str(error)
        except Exception as error:  # noqa: BLE001 - e.g. a compiled backend failing while warming: reported, not lost
            reason = f"{type(error).__name__}: {error}"
            self.get_logger().error(f"pose model build failed:\n{traceback.format_exc().rstrip()}")
        else:
            reason = None
        if stop.is_set():
            return "stopped"
        if reason is not None:
            self._pose_state = f"failed: {reason}"
            return reason
        self._pose = pose
        if self._configured:  # a live enable: the limit as budget mode wants it now (configure applies it else)
            self._apply_compiled_limit()
        if pose.backend_choice is not None:
            self.get_logger().info(f"pose backend auto: {pose.backend_choice.reason}")
        if getattr(self, "pipeline", None) is not None:
            self.pipeline.pose = pose  # the worker runs pose from its next frame on
        self._pose_state = "ready"
        return None

    def _start_pose_builder(self) -> None:
        """First live enable: build the pose model on its own thread; frames run without pose until it is ready."""
        if self._pose is not None or (self._pose_builder is not None and self._pose_builder.is_alive()):
            return
        self.get_logger().info("pose.enable: building the pose model in the background; frames run without pose "
                               "until it is ready (diagnostics key pose_model)")

        stop = self._stop_event  # this configure's

        def build() -> None:
            reason = self._build_pose(stop)
            if stop.is_set():
                return
            if reason:
                self.get_logger().error(f"pose.enable switched back off: {reason}")
                self._pose_failed.trigger()  # the executor sets the parameter back
            else:
                self.get_logger().info("pose model ready: keypoints from the next frame on")

        self._pose_builder = threading.Thread(target=build, name="segmerge-pose-builder", daemon=True)
        self._pose_builder.start()

    def _disable_failed_pose(self) -> None:
        """Executor side of a failed pose build: pose.enable shows what runs (off)."""
        if self._pose is None and self.param("pose.enable"):
            self._set_internally([Parameter("pose.enable", value=False)])

    def _pose_description(self) -> str:
        settings = self._pose_settings
        if not settings.enable:
            return "pose off"
        rate = "following segmentation" if settings.merge_rate < 0 else f"{settings.merge_rate:.2f}"
        return (f"pose on ({self.param('pose.model')}, mode {settings.mode}, at most {settings.max_persons} "
                f"person(s), merge rate {rate})")
