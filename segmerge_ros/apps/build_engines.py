"""segmerge-build-engines: build (or verify) every ladder rung's TensorRT engine, OpenVINO model or compiled graph.

Building TensorRT engines takes minutes per rung on a Jetson; run this once after installing or upgrading (JetPack,
TensorRT, weights) so that the node's first start only loads engines. Engines land in the cache the node reads
(``--cache-dir``, default ``$SEGMERGE_ENGINE_CACHE`` or ``~/.cache/segmerge_ros/engines``); entries that still
match this system are reused, stale ones are rebuilt in place.

    segmerge-build-engines --weights /models/segformer_b0_city --size 512x1024 --precision fp16

    segmerge-build-engines --weights /models/segformer_b0_city --size 480x640 --backend openvino --precision auto

Engines are tied to the input size, backend and precision: use the node's ``input_size``, ``backend``, ``precision``. ``--backend compile`` fills inductor's on-disk
cache instead (later processes still trace, but skip code generation).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch

from segmerge_ros.inference.backends.base import PRECISION_CHOICES
from segmerge_ros.inference.backends.registry import BACKEND_NAMES, missing_requirements
from segmerge_ros.inference.backends.cache import default_cache_dir
from segmerge_ros.inference.engine import SegmentationEngine, parse_size

PROG = "segmerge-build-engines"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="segformer-b0", help="segformer-b0 .. segformer-b5 (default b0)")
    parser.add_argument("--weights", default=None, help="checkpoint (hub folder or .pth); default random weights")
    parser.add_argument("--size", required=True, help="network input HxW, e.g. 512x1024 (the node's input_size)")
    compiled = [name for name in BACKEND_NAMES if name != "eager"]
    parser.add_argument("--backend", default="tensorrt", choices=compiled, help="default tensorrt")
    parser.add_argument("--precision", default=None, choices=PRECISION_CHOICES, help="default fp16 on CUDA, else fp32")
    parser.add_argument("--device", default=None, help="default cuda when available, else cpu")
    parser.add_argument("--cache-dir", default=None, help=f"engine cache (default {default_cache_dir()})")
    parser.add_argument(
        "--rates", default="ladder", help="'ladder' (every rung, default) or comma-separated merge rates of the rungs"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = args.precision or ("fp16" if device.type == "cuda" else "fp32")
    size = parse_size(args.size)
    # Fail before loading anything when the backend cannot run here: a build-only run that builds nothing must
    # say so, never fall back to eager.
    missing = missing_requirements(args.backend, device)
    if missing:
        reason = " and ".join(missing)
        print(f"{PROG}: error: the {args.backend} backend cannot run here; missing {reason}", file=sys.stderr)
        return 2
    rates = None if args.rates == "ladder" else [float(text) for text in args.rates.split(",")]
    start = time.perf_counter()
    try:
        # The engine loads the model and prepares each rung exactly as the node does (same weights hash, same
        # network input per rung), so the node finds every entry this builds.
        engine = SegmentationEngine(model=args.model, weights=args.weights, device=str(device), backend=args.backend,
                                    input_size=size, precision=precision, cache_dir=args.cache_dir, warm=False)
        if engine.randomly_initialised:
            logging.warning("no --weights: building for randomly initialised weights (useful for testing only)")
        steps = engine.warm(rates)
    except ValueError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    failed = engine.eager_fallbacks if engine.backend == args.backend else f"fell back to {engine.backend}"
    if failed:
        print(f"{PROG}: error: building the {args.backend} backend failed ({failed}); see the warnings above",
              file=sys.stderr)
        return 1
    print(f"{len(steps)} rungs ready for {args.model} at {size[0]}x{size[1]} ({precision}, {engine.backend}) "
          f"in {time.perf_counter() - start:.0f} s")
    for step, path, status in engine.prepared_files():
        print(f"  {step:28s} {status:8s} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
