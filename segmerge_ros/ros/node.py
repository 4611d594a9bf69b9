"""segmerge_node: semantic segmentation of one or more camera streams, with a run-time merge rate and compute budget.

Per camera ``<ns>/<name>`` (a ``/compressed`` suffix is stripped first) it publishes:

- ``<ns>/segmentation/mask``        sensor_msgs/Image mono8, class ids, camera resolution, the input header unchanged
- ``<ns>/segmentation/confidence``  sensor_msgs/Image mono8, max softmax probability * 255 (only while subscribed)
- ``<ns>/segmentation/overlay``     sensor_msgs/Image rgb8, class colours over the frame (only while subscribed)
- ``<ns>/segmentation/labels``      std_msgs/String JSON {classes, palette, ...}, transient local (latched)
- ``<ns>/label_info``               vision_msgs/LabelInfo, transient local, when vision_msgs is installed
- ``<ns>/pose/keypoints``           sensor_msgs/PointCloud2, while pose.enable: every frame, height = persons (0 when
                                    none), width 17, fields x, y, z, u, v, score (``ros/pose_msgs.py``)
- ``<ns>/pose/markers``             visualization_msgs/MarkerArray, while pose.enable, subscribed and K known

and one status per camera on ``/diagnostics``. It subscribes to ``<ns>/camera_info`` (sensor-data QoS) and keeps
the latest per camera: its K turns keypoints into unit-depth rays. Parameters: see ``segmerge_ros/ros/params.py``.

Threading: subscription callbacks only drop the message into the camera's one-frame slot (a newer frame replaces an
unprocessed one, counted as dropped), so stale frames never queue up. One worker thread builds and warms the models
(the constructor waits for it), then decodes, infers and publishes: torch runs on no other long-lived thread (see
``_build_models``). Pose, when enabled, runs there too, after segmentation and inside the time the budget controls.
Parameter changes, the diagnostics timer and the budget topic run on the executor thread; every parameter set,
including the node's own, happens there. Pose settings reach the worker as one immutable snapshot, swapped in per
frame. The pose model is built on a short-lived thread of its own on first live enable, so the parameter service,
diagnostics and frames go on meanwhile. Shutdown waits for the frame in progress before the node is destroyed.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time

import rclpy
import torch
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import SetParametersResult
from rclpy.exceptions import NameValidationException, ParameterException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from std_msgs.msg import Float32

from segmerge_ros.inference.budget import BudgetController, BudgetMode, PoseWork, fps_demand
from segmerge_ros.inference.pose import PoseEstimator
from segmerge_ros.inference.threads import ThreadGovernor, thread_pool_policy
from segmerge_ros.ros.camera import Camera
from segmerge_ros.ros.conversions import BadFrame
from segmerge_ros.ros.diagnostics import BudgetSnapshot, FailureLog, FrameTiming, camera_status
from segmerge_ros.ros.frame_pipeline import FramePipeline, FrameSettings, budget_step
from segmerge_ros.ros.parameter_policy import complete_parameter_set, refusal_reason, startup_refusal, topics_refusal
from segmerge_ros.ros.params import PARAMETERS, SPECS
from segmerge_ros.ros.startup import StartupError, apply_merge_settings, build_engine, build_pose, model_info, pose_settings

NODE_NAME = "segmerge"

DIAGNOSTICS_PERIOD_S = 1.0
STEADY_THREADS_S = 60.0  # a thread-count choice held this long frees the rungs compiled for the other counts
BAD_FRAME_WARN_PERIOD_S = 5.0
STOP_WAIT_S = 60.0  # longest wait for the frame in progress at shutdown (a huge frame on a slow CPU takes seconds)


class SegmergeNode(Node):
    def __init__(self, **node_kwargs):
        super().__init__(NODE_NAME, **node_kwargs)
        self._declare_parameters()
        self._setting_internally = False  # parameter sets all run on the executor thread, so a flag suffices
        self._stopping = False
        self.frame_ready = threading.Condition()
        self._budget_lock = threading.Lock()  # controller + engine rate changes from worker and executor
        self._failures = FailureLog()

        topics = self._checked_topics(self.param("image_topics"))  # cheap checks before the slow model load
        reason = startup_refusal({spec.name: self.param(spec.name) for spec in PARAMETERS})
        if reason:
            raise StartupError(reason)
        self._pose: PoseEstimator | None = None  # built on first enable: no cost while pose is off
        self._threads: ThreadGovernor | None = None  # built with the models, on the worker thread
        self._pose_builder: threading.Thread | None = None  # builds the pose model on first live enable
        self._pose_state = ""  # "", "building", "ready" or "failed: <reason>" (diagnostics key pose_model)
        self._pose_settings = pose_settings(self.param)
        self._in_flight: Camera | None = None  # the camera whose frame the worker is processing
        # The models are built, warmed and run on the worker thread: see _build_models.
        self._models_built, self._setup_done = threading.Event(), threading.Event()
        self._build_failure: BaseException | None = None
        self._worker = threading.Thread(target=self._work, name="segmerge-worker", daemon=True)
        self._worker.start()
        self._models_built.wait()
        if self._build_failure is not None:
            raise self._build_failure
        try:
            self._finish_setup(topics)
        except BaseException:
            self._stopping = True  # the worker leaves instead of taking frames
            raise
        finally:
            self._setup_done.set()
        outputs = ", ".join(sorted({c.output_namespace for c in self.cameras}))
        self.get_logger().info(
            f"ready: {len(self.cameras)} camera(s) [{', '.join(c.topic for c in self.cameras)}] -> "
            f"segmentation/* in [{outputs}]; {self.param('model')} on {self.engine.device}, backend {self.engine.backend}, "
            f"input_size {self.param('input_size') or 'camera resolution'}, {self._merge_description()}; "
            f"{self._pose_description()}")

    def _build_models(self) -> None:
        """Pose (when enabled at start) and segmentation models, built and warmed up on the worker thread that runs
        them. torch's OpenMP pool is per calling thread, and while a second thread that has used it lives, both
        pools' threads contend for the cores: measured on the 2-core machine, 66 instead of 37 ms per frame at the
        top rung when the models were built on the main thread and run on the worker."""
        if self._pose_settings.enable:
            reason = self._build_pose()  # before the segmentation model: bad pose weights fail fast
            if reason:
                raise StartupError(reason)
        self.engine = build_engine(self.param, self.get_logger().warning)  # refuses what cannot run, warms up
        self.pipeline = FramePipeline(self.engine, self._pose, warn=self.get_logger().warning)
        # The thread count is this thread's to change, between frames (inference/threads.py): torch's pool and
        # OpenVINO's (one compiled model per count). A network on a GPU does not depend on it: no governor there.
        self._threads_freed_after = 0  # the governor's choice after which unused thread counts were freed
        self._threads = ThreadGovernor(torch.get_num_threads(), self.engine.set_threads,
                                       enabled=bool(self.param("threads.adapt")) and self._governs_threads())

    def _governs_threads(self) -> bool:
        return self.engine.runs_on_cpu_threads

    def _finish_setup(self, topics: list[str]) -> None:
        """Everything after the models, on the constructing thread: budget, cameras, parameter callbacks, timers."""
        self._publish_overlay = bool(self.param("publish_overlay"))
        self._overlay_alpha = float(self.param("overlay_alpha"))
        self._budget = BudgetController(
            mode=BudgetMode.OFF,
            target_latency_ms=self.param("budget.target_latency_ms"),
            target_fps=self.param("budget.target_fps"),
            min_rate=self.param("budget.min_merge_rate"),
            max_rate=self.param("budget.max_merge_rate"),
            # The engine maps rates onto a ladder of configurations; choosing between rungs would be pointless.
            levels=getattr(self.engine, "ladder_rates", None),
        )
        self._budget_rate: float | None = None
        self._skip_slow_steps = bool(self.param("budget.skip_slow_steps"))
        self._backend_choice_logged = self.engine.backend_choice  # logged at start when made there
        if self._backend_choice_logged is not None:
            self.get_logger().info(f"backend auto: {self._backend_choice_logged.reason}")
        self._pose_work = PoseWork()  # budget mode's cap on the people posed per frame (worker thread only)
        if self.param("budget.mode") != BudgetMode.OFF.value and self.param("preset") != "none":
            self.get_logger().warning(f"preset {self.param('preset')!r} ignored: budget mode chooses merge rates")
            self.set_parameters([Parameter("preset", value="none")])  # callbacks are not registered yet
        self._apply_merge_settings()
        self._set_budget_mode(self.param("budget.mode"))

        self.cameras = self._create_cameras(topics)
        info = model_info(self.param, self.engine)
        for camera in self.cameras:
            camera.publish_labels(self.engine.labels, info)

        self.add_pre_set_parameters_callback(self._before_parameters_set)
        self.add_on_set_parameters_callback(self._validate_parameters)
        self.add_post_set_parameters_callback(self._after_parameters_set)

        budget_topic = self.param("budget.topic")
        if budget_topic:
            self.create_subscription(Float32, budget_topic, self._on_budget_message, 10)
        self._reflect_rate = self.create_guard_condition(self._reflect_budget_rate)
        self._pose_failed = self.create_guard_condition(self._disable_failed_pose)
        self._diagnostics_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._last_diagnostics = time.monotonic()
        self.create_timer(DIAGNOSTICS_PERIOD_S, self._publish_diagnostics)

    # -- parameters (the one place that reads them) ---------------------------------------------------------------
    def param(self, name: str):
        return self.get_parameter(name).value

    def _declare_parameters(self) -> None:
        for spec in PARAMETERS:
            # `-p merge_rate:=0` arrives as an integer; rclpy would refuse it for a double parameter.
            override = self._parameter_overrides.get(spec.name)
            if isinstance(spec.default, float) and override is not None and override.type_ == Parameter.Type.INTEGER:
                self._parameter_overrides[spec.name] = Parameter(spec.name, Parameter.Type.DOUBLE,
                                                                 float(override.value))
            try:
                self.declare_parameter(spec.name, spec.default, spec.descriptor())
            except ParameterException as error:
                raise StartupError(f"parameter {spec.name}: {error}") from None

    # -- pose -----------------------------------------------------------------------------------------------------
    def _build_pose(self) -> str | None:
        """Build the pose estimator (slow: seconds); returns why it cannot be built, or None. Runs at start-up, or
        on the pose builder thread after a live enable: never on the executor, which must keep serving."""
        self._pose_state = "building"
        try:
            pose = build_pose(self.param, self.get_logger().warning)
        except StartupError as error:
            self._pose_state = f"failed: {error}"
            return str(error)
        self._pose = pose
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

        def build() -> None:
            reason = self._build_pose()
            if self._stopping:
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

    @staticmethod
    def _checked_topics(topics: list[str]) -> list[str]:
        topics, reason = topics_refusal(topics)
        if reason:
            raise StartupError(reason)
        return topics

    def _create_cameras(self, topics: list[str]) -> list[Camera]:
        try:
            return [Camera(self, topic, self.frame_ready) for topic in topics]
        except NameValidationException as error:
            raise StartupError(f"image_topics: {error}") from None

    def _set_internally(self, parameters: list[Parameter]) -> SetParametersResult:
        """Set parameters as the node itself (budget decisions, budget topic): not a manual override."""
        self._setting_internally = True
        try:
            return self.set_parameters_atomically(parameters)
        finally:
            self._setting_internally = False

    def _before_parameters_set(self, parameters: list[Parameter]) -> list[Parameter]:
        """Accept integers for double parameters, and keep merge_rate, preset and budget.mode consistent."""
        return complete_parameter_set(parameters, self.param, manual=not self._setting_internally)

    def _validate_parameters(self, parameters: list[Parameter]) -> SetParametersResult:
        # Types and ranges were already checked by rclpy against the descriptors; this adds choices and limits.
        values = {p.name: p.value for p in parameters}
        reason = refusal_reason(values, self.param, self.param("model"))
        if reason:
            return SetParametersResult(successful=False, reason=reason)
        if values.get("pose.enable") is True and self._pose is None:
            weights = self.param("pose.weights")
            if weights and not os.path.exists(weights):  # the one failure known before building: refuse it now
                return SetParametersResult(successful=False,
                                           reason=f"cannot load pose.weights {weights!r}: no such file")
        return SetParametersResult(successful=True)

    def _after_parameters_set(self, parameters: list[Parameter]) -> None:
        names = {p.name for p in parameters}
        manual = not self._setting_internally
        if "publish_overlay" in names:
            self._publish_overlay = bool(self.param("publish_overlay"))
        if "overlay_alpha" in names:
            self._overlay_alpha = float(self.param("overlay_alpha"))
        if "threads.adapt" in names and self._threads is not None:
            self._threads.enabled = bool(self.param("threads.adapt")) and self._governs_threads()
        if any(name.startswith("pose.") for name in names):
            was_enabled = self._pose_settings.enable
            self._pose_settings = pose_settings(self.param)  # the worker picks it up from the next frame
            if manual and (self._pose_settings.enable != was_enabled or "pose.mode" in names):
                self.get_logger().info(f"now {self._pose_description()}")
            if self._pose_settings.enable and self._pose is None:
                self._start_pose_builder()
        with self._budget_lock:
            if names & {"budget.target_latency_ms", "budget.target_fps"}:
                self._budget.set_target(target_latency_ms=self.param("budget.target_latency_ms"),
                                        target_fps=self._fps_demand())
            if names & {"budget.min_merge_rate", "budget.max_merge_rate"}:
                self._budget.set_limits(self.param("budget.min_merge_rate"), self.param("budget.max_merge_rate"))
            budget_off = "budget.mode" in names and self.param("budget.mode") == BudgetMode.OFF.value
            # Leaving budget mode, the engine takes the merge_rate parameter again: the controller's last choice may
            # not have been reflected into the parameter yet, and what the parameter says must be what runs.
            if (names & {"merge_rate", "preset"} and manual) or budget_off:
                self._apply_merge_settings()
            if "budget.mode" in names:
                self._set_budget_mode(self.param("budget.mode"))
        if manual and "merge_rate" in names and "budget.mode" in names and self.param("budget.mode") == "off":
            self.get_logger().info(f"merge_rate set to {self.param('merge_rate'):.3f} by hand: budget mode is off now")
        elif manual and names & {"merge_rate", "preset", "budget.mode"}:
            self.get_logger().info(f"now {self._merge_description()}")

    def _apply_merge_settings(self) -> None:
        apply_merge_settings(self.engine, self.param)

    def _set_budget_mode(self, mode: str) -> None:
        mode = BudgetMode.parse(mode)
        was_active = self._budget.active
        self._budget.set_target(mode=mode, target_fps=self._fps_demand())
        if mode is BudgetMode.OFF:
            self._budget_rate = None
        elif not was_active:
            self._budget_rate = None
            if not self._budget.calibrated:
                self.get_logger().info(
                    f"budget mode {mode.value}: calibrating merge rates {self._budget.min_rate:.2f}.."
                    f"{self._budget.max_rate:.2f} on the next frames")

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
        with self._budget_lock:
            rate = self._budget_rate if self._budget.active else None
        if rate is not None and abs(self.param("merge_rate") - rate) > 1e-9:
            self._set_internally([Parameter("merge_rate", value=rate)])

    # -- the worker -----------------------------------------------------------------------------------------------
    def _work(self) -> None:
        try:
            self._build_models()
        except BaseException as error:  # noqa: BLE001 - handed to the constructor, which raises it
            self._build_failure = error
            return
        finally:
            self._models_built.set()
        self._setup_done.wait()
        if self._stopping:
            return
        next_camera = 0
        while True:
            with self.frame_ready:
                while not self._stopping and all(c.pending is None for c in self.cameras):
                    self.frame_ready.wait()
                if self._stopping:
                    return
                # Round robin, so a fast camera cannot starve a slow one.
                order = self.cameras[next_camera:] + self.cameras[:next_camera]
                camera = next(c for c in order if c.pending is not None)
                next_camera = (self.cameras.index(camera) + 1) % len(self.cameras)
                msg, camera.pending = camera.pending, None
                self._in_flight = camera
            try:
                self._process(camera, msg)
            except BadFrame as bad:
                self._count_bad(camera, str(bad))
            except Exception as error:  # noqa: BLE001 - one failing frame must not kill the worker; it is counted
                if self._stopping or not self.context.ok():
                    return
                self._count_failed(camera, error)
            finally:
                with self.frame_ready:
                    self._in_flight = None

    def _process(self, camera: Camera, msg) -> None:
        settings = FrameSettings(
            confidence=camera.has_subscribers("confidence"),
            overlay=self._publish_overlay and camera.has_subscribers("overlay"),
            overlay_alpha=self._overlay_alpha,
            markers=camera.has_subscribers("markers"),
            pose=self._pose_settings)  # one snapshot for the whole frame
        outputs = self.pipeline.process(msg, camera.camera_info, settings, publish=self._publisher(camera))
        times = outputs.times
        stamp = outputs.header.stamp
        stamp_ns = stamp.sec * 1_000_000_000 + stamp.nanosec
        latency_ms = (self.get_clock().now().nanoseconds - stamp_ns) / 1e6 if stamp_ns else math.nan
        with self.frame_ready:
            camera.published += 1
            camera.last_merge = times.merge_name
            camera.timings.append(FrameTiming(latency_ms, times.inference_ms, times.processing_ms, times.merge_rate,
                                              times.persons, times.pose_ms, times.decode_ms, times.preprocess_ms,
                                              times.network_ms, times.postprocess_ms, times.publish_ms))
        if self.engine.backend_choice is not self._backend_choice_logged:  # backend auto decided on this frame
            self._backend_choice_logged = self.engine.backend_choice
            self.get_logger().info(f"backend auto, on the first frame: {self.engine.backend_choice.reason}")
        # the network's time (at this frame's rung) is what the thread count acts on; pose runs at the same count
        self._threads.observe(times.network_ms, times.merge_name)
        if self._threads.choices != self._threads_freed_after and self._threads.steady_for() >= STEADY_THREADS_S:
            # the governor's last choice has held a while: the other counts' compiled rungs (a ladder each) go
            self._threads_freed_after = self._threads.choices
            self.engine.free_other_thread_counts()
        if self._skip_slow_steps and self._budget.active and self.engine.needs_step_times:
            # seconds, once per frame size: outside the budget lock, which parameter callbacks wait for
            self.engine.time_steps()
        with self._budget_lock:
            next_rate = budget_step(self._budget, self.engine, times.processing_ms, times.merge_rate,
                                    self._skip_slow_steps)
            changed = next_rate is not None and next_rate != self._budget_rate
            if next_rate is not None:
                self._budget_rate = next_rate
            if times.persons >= 0 or not self._budget.active:  # pose ran on this frame, or budget mode is off
                rate = next_rate if next_rate is not None else times.merge_rate
                self.pipeline.pose_people_cap = self._pose_work.update(
                    times.processing_ms, times.pose_ms, times.persons,
                    # kept through a re-calibration (its rates move every few frames, so the cap waits)
                    self._budget.target_ms if self._budget.active else None,
                    rate, self._pose_settings.max_persons)
        if changed:
            self._reflect_rate.trigger()

    def _publisher(self, camera: Camera):
        def publish(kind: str, message) -> None:
            if self.context.ok():  # after SIGINT the frame in progress finishes, but publishes nothing more
                camera.publish(kind, message)
        return publish

    def _count_bad(self, camera: Camera, reason: str) -> None:
        with self.frame_ready:
            camera.bad += 1
            camera.last_bad_reason = reason
        now = time.monotonic()
        # Per-camera throttle: one broken camera must not hide another's warnings.
        if now - camera.last_bad_warning >= BAD_FRAME_WARN_PERIOD_S:
            camera.last_bad_warning = now
            self.get_logger().warning(f"{camera.topic}: dropped a bad frame ({reason}); {camera.bad} bad so far")

    def _count_failed(self, camera: Camera, error: Exception) -> None:
        with self.frame_ready:
            camera.failed += 1
            camera.last_failure = f"{type(error).__name__}: {error}"
        text = self._failures.record(camera.topic, error)
        if text is not None:
            self.get_logger().error(text)

    # -- diagnostics ----------------------------------------------------------------------------------------------
    def _publish_diagnostics(self) -> None:
        now = time.monotonic()
        window_s = max(now - self._last_diagnostics, 1e-3)
        self._last_diagnostics = now
        with self._budget_lock:
            if self._budget.mode is BudgetMode.FPS:  # follow the cameras' rates as they come and go
                self._budget.set_target(target_fps=self._fps_demand())
            budget = BudgetSnapshot(self._budget.mode, self._budget.target_ms, self._budget.max_rate,
                                    calibrating=self._budget.active and not self._budget.calibrated)
        array = DiagnosticArray()
        array.header.stamp = self.get_clock().now().to_msg()
        with self.frame_ready:
            snapshots = [c.snapshot(window_s) for c in self.cameras]
        for snapshot in snapshots:
            array.status.append(camera_status(self.get_name(), snapshot, budget, self.engine.merge_rate,
                                              self.engine.merge_config.name, self._pose_settings.enable,
                                              self._pose_state, {**self._thread_values(), **self._model_values()}))
        self._diagnostics_pub.publish(array)

    def _model_values(self) -> dict[str, str]:
        """The backend, precision and ladder in use, and why (backend auto's choice; random weights)."""
        engine = self.engine
        choice = engine.backend_choice
        values = {"backend": engine.backend,
                  "backend_choice": choice.reason if choice is not None else
                  ("timing on the first frame" if engine.backend_pending else f"{self.param('backend')} (asked for)"),
                  "precision_plan": engine.precision_plan,
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

    # -- shutdown -------------------------------------------------------------------------------------------------
    def stop(self, timeout_s: float = STOP_WAIT_S) -> None:
        """Stop the worker and wait for it, so nothing uses the node once it is destroyed: a frame in the middle of
        inference finishes (publishing nothing more)."""
        with self.frame_ready:
            self._stopping = True
            in_flight = self._in_flight
            self.frame_ready.notify_all()
        if in_flight is not None:
            self.get_logger().info(f"stopping: waiting for the frame in progress on {in_flight.topic}")
        for thread in (self._worker, self._pose_builder):
            if thread is not None and thread.is_alive() and thread is not threading.current_thread():
                thread.join(timeout_s)
                if thread.is_alive():
                    self.get_logger().error(f"stopping: {thread.name} still busy after {timeout_s:.0f} s")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``segmerge_node``; returns the exit code (non-zero on a fatal configuration error)."""
    spinning = False
    try:
        rclpy.init(args=argv)
        try:
            node = SegmergeNode()
        except StartupError as error:
            rclpy.logging.get_logger(NODE_NAME).fatal(str(error))
            return 1
        except Exception:  # noqa: BLE001 - re-raised unless it only reflects a shutdown during start-up
            if not rclpy.ok():
                return 0  # SIGINT/SIGTERM while the model was loading: the context is gone, nothing to report
            raise
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        spinning = True
        try:
            executor.spin()  # returns or raises once SIGINT/SIGTERM shut the context down
        except (KeyboardInterrupt, ExternalShutdownException):
            pass
        finally:
            # Ctrl-C reaches a launched node twice (the terminal's process group, then ros2 launch forwarding it):
            # a second SIGINT must not cut the clean-up short.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            node.stop()
            executor.shutdown(timeout_sec=0.5)
            node.destroy_node()
        return 0
    except KeyboardInterrupt:  # Ctrl-C while torch or the model was still loading (or a second one during clean-up)
        return 0 if spinning else 130
    finally:
        rclpy.try_shutdown()


if __name__ == "__main__":
    sys.exit(main())
