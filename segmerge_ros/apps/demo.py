"""The ROS demo: the real node and a camera in their own processes over DDS, steered at run time.

    python -m segmerge_ros.apps.demo [--source VIDEO] [--weights DIR] [--out out/demo]

1. starts ``segmerge_node`` (the trained SegFormer-B0 from the shared data when present, else random weights with a
   warning) and ``segmerge_camera`` (real video: the shared vtest.avi, Debian's opencv-doc copy, or --source),
   which publishes raw rgb8 frames; both run with config/fastdds.xml unless FASTRTPS_DEFAULT_PROFILES_FILE is set;
2. runs unmerged, then sets ``merge_rate`` through the node's parameter service, then switches budget mode on with
   a latency target between the two measured speeds;
3. prints a table (frames in/out, dropped, bad, merge rates used, processing and end-to-end latency against the
   target; with pose, people per frame and pose time) and writes overlays as PNG files.

With the distilled pose student in the shared data (or ``--pose-weights``), pose runs on the people found and the
overlays show their skeletons; ``--pose-weights none`` leaves pose off.

Discovery stays on this host (ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST) on a private ROS_DOMAIN_ID.
The client that drives the node (``client.py``) is the one the integration tests use.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import rclpy
from rclpy.context import Context
from sensor_msgs.msg import Image

from segmerge_ros.inference.sources import default_video, shared_data_dir
from segmerge_ros.ros.startup import StartupError, packaged_pose_weights
from segmerge_ros.apps.client import (FASTDDS_PROFILE_VARIABLE, DiagnosticsWindow, SegmergeClient, camera_command, node_command,
                     ros_env, stop_process, with_fastdds_profile)

STUDENT = "segformer_b0_vtest_student"
POSE_STUDENT = "segformer_pose_b0_vtest_student"
CAMERA_TOPIC = "/demo_cam/image"


# -- the demo ----------------------------------------------------------------------------------------------------
@dataclass
class PhaseReport:
    name: str
    started: float
    ended: float = 0.0
    counters_start: dict[str, float] = field(default_factory=dict)
    counters_end: dict[str, float] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    processing_ms: list[float] = field(default_factory=list)   # diagnostics windows (means over ~1 s)
    rates: list[float] = field(default_factory=list)
    final_rate: float = math.nan
    target: str = ""
    target_ms: float | None = None
    persons: list[float] = field(default_factory=list)   # diagnostics windows: people in the window's last frame
    pose_ms: list[float] = field(default_factory=list)   # diagnostics windows: mean pose time per frame

    def delta(self, key: str) -> int:
        return int(self.counters_end.get(key, 0) - self.counters_start.get(key, 0))


def percentile(values: list[float], q: float) -> float:
    values = sorted(v for v in values if math.isfinite(v))
    if not values:
        return math.nan
    return float(np.percentile(values, q))


def counters(window: DiagnosticsWindow | None) -> dict[str, float]:
    keys = ("frames_in", "frames_out", "dropped_frames", "bad_frames")
    return {k: window.number(k) for k in keys} if window else {k: 0.0 for k in keys}


def default_weights() -> Path | None:
    shared = shared_data_dir()
    folder = shared / STUDENT if shared else None
    return folder if folder and (folder / "model.safetensors").is_file() else None


def default_pose_weights() -> Path | None:
    """The package's own pose student (no shared data needed), else the shared one."""
    try:
        return packaged_pose_weights()
    except StartupError:
        shared = shared_data_dir()
        path = shared / POSE_STUDENT / "pose.pth" if shared else None
        return path if path and path.is_file() else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segmerge-ros-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=None, help="video, image folder or image (default: vtest.avi)")
    parser.add_argument("--weights", default=None,
                        help=f"checkpoint (default: shared data's {STUDENT}; 'none' forces random weights)")
    parser.add_argument("--pose-weights", default=None,
                        help="Segformer++ pose checkpoint (default: the package's student, weights/; 'none': "
                             "pose off)")
    parser.add_argument("--pose-max-persons", type=int, default=3, help="pose.max_persons (default 3)")
    parser.add_argument("--pose-threshold", type=float, default=0.3,
                        help="pose.keypoint_threshold for the overlays (default 0.3, the node's: the package's "
                             "student has calibrated scores)")
    parser.add_argument("--out", default="out/demo", help="folder for overlay PNGs and logs (default out/demo)")
    parser.add_argument("--input-size", default="", help="network input HxW (default: the camera's own size; at "
                        "vtest's 576x768 the merge-rate ladder has authority, at 288x384 fixed costs dominate)")
    parser.add_argument("--encoding", choices=("rgb8", "bgr8", "jpeg"), default="rgb8",
                        help="camera transport (default raw rgb8, with config/fastdds.xml for the node and the camera "
                             "unless FASTRTPS_DEFAULT_PROFILES_FILE is set: with Fast DDS's defaults best-effort raw "
                             "frames above ~0.5 MB are mostly lost; jpeg publishes on <topic>/compressed)")
    parser.add_argument("--resize", default="", help="camera frames HxW (default: the video's own size)")
    parser.add_argument("--fps", type=float, default=10.0, help="camera rate (default 10, vtest's own)")
    parser.add_argument("--phase-seconds", type=float, default=12.0, help="length of each fixed-rate phase")
    parser.add_argument("--budget-seconds", type=float, default=18.0, help="length of each budget phase")
    parser.add_argument("--manual-rate", type=float, default=0.6, help="merge_rate set by hand in phase 2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--domain-id", type=int, default=100 + os.getpid() % 100)
    parser.add_argument("--overlays-per-phase", type=int, default=2)
    return parser


