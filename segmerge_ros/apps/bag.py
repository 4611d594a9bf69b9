"""segmerge-bag: the node's per-frame path over a recorded rosbag2; the outputs are written into a new bag.

    segmerge-bag IN OUT [--topics T ...] [--model M] [--weights W] [--input-size HxW] [--backend B] [--precision P]
                 [--merge-rate R | --preset P | --budget-ms X] [--pose] [--overlay] [--plot FILE.png]

IN is a rosbag2 folder (``metadata.yaml`` with ``.mcap`` or ``.db3`` files) or a bare ``.mcap``/``.db3`` file. OUT
is a new rosbag2 folder (MCAP; ``--storage sqlite3`` for ``.db3``) holding every input topic unchanged and, for each
camera ``<ns>/<name>``, what the node publishes for it: ``<ns>/segmentation/{mask,confidence,labels}``, ``overlay``
with ``--overlay``, ``<ns>/pose/keypoints`` (and ``markers`` where ``<ns>/camera_info`` is recorded) with ``--pose``,
plus ``<ns>/segmentation/merge_rate`` and ``processing_ms`` (std_msgs/Float32, per frame: the rate it ran with and
what it cost). Each output has its input's header and is written at its input's log time, so playback lines them
up. Every frame is processed, in log-time order (none dropped, unlike live); bad frames are counted and skipped.

Messages go through rclpy: raw CDR -> ``deserialize_message`` -> the node's frame path -> ``serialize_message``.
``rosbags`` only reads and writes the bag files (both storage formats, with the standard message definitions).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from rclpy.serialization import deserialize_message, serialize_message
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rosbags.highlevel import AnyReader
from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime
from rosbags.rosbag2 import StoragePlugin, Writer, WriterError
from rosbags.typesys import Stores, get_typestore
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import Float32

from segmerge_ros.inference.budget import BudgetController, BudgetMode
from segmerge_ros.apps.plots import TimelinePoint, plot_bag_timeline
from segmerge_ros.ros.topics import output_topic
from segmerge_ros.apps.demo import percentile
from segmerge_ros.ros.diagnostics import FailureLog, failure_cause
from segmerge_ros.ros.frame_pipeline import (CONFIDENCE, INSTANCES, INSTANCES_INFO, KEYPOINTS, MARKERS, MASK, OVERLAY, PANOPTIC,
                             PANOPTIC_INFO, BadFrame, FramePipeline, FrameSettings, budget_step)
from segmerge_ros.ros.parameter_policy import startup_refusal, topics_refusal
from segmerge_ros.ros.params import DEFAULTS, SPECS
from segmerge_ros.ros.startup import (StartupError, apply_merge_settings, build_engine, build_pose, labels_message, model_info,
                      pose_settings)

IMAGE_TYPES = {"sensor_msgs/msg/Image": Image, "sensor_msgs/msg/CompressedImage": CompressedImage}
CAMERA_INFO_TYPE = "sensor_msgs/msg/CameraInfo"
STORAGES = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}
# Output message definitions and type hashes: the ROS 2 Jazzy ones (equal to what rosidl installs, tested).
OUTPUT_TYPESTORE = get_typestore(Stores.ROS2_JAZZY)
_NO_TIME = QosTime(sec=0, nsec=0)
# Played back, the labels topic is latched as the node's is, so a late RViz still gets the palette.
LATCHED_QOS = Qos(history=QosHistory.KEEP_LAST, depth=1, reliability=QosReliability.RELIABLE,
                  durability=QosDurability.TRANSIENT_LOCAL, deadline=_NO_TIME, lifespan=_NO_TIME,
                  liveliness=QosLiveliness.AUTOMATIC, liveliness_lease_duration=_NO_TIME,
                  avoid_ros_namespace_conventions=False)
OUTPUT_NAMES = {MASK: "segmentation/mask", CONFIDENCE: "segmentation/confidence", OVERLAY: "segmentation/overlay",
                KEYPOINTS: "pose/keypoints", MARKERS: "pose/markers", INSTANCES: "segmentation/instances",
                INSTANCES_INFO: "segmentation/instances/info", PANOPTIC: "segmentation/panoptic",
                PANOPTIC_INFO: "segmentation/panoptic/info"}
# Everything written per camera: the node's outputs, plus each frame's rate and cost.
CAMERA_OUTPUTS = (*OUTPUT_NAMES.values(), "segmentation/labels", "segmentation/merge_rate",
                  "segmentation/processing_ms")
BAD_FRAMES_SHOWN = 5  # per topic; the rest are counted in the summary


class BagError(Exception):
    """Input the tool cannot work with; the message says what and how to fix it (shown without a traceback)."""


def ros_type_name(message) -> str:
    """``sensor_msgs/msg/Image`` for a sensor_msgs.msg.Image instance or class."""
    cls = message if isinstance(message, type) else type(message)
    return f"{cls.__module__.split('.')[0]}/msg/{cls.__name__}"


# -- reading ------------------------------------------------------------------------------------------------------
class InputBag:
    """A rosbag2 (folder, bare .mcap or bare .db3), opened with rosbags; messages come as raw CDR in log-time order."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise BagError(f"input bag {self.path} does not exist")
        if self.path.is_dir() and not (self.path / "metadata.yaml").is_file():
            files = sorted(p.name for p in self.path.iterdir() if p.suffix in (".mcap", ".db3"))
            hint = (f"; it holds {', '.join(files)}: pass that file itself" if files
                    else "; give a rosbag2 folder, or a .mcap or .db3 file")
            raise BagError(f"{self.path} has no metadata.yaml{hint}")
        if self.path.is_file() and self.path.suffix not in (".mcap", ".db3"):
            raise BagError(f"{self.path}: not a rosbag2 (expected a folder with metadata.yaml, or a .mcap or .db3 "
                           "file)")
        # Bags without embedded definitions (older .db3) fall back to the standard ROS 2 ones.
        self.reader = AnyReader([self.path], default_typestore=OUTPUT_TYPESTORE)
        try:
            self.reader.open()
        except Exception as error:  # noqa: BLE001 - rosbags, apsw, lz4, zstd: whatever a damaged file raises
            raise BagError(damaged_message(self.path, error)) from None

    @property
    def connections(self):
        return self.reader.connections

    def topic_types(self) -> dict[str, str]:
        return {c.topic: c.msgtype for c in self.connections}

    def count(self, topics) -> int:
        return sum(c.msgcount for c in self.connections if c.topic in topics)

    def messages(self) -> Iterator[tuple[object, int, bytes]]:
        """Every message as (connection, log time ns, raw CDR); damage found on the way raises BagError."""
        iterator = self.reader.messages()
        while True:
            try:
                item = next(iterator)
            except StopIteration:
                return
            except Exception as error:  # noqa: BLE001 - only reading happens here (our processing is outside)
                raise BagError(damaged_message(self.path, error)) from None
            yield item

    def close(self) -> None:
        self.reader.close()


