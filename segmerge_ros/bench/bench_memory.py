"""Memory: per-frame time and page faults with the engine's malloc setting (``inference/memory.py``) against
glibc's defaults, and (``segmerge-bench --memory``, ``ladder_memory``) what a whole ladder costs in RAM per backend
and precision.

    python -m segmerge_ros.bench.bench_memory --weights ../shared/data/segformer_b0_vtest_student --size 576x768

The setting is process-wide and taken once, so each measurement is a fresh process (``--rounds`` of them per
setting and rate, alternating, since a shared machine drifts): ``engine.infer`` on frames of ``--source``, the
median time and minor page faults per frame after a warm-up. Prints each round and the medians over rounds.
Timing only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

SETTINGS = {"kept": {}, "glibc default": {"SEGMERGE_MALLOC": "default"}}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_memory", description=__doc__.split("\n")[0])
    parser.add_argument("--weights", default="", help="SegFormer checkpoint (default: random weights)")
    parser.add_argument("--size", default="576x768", help="camera resolution HxW (the network's input size too)")
    parser.add_argument("--rates", default="0,0.9", help="merge rates")
    parser.add_argument("--rounds", type=int, default=3, help="processes per setting and rate")
    parser.add_argument("--frames", type=int, default=25, help="frames per process (the first 5 warm up)")
    parser.add_argument("--source", default=None, help="video (default vtest.avi)")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # one process's measurement
    # one process's ladder RSS (segmerge-bench --memory): the model, then these
    parser.add_argument("--ladder-rss", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="eager", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--engine-cache-dir", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def measure(args: argparse.Namespace) -> dict:
    import resource
    import time

    import cv2

    from segmerge_ros.inference.engine import SegmentationEngine, parse_size
    from segmerge_ros.inference.memory import keep_freed_memory
    from segmerge_ros.inference.sources import default_video, iter_frames

    size = parse_size(args.size)
    engine = SegmentationEngine(weights=args.weights or None, input_size=size)
    engine.set_merge_rate(float(args.rates))
    source = args.source or str(default_video())
    frames = [cv2.resize(frame, (size[1], size[0])) for frame, _ in zip(iter_frames(source), range(5))]
    times, faults = [], []
    for index in range(args.frames):
        before, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        engine.infer(frames[index % len(frames)])
        times.append((time.perf_counter() - start) * 1e3)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return {"ms": statistics.median(times[5:]), "faults": statistics.median(faults[5:]),
            "malloc": keep_freed_memory()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args)))
        return 0
    if args.ladder_rss:
        print(json.dumps(measure_ladder(args.ladder_rss, args.weights, args.backend, args.precision, args.size,
                                        args.engine_cache_dir)))
        return 0
    results: dict[tuple[str, str], list[dict]] = {}
    for rate in args.rates.split(","):
        for _ in range(args.rounds):
            for name, env in SETTINGS.items():
                command = [sys.executable, "-m", "segmerge_ros.bench.bench_memory", "--measure", "--rates", rate,
                           "--size", args.size, "--frames", str(args.frames), "--weights", args.weights]
                if args.source:
                    command += ["--source", args.source]
                done = subprocess.run(command, capture_output=True, text=True, check=True,
                                      env={**os.environ, **env})
                row = json.loads(done.stdout.strip().splitlines()[-1])
                results.setdefault((rate, name), []).append(row)
                print(f"rate {rate:<5} {name:<14} {row['ms']:7.1f} ms {row['faults']:8.0f} page faults/frame "
                      f"(malloc: {row['malloc']})", flush=True)
    print(f"\n{'rate':<6} {'setting':<14} {'median ms':>9} {'page faults/frame':>17} {'vs glibc default':>16}")
    for rate in args.rates.split(","):
        baseline = statistics.median(r["ms"] for r in results[(rate, "glibc default")])
        for name in SETTINGS:
            rows = results[(rate, name)]
            ms = statistics.median(r["ms"] for r in rows)
            print(f"{rate:<6} {name:<14} {ms:9.1f} {statistics.median(r['faults'] for r in rows):17.0f} "
                  f"{baseline / ms:15.2f}x")
    return 0



# --- segmerge-bench --memory: what a whole ladder costs in RAM ------------------------------------------------------


def rss_mb(pid: int | str = "self") -> float:
    """The resident set (VmRSS) of process ``pid`` (default: this one), MB; NaN where /proc is missing or the
    process is gone."""
    try:
        for line in open(f"/proc/{pid}/status", encoding="ascii"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def measure_ladder(model: str, weights: str, backend: str, precision: str, size: str, cache_dir: str | None) -> dict:
    """RSS after loading the model, and after preparing and running every step of its ladder once (one process)."""
    import numpy as np

    from segmerge_ros.inference.engine import SegmentationEngine, parse_size

    shape = parse_size(size)
    before = rss_mb()
    engine = SegmentationEngine(model, weights or None, backend=backend, precision=precision, input_size=shape,
                                cache_dir=cache_dir, warm=False)
    loaded = rss_mb()
    frame = np.zeros((*shape, 3), np.uint8)
    for step in engine.ladder:
        engine.set_merge_rate(step.rate)
        engine.infer(frame, calibrate=False)
    return {"model": model, "backend": engine.backend, "precision": precision, "steps": len(engine.ladder),
            "rss_before_mb": before, "rss_model_mb": loaded, "rss_ladder_mb": rss_mb()}


def ladder_memory(args) -> int:
    """``segmerge-bench --memory``: one fresh process per (backend, precision), so each starts from nothing; prints
    RSS with the model loaded and with its whole ladder prepared."""
    from segmerge_ros.bench.common import known_names
    from segmerge_ros.inference.backends.base import PRECISIONS
    from segmerge_ros.inference.backends.registry import BACKEND_NAMES

    rows = []
    for backend in known_names(args.backend, BACKEND_NAMES):
        for precision in known_names(args.precision, PRECISIONS):
            command = [sys.executable, "-m", "segmerge_ros.bench.bench_memory", "--ladder-rss", args.model,
                       "--weights", args.weights or "", "--backend", backend, "--precision", precision,
                       "--size", args.size or "576x768"]
            if args.engine_cache_dir:
                command += ["--engine-cache-dir", args.engine_cache_dir]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{backend}:{precision} failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                return 1
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"RSS of {args.model} at {args.size or '576x768'} (one process per row; MB)")
    print(f"{'backend':<9} {'precision':<9} {'steps':>5} {'python+torch':>12} {'model':>8} {'ladder':>8} {'total':>8}")
    for row in rows:
        print(f"{row['backend']:<9} {row['precision']:<9} {row['steps']:>5} {row['rss_before_mb']:12.0f} "
              f"{row['rss_model_mb'] - row['rss_before_mb']:8.0f} {row['rss_ladder_mb'] - row['rss_model_mb']:8.0f} "
              f"{row['rss_ladder_mb']:8.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
