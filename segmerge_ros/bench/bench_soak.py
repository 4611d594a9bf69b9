"""The node's resident memory over a soak with two cameras, one of which changes resolution halfway.

    python -m segmerge_ros.bench.bench_soak --weights ../shared/data/segformer_b0_vtest_student --seconds 360

The node runs with its defaults (``backend``/``precision`` auto) and pose on, at most 4 people; camera A sends
576x768 rgb8, camera B 360x480 JPEG, both at 10 fps from vtest; halfway camera B switches to 288x384. This process
reads the node's VmRSS from /proc every few seconds and prints it per phase: models loaded, both sizes running, the
third size running, and the end (the size B left unseen for a minute is freed by then). ``--param name=value``
(repeatable) sets other node parameters, e.g. ``--param engine_max_compiled_rungs=0`` for the unbounded ladder.
Memory only: nothing is asserted.
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
from pathlib import Path

import rclpy
from rclpy.context import Context

from segmerge_ros.inference.sources import default_video
from segmerge_ros.apps.client import SegmergeClient, camera_command, node_command, ros_env, stop_process, with_fastdds_profile
from segmerge_ros.bench.bench_memory import rss_mb
from segmerge_ros.bench.bench_node import cpu_description
from segmerge_ros.bench.common import node_param_overrides

CAMERA_A, CAMERA_B = "/soak_a/image", "/soak_b/image"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="segmerge-bench-soak", description=__doc__.split("\n")[0])
    parser.add_argument("--weights", required=True, help="segmentation checkpoint (or 'random')")
    parser.add_argument("--seconds", type=float, default=360.0, help="soak length; camera B switches halfway")
    parser.add_argument("--sample-s", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--param", action="append", default=[], help="name=value for the node (JSON value)")
    parser.add_argument("--source", default=None, help="video (default vtest.avi)")
    parser.add_argument("--cache-dir", default=None, help="engine_cache_dir (default: the node's)")
    parser.add_argument("--domain", type=int, default=141)
    parser.add_argument("--json", default=None)
    return parser.parse_args(argv)


def node_params(args) -> dict:
    params = {"image_topics": [CAMERA_A, CAMERA_B + "/compressed"], "weights": args.weights, "pose.enable": True,
              "pose.max_persons": 4, "engine_cache_dir": args.cache_dir or ""}
    return {**params, **node_param_overrides(args.param)}


def soak(args) -> dict:
    env, _, _ = with_fastdds_profile(ros_env(args.domain))
    source = args.source or str(default_video())
    context = Context()
    rclpy.init(context=context, domain_id=args.domain)
    client = SegmergeClient(context, name="bench_soak_client")
    log = tempfile.NamedTemporaryFile("w+", prefix="segmerge_bench_soak_", suffix=".log", delete=False)
    node = subprocess.Popen(node_command(node_params(args)), env=env, stdout=log, stderr=subprocess.STDOUT)
    cameras: list[subprocess.Popen] = []
    samples: list[tuple[float, str, float]] = []  # (seconds since the cameras started, phase, RSS MB)

    def camera(topic: str, size: str, encoding: str) -> subprocess.Popen:
        return subprocess.Popen(camera_command({"source": source, "fps": 10, "topic": topic, "resize": size,
                                                "loop": True, "encoding": encoding}),
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    try:
        client.wait_ready(600.0, node)
        loaded = rss_mb(node.pid)
        cameras = [camera(CAMERA_A, "576x768", "rgb8"), camera(CAMERA_B, "360x480", "jpeg")]
        start = time.monotonic()
        switched = False
        while (elapsed := time.monotonic() - start) < args.seconds:
            if not switched and elapsed >= args.seconds / 2:
                stop_process(cameras.pop(), signal.SIGINT)
                cameras.append(camera(CAMERA_B, "288x384", "jpeg"))
                switched = True
            client.spin_for(args.sample_s)
            if node.poll() is not None:
                raise RuntimeError(f"the node exited with status {node.returncode}; see {log.name}")
            samples.append((time.monotonic() - start, "after" if switched else "before", rss_mb(node.pid)))
        window_a, window_b = client.latest(CAMERA_A), client.latest(CAMERA_B + "/compressed")
        diagnostics = {name: (w.values if w else {}) for name, w in (("a", window_a), ("b", window_b))}
    finally:
        for process in cameras:
            stop_process(process, signal.SIGINT)
        stop_process(node, signal.SIGINT, timeout_s=10.0)
        client.close()
        rclpy.try_shutdown(context=context)
    return {"loaded_mb": loaded, "samples": samples, "diagnostics": diagnostics, "log": log.name}


def summarise(result: dict, seconds: float) -> list[tuple[str, float]]:
    """Median RSS per phase: the last quarter before the switch (both sizes), the first 30 s after the switch (third
    size beside them), and the last quarter of the soak (a minute and more after the switch)."""
    half = seconds / 2
    def median(low: float, high: float) -> float:
        values = [rss for t, _, rss in result["samples"] if low <= t < high]
        return statistics.median(values) if values else float("nan")
    return [("models loaded", result["loaded_mb"]),
            ("both sizes (last quarter before the switch)", median(half / 2, half)),
            ("third size (30 s after the switch)", median(half, half + 30)),
            ("end (last quarter)", median(seconds - seconds / 4, seconds + 1)),
            ("peak", max(rss for _, _, rss in result["samples"]))]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if (args.source or default_video()) is None:
        raise SystemExit("segmerge-bench-soak: no video found; pass --source")
    result = soak(args)
    print(f"\nthe node's VmRSS (MB); cameras 576x768 rgb8 + 360x480 JPEG -> 288x384 at {args.seconds / 2:.0f} s, "
          f"pose on; {cpu_description()}; parameters {json.dumps(node_params(args))}")
    for phase, value in summarise(result, args.seconds):
        print(f"{phase:<46} {value:8.0f}")
    for name, values in result["diagnostics"].items():
        shown = {k: values.get(k) for k in ("backend", "precision_plan", "compiled_rungs", "rung_recompiles", "threads",
                                             "processing_p50_ms") if k in values}
        print(f"camera {name}: {shown}")
    print(f"node log: {result['log']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
