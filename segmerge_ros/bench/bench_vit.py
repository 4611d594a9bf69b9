"""Side-by-side benchmark of ViT-family models (Segmenter baseline, ALGM, ClustViT, DoViT) in one process.

For every model: mIoU and pixel accuracy on a held-out set (e.g. the SegFormer-B0 student's teacher labels), then
CPU latency at each resolution (forward + upsampling to the frame + argmax, batch 1, no grad), with the models
interleaved rep by rep so load from other processes hits them alike. Prints a table of medians and the ratio to
the baseline, and the share of patch tokens the adaptive methods still carry at the end of the encoder.

    python -m segmerge_ros.bench.bench_vit --model segmenter=/tmp/runs/segmenter-vit-t-linear \\
        --model algm=/tmp/runs/algm-vit-t-linear --baseline segmenter \\
        --heldout ../shared/data/segformer_b0_vtest_student/heldout --sizes 480x640,1024x2048 --reps 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from segmerge_ros.models.vit.segmenter import count_parameters
from segmerge_ros.inference.sources import read_rgb
from segmerge_ros.inference.engine import parse_size
from segmerge_ros.training.segmentation_data import MemoryDataset, PairDataset, heldout_pairs, to_tensor_batch
from segmerge_ros.training.segmentation_models import load_trained_model, model_normalisation, predict_logits
from segmerge_ros.training.train_segmentation import evaluate


def final_token_share(model, patches: int) -> float | None:
    """Share of the patch tokens the last forward carried through the last block (None for static models)."""
    counts = getattr(model, "last_token_counts", None)
    if counts is None:
        return None
    if isinstance(counts, dict):  # ALGM: counts after each merge
        last = counts.get("after_global") or counts.get("after_local")
    elif counts and isinstance(counts[0], list):  # DoViT: running tokens after each exit
        last = counts[-1]
    else:  # ClustViT: tokens after clustering
        last = counts
    return float(np.mean(last)) / patches if last else 1.0


@torch.no_grad()
def time_models(models: dict, frames: list[np.ndarray], size_hw: tuple[int, int], reps: int, warmup: int) -> dict:
    """Median latency (ms) and token share per model at one resolution, models interleaved per rep."""
    import cv2

    resized = [cv2.resize(f, (size_hw[1], size_hw[0]), interpolation=cv2.INTER_LINEAR) for f in frames]
    results = {name: {"ms": [], "tokens": []} for name in models}
    patches = (size_hw[0] // 16) * (size_hw[1] // 16)
    for rep in range(warmup + reps):
        frame = resized[rep % len(resized)]
        for name, model in models.items():
            batch = to_tensor_batch([frame], *model_normalisation(model))
            start = time.perf_counter()
            predict_logits(model, batch).argmax(1)
            elapsed = (time.perf_counter() - start) * 1000.0
            if rep >= warmup:
                results[name]["ms"].append(elapsed)
                share = final_token_share(model, patches)
                if share is not None:
                    results[name]["tokens"].append(share)
    return {
        name: {
            "median_ms": statistics.median(r["ms"]),
            "all_ms": [round(v, 1) for v in r["ms"]],
            "token_share": statistics.mean(r["tokens"]) if r["tokens"] else None,
        }
        for name, r in results.items()
    }


def format_table(report: dict, baseline: str) -> str:
    sizes = report["sizes"]
    header = ["model", "params (M)", "mIoU", "pix acc"]
    for size in sizes:
        header += [f"{size} ms", f"{size} speed-up", f"{size} tokens"]
    rows = [header]
    for name, entry in report["models"].items():
        scores = entry["eval"]
        row = [name, f"{entry['params'] / 1e6:.2f}", f"{scores['miou']:.3f}", f"{scores['pixel_accuracy']:.3f}"]
        for size in sizes:
            timing = entry["timing"][size]
            base = report["models"][baseline]["timing"][size]["median_ms"]
            share = timing["token_share"]
            tokens = "-" if share is None else f"{share:.0%}"
            row += [f"{timing['median_ms']:.0f}", f"{base / timing['median_ms']:.2f}x", tokens]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench_vit", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", action="append", required=True,
        help="NAME=CHECKPOINT_DIR[@RATE] (repeatable); @RATE calls set_merge_rate",
    )
    parser.add_argument("--baseline", help="NAME of the baseline (default: the first model)")
    parser.add_argument("--heldout", required=True, help="folder with images/ and labels/")
    parser.add_argument("--eval-scale", type=float, default=0.5, help="scale of the held-out frames for mIoU")
    parser.add_argument("--sizes", default="480x640,1024x2048", help="HxW resolutions to time")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-classes", type=int, default=19)
    parser.add_argument("--json", help="write the full report here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = {}
    for item in args.model:
        name, _, spec = item.partition("=")
        path, _, rate = spec.partition("@")
        models[name] = load_trained_model(path).eval()
        if rate:
            models[name].set_merge_rate(float(rate))
    baseline = args.baseline or next(iter(models))
    pairs = heldout_pairs(args.heldout)
    files = PairDataset(pairs)
    heldout = MemoryDataset([files[i] for i in range(len(files))])  # read once, shared by all models
    frames = [read_rgb(image) for image, _ in pairs[:: max(1, len(pairs) // (args.reps + args.warmup))]]
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "host": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads",
        "sizes": [s.strip() for s in args.sizes.split(",")],
        "models": {},
    }
    for name, model in models.items():
        started = time.perf_counter()
        report["models"][name] = {
            "params": count_parameters(model),
            "eval": evaluate(model, heldout, args.num_classes, args.eval_scale),
            "timing": {},
        }
        print(f"evaluated {name} in {time.perf_counter() - started:.0f}s", file=sys.stderr)
    for size in report["sizes"]:
        started = time.perf_counter()
        timings = time_models(models, frames, parse_size(size), args.reps, args.warmup)
        for name, timing in timings.items():
            report["models"][name]["timing"][size] = timing
        print(f"timed {size} in {time.perf_counter() - started:.0f}s", file=sys.stderr)
    print(format_table(report, baseline))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
