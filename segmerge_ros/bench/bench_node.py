"""The node end to end, timed from inside itself: per rung, backend, CPU load and thread mechanism.

    python -m segmerge_ros.bench.bench_node --weights ../shared/data/segformer_b0_vtest_student --size 576x768 \\
        --configs eager:fp32,openvino:fp32 --rates 0,0.9 --loads 0,1,2 --variants all,none

For each backend:precision and variant the node runs (input at the camera's resolution, raw rgb8 frames from
``segmerge_camera`` with the package's Fast DDS profile) while this process starts ``--loads`` busy processes beside it,
sets ``merge_rate`` through the parameter service, and reads what the node timed inside itself from /diagnostics:
decode, pre-processing, the network (the backend call alone), post-processing, publishing, and processing p50/p90
(what budget mode controls). Variants switch the thread mechanisms of ``inference/threads.py`` off one at a time:
``spin`` (OpenMP's own spinning wait policy), ``fixed`` (no thread governor), ``none`` (neither). The table gives
medians, each load's slowdown against the calm run, and the knob's authority (processing at the lowest rate over
the highest, in the node and for its network alone). Timing only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import rclpy
from rclpy.context import Context

from segmerge_ros.inference.engine import parse_size
from segmerge_ros.inference.sources import default_video
from segmerge_ros.apps.client import SegmergeClient, camera_command, node_command, ros_env, stop_process, with_fastdds_profile

CAMERA = "/bench_cam/image"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="segmerge-bench-node", description=__doc__.split("\n")[0])
    parser.add_argument("--weights", default="", help="checkpoint (default: random weights)")
    parser.add_argument("--model", default="segformer-b0")
    parser.add_argument("--size", default="576x768", help="camera resolution HxW (the node's input size too)")
    parser.add_argument("--configs", default="eager:fp32,openvino:fp32,openvino:bf16",
                        help="comma-separated backend:precision pairs")
    parser.add_argument("--rates", default="0,0.9", help="merge rates to measure (first = reference, last = top)")
    parser.add_argument("--seconds", type=float, default=8.0, help="measuring time per rate")
    parser.add_argument("--fps", type=float, default=3.0, help="camera frame rate")
    parser.add_argument("--source", default=None, help="video (default vtest.avi)")
    parser.add_argument("--cache-dir", default=None, help="engine_cache_dir for the node and this process")
    parser.add_argument("--loads", default="0", help="busy processes beside the node, e.g. 0,1,2 (first = calm)")
    parser.add_argument("--variants", default="all",
                        help="thread mechanisms, comma-separated: all (default: sleeping OpenMP threads and the thread "
                             "governor), spin (OpenMP's spinning), fixed (no governor), none (neither)")
    parser.add_argument("--domain", type=int, default=None,
                        help="ROS_DOMAIN_ID of the first node (default: 150-199 from the configuration); one per run")
    parser.add_argument("--json", default=None)
    return parser.parse_args(argv)


STAGES = ("decode", "preprocess", "network", "postprocess", "pose", "publish")


def busy_processes(count: int) -> list[subprocess.Popen]:
    """``count`` processes that each keep one core busy: the navigation, SLAM and drivers of a robot's CPU."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def window_stats(windows) -> dict:
    """Medians over diagnostics windows of what the node timed inside itself (each window gives its frames' p50)."""
    def median_of(key: str) -> float:
        values = [w.number(key) for w in windows if math.isfinite(w.number(key))]
        return statistics.median(values) if values else math.nan
    stats = {"processing_ms": median_of("processing_p50_ms"), "processing_p90_ms": median_of("processing_p90_ms"),
             "inference_ms": median_of("inference_ms"), "windows": len(windows),
             "threads": windows[-1].values.get("threads", "?"),
             "cpu_others_cores": median_of("cpu_others_cores")}
    for stage in STAGES:
        stats[f"{stage}_ms"] = median_of("pose_ms" if stage == "pose" else f"{stage}_p50_ms")
    return stats


