"""segmerge-bench: transformers' SegFormer, ours unmerged, each merge preset and a sweep of merge rates, side by side.

Every row runs in this one process on the same weights and the same input; the rows are timed round-robin (one call
of each per round) so that drift in machine load hits all of them alike. Times are the network alone (pixels in,
logits at 1/4 out); pre- and post-processing are the same for every row and left out.

Agreement is the share of pixels whose arg-max class equals the unmerged model's; mIoU is against ``--labels``.
Both are computed on the logits upsampled to the image's resolution, as the node does.

``--model mask2former-...`` takes the same command line (one parser, ``build_parser``) and hands it to
``bench_mask2former``: rows per knob setting; what that family cannot do yet is refused in one line, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from segmerge_ros.merging.segformerpp import (
    EXPERIMENTS, NONE, PRESETS, MergeConfig, config_for_rate, ladder_for_backend, rung_for_rate,
)
from segmerge_ros.models.segformer.checkpoints import load_segformer
from segmerge_ros.inference.backends.base import PRECISIONS
from segmerge_ros.inference.backends.registry import BACKEND_NAMES, make_backend
from segmerge_ros.inference.engine import parse_size, to_tensor
from segmerge_ros.inference.metrics import ConfusionMatrix
from segmerge_ros.inference.sources import read_rgb
from segmerge_ros.bench.common import (  # shared with bench_mask2former, which must not import this module
    MASK2FORMER_DEFAULT_SIZES, find_images, is_mask2former, known_names, merge_rates, refuse,
)



@dataclass
class Row:
    name: str
    run: callable  # pixels -> logits
    config: str = ""  # the merge configuration behind the row
    times_ms: list[float] = field(default_factory=list)
    agreement: list[float] = field(default_factory=list)
    max_diff_vs_hf: float | None = None
    confusion: ConfusionMatrix | None = None


def build_parser() -> argparse.ArgumentParser:
    """The one parser of ``segmerge-bench``, for every ``--model`` family (SegFormer and Mask2Former alike)."""
    parser = argparse.ArgumentParser(prog="segmerge-bench", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="segformer-b0", help="segformer-b0 .. segformer-b5 (default b0), or "
                        "mask2former-<backbone>[-proscale], e.g. mask2former-swin-t (docs/mask2former.md)")
    parser.add_argument("--size", action="append", default=None,
                        help="network input HxW, e.g. 1024x2048 (SegFormer: once, default the image's size; "
                        "Mask2Former: repeatable, default 576x768 and 512x1024)")
    parser.add_argument(
        "--presets", default=None, help="comma-separated presets or EXPERIMENTS names (default hq,fast,2x2; "
        "Mask2Former has none)"
    )
    parser.add_argument(
        "--rates", default="ladder", help="merge rates to sweep: 'ladder' (every rung), a comma-separated list, or ''; "
        "Mask2Former: the knob settings these rates select (coarse_layers_for_rate), k = 0 always"
    )
    parser.add_argument(
        "--attention-rates", default="", help="Segformer++ attention-only rates (the continuous mapping), e.g. 0.3,0.9"
    )
    parser.add_argument("--matching", default="global", choices=("global", "local"), help="for --attention-rates")
    parser.add_argument("--repeat", "--repeats", dest="repeat", type=int, default=None,
                        help="timed rounds, one call of every row each (median reported; default 5, Mask2Former 3); "
                        "--repeats is an alias")
    parser.add_argument("--weights", default=None, help="checkpoint (hub folder or .pth); default random weights")
    parser.add_argument("--config-overrides", default=None,
                        help='Mask2Former: JSON of Mask2FormerConfig fields, "swin.depths" etc. for the backbone\'s, '
                        'e.g. \'{"num_queries": 20, "swin.depths": [2, 2, 2, 2]}\'')
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.add_argument("--image", default=None, help="an image or a folder of images (default: the Cityscapes frame)")
    parser.add_argument("--labels", default=None, help="label image or folder (<stem>_trainIds.png or <stem>.png)")
    parser.add_argument("--max-images", type=int, default=None,
                        help="images used for agreement/mIoU (default 9, Mask2Former 1)")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers row even when installed")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--backend", default="eager",
        help="eager, compile, openvino or tensorrt, or several comma-separated: every backend runs in every "
        "--precision, side by side; rows of eager fp32 keep their names, the others are named "
        "<row>@<backend>-<precision> (e.g. rate=0.9@openvino-bf16); each row is prepared during the quality pass, "
        "before timing. --rates ladder sweeps each backend's own ladder. Mask2Former: eager only (for now)",
    )
    parser.add_argument(
        "--precision", default="fp32",
        help="fp32, bf16, fp16 or several comma-separated (bf16 on CUDA or a CPU with native bf16; fp16 on CUDA; "
        "Mask2Former: fp32, bf16 by autocast)",
    )
    parser.add_argument("--engine-cache-dir", default=None, help="cache for OpenVINO/TensorRT models (default: "
                        "the node's, ~/.cache/segmerge_ros/engines)")
    parser.add_argument("--plot", default=None, help="draw speed-up against agreement of every row into this PNG")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--memory", action="store_true",
                        help="instead of timing: the process's RSS with the model loaded and with its whole ladder "
                        "prepared and run once, per --backend and --precision (one fresh process each)")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line with the family's defaults filled in: ``sizes`` (every ``--size``) and ``size`` (SegFormer's
    one, or None), ``repeat``, ``max_images`` and ``presets``."""
    args = build_parser().parse_args(argv)
    mask2former = is_mask2former(args.model)
    args.sizes = args.size or (list(MASK2FORMER_DEFAULT_SIZES) if mask2former else [])
    if not mask2former and len(args.sizes) > 1:
        refuse(f"{args.model} takes one --size (several are for Mask2Former)")
    args.size = args.sizes[-1] if args.size else None
    args.repeat = args.repeat if args.repeat is not None else (3 if mask2former else 5)
    args.max_images = args.max_images if args.max_images is not None else (1 if mask2former else 9)
    if args.presets is None:
        args.presets = "" if mask2former else "hq,fast,2x2"
    if args.config_overrides is not None and not mask2former:
        refuse(f"--config-overrides is for Mask2Former models, not {args.model}")
    return args


