"""One bag through the node's per-frame path: ``BagProcessor`` (the models and settings, built once from the node's
parameter values) runs ``BagRun`` (every message copied, every camera frame processed, in log-time order) and
returns its ``BagSummary``. ``segmerge-bag IN OUT`` builds one processor for one bag; the fleet's workers build one
each and give it whole bags, one after another.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rclpy.serialization import deserialize_message
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from sensor_msgs.msg import CameraInfo
from std_msgs.msg import Float32

from segmerge_ros.apps.bag_io import (CAMERA_INFO_TYPE, IMAGE_TYPES, LATCHED_QOS, BagError, InputBag, OutputBag)
from segmerge_ros.apps.plots import TimelinePoint
from segmerge_ros.inference.budget import BudgetController, BudgetMode
from segmerge_ros.ros.diagnostics import FailureLog, failure_cause
from segmerge_ros.ros.frame_pipeline import (CONFIDENCE, INSTANCES, INSTANCES_INFO, KEYPOINTS, MARKERS, MASK, OVERLAY, PANOPTIC,
                             PANOPTIC_INFO, BadFrame, FramePipeline, FrameSettings, budget_step)
from segmerge_ros.ros.startup import (apply_merge_settings, build_engine, build_pose, labels_message, model_info,
                      pose_settings)
from segmerge_ros.ros.topics import output_topic

OUTPUT_NAMES = {MASK: "segmentation/mask", CONFIDENCE: "segmentation/confidence", OVERLAY: "segmentation/overlay",
                KEYPOINTS: "pose/keypoints", MARKERS: "pose/markers", INSTANCES: "segmentation/instances",
                INSTANCES_INFO: "segmentation/instances/info", PANOPTIC: "segmentation/panoptic",
                PANOPTIC_INFO: "segmentation/panoptic/info"}
# Everything written per camera: the node's outputs, plus each frame's rate and cost.
CAMERA_OUTPUTS = (*OUTPUT_NAMES.values(), "segmentation/labels", "segmentation/merge_rate",
                  "segmentation/processing_ms")
BAD_FRAMES_SHOWN = 5  # per topic; the rest are counted in the summary


@dataclass
class CameraTally:
    """One camera topic's frames: what happened to them and what each processed one cost."""

    topic: str
    msgtype: str
    frames: int = 0     # image messages read
    processed: int = 0  # frames whose outputs were written
    bad: int = 0        # counted and skipped, as the node does
    failed: int = 0     # raised something other than BadFrame (a bug, out of memory): counted, logged, skipped
    persons: int = 0    # people posed, summed over the frames (with --pose)
    labelled: bool = False  # segmentation/labels written
    bad_reasons: Counter = field(default_factory=Counter)
    failures: Counter = field(default_factory=Counter)
    merges_used: Counter = field(default_factory=Counter)  # "0.45" per ladder rate, the name for a preset
    timeline: list[TimelinePoint] = field(default_factory=list)

    @property
    def processing_ms(self) -> list[float]:
        return [p.processing_ms for p in self.timeline]

    def record(self, time_s: float, times, persons: int = 0) -> None:
        self.processed += 1
        self.persons += persons
        self.timeline.append(TimelinePoint(time_s, times.processing_ms, times.merge_rate))
        rate = times.merge_rate
        self.merges_used[f"{rate:g}" if math.isfinite(rate) else times.merge_name] += 1

    def rates_used(self) -> str:
        def order(key: str):
            try:
                return (0, float(key), "")
            except ValueError:
                return (1, 0.0, key)

        return ", ".join(sorted(self.merges_used, key=order)) or "-"


@dataclass
class BagSummary:
    cameras: dict[str, CameraTally]
    output: Path
    messages_in: int = 0
    messages_out: int = 0
    wall_s: float = 0.0
    budget_ms: float | None = None
    skipped_topics: dict[str, str] = field(default_factory=dict)
    replaced_topics: dict[str, int] = field(default_factory=dict)
    error: str = ""  # why reading stopped early (a damaged bag), or ""
    backend: str = ""  # the backend that ran, and why (backend auto's choice)

    @property
    def processed(self) -> int:
        return sum(c.processed for c in self.cameras.values())

    @property
    def bad(self) -> int:
        return sum(c.bad for c in self.cameras.values())

    @property
    def failed(self) -> int:
        return sum(c.failed for c in self.cameras.values())

    def total(self, count: str) -> int:
        """A ``CameraTally`` count (``frames``, ``persons``, ...) summed over the cameras."""
        return sum(getattr(c, count) for c in self.cameras.values())

    def problems(self) -> list[str]:
        """What makes the run a failure (exit status 1), one sentence each; empty when all went well."""
        problems = []
        if self.error:
            problems.append(f"{self.error}; {self.output} holds what came before it")
        if self.failed:
            problems.append(f"{self.failed} frame(s) failed (see above); the others were written")
        if self.processed == 0:
            reasons = "; ".join(r for t in self.cameras.values() for r in t.bad_reasons) or "no image messages"
            problems.append(f"no frame could be processed: {reasons}")
        return problems