def damaged_message(path: Path, error: Exception) -> str:
    return (f"cannot read {path}: the bag is truncated or corrupt ({type(error).__name__}: {error}). A recording "
            "cut off mid-write can often be repaired: `ros2 bag reindex` (.db3) or `mcap recover` (.mcap)")


def select_cameras(topic_types: dict[str, str], wanted: list[str] | None) -> list[str]:
    """The image topics to process: ``wanted`` (each checked to be an image topic of the bag), else every image
    topic, a raw topic taking precedence over its own ``/compressed`` (both are one camera, with one output)."""
    images = {topic: msgtype for topic, msgtype in topic_types.items() if msgtype in IMAGE_TYPES}
    if wanted:
        for topic in wanted:
            if topic not in topic_types:
                listing = ", ".join(sorted(images)) or "none"
                raise BagError(f"topic {topic} is not in the bag; its image topics: {listing}")
            if topic not in images:
                raise BagError(f"topic {topic} is a {topic_types[topic]}, not a sensor_msgs/Image or CompressedImage")
        topics = list(dict.fromkeys(wanted))
    else:
        if not images:
            listing = ", ".join(f"{t} ({m})" for t, m in sorted(topic_types.items())) or "no topics at all"
            raise BagError(f"no sensor_msgs/Image or CompressedImage topic in the bag: {listing}")
        topics = [t for t in sorted(images) if not (t.endswith("/compressed") and t[: -len("/compressed")] in images)]
    topics, reason = topics_refusal(topics)  # the node's own check: two cameras must not share their outputs
    if reason:
        raise BagError(f"{reason}; choose the cameras with --topics")
    return topics


