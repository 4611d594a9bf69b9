"""The class map's post-processing, side by side: F.interpolate + argmax against ``upsampled_argmax`` per rung.

    python -m segmerge_ros.bench.bench_upsample --weights ../shared/data/segformer_b0_vtest_student --size 576x768

For every rung of the eager and OpenVINO ladders (the logits come from the eager model, so the rung's logit size and
real class boundaries are what the node sees), on each frame: the reference (all K channels upsampled bilinearly to
``--size``, then the arg-max) and ``upsampled_argmax``, at torch's thread count as the engine runs them. Prints medians,
their ratio and whether the two class maps are identical (they must be). Timing only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from segmerge_ros.merging.segformerpp import ladder_for_backend
from segmerge_ros.inference.engine import SegmentationEngine, parse_size
from segmerge_ros.inference.sources import default_video, iter_frames
from segmerge_ros.inference.postprocess.upsample import upsampled_argmax


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_upsample", description=__doc__.split("\n")[0])
    parser.add_argument("--weights", default="", help="SegFormer checkpoint (default: random weights)")
    parser.add_argument("--size", default="576x768", help="camera resolution HxW (the network's input size too)")
    parser.add_argument("--frames", type=int, default=5, help="frames of --source")
    parser.add_argument("--repeat", type=int, default=7, help="timed calls per frame and method")
    parser.add_argument("--source", default=None, help="video (default vtest.avi)")
    return parser.parse_args(argv)


def _median_ms(call, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size = parse_size(args.size)
    engine = SegmentationEngine(weights=args.weights or None, input_size=size)
    source = args.source or str(default_video())
    frames = [cv2.resize(frame, (size[1], size[0])) for frame, _ in zip(iter_frames(source), range(args.frames))]
    configs = {rung.config.name: rung.config for rung in ladder_for_backend("eager") + ladder_for_backend("openvino")}
    print(f"{'rung':<24} {'logits':>9} {'interpolate ms':>14} {'ours ms':>8} {'ratio':>6} identical")
    for name, config in configs.items():
        reference_ms, ours_ms, identical, shape = [], [], True, None
        for frame in frames:
            # contiguous: torch's channels-last kernel (the head's output layout) rounds differently from its NCHW
            # one, which upsampled_argmax repeats, and so breaks some exact ties the other way
            logits = engine.logits(frame, config).float().contiguous()
            shape = tuple(logits.shape[2:])
            with torch.inference_mode():
                reference = F.interpolate(logits, size=size, mode="bilinear", align_corners=False).argmax(dim=1)[0]
                identical &= bool(np.array_equal(upsampled_argmax(logits[0], size), reference.numpy()))
                reference_ms.append(_median_ms(lambda: F.interpolate(logits, size=size, mode="bilinear",
                                                                     align_corners=False).argmax(dim=1), args.repeat))
                ours_ms.append(_median_ms(lambda: upsampled_argmax(logits[0], size), args.repeat))
        slow, fast = statistics.median(reference_ms), statistics.median(ours_ms)
        print(f"{name:<24} {shape[0]:>4}x{shape[1]:<4} {slow:>14.2f} {fast:>8.2f} {slow / fast:>5.1f}x {identical}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