def published_frames(camera_log: Path) -> int | None:
    """The camera's own count ("published N frames"), read from its log."""
    for line in reversed(camera_log.read_text().splitlines()):
        if "published" in line and "frames" in line:
            words = line.split()
            return int(words[words.index("published") + 1])
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    source = Path(args.source) if args.source else default_video()
    if source is None or not source.exists():
        print("no video found: pass --source (or install opencv-doc for vtest.avi)", file=sys.stderr)
        return 2
    weights = None if (args.weights or "").lower() == "none" else (args.weights or default_weights())
    if weights is None:
        print("WARNING: no trained weights found: the node runs a RANDOM model, masks will be noise", file=sys.stderr)
    pose_weights = None if (args.pose_weights or "").lower() == "none" else (args.pose_weights or default_pose_weights())
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.png"):
        old.unlink()

    camera_topic = CAMERA_TOPIC + ("/compressed" if args.encoding == "jpeg" else "")
    # Both processes (and this one, which reads the overlays) use the profile: Fast DDS reads it at start-up, and
    # the writer's shared-memory segment is what carries a raw frame.
    env, profile, chosen_by_user = with_fastdds_profile(ros_env(args.domain_id))
    for name in ("ROS_AUTOMATIC_DISCOVERY_RANGE", FASTDDS_PROFILE_VARIABLE):  # for this process's rclpy
        if name in env:
            os.environ[name] = env[name]
    if profile:
        print(f"demo: Fast DDS profile {profile}" + (" (set by you)" if chosen_by_user else ""))
    elif args.encoding != "jpeg":
        print("WARNING: config/fastdds.xml not found: raw frames above ~0.5 MB are mostly lost with Fast DDS's "
              "defaults; use --encoding jpeg", file=sys.stderr)
    node_params = {"image_topics": [camera_topic], "input_size": args.input_size, "device": args.device,
                   "budget.max_merge_rate": 0.9}
    node_params["weights"] = str(weights) if weights else "random"  # the node refuses empty weights
    if pose_weights:
        node_params.update({"pose.enable": True, "pose.weights": str(pose_weights),
                            "pose.max_persons": args.pose_max_persons, "pose.keypoint_threshold": args.pose_threshold})
    print(f"demo: ROS_DOMAIN_ID={args.domain_id}, source {source} ({args.encoding}, {args.fps:g} fps), weights "
          f"{weights or 'RANDOM'}, pose {pose_weights or 'off'}, input_size {args.input_size or 'camera resolution'}, "
          f"output {out_dir}")

    context = Context()
    rclpy.init(context=context, domain_id=args.domain_id)
    node_log, camera_log = out_dir / "node.log", out_dir / "camera.log"
    with open(node_log, "w") as log:
        node = subprocess.Popen(node_command(node_params), env=env, stdout=log, stderr=subprocess.STDOUT)
    camera = None
    client = SegmergeClient(context, name="segmerge_demo")
    phases: list[PhaseReport] = []
    try:
        started = time.monotonic()
        client.wait_ready(120.0, node)
        print(f"demo: node ready after {time.monotonic() - started:.1f} s")
        masks = client.subscribe_images("/demo_cam/segmentation/mask")
        overlays = client.subscribe_images("/demo_cam/segmentation/overlay", depth=5)
        with open(camera_log, "w") as log:
            camera = subprocess.Popen(
                camera_command({"source": source, "fps": args.fps, "topic": CAMERA_TOPIC, "encoding": args.encoding,
                                "frame_id": "demo_camera", "resize": args.resize, "loop": True}),
                env=env, stdout=log, stderr=subprocess.STDOUT)
        if not client.spin_until(lambda: len(masks) >= 3, 60.0):
            raise RuntimeError(f"no masks arrived within 60 s; see {node_log} and {camera_log}")

        def run_phase(name: str, params: dict[str, Any], seconds: float, target: str = "", target_ms=None):
            results = client.set_parameters(params)
            for pname, result in results.items():
                if not result.successful:
                    raise RuntimeError(f"setting {pname} failed: {result.reason}")
            print(f"demo: phase {len(phases) + 1}, {name}: set {params} through {client.target}/set_parameters")
            phase = PhaseReport(name, time.monotonic(), counters_start=counters(client.latest(camera_topic)),
                                target=target, target_ms=target_ms)
            first_mask = len(masks)
            saved = 0
            save_every = seconds / max(args.overlays_per_phase, 1)
            next_save = phase.started + save_every * 0.75
            while time.monotonic() - phase.started < seconds:
                client.spin_for(0.1)
                if overlays and overlays[-1].msg is not None and time.monotonic() >= next_save \
                        and saved < args.overlays_per_phase:
                    save_overlay(overlays[-1].msg, out_dir / f"{len(phases) + 1}_{slug(name)}_{saved}.png")
                    saved += 1
                    next_save += save_every
            client.spin_for(1.2)  # one more diagnostics window for this phase's counters
            phase.ended = time.monotonic()
            phase.counters_end = counters(client.latest(camera_topic))
            phase.latencies_ms = [m.latency_ms for m in masks[first_mask:]]
            windows = [w for w in client.windows_after(camera_topic, phase.started + 1.0) if w.time <= phase.ended]
            busy = [w for w in windows if w.number("fps") > 0]
            phase.processing_ms = [w.number("processing_ms") for w in busy]
            phase.persons = [w.number("persons") for w in busy if "persons" in w.values]
            phase.pose_ms = [w.number("pose_ms") for w in busy if "pose_ms" in w.values]
            node_targets = [w.number("budget_target_ms") for w in busy if math.isfinite(w.number("budget_target_ms"))]
            if target_ms is not None and node_targets:
                # The node's own per-frame target (in fps mode it also depends on the camera's measured rate).
                phase.target_ms = statistics.median(node_targets)
            phase.rates = sorted({round(w.number("merge_rate"), 3) for w in busy} |
                                 {round(r, 3) for t, r in client.rate_changes if phase.started <= t <= phase.ended})
            phase.final_rate = client.get_parameters("merge_rate")["merge_rate"]
            phases.append(phase)
            return phase

        unmerged = run_phase("unmerged: merge_rate 0", {"merge_rate": 0.0}, args.phase_seconds)
        manual = run_phase(f"manual: merge_rate {args.manual_rate:g}", {"merge_rate": args.manual_rate},
                           args.phase_seconds)
        slow_ms = statistics.median(unmerged.processing_ms or [math.nan])
        fast_ms = statistics.median(manual.processing_ms or [math.nan])
        if not (math.isfinite(slow_ms) and math.isfinite(fast_ms)):
            raise RuntimeError(f"no processing times in the diagnostics; see {node_log}")
        # Tight: between the two measured speeds (achievable by construction) when merging pays here; when it does
        # not (SegFormer-B0 on a CPU), 10 % below unmerged, which nothing reaches: the controller must then keep
        # the least merging instead of merging hard for nothing.
        tight = round((slow_ms + fast_ms) / 2 if fast_ms < 0.9 * slow_ms else 0.9 * slow_ms, 1)
        run_phase(f"budget latency {tight:g} ms", {"budget.target_latency_ms": tight, "budget.mode": "latency"},
                  args.budget_seconds, target=f"{tight:g} ms", target_ms=tight)
        # Demanding when merging pays: a frame period of 60 % of the unmerged time, which only the ladder's upper
        # rungs reach; otherwise generous (a target the unmerged model meets, so budget mode must not merge at all).
        fps = round(1000.0 / (0.6 * slow_ms) if fast_ms < 0.9 * slow_ms else 800.0 / slow_ms, 1)
        run_phase(f"budget fps {fps:g}", {"budget.target_fps": fps, "budget.mode": "fps"}, args.budget_seconds,
                  target=f"{fps:g} fps", target_ms=1000.0 / fps)
        mode_after = client.get_parameters("budget.mode", "merge_rate")
        print(f"demo: at the end the node reports budget.mode={mode_after['budget.mode']}, "
              f"merge_rate={mode_after['merge_rate']:.3f}")
        return 0
    except (RuntimeError, TimeoutError) as error:
        print(f"demo failed: {error}", file=sys.stderr)
        return 1
    finally:
        if camera is not None:
            stop_process(camera)
        took = stop_process(node)
        client.close()
        rclpy.try_shutdown(context=context)
        if phases:
            print_table(phases, pose=bool(pose_weights))
            sent = published_frames(camera_log)
            received = sum(p.delta("frames_in") for p in phases)
            print(f"camera published {sent} frames in all; the node received {received} during the phases.")
            written = sorted(p.name for p in out_dir.glob("*.png"))
            print(f"{len(written)} overlay PNGs in {out_dir}: {', '.join(written)}")
        print(f"demo: node stopped in {took:.2f} s (exit code {node.returncode}); logs: {node_log}, {camera_log}")


