"""Benchmark of ``segmerge-bag --out-dir``: bags per minute with 1 worker and with N Ray workers, same inputs.

    python -m segmerge_ros.apps.fleet_bench [--bags 6] [--frames 20] [--size 288x384] [--workers 1 2]
                                            [--video vtest.avi] [--keep DIR] [-- segmerge-bag options]

Writes ``--bags`` identical bags of a video's first frames (one rgb8 camera, ``/camera/image``, 10 Hz stamps),
then runs the fleet path on those copies once per ``--workers`` value, one after the other in this
process, each into a fresh out dir. Each time is the whole command (Ray start, model builds, every bag), as a user
waits for it; the table also gives the frames per second and the speed-up over the first row. The CPU's model and its
vector flags are printed with it (``/proc/cpuinfo``). The segmerge-bag options default to a random SegFormer-B0 on
the eager backend at the frames' size: the timing, not the masks, is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from std_msgs.msg import Header

from segmerge_ros.apps import bag
from segmerge_ros.apps.bag_io import write_messages
from segmerge_ros.apps.bag_manifest import MANIFEST_NAME
from segmerge_ros.inference.engine import parse_size
from segmerge_ros.inference.sources import default_video, iter_frames
from segmerge_ros.ros.conversions import rgb8_image

CAMERA = "/camera/image"
DEFAULT_TOOL_OPTIONS = ["--weights", "random", "--backend", "eager", "--precision", "fp32"]
VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile",
                "amx_bf16", "amx_int8")


def cpu_description() -> str:
    """``model name`` and the vector flags of /proc/cpuinfo, with the CPUs this process may use."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    shown = " ".join(flag for flag in VECTOR_FLAGS if flag in flags) or "none of " + " ".join(VECTOR_FLAGS)
    return f"{model}; {len(os.sched_getaffinity(0))} CPUs usable; flags: {shown}"


def make_bag(path: Path, frames: list[np.ndarray]) -> Path:
    """A rosbag2 (MCAP) of ``frames`` as one rgb8 camera, 10 Hz."""
    start = 1_700_000_000 * 1_000_000_000

    def messages():
        for index, frame in enumerate(frames):
            stamp = start + index * 100_000_000
            header = Header(frame_id="camera_optical")
            header.stamp.sec, header.stamp.nanosec = divmod(stamp, 1_000_000_000)
            yield CAMERA, stamp + 5_000_000, rgb8_image(frame, header)

    return write_messages(path, "mcap", messages())


def run_once(inputs: list[Path], out_dir: Path, workers: int, options: list[str]) -> dict:
    """segmerge-bag over ``inputs`` into a fresh ``out_dir``: its wall time and what its manifest counts."""
    shutil.rmtree(out_dir, ignore_errors=True)
    started = time.perf_counter()
    code = bag.main([*map(str, inputs), "--out-dir", str(out_dir), "--workers", str(workers), *options])
    wall_s = time.perf_counter() - started
    entries = json.loads((out_dir / MANIFEST_NAME).read_text())["bags"].values()
    if code != 0:
        raise SystemExit(f"segmerge-bag --workers {workers} failed (exit {code}); see above")
    return {"workers": workers, "bags": len(entries), "frames": sum(e["processed"] for e in entries),
            "wall_s": wall_s, "bag_s": sorted(e["wall_s"] for e in entries)}


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table (what docs/benchmarks.md takes)."""
    lines = ["| workers | bags | frames | wall s | bags/min | frames/s | speed-up | per-bag s (min-max) |",
             "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        speedup = rows[0]["wall_s"] / row["wall_s"]
        lines.append(f"| {row['workers']} | {row['bags']} | {row['frames']} | {row['wall_s']:.1f} | "
                     f"{row['bags'] / row['wall_s'] * 60:.1f} | {row['frames'] / row['wall_s']:.1f} | "
                     f"{speedup:.2f}x | {row['bag_s'][0]:.1f}-{row['bag_s'][-1]:.1f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m segmerge_ros.apps.fleet_bench",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--bags", type=int, default=6, help="copies of the bag (default 6)")
    parser.add_argument("--frames", type=int, default=20, help="frames per bag (default 20)")
    parser.add_argument("--size", default="288x384", help="the frames' HEIGHTxWIDTH in the bag (default 288x384)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts, in order (default 1 2)")
    parser.add_argument("--video", default=None, help="the video (default: vtest.avi from the shared data)")
    parser.add_argument("--keep", default=None, metavar="DIR", help="work in DIR and keep it (default: a temporary "
                        "folder, removed)")
    parser.add_argument("tool_options", nargs=argparse.REMAINDER,
                        help="after --: segmerge-bag options (default: " + " ".join(DEFAULT_TOOL_OPTIONS) + ")")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    video = Path(args.video) if args.video else default_video()
    if video is None or not Path(video).exists():
        raise SystemExit("no video: give --video (vtest.avi is in the shared data, or Debian's opencv-doc)")
    options = [o for o in args.tool_options if o != "--"] or DEFAULT_TOOL_OPTIONS
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="segmerge-fleet-bench-"))
    try:
        height, width = parse_size(args.size)
        frames = [cv2.resize(f, (width, height)) for f in iter_frames(video, max_frames=args.frames)]
        inputs = [work / "inputs" / f"bag_{index:02d}" for index in range(args.bags)]
        for path in inputs:
            shutil.rmtree(path, ignore_errors=True)
            make_bag(path, frames)
        rows = [run_once(inputs, work / f"out_{workers}", workers, options) for workers in args.workers]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nsegmerge-bag --out-dir: {args.bags} bags x {args.frames} frames ({args.size}), options: "
          f"{' '.join(options)}")
    print(f"CPU: {cpu_description()}")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
