"""Per-frame time and page faults with the engine's memory setting (``inference/memory.py``) and with glibc's defaults.

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


if __name__ == "__main__":
    raise SystemExit(main())