def measure_node(args, backend: str, precision: str, rates: list[float], domain: int, loads: tuple[int, ...] = (0,),
                 env_extra: dict[str, str] | None = None, params_extra: dict | None = None,
                 settle_s: float = 3.0) -> dict[tuple[int, float], dict]:
    """The node's own timings per (busy processes, merge rate), from /diagnostics."""
    size = parse_size(args.size)
    params = {"image_topics": [CAMERA], "weights": args.weights or "random", "model": args.model, "backend": backend,
              "input_size": f"{size[0]}x{size[1]}",
              "precision": precision, "engine_cache_dir": args.cache_dir or "", "merge_rate": rates[0],
              **(params_extra or {})}
    env, _, _ = with_fastdds_profile(ros_env(domain))
    env.update(env_extra or {})
    source = args.source or str(default_video())
    context = Context()
    rclpy.init(context=context, domain_id=domain)
    client = SegmergeClient(context, name="bench_node_client")
    log = tempfile.NamedTemporaryFile("w+", prefix="segmerge_bench_node_", suffix=".log", delete=False)
    node = subprocess.Popen(node_command(params), env=env, stdout=log, stderr=subprocess.STDOUT)
    camera = None
    busy: list[subprocess.Popen] = []
    results: dict[tuple[int, float], dict] = {}
    try:
        client.wait_ready(600.0, node)
        camera = subprocess.Popen(
            camera_command({"source": source, "fps": args.fps, "topic": CAMERA, "resize": f"{size[0]}x{size[1]}",
                            "loop": True, "encoding": "rgb8"}),
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def flowing() -> bool:
            window = client.latest(CAMERA)
            return window is not None and window.number("processing_ms") > 0

        if not client.spin_until(flowing, 120.0):
            raise RuntimeError(f"the node processed no camera frame within 120 s ({backend}:{precision})")
        for load in loads:
            for process in busy:
                process.kill()
            busy = busy_processes(load)
            for rate in rates:
                client.set_parameters({"merge_rate": rate})
                client.spin_for(settle_s)  # the first windows after a change hold frames of the setting before
                since = time.monotonic()
                client.spin_for(args.seconds)
                windows = [w for w in client.windows_after(CAMERA, since) if w.number("processing_ms") > 0]
                if not windows:
                    log.flush()
                    tail = Path(log.name).read_text()[-3000:]
                    raise RuntimeError(f"no frames processed at rate {rate} with {load} busy processes "
                                       f"({backend}:{precision}); the node said:\n{tail}")
                results[(load, rate)] = window_stats(windows)
    finally:
        for process in busy:
            process.kill()
        if camera is not None:
            stop_process(camera, signal.SIGINT)
        stop_process(node, signal.SIGINT, timeout_s=10.0)
        client.close()
        rclpy.try_shutdown(context=context)
    return results


VARIANTS = {
    # what the node does by default: OpenMP threads sleep while waiting, the thread count re-chosen under load
    "all": ({}, {}),
    "spin": ({"SEGMERGE_THREADS": "default"}, {}),         # OpenMP's own wait policy (spinning)
    "fixed": ({}, {"threads.adapt": False}),                # the thread count torch started with
    "none": ({"SEGMERGE_THREADS": "default"}, {"threads.adapt": False}),
}


def cpu_description() -> str:
    """The CPU model and the flags that decide precision and speed here: every table names where it came from."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    shown = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "avx_vnni") if f in flags]
    return f"{model}, {os.cpu_count()} cores, flags: {' '.join(shown) or 'none of avx2/avx512'}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A terminated benchmark still stops the node, the camera and the busy processes it started (finally clauses).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    rates = [float(v) for v in args.rates.split(",")]
    loads = tuple(int(v) for v in args.loads.split(","))
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"segmerge-bench-node: unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")
    size = parse_size(args.size)
    if (args.source or default_video()) is None:
        raise SystemExit("segmerge-bench-node: no video found; pass --source")
    rows = []
    for index, pair in enumerate(args.configs.split(",")):
        backend, precision = pair.split(":")
        for variant in variants:
            env_extra, params_extra = VARIANTS[variant]
            domain = (150 + (zlib.crc32(f"{pair}/{variant}".encode()) + index) % 50 if args.domain is None
                      else args.domain + len(rows) // max(1, len(rates) * len(loads)))
            node = measure_node(args, backend, precision, rates, domain, loads, env_extra, params_extra)
            for (load, rate), stats in node.items():
                calm = node.get((loads[0], rate), stats)
                rows.append({"backend": backend, "precision": precision, "variant": variant, "load": load,
                             "rate": rate, **stats,
                             "x_calm_p50": stats["processing_ms"] / calm["processing_ms"],
                             "x_calm_p90": stats["processing_p90_ms"] / calm["processing_p90_ms"]})
            print(f"{pair} {variant}: done", file=sys.stderr)
    print(f"\nthe node at {size[0]}x{size[1]}, camera rgb8 at {args.fps:g} fps; {cpu_description()}")
    print("every figure from the node's own /diagnostics (medians over ~1 s windows of each window's per-frame p50 or "
          "p90); load = busy processes beside the node; x calm = processing over the same rate at the first load")
    header = (f"{'backend':<8} {'prec':<4} {'variant':<6} {'load':>4} {'rate':>4} {'thr':>3} {'others':>6} "
              f"{'network':>8} {'pre':>6} {'post':>6} {'publish':>7} {'proc p50':>8} {'proc p90':>8} "
              f"{'x calm p50':>10} {'x calm p90':>10}")
    print(header)
    for row in rows:
        print(f"{row['backend']:<8} {row['precision']:<4} {row['variant']:<6} {row['load']:>4} {row['rate']:>4g} "
              f"{row['threads']:>3} {row['cpu_others_cores']:>6.2f} {row['network_ms']:>8.1f} "
              f"{row['preprocess_ms'] + row['decode_ms']:>6.1f} {row['postprocess_ms']:>6.1f} {row['publish_ms']:>7.1f} "
              f"{row['processing_ms']:>8.1f} {row['processing_p90_ms']:>8.1f} {row['x_calm_p50']:>10.2f} "
              f"{row['x_calm_p90']:>10.2f}")
    for config in sorted({(r["backend"], r["precision"], r["variant"]) for r in rows}):
        calm = {r["rate"]: r for r in rows if (r["backend"], r["precision"], r["variant"]) == config
                and r["load"] == loads[0]}
        low, high = calm.get(rates[0]), calm.get(rates[-1])
        if low and high and len(rates) > 1:
            node_authority = low["processing_ms"] / high["processing_ms"]
            network_authority = low["network_ms"] / high["network_ms"]
            share = 1 - high["network_ms"] / high["processing_ms"]
            print(f"{' '.join(config)}: authority (rate {rates[0]:g} / {rates[-1]:g}) node {node_authority:.2f}x, "
                  f"network {network_authority:.2f}x, node/network {100 * node_authority / network_authority:.0f} %; "
                  f"at rate {rates[-1]:g} processing minus network {100 * share:.0f} % of processing")
    if args.json:
        Path(args.json).write_text(json.dumps({"size": list(size), "fps": args.fps, "cpu": cpu_description(),
                                               "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
