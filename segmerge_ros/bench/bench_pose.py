"""Benchmark the Segformer++ pose path: time per frame and per person, with and without token merging.

Everything runs in one process on one real image with a synthetic person segmentation of N people (boxes laid
side by side), through ``PoseEstimator.estimate`` (crop, one batched forward of all crops, decode, map back).
Configurations are interleaved round by round so that load from other processes hits them alike. Reported per
configuration: the median and the minimum wall time (``PoseResult.pose_ms``) and the median process CPU time (all
threads); the speed-ups divide the unmerged figure by the configuration's at the same N. On a shared machine the
minimum wall time and the CPU time are the robust figures; the median shows the contention. A precision this machine
lacks (bf16 on a CPU without native bf16) runs as the estimator falls back (fp32): its rows fold into those of the
precision it ran in, and a note above the table says so.

    python -m segmerge_ros.bench.bench_pose --model segformer-b0 --persons 1 4 --repeats 10
    python -m segmerge_ros.bench.bench_pose --configs none --backend eager,openvino --precision fp32,bf16 \
        --input-size 384x288,256x192
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_CONFIGS = ("none", "rate=0.3", "hq", "fast", "2x2")


def _frame(image: Path | None) -> np.ndarray:
    from segmerge_ros.inference.sources import read_rgb, shared_data_dir

    if image is None:
        shared = shared_data_dir()
        image = shared / "mmpose_coco_keypoints" / "000000197388.jpg" if shared else None
    if image is None or not Path(image).is_file():
        rng = np.random.default_rng(0)
        return rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    return read_rgb(image)


def _segmentation(shape: tuple[int, int], persons: int, person_id: int) -> np.ndarray:
    """``persons`` disjoint upright boxes of equal size across the frame."""
    h, w = shape
    seg = np.zeros((h, w), np.uint8)
    slot = w // max(persons, 1)
    for i in range(persons):
        x0 = i * slot + slot // 8
        seg[h // 8: h - h // 8, x0: x0 + max(slot * 3 // 4, 1)] = person_id
    return seg


def _apply(estimator, config: str) -> None:
    if config == "none":
        estimator.set_preset("none")
    elif config.startswith("rate="):
        estimator.set_merge_rate(float(config.split("=", 1)[1]))
    else:
        estimator.set_preset(config)


def run(model: str, persons: list[int], configs: list[str], repeats: int, warmup: int, threads: int | None,
        image: Path | None, variants: list[tuple[str, str, tuple[int, int]]] = (("eager", "fp32", (288, 384)),),
        cache_dir: str | None = None, notes: list[str] | None = None) -> tuple[list[dict], str]:
    """Rows per (variant, persons, merge configuration); a variant is (backend, precision, crop (w, h)), each its own
    PoseEstimator. Speed-ups divide the first variant's unmerged figure at the same N by the row's. A variant whose
    estimator falls back to a variant already there (bf16 without native bf16) adds no rows, and a line to ``notes``
    saying so."""
    import torch

    from segmerge_ros.inference.pose import PoseEstimator

    if threads:
        torch.set_num_threads(threads)
    load_before = os.getloadavg()[0]
    rgb = _frame(image)
    estimators = {}
    for backend, precision, crop in variants:
        estimator = PoseEstimator(model, device="cpu", max_persons=max(persons), min_person_area=1,
                                  backend=backend, precision=precision, input_size=crop, cache_dir=cache_dir)
        label = f"{estimator.backend}-{estimator.precision} {crop[0]}x{crop[1]}"  # after any fallback to eager
        if (estimator.backend, estimator.precision) != (backend, precision) and notes is not None:
            notes.append(f"{backend}-{precision} {crop[0]}x{crop[1]} asked, ran as {label}{_why(precision)}: "
                         f"{'folded into its rows' if label in estimators else 'its rows are named so'}")
        estimators.setdefault(label, estimator)
    person_id = 11
    segs = {n: _segmentation(rgb.shape[:2], n, person_id) for n in persons}
    keys = [(label, config, n) for label in estimators for config in configs for n in persons]
    wall: dict[tuple, list[float]] = {k: [] for k in keys}
    cpu: dict[tuple, list[float]] = {k: [] for k in keys}
    for round_ in range(warmup + repeats):  # interleaved: load from other processes hits every row alike
        for label, config, n in keys:
            estimator = estimators[label]
            _apply(estimator, config)
            c0 = time.process_time()
            result = estimator.estimate(rgb, segs[n], (person_id,))
            c1 = time.process_time()
            if result.num_persons != n:
                raise RuntimeError(f"{label} {config}: found {result.num_persons} people, expected {n}")
            if round_ >= warmup:
                wall[(label, config, n)].append(result.pose_ms)
                cpu[(label, config, n)].append((c1 - c0) * 1e3)
    first = next(iter(estimators))
    rows = []
    for label, config, n in keys:
        row = {"variant": label, "persons": n, "config": config, "runs": len(wall[(label, config, n)]),
               "wall_median": statistics.median(wall[(label, config, n)]), "wall_min": min(wall[(label, config, n)]),
               "cpu_median": statistics.median(cpu[(label, config, n)])}
        if "none" in configs:
            row["speedup_min"] = min(wall[(first, "none", n)]) / row["wall_min"]
            row["speedup_cpu"] = statistics.median(cpu[(first, "none", n)]) / row["cpu_median"]
        rows.append(row)
    env = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch "
           f"threads, torch {torch.__version__}, Python {platform.python_version()}, frame {rgb.shape[1]}x{rgb.shape[0]}, "
           f"1-min load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after")
    return rows, env


def _why(precision: str) -> str:
    """" (why)" when ``precision`` is bf16 and the bf16 probe says this CPU lacks it; else ""."""
    if precision != "bf16":
        return ""
    from segmerge_ros.inference.backends import base  # looked up at call time: tests replace the probe

    missing = base.cpu_bf16_support()
    return f" ({missing})" if missing else ""


def table(rows: list[dict]) -> str:
    lines = ["| backend-precision crop (w x h) | persons | merge | wall ms / frame, median | wall ms / frame, min | "
             "wall ms / person, min | CPU ms / frame, median | speed-up (wall min) | speed-up (CPU) |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['persons']} | {r['config']} | {r['wall_median']:.1f} | "
                     f"{r['wall_min']:.1f} | {r['wall_min'] / r['persons']:.1f} | {r['cpu_median']:.1f} | "
                     f"{r.get('speedup_min', float('nan')):.2f}x | {r.get('speedup_cpu', float('nan')):.2f}x |")
    return "\n".join(lines)


def _variants(backends: str, precisions: str, sizes: str) -> list[tuple[str, str, tuple[int, int]]]:
    from segmerge_ros.inference.engine import parse_size

    crops = []
    for text in sizes.split(","):
        height, width = parse_size(text.strip())
        crops.append((width, height))
    return [(b.strip(), p.strip(), crop) for b in backends.split(",") for p in precisions.split(",") for crop in crops]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="segformer-b0")
    parser.add_argument("--persons", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                        help="comma-separated: none, rate=<r>, or a preset name (hq, fast, 2x2)")
    parser.add_argument("--repeats", "--repeat", dest="repeats", type=int, default=10, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--image", type=Path, default=None, help="RGB frame (default: a shared COCO image)")
    parser.add_argument("--backend", default="eager", help="comma-separated backends, each a row group (eager, "
                        "openvino, compile, tensorrt)")
    parser.add_argument("--precision", default="fp32", help="comma-separated precisions (fp32, bf16, fp16, auto)")
    parser.add_argument("--input-size", default="384x288",
                        help="comma-separated pose crop sizes HEIGHTxWIDTH, multiples of 32 (as pose.input_size)")
    parser.add_argument("--engine-cache-dir", default=None, help="compiled models of openvino/tensorrt")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    t0 = time.perf_counter()
    notes: list[str] = []
    rows, env = run(args.model, args.persons, configs, args.repeats, args.warmup, args.threads, args.image,
                    _variants(args.backend, args.precision, args.input_size), args.engine_cache_dir, notes)
    text = (f"{args.model} pose, heatmaps at 1/4 of the crop, {args.repeats} timed rounds after {args.warmup} "
            f"warm-up, rows interleaved; {env}; {time.perf_counter() - t0:.0f} s total\n\n"
            + "".join(f"note: {note}\n" for note in notes) + ("\n" if notes else "") + table(rows))
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