# -- writing ------------------------------------------------------------------------------------------------------
class OutputBag:
    """OUT: the input's connections copied as they are, plus output topics added on first use."""

    def __init__(self, path: str | Path, storage: str, source: InputBag, replaced: set[str]):
        """``replaced``: input topics this run writes anew (outputs recorded earlier, e.g. with the node running);
        their recorded messages are left out, so each output topic holds one run's messages."""
        self.path = Path(path)
        check_output_path(self.path, storage)
        self.writer = Writer(self.path, version=Writer.VERSION_LATEST, storage_plugin=STORAGES[storage])
        try:
            self.writer.open()
        except (WriterError, OSError) as error:
            raise BagError(f"cannot create {self.path}: {error}") from None
        self.source = source
        self.replaced = {topic: 0 for topic in sorted(replaced)}  # topic -> recorded messages left out
        self._copies: dict[int, object] = {}  # input connection id -> output connection
        self._outputs: dict[str, object] = {}  # output topic -> connection
        self.skipped_topics: dict[str, str] = {}
        self.written = 0

    def copy(self, connection, log_time_ns: int, raw: bytes) -> None:
        """An input message, unchanged."""
        if connection.topic in self.replaced:
            self.replaced[connection.topic] += 1
            return
        out = self._copies.get(connection.id)
        if out is None:
            if connection.topic in self.skipped_topics:
                return
            out = self._copy_connection(connection)
            if out is None:
                return
        self.writer.write(out, log_time_ns, raw)
        self.written += 1

    def _copy_connection(self, connection):
        for out in self._copies.values():  # split bags repeat a connection per file
            if (out.topic, out.msgtype) == (connection.topic, connection.msgtype):
                self._copies[connection.id] = out
                return out
        msgdef, digest = connection.msgdef.data, connection.digest
        if not msgdef or not digest:
            typestore = self.source.reader.typestore
            try:
                msgdef = msgdef or typestore.generate_msgdef(connection.msgtype, ros_version=2)[0]
                digest = digest or typestore.hash_rihs01(connection.msgtype)
            except Exception as error:  # noqa: BLE001 - the type is unknown: keep going without this topic
                self.skipped_topics[connection.topic] = f"no definition of {connection.msgtype} ({error})"
                return None
        out = self.writer.add_connection(connection.topic, connection.msgtype, msgdef=msgdef, rihs01=digest,
                                         serialization_format=connection.ext.serialization_format,
                                         offered_qos_profiles=connection.ext.offered_qos_profiles)
        self._copies[connection.id] = out
        return out

    def write(self, topic: str, message, log_time_ns: int, qos: Qos | None = None) -> None:
        """An rclpy message, serialized with rclpy."""
        out = self._outputs.get(topic)
        if out is None:
            out = self.writer.add_connection(topic, ros_type_name(message), typestore=OUTPUT_TYPESTORE,
                                             offered_qos_profiles=[qos] if qos else ())
            self._outputs[topic] = out
        self.writer.write(out, log_time_ns, serialize_message(message))
        self.written += 1

    def close(self) -> None:
        self.writer.close()


def check_output_path(path: Path, storage: str) -> None:
    if path.exists():
        raise BagError(f"output {path} exists already: give a new path (a rosbag2 folder is created there)")
    if path.suffix in (".mcap", ".db3"):
        raise BagError(f"output {path}: give a folder name (like `ros2 bag record -o`); the "
                       f"{'.db3' if storage == 'sqlite3' else '.mcap'} file is created inside it")


# -- the run ------------------------------------------------------------------------------------------------------
@dataclass
class CameraTally:
    """One camera topic's frames: what happened to them and what each processed one cost."""

    topic: str
    msgtype: str
    frames: int = 0     # image messages read
    processed: int = 0  # frames whose outputs were written
    bad: int = 0        # counted and skipped, as the node does
    failed: int = 0     # raised something other than BadFrame (a bug, out of memory): counted, logged, skipped
    labelled: bool = False  # segmentation/labels written
    bad_reasons: Counter = field(default_factory=Counter)
    failures: Counter = field(default_factory=Counter)
    merges_used: Counter = field(default_factory=Counter)  # "0.45" per ladder rate, the name for a preset
    timeline: list[TimelinePoint] = field(default_factory=list)

    @property
    def processing_ms(self) -> list[float]:
        return [p.processing_ms for p in self.timeline]

    def record(self, time_s: float, times) -> None:
        self.processed += 1
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
        tally.record((log_time_ns - self.start_ns) / 1e9, times)
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


