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

Lifecycle (a managed node): configure checks the parameters, builds the models and creates the publishers;
activate subscribes to the cameras; deactivate unsubscribes (a frame in progress finishes, publishing nothing);
cleanup frees the models and publishers. With ``autostart`` (the default) the node configures and activates itself
in its constructor, which raises StartupError when configure fails.

Threading: subscription callbacks only drop the message into the camera's one-frame slot (a newer frame replaces an
unprocessed one, counted as dropped), so stale frames never queue up. One worker thread builds and warms the models
(configure waits for it), then decodes, infers and publishes: torch runs on no other long-lived thread (see
``_build_models``). Pose, when enabled, runs there too, after segmentation and inside the time the budget controls.
Parameter changes, the diagnostics timer and the budget topic run on the executor thread; every parameter set,
including the node's own, happens there. Pose settings reach the worker as one immutable snapshot, swapped in per
frame. The pose model is built on a short-lived thread of its own on first live enable, so the parameter service,
diagnostics and frames go on meanwhile. Cleanup and shutdown wait for the frame in progress; each configure starts
a new worker.
"""

from __future__ import annotations

import gc
import math
import os
import signal
import sys
import threading
import time
import traceback
from typing import TYPE_CHECKING

import rclpy
import torch
from diagnostic_msgs.msg import DiagnosticArray
from lifecycle_msgs.msg import State
from rcl_interfaces.msg import SetParametersResult
from rclpy.exceptions import ParameterException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from std_msgs.msg import Float32

from segmerge_ros.inference.budget import BudgetController, BudgetMode, PoseWork
from segmerge_ros.inference.pose import PoseEstimator
from segmerge_ros.inference.threads import ThreadGovernor
from segmerge_ros.inference.tracking import TrackIds, Tracker
from segmerge_ros.ros.camera import HAVE_VISION_MSGS, Camera
from segmerge_ros.ros.conversions import BadFrame
from segmerge_ros.ros.log_bridge import forward_library_logs
from segmerge_ros.ros.diagnostics import FailureLog, FrameTiming
from segmerge_ros.ros.node_budget import BudgetParameters
from segmerge_ros.ros.node_diagnostics import DiagnosticsPublishing
from segmerge_ros.ros.node_outputs import NodeOutputs
from segmerge_ros.ros.node_pose import PoseOnDemand
from segmerge_ros.ros.frame_pipeline import DETECTIONS, FramePipeline, FrameSettings, budget_step
from segmerge_ros.ros.parameter_policy import (complete_parameter_set, detection_class_ids, lifecycle_refusal,
                                              refusal_reason, startup_refusal)
from segmerge_ros.ros.params import PARAMETERS
from segmerge_ros.ros.startup import RANDOM_WEIGHTS, StartupError, apply_merge_settings, build_engine, pose_settings

if TYPE_CHECKING:
    from segmerge_ros.ros.bodies import BodyPublishers

NODE_NAME = "segmerge"

DIAGNOSTICS_PERIOD_S = 1.0
STEADY_THREADS_S = 60.0  # a thread-count choice held this long frees the rungs compiled for the other counts
BAD_FRAME_WARN_PERIOD_S = 5.0
STOP_WAIT_S = 60.0  # longest wait for the frame in progress at shutdown (a huge frame on a slow CPU takes seconds)


SUCCESS, FAILURE = TransitionCallbackReturn.SUCCESS, TransitionCallbackReturn.FAILURE


class SegmergeNode(PoseOnDemand, BudgetParameters, DiagnosticsPublishing, NodeOutputs, LifecycleNode):
    def __init__(self, **node_kwargs):
        super().__init__(NODE_NAME, **node_kwargs)
        self._declare_parameters()
        self._setting_internally = False  # parameter sets all run on the executor thread, so a flag suffices
        self.frame_ready = threading.Condition()
        self._budget_lock = threading.Lock()  # controller + engine rate changes from worker and executor
        self._failures = FailureLog()
        self._configured = self._active = False  # configured: models, cameras, budget exist (until cleanup)
        self._configure_failure = ""  # why the last configure failed (diagnostics), "" after one that worked
        self._autostarting = False
        self.cameras: list[Camera] = []
        self.engine = self.pipeline = None  # from configure to cleanup
        self._worker: threading.Thread | None = None
        # Set when the current configure's threads (worker, pose builder) are to leave; each configure makes a new
        # one, so a thread of an earlier configure that outlived its cleanup never takes up the new one's work.
        self._stop_event = threading.Event()
        self._stop_event.set()
        self._pose: PoseEstimator | None = None  # built on first enable: no cost while pose is off
        self._threads: ThreadGovernor | None = None  # built with the models, on the worker thread
        self._pose_builder: threading.Thread | None = None  # builds the pose model on first live enable
        self._pose_state = ""  # "", "building", "ready" or "failed: <reason>" (diagnostics key pose_model)
        self._pose_settings = pose_settings(self.param)
        self._in_flight: Camera | None = None  # the camera whose frame the worker is processing
        self._budget_subscription = None
        self._track_ids = TrackIds()  # one id source for the node's life: ids never repeat across cameras or configures
        self._bodies: BodyPublishers | None = None  # REP-155 (hri.enable), from configure to cleanup
        self.add_pre_set_parameters_callback(self._before_parameters_set)
        self.add_on_set_parameters_callback(self._validate_parameters)
        self.add_post_set_parameters_callback(self._after_parameters_set)
        self._reflect_rate = self.create_guard_condition(self._reflect_budget_rate)
        self._pose_failed = self.create_guard_condition(self._disable_failed_pose)
        self._diagnostics_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._last_diagnostics = time.monotonic()
        self.create_timer(DIAGNOSTICS_PERIOD_S, self._publish_diagnostics)
        if self.param("autostart"):
            self._autostarting = True
            try:
                if self.trigger_configure() != SUCCESS:
                    raise StartupError(self._configure_failure)
                if self.trigger_activate() != SUCCESS:
                    raise StartupError("activate failed (see the log)")
            finally:
                self._autostarting = False
        else:
            self.get_logger().info("autostart false: unconfigured, waiting for `ros2 lifecycle set "
                                   f"{self.get_fully_qualified_name()} configure`")

    @property
    def lifecycle_state(self) -> str:
        """"unconfigured", "inactive", "active", "finalized" or a transition's name."""
        state_id, label = self._state_machine.current_state
        return "unconfigured" if state_id == State.PRIMARY_STATE_UNCONFIGURED else label

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self._configure()
        except Exception as error:  # noqa: BLE001 - reported, and the node stays unconfigured
            self._configure_failure = str(error) if isinstance(error, StartupError) else f"{type(error).__name__}: {error}"
            if not isinstance(error, StartupError):
                self.get_logger().error(f"configure failed:\n{traceback.format_exc().rstrip()}")
            elif not self._autostarting:  # with autostart, main() logs it once as FATAL
                self.get_logger().error(f"configure failed: {self._configure_failure}")
            self._release()
            return FAILURE
        self._configure_failure = ""
        return SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self._activate()
        except Exception:  # noqa: BLE001 - rclpy would turn it into a silent ERROR; logged, and the node stays inactive
            self.get_logger().error(f"activate failed:\n{traceback.format_exc().rstrip()}")
            with self.frame_ready:
                self._active = True  # so that _deactivate undoes what activate did
            self._deactivate()
            return FAILURE
        return SUCCESS

    def _activate(self) -> None:
        """Subscribe to the cameras and the budget topic."""
        with self.frame_ready:
            self._active = True
        for camera in self.cameras:
            camera.tracker.reset()  # tracks from before a deactivate are stale
            camera.subscribe()
        budget_topic = self.param("budget.topic")
        if budget_topic:
            self._budget_subscription = self.create_subscription(Float32, budget_topic, self._on_budget_message, 10)
        outputs = ", ".join(sorted({c.output_namespace for c in self.cameras}))
        self.get_logger().info(
            f"ready: {len(self.cameras)} camera(s) [{', '.join(c.topic for c in self.cameras)}] -> "
            f"segmentation/* in [{outputs}]; {self.param('model')} on {self.engine.device}, backend {self.engine.backend}, "
            f"input_size {self.param('input_size') or 'camera resolution'}, {self._merge_description()}; "
            f"{self._pose_description()}")

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._deactivate()
        self.get_logger().info("inactive: cameras unsubscribed (models kept)")
        return SUCCESS

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        self.get_logger().info("unconfigured: models and publishers freed")
        return SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._deactivate()
        self._release()
        return SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._deactivate()
        self._release()
        return SUCCESS  # back to unconfigured

    def _configure(self) -> None:
        """Check the parameters, build the models on a new worker thread, create budget, cameras and labels."""
        topics = self._checked_topics(self.param("image_topics"))  # cheap checks before the slow model load
        reason = startup_refusal({spec.name: self.param(spec.name) for spec in PARAMETERS})
        if reason:
            raise StartupError(reason)
        busy = [t.name for t in (self._worker, self._pose_builder) if t is not None and t.is_alive()]
        if busy:
            raise StartupError(f"{', '.join(busy)} of the previous configure still running (a frame or a model build "
                               "that outlived cleanup): configure again once it ends")
        budget_topic = self.param("budget.topic")
        if budget_topic:
            try:
                self.resolve_topic_name(budget_topic)
            except RuntimeError as error:  # rcl's RCLError for a name it cannot expand
                raise StartupError(f"budget.topic: {error}") from None
        self._pose_settings = pose_settings(self.param)
        self._pose, self._pose_state = None, ""
        stop = self._stop_event = threading.Event()
        self._models_built, self._setup_done = threading.Event(), threading.Event()
        self._build_failure: BaseException | None = None
        self._worker = threading.Thread(target=self._work, args=(stop,), name="segmerge-worker", daemon=True)
        self._worker.start()
        self._models_built.wait()
        if self._build_failure is not None:
            raise self._build_failure
        try:
            self._finish_setup(topics)
        finally:
            self._setup_done.set()
        self._configured = True

    def _deactivate(self) -> None:
        """Unsubscribe and wait for the frame in progress, which publishes nothing more."""
        with self.frame_ready:
            was_active, self._active = self._active, False
        if not was_active:
            return
        for camera in self.cameras:
            camera.unsubscribe()
        if self._budget_subscription is not None:
            self.destroy_subscription(self._budget_subscription)
            self._budget_subscription = None
        if self._bodies is not None:
            self._bodies.clear()  # REP-155 consumers see no bodies while nothing is tracked
        deadline = time.monotonic() + STOP_WAIT_S
        with self.frame_ready:
            while self._in_flight is not None and time.monotonic() < deadline:
                self.frame_ready.wait(0.1)
            still = self._in_flight
        if still is not None:
            self.get_logger().warning(f"deactivate: the frame in progress on {still.topic} still runs after "
                                      f"{STOP_WAIT_S:.0f} s; it will publish nothing")

    def _release(self) -> None:
        """Back to unconfigured: the worker stopped, cameras and models freed."""
        self._configured = False
        self.stop()
        for camera in self.cameras:
            camera.destroy()
        self.cameras = []
        if self._bodies is not None:
            self._bodies.destroy()
            self._bodies = None
        self.engine = self.pipeline = self._pose = self._threads = None
        self._pose_state = ""
        gc.collect()  # the models' memory back before a new configure builds again

    def _build_models(self, stop: threading.Event) -> None:
        """Pose (when enabled at start) and segmentation models, built and warmed up on the worker thread that runs
        them. torch's OpenMP pool is per calling thread, and while a second thread that has used it lives, both
        pools' threads contend for the cores: measured on the 2-core machine, 66 instead of 37 ms per frame at the
        top rung when the models were built on the main thread and run on the worker."""
        if self._pose_settings.enable:
            reason = self._build_pose(stop)  # before the segmentation model: bad pose weights fail fast
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
            self._set_internally([Parameter("preset", value="none")])  # not configured yet: callbacks only store it
        self._apply_merge_settings()
        self._set_budget_mode(self.param("budget.mode"))

        self._detection_min_area = int(self.param("detections.min_area"))
        ids, reason = detection_class_ids(self.param("detections.classes"), list(self.engine.labels.classes),
                                          self.engine.labels.person_ids)
        if reason:
            raise StartupError(reason)
        self._detection_class_ids = tuple(ids)
        if self.param("hri.enable"):
            self._bodies = self._make_body_publishers(self, self.engine.labels.person_ids)
        self.cameras = self._create_cameras(topics)
        if not HAVE_VISION_MSGS:
            self.get_logger().warning("vision_msgs is not installed: no segmentation/label_info and no "
                                      "segmentation/detections (apt install ros-jazzy-vision-msgs)")
        for camera in self.cameras:
            camera.tracker = Tracker(self._track_ids, float(self.param("tracking.min_iou")),
                                     int(self.param("tracking.max_age")))
        self._publish_labels()

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
        reason = lifecycle_refusal(values, self.lifecycle_state) or refusal_reason(values, self.param,
                                                                                   self.param("model"))
        if reason:
            return SetParametersResult(successful=False, reason=reason)
        if values.get("pose.enable") is True and self._pose is None and self._configured:
            weights = self.param("pose.weights")
            # the one failure known before building: refuse it now ('random' names no file)
            if weights and weights != RANDOM_WEIGHTS and not os.path.exists(weights):
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
        if "detections.min_area" in names:
            self._detection_min_area = int(self.param("detections.min_area"))
        if "instances.score_threshold" in names and self._configured:
            self.engine.set_instance_score_threshold(float(self.param("instances.score_threshold")))
            self._publish_labels()  # LabelInfo's threshold
        if "engine_max_compiled_rungs" in names and self._configured:
            self._apply_compiled_limit()
        if "threads.adapt" in names and self._threads is not None:
            self._threads.enabled = bool(self.param("threads.adapt")) and self._governs_threads()
        if not self._configured:
            return  # stored: configure reads every parameter
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

    # -- the worker -----------------------------------------------------------------------------------------------
    def _work(self, stop: threading.Event) -> None:
        try:
            self._build_models(stop)
        except BaseException as error:  # noqa: BLE001 - handed to the constructor, which raises it
            self._build_failure = error
            return
        finally:
            self._models_built.set()
        self._setup_done.wait()
        if stop.is_set():
            return
        next_camera = 0
        while True:
            with self.frame_ready:
                while not stop.is_set() and all(c.pending is None for c in self.cameras):
                    self.frame_ready.wait()
                if stop.is_set():
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
                if stop.is_set() or not self.context.ok():
                    return
                self._count_failed(camera, error)
            finally:
                with self.frame_ready:
                    self._in_flight = None
                    self.frame_ready.notify_all()  # deactivate waits for the frame in progress

    def _process(self, camera: Camera, msg) -> None:
        settings = FrameSettings(
            confidence=camera.has_subscribers("confidence"),
            overlay=self._publish_overlay and camera.has_subscribers("overlay"),
            overlay_alpha=self._overlay_alpha,
            markers=camera.has_subscribers("markers"),
            pose=self._pose_settings,  # one snapshot for the whole frame
            detections=camera.has_subscribers(DETECTIONS), track=self._bodies is not None,
            instances=camera.wants_instances(),
            detection_class_ids=self._detection_class_ids, detection_min_area=self._detection_min_area)
        outputs = self.pipeline.process(msg, camera.camera_info, settings, publish=self._publisher(camera),
                                        tracker=camera.tracker)
        if self._bodies is not None and self._active:
            self._bodies.publish(camera.topic, outputs, camera.tracker.live(self.engine.labels.person_ids))
        times = outputs.times
        stamp = outputs.header.stamp
        stamp_ns = stamp.sec * 1_000_000_000 + stamp.nanosec
        latency_ms = (self.get_clock().now().nanoseconds - stamp_ns) / 1e6 if stamp_ns else math.nan
        with self.frame_ready:
            camera.published += 1
            camera.last_merge = times.merge_name
            camera.timings.append(FrameTiming(latency_ms, times.inference_ms, times.processing_ms, times.merge_rate,
                                              times.persons, times.pose_ms, times.decode_ms, times.preprocess_ms,
                                              times.network_ms, times.postprocess_ms, times.publish_ms,
                                              times.instances))
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
                                    self._skip_slow_steps, hold=self._threads.probing)
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
            # after SIGINT or deactivate the frame in progress finishes, but publishes nothing more
            if self._active and self.context.ok():
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

    # -- shutdown -------------------------------------------------------------------------------------------------
    def stop(self, timeout_s: float = STOP_WAIT_S) -> None:
        """Stop the worker and wait for it, so nothing uses the node once it is destroyed: a frame in the middle of
        inference finishes (publishing nothing more)."""
        with self.frame_ready:
            self._stop_event.set()
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
        forward_library_logs(rclpy.logging.get_logger(NODE_NAME))  # before the node: start-up's records too
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