class BagRun:
    """One pass over IN: every message copied to OUT, every camera frame through the node's frame path."""

    def __init__(self, source: InputBag, out: OutputBag, cameras: list[str], pipeline: FramePipeline,
                 settings: FrameSettings, model_info: dict, budget: BudgetController | None,
                 console: Console, skip_slow_steps: bool = True):
        self.source, self.out, self.pipeline, self.settings = source, out, pipeline, settings
        self.model_info = model_info
        self.budget = budget
        self.skip_slow_steps = skip_slow_steps  # budget.skip_slow_steps
        self.console = console
        types = source.topic_types()
        self.tallies = {topic: CameraTally(topic, types[topic]) for topic in cameras}
        # <ns>/camera_info -> the camera reading it; the latest message applies, as live.
        self.info_topics = {output_topic(topic, "camera_info"): topic for topic in cameras
                            if types.get(output_topic(topic, "camera_info")) == CAMERA_INFO_TYPE}
        self.camera_info: dict[str, CameraInfo] = {}
        self.failures = FailureLog()
        self.start_ns = source.reader.start_time
        self.summary = BagSummary(self.tallies, out.path, budget_ms=budget.target_ms if budget else None)

    def run(self, progress: Progress) -> BagSummary:
        task = progress.add_task("frames", total=self.source.count(self.tallies), fps="")
        started = time.perf_counter()
        try:
            for connection, log_time_ns, raw in self.source.messages():
                self.summary.messages_in += 1
                self.out.copy(connection, log_time_ns, raw)
                topic = connection.topic
                if topic in self.info_topics:
                    self._read_camera_info(topic, raw)
                tally = self.tallies.get(topic)
                if tally is None:
                    continue
                self._frame(tally, log_time_ns, raw)
                done = sum(t.frames for t in self.tallies.values())
                elapsed = time.perf_counter() - started
                progress.update(task, completed=done, fps=f"{done / elapsed:.1f} fps" if elapsed > 0 else "")
        except BagError as error:
            self.summary.error = str(error)  # what was read so far is processed and written; OUT stays valid
        finally:
            self.summary.wall_s = time.perf_counter() - started
            engine = self.pipeline.engine
            choice = engine.backend_choice
            self.summary.backend = f"{engine.backend}, {engine.precision_plan}" + (f" (auto: {choice.reason})" if choice else "")
            self.summary.skipped_topics = dict(self.out.skipped_topics)
            self.summary.replaced_topics = {t: n for t, n in self.out.replaced.items() if n}
            self.summary.messages_out = self.out.written
        return self.summary

    def _read_camera_info(self, topic: str, raw: bytes) -> None:
        try:
            self.camera_info[self.info_topics[topic]] = deserialize_message(raw, CameraInfo)
        except Exception as error:  # noqa: BLE001 - rclpy raises its own RMWError on bad CDR
            self.console.print(f"segmerge-bag: {topic}: skipped an unreadable CameraInfo ({error})")

    def _frame(self, tally: CameraTally, log_time_ns: int, raw: bytes) -> None:
        tally.frames += 1
        try:
            msg = deserialize_message(raw, IMAGE_TYPES[tally.msgtype])
        except Exception as error:  # noqa: BLE001 - rclpy raises its own RMWError on bad CDR
            self._bad(tally, log_time_ns, f"cannot deserialize the {tally.msgtype} ({error})")
            return

        def write(kind: str, message) -> None:  # as the node publishes: each message as soon as it is built
            if not tally.labelled:  # latched, as the node's: once, before the camera's first output
                self._write_labels(tally.topic, log_time_ns)
                tally.labelled = True
            self.out.write(output_topic(tally.topic, OUTPUT_NAMES[kind]), message, log_time_ns)

        try:
            outputs = self.pipeline.process(msg, self.camera_info.get(tally.topic), self.settings, publish=write)
        except BadFrame as bad:
            self._bad(tally, log_time_ns, str(bad))
            return
        except Exception as error:  # noqa: BLE001 - as the node: a failing frame is counted and logged, not fatal
            tally.failed += 1
            tally.failures[failure_cause(error)] += 1
            text = self.failures.record(f"{tally.topic} frame {tally.frames}", error)
            if text:
                self.console.print(f"segmerge-bag: {text}", markup=False, highlight=False)
            return
        times = outputs.times
        tally.record((log_time_ns - self.start_ns) / 1e9, times,
                     persons=len(outputs.pose.keypoints) if outputs.pose is not None else 0)
        self.out.write(output_topic(tally.topic, "segmentation/merge_rate"), Float32(data=times.merge_rate),
                       log_time_ns)
        self.out.write(output_topic(tally.topic, "segmentation/processing_ms"), Float32(data=times.processing_ms),
                       log_time_ns)
        if self.budget is not None:
            budget_step(self.budget, self.pipeline.engine, times.processing_ms, times.merge_rate,
                        self.skip_slow_steps)

    def _write_labels(self, topic: str, log_time_ns: int) -> None:
        message = labels_message(self.pipeline.engine.labels, self.model_info,
                                 output_topic(topic, "segmentation/mask"))
        self.out.write(output_topic(topic, "segmentation/labels"), message, log_time_ns, qos=LATCHED_QOS)

    def _bad(self, tally: CameraTally, log_time_ns: int, reason: str) -> None:
        tally.bad += 1
        tally.bad_reasons[reason] += 1
        if tally.bad <= BAD_FRAMES_SHOWN:
            self.console.print(f"segmerge-bag: {tally.topic}: skipped bad frame {tally.frames} "
                               f"(log time {log_time_ns / 1e9:.3f} s): {reason}", markup=False, highlight=False)
        if tally.bad == BAD_FRAMES_SHOWN:
            self.console.print(f"segmerge-bag: {tally.topic}: further bad frames are only counted", markup=False)