# -- the command --------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="segmerge-bag", description=__doc__.split("\n\n")[0])
    parser.add_argument("input", metavar="IN", help="rosbag2 folder (metadata.yaml + .mcap/.db3), or a .mcap or .db3")
    parser.add_argument("output", metavar="OUT", help="new rosbag2 folder to write (must not exist)")
    parser.add_argument("--topics", nargs="+", default=None, metavar="T",
                        help="camera topics to process (default: every Image/CompressedImage topic; a raw topic "
                             "wins over its own /compressed)")
    parser.add_argument("--storage", choices=tuple(STORAGES), default="mcap", help="OUT's storage (default mcap)")
    for name in ("model", "weights", "device", "backend", "precision", "input_size", "engine_cache_dir"):
        parser.add_argument("--" + name.replace("_", "-"), default=DEFAULTS[name], help=_short(SPECS[name]))
    merge = parser.add_mutually_exclusive_group()
    merge.add_argument("--merge-rate", type=float, default=None, help=_short(SPECS["merge_rate"]))
    merge.add_argument("--preset", default=None, help=_short(SPECS["preset"]))
    merge.add_argument("--budget-ms", type=float, default=None,
                       help="budget mode (latency): each frame's merge rate chosen from the measured processing "
                            "times to meet this many ms per frame, as the node does live")
    parser.add_argument("--pose", action="store_true", help="human pose keypoints (pose/keypoints, and pose/markers "
                        "where camera_info is recorded)")
    parser.add_argument("--pose-weights", default=DEFAULTS["pose.weights"], help=_short(SPECS["pose.weights"]))
    parser.add_argument("--pose-mode", default=DEFAULTS["pose.mode"], help=_short(SPECS["pose.mode"]))
    parser.add_argument("--overlay", action="store_true", help="also write segmentation/overlay (rgb8)")
    parser.add_argument("--plot", default=None, metavar="FILE.png",
                        help="plot per-frame processing time and merge rate over the bag")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return parser.parse_args(argv)


def _short(spec) -> str:
    return spec.description.split(". ")[0].rstrip(".") + f" (default {spec.default!r})"


def node_values(args: argparse.Namespace) -> dict:
    """The node parameters these options amount to (the node's defaults for the rest)."""
    values = dict(DEFAULTS)
    for name in ("model", "weights", "device", "backend", "precision", "input_size", "engine_cache_dir"):
        values[name] = getattr(args, name)
    if args.merge_rate is not None:
        values["merge_rate"] = args.merge_rate
    if args.preset is not None:
        values["preset"] = args.preset
    if args.budget_ms is not None:
        values["budget.mode"] = BudgetMode.LATENCY.value
        values["budget.target_latency_ms"] = args.budget_ms
    values["pose.enable"] = bool(args.pose)
    values["pose.weights"] = args.pose_weights
    values["pose.mode"] = args.pose_mode
    values["publish_overlay"] = bool(args.overlay)
    return values


