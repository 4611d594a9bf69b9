"""OpenMP's wait policy, calm and under load: the engine's network per setting, one fresh process per setting.

    python -m segmerge_ros.bench.bench_wait_policy --weights ../shared/data/segformer_b0_vtest_student \\
        --size 576x768 --settings default,passive,3000,10000,30000 --runs 2

libgomp reads its wait policy once, when torch loads it, so every setting runs in a process of its own, started
with that environment: ``default`` (libgomp's own spin, ``SEGMERGE_THREADS=default``), ``passive``
(``OMP_WAIT_POLICY=PASSIVE``: sleep at once) or a number (``GOMP_SPINCOUNT``: spin that long, then sleep; the
package's choice is ``inference/threads.py``'s). Each process times the network (the engine's ``network_ms``) at
the top and the bottom rate, calm and with ``--busy`` busy processes; settings alternate over ``--runs`` rounds.
Prints the median over runs per setting, and the ratio to ``default`` calm. Timing only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ENVIRONMENT = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "SEGMERGE_THREADS")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="segmerge-bench-wait-policy", description=__doc__.split("\n")[0])
    parser.add_argument("--weights", default="", help="checkpoint (default: random weights)")
    parser.add_argument("--size", default="576x768", help="the engine's input size HxW")
    parser.add_argument("--settings", default="default,passive,10000", help="comma-separated: default, passive, N")
    parser.add_argument("--rates", default="0.9,0", help="merge rates, comma-separated")
    parser.add_argument("--busy", type=int, default=2, help="busy processes for the loaded timings")
    parser.add_argument("--frames", type=int, default=12, help="frames timed per rate and load")
    parser.add_argument("--runs", type=int, default=2, help="rounds over the settings")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def environment(setting: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ENVIRONMENT}
    if setting == "default":
        env["SEGMERGE_THREADS"] = "default"
    elif setting == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    else:
        env["GOMP_SPINCOUNT"] = str(int(setting))
    return env


def child(args: argparse.Namespace) -> int:
    """One setting: times the network per (load, rate) and prints them as JSON."""
    import cv2  # after the environment is in place: torch loads with the engine
    import numpy as np

    from segmerge_ros.bench.bench_node import busy_processes
    from segmerge_ros.inference.engine import SegmentationEngine, parse_size
    from segmerge_ros.inference.sources import default_video, iter_frames

    size = parse_size(args.size)
    video = default_video()
    frames = ([cv2.resize(f, (size[1], size[0])) for f, _ in zip(iter_frames(str(video)), range(6))]
              if video else [np.random.default_rng(i).integers(0, 255, (*size, 3), np.uint8) for i in range(6)])
    engine = SegmentationEngine(weights=args.weights or None, input_size=size)
    result = {}
    for load in (0, args.busy):
        busy = busy_processes(load)
        try:
            time.sleep(0.5)
            for rate in (float(r) for r in args.rates.split(",")):
                engine.set_merge_rate(rate)
                engine.infer(frames[0])
                times = [engine.infer(frames[i % len(frames)]).network_ms for i in range(args.frames)]
                result[f"{load}/{rate:g}"] = statistics.median(times)
        finally:
            for process in busy:
                process.kill()
        time.sleep(0.5)
    print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args)
    from segmerge_ros.bench.bench_node import cpu_description

    settings = args.settings.split(",")
    runs: dict[str, list[dict]] = {setting: [] for setting in settings}
    forwarded = ["--weights", args.weights, "--size", args.size, "--rates", args.rates, "--busy", str(args.busy),
                 "--frames", str(args.frames), "--child"]
    for _ in range(args.runs):
        for setting in settings:
            out = subprocess.run([sys.executable, "-m", "segmerge_ros.bench.bench_wait_policy", *forwarded],
                                 env=environment(setting), capture_output=True, text=True, check=True)
            runs[setting].append(json.loads(out.stdout.strip().splitlines()[-1]))
    keys = list(runs[settings[0]][0])
    medians = {s: {k: statistics.median(run[k] for run in runs[s]) for k in keys} for s in settings}
    print(f"network ms (median over {args.runs} runs of {args.frames}-frame medians), engine at {args.size}, "
          f"busy/rate; {cpu_description()}")
    print(f"{'setting':<10} " + " ".join(f"{k:>9}" for k in keys)
          + ("   calm x default" if "default" in medians else ""))
    for setting in settings:
        line = f"{setting:<10} " + " ".join(f"{medians[setting][k]:>9.1f}" for k in keys)
        if "default" in medians:
            calm = [k for k in keys if k.startswith("0/")]
            line += "   " + " ".join(f"{medians[setting][k] / medians['default'][k]:.2f}" for k in calm)
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