class BagProcessor:
    """The engine, pose estimator and frame settings of the node parameter ``values`` (``bag.node_values``), built
    once (slow: model loading and warm-up); ``process`` runs one bag with them. Each bag starts as the tool started on
    it alone: at the configured merge setting, with a new budget controller and frame pipeline (budget replay is per
    bag), so a bag's outputs do not depend on the bags processed before it."""

    def __init__(self, values: dict, console: Console):
        self.values, self.console = values, console
        param = values.__getitem__  # the node's start-up code reads its parameters through this
        self.engine = build_engine(param, self.warn)
        self.pose = build_pose(param, self.warn) if values["pose.enable"] else None
        # Every output is written (live, the node builds confidence, overlay and markers only for subscribers).
        self.settings = FrameSettings(confidence=True, overlay=values["publish_overlay"],
                                      overlay_alpha=values["overlay_alpha"], markers=True, pose=pose_settings(param))
        self.model_info = model_info(param, self.engine)

    def warn(self, message: str) -> None:
        self.console.print(f"segmerge-bag: {message}", markup=False, highlight=False)

    def process(self, source: InputBag, cameras: list[str], output: str | Path, storage: str,
                progress: Progress) -> BagSummary:
        """``source``'s cameras through the node's frame path into the new bag ``output``; what was written stays
        valid (the bag is closed) however the run ends, Ctrl-C included."""
        values = self.values
        param = values.__getitem__
        pipeline = FramePipeline(self.engine, self.pose, warn=self.warn)
        apply_merge_settings(self.engine, param)
        budget = None
        if values["budget.mode"] != BudgetMode.OFF.value:
            budget = BudgetController(mode=values["budget.mode"],
                                      target_latency_ms=values["budget.target_latency_ms"],
                                      min_rate=values["budget.min_merge_rate"],
                                      max_rate=values["budget.max_merge_rate"], levels=self.engine.ladder_rates or None)
        produced = {output_topic(camera, name) for camera in cameras for name in CAMERA_OUTPUTS}
        out = OutputBag(output, storage, source, replaced=produced & set(source.topic_types()))
        try:
            bag_run = BagRun(source, out, cameras, pipeline, self.settings, self.model_info, budget, self.console,
                             skip_slow_steps=values["budget.skip_slow_steps"])
            return bag_run.run(progress)
        finally:
            out.close()  # also after Ctrl-C: OUT then holds the frames processed so far


def progress_bar(console: Console) -> Progress:
    """Frames, fps and ETA on a terminal; nothing when stderr is a file or a pipe (logs, CI)."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[fps]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    console=console, disable=not console.is_terminal, transient=False)
