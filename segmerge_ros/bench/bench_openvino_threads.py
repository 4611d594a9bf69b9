"""OpenVINO's network under CPU load: thread counts and pinning side by side, with 0, 1, 2 busy processes.

    python -m segmerge_ros.bench.bench_openvino_threads --weights ../shared/data/segformer_b0_vtest_student \\
        --size 576x768 --rate 0.9 --threads 1,2,3,4 --loads 0,1,2

The rung's IR comes from the engine's cache (built on first use); it is compiled once per setting
(``INFERENCE_NUM_THREADS`` x ``ENABLE_CPU_PINNING`` x ``TBB_PARTITIONER``) and every setting runs ``--repeat`` inferences round-robin
at each load, so a drift of the machine hits all settings alike. Prints the median and p90 per setting and load
and the slowdown against the calm run. Timing only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from segmerge_ros.bench.bench_node import busy_processes, cpu_description
from segmerge_ros.inference.backends.openvino import openvino_core
from segmerge_ros.inference.engine import SegmentationEngine, parse_size


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="segmerge-bench-openvino-threads", description=__doc__.split("\n")[0])
    parser.add_argument("--weights", default="", help="checkpoint (default: random weights)")
    parser.add_argument("--size", default="576x768", help="the engine's input size HxW")
    parser.add_argument("--rate", type=float, default=0.9, help="merge rate: the rung whose network is timed")
    parser.add_argument("--threads", default="1,2,3,4", help="INFERENCE_NUM_THREADS values, comma-separated")
    parser.add_argument("--loads", default="0,1,2", help="busy processes, comma-separated (first = calm)")
    parser.add_argument("--pinning", default="off,on", help="ENABLE_CPU_PINNING values: off, on or both")
    parser.add_argument("--partitioner", default="static",
                        help="TBB_PARTITIONER values, comma-separated: static (OpenVINO's default: fixed chunks per "
                             "thread) and/or auto (work stealing: a running thread takes a descheduled one's chunks)")
    parser.add_argument("--precision", default="f32", help="INFERENCE_PRECISION_HINT (f32, bf16)")
    parser.add_argument("--repeat", type=int, default=12, help="inferences per setting and load")
    parser.add_argument("--period-ms", type=float, default=0.0,
                        help="start inferences this far apart, sleeping in between, as a camera's frames arrive "
                             "(0: back to back)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    engine = SegmentationEngine(weights=args.weights or None, backend="openvino", input_size=parse_size(args.size))
    if engine.backend != "openvino":
        raise SystemExit(f"segmerge-bench-openvino-threads: OpenVINO is not usable here ({engine.eager_fallbacks})")
    engine.set_merge_rate(args.rate)
    engine.infer(np.zeros((*parse_size(args.size), 3), np.uint8))  # the rung's IR, built or read from the cache
    rung = engine.merge_config.name
    path = next(path for step, path, _ in engine.prepared_files() if step == rung)
    core = openvino_core()
    model = core.read_model(str(path))
    pixels = np.random.default_rng(0).random(tuple(model.inputs[0].shape), dtype=np.float32)
    pinnings = [{"off": False, "on": True}[v] for v in args.pinning.split(",")]
    partitioners = [v.upper() for v in args.partitioner.split(",")]
    settings = {f"{n} thr {'pinned' if pin else 'unpinned'} {part.lower()}": (n, pin, part)
                for n in (int(v) for v in args.threads.split(",")) for pin in pinnings for part in partitioners}
    requests = {}
    for name, (threads, pinned, partitioner) in settings.items():
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": args.precision,
                                                     "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
                                                     "ENABLE_CPU_PINNING": pinned, "TBB_PARTITIONER": partitioner})
        requests[name] = compiled.create_infer_request()
        requests[name].infer([pixels])
    loads = [int(v) for v in args.loads.split(",")]
    times: dict[tuple[int, str], list[float]] = {}
    for load in loads:
        busy = busy_processes(load)
        try:
            time.sleep(1.0)  # the busy processes are running before the first timing
            for _ in range(args.repeat):
                for name, request in requests.items():
                    start = time.perf_counter()
                    request.infer([pixels])
                    elapsed = time.perf_counter() - start
                    times.setdefault((load, name), []).append(elapsed * 1e3)
                    time.sleep(max(0.0, args.period_ms / 1e3 - elapsed))
        finally:
            for process in busy:
                process.kill()
        time.sleep(1.0)
    print(f"OpenVINO network of rung {rung} (rate {args.rate:g}), input {tuple(model.inputs[0].shape)}, "
          f"{'back to back' if not args.period_ms else f'one every {args.period_ms:g} ms'}; "
          f"{cpu_description()}")
    print(f"{'setting':<26} " + " ".join(f"{f'{load} busy p50/p90':>17}" for load in loads)
          + "  x calm p50 per load")
    for name in requests:
        cells = []
        for load in loads:
            values = sorted(times[(load, name)])
            cells.append(f"{statistics.median(values):8.1f}/{values[int(0.9 * (len(values) - 1))]:8.1f}")
        calm = statistics.median(times[(loads[0], name)])
        ratios = " ".join(f"{statistics.median(times[(load, name)]) / calm:.2f}" for load in loads)
        print(f"{name:<26} " + " ".join(cells) + f"  {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