def slug(text: str) -> str:
    """'budget latency 172 ms' -> 'budget_latency_172_ms' (safe in file names)."""
    return "_".join("".join(c if c.isalnum() or c == "." else " " for c in text).split())


def save_overlay(msg: Image, path: Path) -> None:
    rgb = np.frombuffer(msg.data, np.uint8).reshape(msg.height, msg.width, 3)
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def print_table(phases: list[PhaseReport], pose: bool = False) -> None:
    header = ("phase", "in", "out", "dropped", "bad", "merge rates used", "final rate", "proc p50", "proc p90",
              "e2e p50", "e2e p90", "target", "proc p50 vs target") + (("persons", "pose p50") if pose else ())
    rows = []
    for p in phases:
        proc50, proc90 = percentile(p.processing_ms, 50), percentile(p.processing_ms, 90)
        versus = f"{(proc50 / p.target_ms - 1) * 100:+.0f} %" if p.target_ms else "-"
        rates = ", ".join(f"{r:g}" for r in p.rates) if len(p.rates) <= 8 else \
            f"{min(p.rates):g}..{max(p.rates):g} ({len(p.rates)} values)"
        target = f"{p.target} = {p.target_ms:.0f} ms" if p.target.endswith("fps") else (p.target or "-")
        rows.append((p.name, str(p.delta("frames_in")), str(p.delta("frames_out")), str(p.delta("dropped_frames")),
                     str(p.delta("bad_frames")), rates, f"{p.final_rate:g}", f"{proc50:.1f}", f"{proc90:.1f}",
                     f"{percentile(p.latencies_ms, 50):.1f}", f"{percentile(p.latencies_ms, 90):.1f}", target,
                     versus) + ((f"{statistics.mean(p.persons):.1f}" if p.persons else "-",
                                 f"{percentile(p.pose_ms, 50):.1f}") if pose else ()))
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = "  ".join("{:<%d}" % w for w in widths)
    print()
    print(line.format(*header))
    print(line.format(*("-" * w for w in widths)))
    for row in rows:
        print(line.format(*row))
    print("\nin/out/dropped/bad: the node's counters during the phase (dropped = replaced in the one-frame slot before "
          "the worker took it).\nproc: node processing per frame (decode + inference + publishing; what budget mode "
          "controls), p50/p90 over 1-s diagnostics windows, ms.\ne2e: now - header.stamp at the demo's subscriber, "
          "per mask, ms (includes waiting for the worker)." + ("\npersons: people per frame (mean over the windows' "
          "last frames); pose p50: pose time per frame (all its people), ms, included in proc." if pose else ""))


if __name__ == "__main__":
    sys.exit(main())
