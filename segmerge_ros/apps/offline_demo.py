"""segmerge-demo: segment real frames offline at several merge rates, write colour overlays and a timing table.

No ROS involved (the ROS demo is ``python -m segmerge_ros.apps.demo``). Frames come from a video, an image folder or
one image; by default the shared copy of OpenCV's vtest.avi (people on a campus plaza), else Debian's opencv-doc
copy. Weights default to the SegFormer-B0 trained here when ../shared/data is present, else a random model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import cv2
import numpy as np

from segmerge_ros.models.labels import overlay
from segmerge_ros.inference.engine import SegmentationEngine
from segmerge_ros.inference.sources import DEBIAN_VTEST, default_video, iter_frames, shared_data_dir

STUDENT = "segformer_b0_vtest_student"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="segmerge-demo", description=__doc__.split("\n")[0])
    parser.add_argument("source", nargs="?", default=None, help="video, image folder or image (default: vtest.avi)")
    parser.add_argument("--weights", default=None, help="checkpoint (default: the trained B0 in ../shared/data)")
    parser.add_argument("--model", default="segformer-b0")
    parser.add_argument("--size", default="", help="network input HxW (default: the frame's own size)")
    parser.add_argument("--rates", default="0,0.6,0.9", help="merge rates to compare (default 0,0.6,0.9)")
    parser.add_argument("--frames", type=int, default=8, help="frames per rate (default 8)")
    parser.add_argument("--step", type=int, default=10, help="use every n-th frame of a video (default 10)")
    parser.add_argument("--out", default="out/demo", help="folder for the overlay PNGs (default out/demo)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    source = args.source or default_video()
    if source is None:
        print(
            f"segmerge-demo: no frames found: ../shared/data is absent and {DEBIAN_VTEST} is not installed.\n"
            "  Install it with `apt-get install opencv-doc`, or pass a video, image folder or image.",
            file=sys.stderr,
        )
        return 2
    weights = args.weights
    if weights is None and (shared := shared_data_dir()) and (shared / STUDENT / "model.safetensors").is_file():
        weights = str(shared / STUDENT)
    if not weights:
        print("segmerge-demo: WARNING: no weights: a randomly initialised model (colours mean nothing)", file=sys.stderr)
    engine = SegmentationEngine(model=args.model, weights=weights, input_size=args.size or None)
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    frames = list(iter_frames(source, max_frames=args.frames, step=args.step))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"segmerge-demo: {len(frames)} frames of {source} ({frames[0].shape[1]}x{frames[0].shape[0]}), "
          f"weights {weights or 'random'}", file=sys.stderr)

    engine.infer(frames[0])  # warm-up
    reference: list[np.ndarray] = []
    table = []
    for rate in rates:
        engine.set_merge_rate(rate)
        times, agreement = [], []
        for index, rgb in enumerate(frames):
            result = engine.infer(rgb)
            times.append(result.inference_ms)
            if rate == rates[0]:
                reference.append(result.class_map)
            agreement.append(float((result.class_map == reference[index]).mean()))
            blend = overlay(rgb, result.class_map, engine.labels.palette, 0.5)
            cv2.imwrite(str(out / f"rate{rate:.2f}_frame{index:03d}.png"), cv2.cvtColor(blend, cv2.COLOR_RGB2BGR))
        table.append((rate, statistics.median(times), statistics.mean(agreement)))

    base = table[0][1]
    print(f"\n{'merge rate':>10} {'median ms':>10} {'speed-up':>9} {'agreement vs rate ' + str(rates[0]):>22}")
    for rate, median, agree in table:
        print(f"{rate:>10.2f} {median:>10.1f} {base / median:>9.2f} {agree:>22.4f}")
    print(f"\noverlays written to {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
