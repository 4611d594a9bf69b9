"""segmerge-build-engines: build (or verify) every ladder rung's TensorRT engine or compiled graph, then exit.

Building TensorRT engines takes minutes per rung on a Jetson; run this once after installing or upgrading (JetPack,
TensorRT, weights) so that the node's first start only loads engines. Engines land in the cache the node reads
(``--cache-dir``, default ``$SEGMERGE_ENGINE_CACHE`` or ``~/.cache/segmerge_ros/engines``); entries that still
match this system are reused, stale ones are rebuilt in place.

    segmerge-build-engines --weights /models/segformer_b0_city --size 512x1024 --precision fp16

Engines are tied to the input size: use the node's ``input_size``. ``--backend compile`` fills inductor's on-disk
cache instead (later processes still trace, but skip code generation).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch

from ..merging.segformerpp import LADDER, rung_for_rate
from ..runtime.backends import (
    BACKEND_NAMES,
    PRECISIONS,
    BackendUnavailable,
    TensorRTBackend,
    build_engines,
    default_cache_dir,
    missing_requirements,
)
from ..runtime.engine import SegmentationEngine, parse_size

PROG = "segmerge-build-engines"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="segformer-b0", help="segformer-b0 .. segformer-b5 (default b0)")
    parser.add_argument("--weights", default=None, help="checkpoint (hub folder or .pth); default random weights")
    parser.add_argument("--size", required=True, help="network input HxW, e.g. 512x1024 (the node's input_size)")
    compiled = [name for name in BACKEND_NAMES if name != "eager"]
    parser.add_argument("--backend", default="tensorrt", choices=compiled, help="default tensorrt")
    parser.add_argument("--precision", default=None, choices=sorted(PRECISIONS), help="default fp16 on CUDA, else fp32")
    parser.add_argument("--device", default=None, help="default cuda when available, else cpu")
    parser.add_argument("--cache-dir", default=None, help=f"engine cache (default {default_cache_dir()})")
    parser.add_argument(
        "--rates", default="ladder", help="'ladder' (every rung, default) or comma-separated merge rates of the rungs"
    )
    return parser.parse_args(argv)


def selected_configs(rates: str):
    """The ladder rungs to build: all of them, or those the given merge rates select."""
    if rates == "ladder":
        return [rung.config for rung in LADDER]
    configs = []
    for text in rates.split(","):
        config = rung_for_rate(float(text)).config
        if config not in configs:
            configs.append(config)
    return configs


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
    # The engine loads the model exactly as the node does, so the weights hash in the cache key matches the node's.
    engine = SegmentationEngine(model=args.model, weights=args.weights, device=str(device), input_size=size)
    if engine.randomly_initialised:
        logging.warning("no --weights: building for randomly initialised weights (useful for testing only)")
    configs = selected_configs(args.rates)
    start = time.perf_counter()
    try:
        backend = build_engines(
            engine.model, size, configs, backend=args.backend, device=device, precision=precision,
            cache_dir=args.cache_dir, model_name=args.model,
        )
    except (BackendUnavailable, RuntimeError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    print(f"{len(configs)} rungs ready for {args.model} at {size[0]}x{size[1]} ({backend.precision}, {backend.name}) "
          f"in {time.perf_counter() - start:.0f} s")
    if isinstance(backend, TensorRTBackend):
        for rung, (path, status) in backend.engines.items():
            print(f"  {rung:24s} {status:8s} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
