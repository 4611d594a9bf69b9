"""End-to-end speed per rung and backend: the real node with a camera process over DDS, against the network alone.

    python -m segmerge_ros.bench.bench_node --weights ../shared/data/segformer_b0_vtest_student --size 576x768 \\
        --configs eager:fp32,openvino:bf16 --rates 0,0.45,0.9

For each backend:precision the node runs (input at the camera's resolution, raw rgb8 frames from ``segmerge_camera``
with the package's Fast DDS profile) while this process sets ``merge_rate`` through the parameter service and reads
``processing_ms`` (decode + inference + publishing: what budget mode controls) and ``inference_ms`` (pre-processing +
network + post-processing) from /diagnostics. Then the same engine runs in this process on the same frames,
round-robin over the rates: the network alone (``network ms``) and, right after it on the same frame, the engine's
whole path (``engine ms``): their difference is pre- and post-processing, measured under the same load. The table gives medians and the knob's authority: processing time at the lowest rate
over that at the highest, in the node and for the network alone, and their ratio. Timing only: nothing is asserted.
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
import zlib
from pathlib import Path

import cv2
import numpy as np
import rclpy
import torch
from rclpy.context import Context

from segmerge_ros.inference.engine import SegmentationEngine, network_config, parse_size
from segmerge_ros.inference.sources import default_video, iter_frames
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
    parser.add_argument("--repeat", type=int, default=7, help="network-only timed calls per rate")
    parser.add_argument("--json", default=None)
    return parser.parse_args(argv)


def measure_node(args, backend: str, precision: str, rates: list[float], domain: int) -> dict[float, dict]:
    size = parse_size(args.size)
    params = {"image_topics": [CAMERA], "weights": args.weights, "model": args.model, "backend": backend,
              "input_size": f"{size[0]}x{size[1]}",
              "precision": precision, "engine_cache_dir": args.cache_dir or "", "merge_rate": rates[0]}
    env, _, _ = with_fastdds_profile(ros_env(domain))
    source = args.source or str(default_video())
    context = Context()
    rclpy.init(context=context, domain_id=domain)
    client = SegmergeClient(context, name="bench_node_client")
    log = tempfile.NamedTemporaryFile("w+", prefix="segmerge_bench_node_", suffix=".log", delete=False)
    node = subprocess.Popen(node_command(params), env=env, stdout=log, stderr=subprocess.STDOUT)
    camera = None
    results: dict[float, dict] = {}
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
        for rate in rates:
            client.set_parameters({"merge_rate": rate})
            client.spin_for(3.0)  # the first windows after a change may hold frames of the rate before
            since = time.monotonic()
            client.spin_for(args.seconds)
            windows = [w for w in client.windows_after(CAMERA, since) if w.number("processing_ms") > 0]
            if not windows:
                log.flush()
                tail = Path(log.name).read_text()[-3000:]
                raise RuntimeError(f"no frames processed at rate {rate} ({backend}:{precision}); the node said:\n{tail}")
            results[rate] = {
                "processing_ms": statistics.median(w.number("processing_ms") for w in windows),
                "inference_ms": statistics.median(w.number("inference_ms") for w in windows),
                "windows": len(windows),
            }
    finally:
        if camera is not None:
            stop_process(camera, signal.SIGINT)
        stop_process(node, signal.SIGINT, timeout_s=10.0)
        client.close()
        rclpy.try_shutdown(context=context)
    return results


def measure_network(args, backend: str, precision: str, rates: list[float], frames: list[np.ndarray]) -> dict:
    """The network alone (pixels in, logits out) per rate, on the same frames, round-robin over the rates."""
    engine = SegmentationEngine(model=args.model, weights=args.weights or None, backend=backend, precision=precision,
                                input_size=args.size, cache_dir=args.cache_dir)
    inputs = {}
    for rate in rates:
        engine.set_merge_rate(rate)
        step = engine._step
        pixels = [engine._network_input(frame, step.config) for frame in frames]
        inputs[rate] = (engine._backends[step.precision], network_config(step.config), pixels, step.name)
    times: dict[float, list[float]] = {rate: [] for rate in rates}
    whole: dict[float, list[float]] = {rate: [] for rate in rates}
    with torch.inference_mode():
        for index in range(args.repeat + 1):
            for rate, (backend_, config, pixels, _) in inputs.items():
                start = time.perf_counter()
                backend_.run(pixels[index % len(pixels)], config)
                network_ms = (time.perf_counter() - start) * 1e3
                engine.set_merge_rate(rate)  # the engine's whole path on the same frame, right after
                # as in the node, where nobody subscribes to the confidence map here
                engine_ms = engine.infer(frames[index % len(frames)], confidence=False).inference_ms
                if index:  # the first round warms up
                    times[rate].append(network_ms)
                    whole[rate].append(engine_ms)
    return {rate: {"network_ms": statistics.median(times[rate]), "engine_ms": statistics.median(whole[rate]),
                   "step": inputs[rate][3]} for rate in rates}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A terminated benchmark still stops the node and the camera it started (measure_node's finally).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    rates = [float(v) for v in args.rates.split(",")]
    size = parse_size(args.size)
    source = args.source or default_video()
    if source is None:
        raise SystemExit("segmerge-bench-node: no video found; pass --source")
    frames = [cv2.resize(frame, (size[1], size[0])) for frame in iter_frames(source, max_frames=8)]
    rows = []
    for index, pair in enumerate(args.configs.split(",")):
        backend, precision = pair.split(":")
        domain = 150 + (zlib.crc32(pair.encode()) + index) % 50
        node = measure_node(args, backend, precision, rates, domain)
        network = measure_network(args, backend, precision, rates, frames)
        for rate in rates:
            rows.append({"backend": backend, "precision": precision, "rate": rate, **network[rate], **node[rate]})
        low, high = rates[0], rates[-1]
        node_authority = node[low]["processing_ms"] / node[high]["processing_ms"]
        network_authority = network[low]["network_ms"] / network[high]["network_ms"]
        rows[-1]["authority"] = {"node": node_authority, "network": network_authority,
                                 "ratio": node_authority / network_authority,
                                 "pre_post_share_at_top": 1 - network[high]["network_ms"] / network[high]["engine_ms"]}
        print(f"{pair}: done", file=sys.stderr)
    print(f"\nnode end to end at {size[0]}x{size[1]}, camera rgb8 at {args.fps:g} fps, {torch.get_num_threads()} threads")
    print("in this process, round-robin: network ms (network alone), engine ms (pre + network + post on the same "
          "frame); in the node: inference ms (pre + network + post), processing ms (decode + inference + publish)")
    print(f"{'backend':<9} {'prec':<5} {'rate':>5} {'step':<30} {'network ms':>10} {'engine ms':>9} {'pre+post %':>10} "
          f"{'node inference ms':>17} {'node processing ms':>18}")
    for row in rows:
        share = 100 * (row["engine_ms"] - row["network_ms"]) / row["engine_ms"]
        print(f"{row['backend']:<9} {row['precision']:<5} {row['rate']:>5g} {row['step']:<30} {row['network_ms']:>10.1f} "
              f"{row['engine_ms']:>9.1f} {share:>10.0f} {row['inference_ms']:>17.1f} {row['processing_ms']:>18.1f}")
        if "authority" in row:
            a = row["authority"]
            print(f"{'':<9} authority (rate {rates[0]:g} / rate {rates[-1]:g}): node {a['node']:.2f}x, network alone "
                  f"{a['network']:.2f}x, node/network {100 * a['ratio']:.0f} %")
    if args.json:
        Path(args.json).write_text(json.dumps({"size": list(size), "fps": args.fps, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
