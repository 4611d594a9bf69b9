"""Budget mode on a CPU whose load comes and goes: does the node hold its latency target, and give merging back?

    python -m segmerge_ros.bench.bench_budget --weights ../shared/data/segformer_b0_vtest_student --size 576x768

The node runs with its defaults on JPEG camera frames (``--fps``, the camera's resolution), first unmerged with
budget mode off to measure its calm unmerged processing time; the target is ``--target-share`` of that. Budget mode
(latency) is then switched on while a burst of ``--busy`` busy processes runs (``--burst-s``: calibration under a
load that then goes away), followed by phases: calm, busy, calm (``--phases``). For each phase, the median over its
last ``--tail-s`` seconds of what the node timed itself (/diagnostics: processing p50 and p90, merge rate, threads)
and whether processing is within ``--tolerance`` of the target. Timing only: nothing is asserted; the verdict lines
say whether the node met each phase's target and moved its merge rate up under load and down after.

``--cameras`` runs several cameras (``HxW:encoding`` each, e.g. ``576x768:rgb8,360x480:jpeg``), ``--pose-weights``
switches pose on (segmentation mode, ``--max-persons``), ``--target-ms`` fixes the target instead of measuring it.
Rows are per phase and camera; the people posed and budget mode's cap on them (``pose_people_cap``) come from the
node's diagnostics too:

    python -m segmerge_ros.bench.bench_budget --weights ../shared/data/segformer_b0_vtest_student --backend openvino \\
        --cameras 576x768:rgb8,360x480:jpeg --pose-weights ../shared/data/segformer_pose_b0_vtest_student/pose.pth \\
        --target-ms 250 --busy 0 --burst-s 0 --phases calm:40
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import rclpy
from rclpy.context import Context

from segmerge_ros.apps.client import SegmergeClient, camera_command, node_command, ros_env, stop_process, with_fastdds_profile
from segmerge_ros.bench.bench_node import busy_processes, cpu_description
from segmerge_ros.bench.common import node_param_overrides
from segmerge_ros.inference.engine import parse_size
from segmerge_ros.inference.sources import default_video

DOMAIN = 211


@dataclass(frozen=True)
class CameraSpec:
    name: str
    size: tuple[int, int]
    encoding: str  # rgb8 | jpeg

    @property
    def topic(self) -> str:  # what the camera publishes on (JPEG goes to <topic>/compressed)
        return f"/{self.name}/image"

    @property
    def input(self) -> str:  # what the node subscribes to, and its diagnostics' hardware id
        return self.topic + "/compressed" if self.encoding == "jpeg" else self.topic


def parse_cameras(text: str, size: str) -> list[CameraSpec]:
    specs = text.split(",") if text else [f"{size}:jpeg"]
    cameras = []
    for index, spec in enumerate(specs):
        shape, _, encoding = spec.partition(":")
        if encoding not in ("rgb8", "jpeg"):
            raise SystemExit(f"segmerge-bench-budget: camera {spec!r}: encoding must be rgb8 or jpeg")
        cameras.append(CameraSpec(f"budget_cam{index}", parse_size(shape), encoding))
    return cameras


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="segmerge-bench-budget", description=__doc__.split("\n")[0])
    parser.add_argument("--weights", default="", help="checkpoint (default: random weights)")
    parser.add_argument("--model", default="segformer-b0")
    parser.add_argument("--backend", default="eager")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--size", default="576x768", help="camera resolution HxW (one JPEG camera)")
    parser.add_argument("--cameras", default="", help="instead of --size: HxW:rgb8|jpeg per camera, comma-separated")
    parser.add_argument("--fps", type=float, default=10.0, help="each camera's frame rate")
    parser.add_argument("--source", default=None, help="video (default vtest.avi)")
    parser.add_argument("--pose-weights", default="", help="pose checkpoint: pose on (segmentation mode)")
    parser.add_argument("--max-persons", type=int, default=4, help="pose.max_persons with --pose-weights")
    parser.add_argument("--busy", type=int, default=2, help="busy processes in the burst and the busy phases")
    parser.add_argument("--target-share", type=float, default=0.8, help="target = this x calm unmerged processing")
    parser.add_argument("--target-ms", type=float, default=0.0, help="a fixed target instead (ms)")
    parser.add_argument("--burst-s", type=float, default=4.0, help="busy burst while budget mode switches on")
    parser.add_argument("--phases", default="calm:50,busy:60,calm:45", help="phase:seconds, comma-separated")
    parser.add_argument("--tail-s", type=float, default=18.0, help="each phase is judged on its last seconds")
    parser.add_argument("--tolerance", type=float, default=0.15, help="allowed share above or below the target")
    parser.add_argument("--domain", type=int, default=DOMAIN, help=f"ROS_DOMAIN_ID (default {DOMAIN})")
    parser.add_argument("--param", action="append", default=[],
                        help="name=value for the node (JSON value), repeatable, e.g. engine_max_compiled_rungs=0")
    parser.add_argument("--json", default=None)
    return parser.parse_args(argv)


def tail_stats(windows, since: float) -> dict:
    chosen = [w for w in windows if w.time >= since and w.number("processing_p50_ms") > 0]
    if not chosen:
        raise RuntimeError("no diagnostics window with processed frames in the phase's tail")

    def median(key: str) -> float:
        return statistics.median(w.number(key) for w in chosen)

    return {"processing_ms": median("processing_p50_ms"), "processing_p90_ms": median("processing_p90_ms"),
            "network_ms": median("network_p50_ms"), "pose_ms": median("pose_ms"), "persons": median("persons"),
            "merge_rate": median("merge_rate"), "threads": chosen[-1].values.get("threads", "?"),
            "pose_people_cap": chosen[-1].values.get("pose_people_cap", "?"),
            "cpu_others_cores": median("cpu_others_cores"), "windows": len(chosen),
            "rung_recompiles": chosen[-1].values.get("rung_recompiles", "?")}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    cameras = parse_cameras(args.cameras, args.size)
    phases = [(name, float(seconds)) for name, seconds in (p.split(":") for p in args.phases.split(","))]
    source = args.source or default_video()
    if source is None:
        raise SystemExit("segmerge-bench-budget: no video found; pass --source")
    params = {"image_topics": [camera.input for camera in cameras], "weights": args.weights or "random",
              "model": args.model, "backend": args.backend, "precision": args.precision, "merge_rate": 0.0}
    if len(cameras) == 1:
        params["input_size"] = "{}x{}".format(*cameras[0].size)  # else each camera at its own resolution
    if args.pose_weights:
        params.update({"pose.enable": True, "pose.weights": args.pose_weights, "pose.mode": "segmentation",
                       "pose.max_persons": args.max_persons})
    params.update(node_param_overrides(args.param))
    env, _, _ = with_fastdds_profile(ros_env(args.domain))
    context = Context()
    rclpy.init(context=context, domain_id=args.domain)
    client = SegmergeClient(context, name="bench_budget_client")
    log = tempfile.NamedTemporaryFile("w+", prefix="segmerge_bench_budget_", suffix=".log", delete=False)
    node = subprocess.Popen(node_command(params), env=env, stdout=log, stderr=subprocess.STDOUT)
    publishers, busy, rows = [], [], []
    try:
        client.wait_ready(600.0, node)
        for camera in cameras:
            publishers.append(subprocess.Popen(
                camera_command({"source": str(source), "fps": args.fps, "topic": camera.topic,
                                "resize": "{}x{}".format(*camera.size), "loop": True, "encoding": camera.encoding}),
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

        def flowing() -> bool:
            return all((client.latest(c.input) is not None and client.latest(c.input).number("processing_ms") > 0)
                       for c in cameras)

        if not client.spin_until(flowing, 180.0):
            raise RuntimeError(f"the node processed no frame of some camera within 180 s; log: {log.name}")
        client.spin_for(3.0)
        since = time.monotonic()
        client.spin_for(8.0)
        # budget mode controls each frame's processing: the unmerged cost is the slowest camera's
        calm_unmerged = max(tail_stats(client.windows_after(c.input, since), since)["processing_ms"] for c in cameras)
        target = args.target_ms or args.target_share * calm_unmerged
        print(f"calm unmerged processing {calm_unmerged:.1f} ms -> target {target:.1f} ms", file=sys.stderr)
        busy = busy_processes(args.busy) if args.burst_s > 0 else []
        client.set_parameters({"budget.target_latency_ms": target, "budget.mode": "latency"})
        client.spin_for(args.burst_s)
        for process in busy:
            process.kill()
        busy = []
        for name, seconds in phases:
            busy = busy_processes(args.busy) if name == "busy" else []
            start = time.monotonic()
            client.spin_for(seconds)
            tail = time.monotonic() - args.tail_s
            for camera in cameras:
                stats = tail_stats(client.windows_after(camera.input, start), tail)
                within = abs(stats["processing_ms"] / target - 1) <= args.tolerance
                rows.append({"phase": name, "seconds": seconds, "camera": camera.input, **stats, "target_ms": target,
                             "within": within})
            for process in busy:
                process.kill()
            busy = []
            print(f"{name} {seconds:g} s: done", file=sys.stderr)
    finally:
        for process in busy:
            process.kill()
        for publisher in publishers:
            stop_process(publisher, signal.SIGINT)
        stop_process(node, signal.SIGINT, timeout_s=10.0)
        client.close()
        rclpy.try_shutdown(context=context)
    report(args, cameras, rows, target, calm_unmerged)
    return 0


def report(args, cameras: list[CameraSpec], rows: list[dict], target: float, calm_unmerged: float) -> None:
    described = ", ".join("{}x{} {}".format(*c.size, c.encoding) for c in cameras)
    pose = f"pose on (at most {args.max_persons} people)" if args.pose_weights else "pose off"
    print(f"\nbudget mode (latency) on the node, {args.backend}, cameras {described} at {args.fps:g} fps, {pose}; "
          f"{cpu_description()}")
    origin = "fixed" if args.target_ms else f"{args.target_share:g} x calm unmerged {calm_unmerged:.1f} ms"
    print(f"target {target:.1f} ms ({origin}); switched on during a {args.burst_s:g}-s burst of {args.busy} busy "
          f"processes; each phase judged on its last {args.tail_s:g} s (medians of the node's 1-s diagnostics windows)")
    print(f"{'phase':<6} {'s':>4} {'camera':<28} {'proc p50':>8} {'proc p90':>8} {'network':>8} {'pose':>6} "
          f"{'people':>6} {'cap':>11} {'x target':>8} {'rate':>5} {'thr':>3} {'others':>6} {'recompiles':>10} "
          f"within {100 * args.tolerance:g} %")
    for row in rows:
        print(f"{row['phase']:<6} {row['seconds']:>4g} {row['camera']:<28} {row['processing_ms']:>8.1f} "
              f"{row['processing_p90_ms']:>8.1f} {row['network_ms']:>8.1f} {row['pose_ms']:>6.1f} {row['persons']:>6.1f} "
              f"{row['pose_people_cap']:>11} {row['processing_ms'] / target:>8.2f} {row['merge_rate']:>5.2f} "
              f"{row['threads']:>3} {row['cpu_others_cores']:>6.2f} {row['rung_recompiles']:>10} "
              f"{'yes' if row['within'] else 'NO'}")
    first = [row for row in rows if row["camera"] == cameras[0].input]
    rates = [row["merge_rate"] for row in first]
    loaded = [i for i, row in enumerate(first) if row["phase"] == "busy"]
    up = all(rates[i] > rates[i - 1] for i in loaded if i > 0)
    down = all(rates[i + 1] < rates[i] for i in loaded if i + 1 < len(first))
    print(f"every phase within {100 * args.tolerance:g} % of the target: "
          f"{'yes' if all(r['within'] for r in rows) else 'no'}; rate higher under load than calm before: "
          f"{'yes' if up else 'no'}; lower again after: {'yes' if down else 'no'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_description(), "target_ms": target,
                                               "calm_unmerged_ms": calm_unmerged, "rows": rows}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