def find_label(labels: str | None, image: Path) -> np.ndarray | None:
    if labels is None:
        return None
    folder = Path(labels)
    if folder.is_file():
        candidates = [folder]
    else:
        candidates = [folder / f"{image.stem}_trainIds.png", folder / f"{image.stem}.png"]
    for candidate in candidates:
        if candidate.is_file():
            return cv2.imread(str(candidate), cv2.IMREAD_UNCHANGED)
    raise SystemExit(f"segmerge-bench: no label for {image.name} in {labels}")


def build_models(args: argparse.Namespace, device: torch.device):
    """Our model and, when transformers is installed and the weights allow it, transformers' on the same weights."""
    hf = None
    try:
        if args.no_hf:
            raise ImportError
        from transformers import SegformerConfig, SegformerForSemanticSegmentation
    except ImportError:
        SegformerForSemanticSegmentation = None
    if args.weights:
        loaded = load_segformer(args.weights, size=args.model)
        ours, labels = loaded.model, loaded.labels
        if SegformerForSemanticSegmentation is not None and loaded.format == "huggingface":
            hf = SegformerForSemanticSegmentation.from_pretrained(str(loaded.source.parent), local_files_only=True)
    elif SegformerForSemanticSegmentation is not None:
        # Random weights through transformers' own initialisation, saved and loaded by our loader: same weights.
        from segmerge_ros.models.segformer.model import mit_config

        size = mit_config(args.model)
        torch.manual_seed(args.seed)
        hf = SegformerForSemanticSegmentation(
            SegformerConfig(
                num_labels=19,
                hidden_sizes=list(size.hidden_sizes),
                depths=list(size.depths),
                decoder_hidden_size=size.decoder_hidden_size,
            )
        )
        with tempfile.TemporaryDirectory() as folder:
            hf.save_pretrained(folder)
            loaded = load_segformer(folder)
        ours, labels = loaded.model, loaded.labels
    else:
        from segmerge_ros.models.labels import CITYSCAPES
        from segmerge_ros.models.segformer.model import SegFormer, mit_config

        torch.manual_seed(args.seed)
        ours, labels = SegFormer(mit_config(args.model)).eval().fold_head(), CITYSCAPES
    if hf is not None:
        hf = hf.eval().to(device)
    return ours.to(device), hf, labels


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory:
        from segmerge_ros.bench.bench_memory import ladder_memory

        return ladder_memory(args)
    if is_mask2former(args.model):  # its own rows (knob settings), from the same command line
        from segmerge_ros.bench import bench_mask2former

        return bench_mask2former.run(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    size = parse_size(args.size)
    images = find_images(args.image)
    if not images and size is None:
        size = (1024, 2048)
    known_presets = {**PRESETS, **EXPERIMENTS}
    presets = [(name, known_presets[name])  # checked before the models load
               for name in (known_names(args.presets, list(known_presets)) if args.presets.strip() else [])]
    ours, hf, labels = build_models(args, device)

    attention = [(f"attn={rate:g}/{args.matching}", config_for_rate(rate, args.matching))
                 for rate in merge_rates(args.attention_rates)]

    def merges_for(backend_name: str) -> list[tuple[str, MergeConfig]]:
        ladder = ladder_for_backend(backend_name)
        rates = [rung.rate for rung in ladder[1:]] if args.rates == "ladder" else merge_rates(args.rates)
        rated = [(f"rate={rate:g}", rung_for_rate(rate, ladder).config) for rate in rates]
        return [("unmerged", NONE)] + presets + rated + attention

    rows = []
    combinations = [(b, p) for b in known_names(args.backend, BACKEND_NAMES) for p in known_names(args.precision, PRECISIONS)]
    if ("eager", "fp32") not in combinations:  # the reference of speedup_vs_unmerged and agreement_vs_unmerged
        rows.append(Row("unmerged", (lambda x: ours(x, NONE)), NONE.name))
    for backend_name, precision in combinations:
        run = ours
        if (backend_name, precision) != ("eager", "fp32"):
            backend = make_backend(backend_name, ours, device, precision=precision, model_name=args.model,
                                   cache_dir=args.engine_cache_dir, strict=True)
            if backend.precision != precision:
                raise SystemExit(f"segmerge-bench: precision {precision} cannot run on this {device} (see the warning)")
            run = backend.run
        suffix = "" if (backend_name, precision) == ("eager", "fp32") else f"@{backend_name}-{precision}"
        rows += [
            Row(name + suffix, (lambda run, config: lambda x: run(x, config))(run, config), config.name)
            for name, config in merges_for(backend_name)
        ]
    if hf is not None:
        rows.insert(0, Row("hf-transformers", lambda x: hf(pixel_values=x).logits, "transformers"))

    if images:
        first = read_rgb(images[0])
    else:
        first = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    pixels = to_tensor(first, size, device)
    shape = tuple(pixels.shape[-2:])
    print(f"segmerge-bench: {args.model} at {shape[0]}x{shape[1]} on {device} ({torch.get_num_threads()} threads), "
          f"{len(rows)} rows x {args.repeat} rounds", file=sys.stderr)

    with torch.inference_mode():
        # Quality: every row on every image (up to --max-images) against the unmerged row.
        for image in images[: args.max_images] or [None]:
            rgb = read_rgb(image) if image is not None else first
            label = find_label(args.labels, image) if image is not None else None
            x = to_tensor(rgb, size, device)
            outputs = {row.name: row.run(x) for row in rows}
            reference = _upsampled_argmax(outputs["unmerged"], rgb.shape[:2])
            for row in rows:
                prediction = _upsampled_argmax(outputs[row.name], rgb.shape[:2])
                row.agreement.append(float((prediction == reference).float().mean()))
                same_shape = hf is not None and outputs[row.name].shape == outputs["hf-transformers"].shape
                if same_shape and row.name != "hf-transformers":
                    diff = (outputs[row.name] - outputs["hf-transformers"]).abs().max().item()
                    row.max_diff_vs_hf = max(row.max_diff_vs_hf or 0.0, diff)
                if label is not None:
                    row.confusion = row.confusion or ConfusionMatrix(len(labels.classes))
                    row.confusion.update(prediction.cpu().numpy(), label)
        # Speed: round-robin over the rows, on the first image.
        for row in rows:
            row.run(pixels)  # warm-up
        for _ in range(args.repeat):
            for row in rows:
                _sync(device)
                start = time.perf_counter()
                row.run(pixels)
                _sync(device)
                row.times_ms.append((time.perf_counter() - start) * 1e3)

    result = _results(args, device, shape, rows)
    _print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        from segmerge_ros.apps.plots import plot_tradeoff  # matplotlib only when asked for

        plot_tradeoff(result["rows"], args.plot, title=f"{args.model} at {shape[0]}x{shape[1]}, {result['device']}")
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _upsampled_argmax(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False).argmax(dim=1)[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _results(args, device, shape, rows: list[Row]) -> dict:
    medians = {row.name: statistics.median(row.times_ms) for row in rows}
    hf_ms = medians.get("hf-transformers")
    return {
        "device": _device_name(device),
        "model": args.model,
        "size": list(shape),
        "rows": [
            {
                "name": row.name,
                "config": row.config,
                "median_ms": round(medians[row.name], 3),
                "speedup_vs_hf": round(hf_ms / medians[row.name], 3) if hf_ms else None,
                "speedup_vs_unmerged": round(medians["unmerged"] / medians[row.name], 3),
                "agreement_vs_unmerged": round(statistics.mean(row.agreement), 4),
                "max_abs_logit_diff_vs_hf": None if row.max_diff_vs_hf is None else float(f"{row.max_diff_vs_hf:.3g}"),
                "miou": None if row.confusion is None else round(row.confusion.miou, 4),
            }
            for row in rows
        ],
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def _print_table(result: dict) -> None:
    print(f"\n{result['model']}  {result['size'][0]}x{result['size'][1]}  {result['device']}")
    header = f"{'name':<28} {'config':<24} {'median ms':>10} {'x vs hf':>8} {'x vs unmerged':>13} {'agreement':>9} {'max|dlogit| hf':>14} {'mIoU':>6}"
    print(header)
    print("-" * len(header))

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    for row in result["rows"]:
        print(
            f"{row['name']:<28} {row['config']:<24} {row['median_ms']:>10.1f} {fmt(row['speedup_vs_hf'], '>8.2f')} "
            f"{row['speedup_vs_unmerged']:>13.2f} {row['agreement_vs_unmerged']:>9.4f} "
            f"{fmt(row['max_abs_logit_diff_vs_hf'], '>14.2e')} {fmt(row['miou'], '>6.3f')}"
        )


if __name__ == "__main__":
    sys.exit(main())