def check_values(values: dict) -> None:
    """Refuse what the node would refuse at start-up, with its reasons."""
    reason = startup_refusal(values)
    for name, spec in SPECS.items():  # ranges: rclpy checks them for the node
        if reason is None and spec.float_range is not None:
            low, high = spec.float_range
            if not low <= values[name] <= high:
                reason = f"{name} must lie in [{low:g}, {high:g}]; got {values[name]:g}"
    if reason:
        raise BagError(reason)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``segmerge-bag``; returns the exit code (0: frames processed, 1: an error, said on stderr)."""
    args = parse_args(argv)
    err = Console(stderr=True, soft_wrap=True)  # messages stay whole lines in logs
    try:
        summary = run(args, err)
    except (BagError, StartupError) as error:
        err.print(f"segmerge-bag: error: {error}", markup=False, highlight=False)
        return 1
    except KeyboardInterrupt:
        held = f"; {args.output} holds the frames processed so far" if Path(args.output).exists() else ""
        err.print(f"segmerge-bag: interrupted{held}", markup=False, highlight=False)
        return 130
    print_summary(summary, Console(width=None if sys.stdout.isatty() else 160, soft_wrap=True))
    if args.plot and summary.processed:
        path = plot_bag_timeline({t.topic: t.timeline for t in summary.cameras.values()}, args.plot,
                                 target_ms=summary.budget_ms, title=f"segmerge-bag {Path(args.input).name}")
        err.print(f"segmerge-bag: wrote {path}", markup=False, highlight=False)
    problems = []
    if summary.error:
        problems.append(f"{summary.error}; {summary.output} holds what came before it")
    if summary.failed:
        problems.append(f"{summary.failed} frame(s) failed (see above); the others were written")
    if summary.processed == 0:
        reasons = "; ".join(r for t in summary.cameras.values() for r in t.bad_reasons) or "no image messages"
        problems.append(f"no frame could be processed: {reasons}")
    for problem in problems:
        err.print(f"segmerge-bag: error: {problem}", markup=False, highlight=False)
    return 1 if problems else 0


def run(args: argparse.Namespace, console: Console) -> BagSummary:
    """Check everything cheap first (bag, topics, options, OUT), then load the models and go over the bag."""
    values = node_values(args)
    check_values(values)
    check_output_path(Path(args.output), args.storage)  # before the slow model load
    if args.threads:
        torch.set_num_threads(args.threads)
    source = InputBag(args.input)
    try:
        cameras = select_cameras(source.topic_types(), args.topics)
        warn = lambda message: console.print(f"segmerge-bag: {message}", markup=False, highlight=False)  # noqa: E731
        param = values.__getitem__  # the node's start-up code reads its parameters through this
        engine = build_engine(param, warn)
        pose = build_pose(param, warn) if values["pose.enable"] else None
        pipeline = FramePipeline(engine, pose, warn=warn)
        apply_merge_settings(engine, param)
        budget = None
        if values["budget.mode"] != BudgetMode.OFF.value:
            budget = BudgetController(mode=values["budget.mode"],
                                      target_latency_ms=values["budget.target_latency_ms"],
                                      min_rate=values["budget.min_merge_rate"],
                                      max_rate=values["budget.max_merge_rate"], levels=engine.ladder_rates or None)
        # Every output is written (live, the node builds confidence, overlay and markers only for subscribers).
        settings = FrameSettings(confidence=True, overlay=values["publish_overlay"],
                                 overlay_alpha=values["overlay_alpha"], markers=True, pose=pose_settings(param))
        info = model_info(param, engine)
        produced = {output_topic(camera, name) for camera in cameras for name in CAMERA_OUTPUTS}
        out = OutputBag(args.output, args.storage, source, replaced=produced & set(source.topic_types()))
        try:
            bag_run = BagRun(source, out, cameras, pipeline, settings, info, budget, console,
                             skip_slow_steps=values["budget.skip_slow_steps"])
            with progress_bar(console) as progress:
                return bag_run.run(progress)
        finally:
            out.close()  # also after Ctrl-C: OUT then holds the frames processed so far
    finally:
        source.close()


def progress_bar(console: Console) -> Progress:
    """Frames, fps and ETA on a terminal; nothing when stderr is a file or a pipe (logs, CI)."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[fps]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    console=console, disable=not console.is_terminal, transient=False)


def print_summary(summary: BagSummary, console: Console) -> None:
    table = Table(title=f"segmerge-bag -> {summary.output}", title_justify="left")
    for heading in ("topic", "type", "frames", "processed", "bad", "failed", "proc p50 ms", "proc p90 ms",
                    "merge rates used"):
        table.add_column(heading, justify="left" if heading in ("topic", "type", "merge rates used") else "right")
    for tally in summary.cameras.values():
        ms = tally.processing_ms
        table.add_row(tally.topic, tally.msgtype.rsplit("/", 1)[-1], str(tally.frames), str(tally.processed),
                      str(tally.bad), str(tally.failed), f"{percentile(ms, 50):.1f}", f"{percentile(ms, 90):.1f}",
                      tally.rates_used())
    console.print(table)
    fps = summary.processed / summary.wall_s if summary.wall_s > 0 else math.nan
    console.print(f"{summary.messages_in} messages read, {summary.messages_out} written; {summary.processed} frames "
                  f"processed in {summary.wall_s:.1f} s ({fps:.1f} fps)", markup=False, highlight=False)
    if summary.backend:
        console.print(f"backend: {summary.backend}", markup=False, highlight=False)
    if summary.budget_ms is not None:
        ms = [m for t in summary.cameras.values() for m in t.processing_ms]
        console.print(f"budget {summary.budget_ms:g} ms per frame: processing p50 {percentile(ms, 50):.1f} ms "
                      f"({percentile(ms, 50) / summary.budget_ms - 1:+.0%})", markup=False, highlight=False)
    for tally in summary.cameras.values():
        for reason, count in tally.bad_reasons.most_common():
            console.print(f"bad frames on {tally.topic}: {count} x {reason}", markup=False, highlight=False)
        for cause, count in tally.failures.most_common():
            console.print(f"failed frames on {tally.topic}: {count} x {cause} (traceback above)", markup=False,
                          highlight=False)
    for topic, count in summary.replaced_topics.items():
        console.print(f"replaced: {topic}: {count} recorded message(s) left out, this run's written instead",
                      markup=False, highlight=False)
    for topic, reason in summary.skipped_topics.items():
        console.print(f"not copied: {topic}: {reason}", markup=False, highlight=False)


if __name__ == "__main__":
    sys.exit(main())
