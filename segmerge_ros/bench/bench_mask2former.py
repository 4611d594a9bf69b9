"""segmerge-bench --model mask2former-<backbone>[-proscale]: our Mask2Former against transformers' and at every
setting of the encoder knob, side by side in one process.

Rows, per input size: transformers' ``Mask2FormerForUniversalSegmentation`` holding the same weights as ours (speed
and equality: max |difference| of the class and mask logits), then our model at every knob setting
``coarse_layers = k`` that ``coarse_layers_for_rate`` reaches (0 = the stock model; on a PRO-SCALE model k extends
stage 2 into stage 3 of the schedule). For each: median ms over interleaved rounds (one call of every row per round,
so machine load drifts hit all rows alike), speed-up against k = 0, the analytic MACs of the whole model and of the
pixel decoder (``models/mask2former/flops.py``) and the share of pixels whose semantic arg-max (detectron2's
semantic inference, ``inference/postprocess/mask2former.py``'s ``semantic_maps``) equals k = 0's.

Weights: random (seeded, fan-in scaled) unless ``--weights`` names a checkpoint (``load_mask2former``: a hub folder,
a detectron2 file or a ``segmerge-train mask2former`` output). Random weights show speed and equality only: their
arg-max agreement says nothing about what the knob costs a trained model.

The command line is ``segmerge-bench``'s own (``bench.build_parser``, the same flags for every model), parsed there
and handed to ``run``: ``--repeat`` (alias ``--repeats``) rounds; ``--rates`` picks the knob settings those merge
rates select (``ladder``: all); ``--backend eager,openvino`` and ``--precision fp32,bf16`` side by side (bf16:
autocast eagerly, OpenVINO's bf16 inference precision; on a CPU with native bf16), rows named
``ours k=<k>@<backend>-<precision>`` (eager fp32 rows are plain ``ours k=<k>``: they are always run, the reference of
every other row at the same setting). OpenVINO rows run the engine's own path (``KnobNetwork`` through the OpenVINO
backend, IR in the engine cache, ``--cache-dir``); their conversion happens in the untimed quality pass. Per row:
the speed-up against eager fp32 at the same setting and against the same backend and precision at k = 0, and the
largest class and mask logit difference from eager fp32 at the same setting, relative to its largest logit, with
the arg-max agreement. The compiled and TensorRT backends, fp16, bf16 on a CPU without it, ``--presets``,
``--attention-rates``, ``--labels``, ``--plot`` and a non-CPU ``--device`` are refused in one line on stderr with
exit status 2.

transformers is a test-only dependency: it is imported here when installed and its column is skipped (with a line
saying why) when it is not, or when it has no such model (MiT backbones, the PRO-SCALE encoder).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from segmerge_ros.models.mask2former.deformable_attention import coarse_layers_for_rate
from segmerge_ros.models.mask2former.model import Mask2Former, Mask2FormerConfig, knob_settings, mask2former_config
from segmerge_ros.models.mask2former.flops import model_macs, pixel_decoder_macs_for
from segmerge_ros.inference.engine import parse_size, to_tensor
from segmerge_ros.inference.families.mask2former import KnobNetwork, knob_config, unpack
from segmerge_ros.inference.postprocess.mask2former import semantic_maps
from segmerge_ros.inference.backends import base as backends_base  # cpu_bf16_support looked up at call time
from segmerge_ros.inference.backends.base import PRECISIONS, Backend
from segmerge_ros.inference.backends.registry import BACKEND_NAMES, make_backend, missing_requirements
from segmerge_ros.inference.sources import read_rgb
from segmerge_ros.bench.common import find_images, is_mask2former, known_names, merge_rates, refuse

RANDOM_WEIGHTS_NOTE = ("random weights: the times and the equality with transformers are meaningful, the arg-max "
                       "agreement between knob settings is not (load trained weights with --weights)")
HF_STAGES = ["stage1", "stage2", "stage3", "stage4"]

Outputs = tuple[torch.Tensor, torch.Tensor]  # class logits (B, Q, K+1), mask logits (B, Q, H/4, W/4)


@dataclass
class Row:
    name: str
    run: Callable[[torch.Tensor], Outputs]
    coarse_layers: int | None = None  # None: the transformers row (the stock model, k = 0)
    min_rate: float | None = None  # the smallest merge rate that selects this knob setting
    precision: str = "fp32"  # ours in fp32, or bf16 under autocast; transformers' row is fp32
    backend: str = "eager"
    compiled: Backend | None = None  # the compiled backend of a non-eager row (to report a fallback to eager)
    times_ms: list[float] = field(default_factory=list)
    agreement: list[float] = field(default_factory=list)
    class_diff: float | None = None  # max |difference| from its reference row (reference_row)
    mask_diff: float | None = None
    largest_logits: tuple[float, float] = (0.0, 0.0)  # max |class|, |mask| logit of the row (scale of the diffs)
    reference_agreement: list[float] = field(default_factory=list)  # arg-max agreement with the reference row

    @property
    def is_eager_fp32(self) -> bool:
        return self.coarse_layers is not None and (self.backend, self.precision) == ("eager", "fp32")


def reference_row(row: Row, rows: list[Row]) -> Row | None:
    """What ``row``'s outputs are compared with: ours eager fp32 at the same setting (k = 0 for transformers);
    None for those rows themselves."""
    if row.is_eager_fp32:
        return None
    k = row.coarse_layers or 0
    return next(other for other in rows if other.is_eager_fp32 and other.coarse_layers == k)


def row_name(k: int, backend: str, precision: str) -> str:
    return f"ours k={k}" + ("" if (backend, precision) == ("eager", "fp32") else f"@{backend}-{precision}")


BENCH_BACKENDS = ("eager", "openvino")


def check_args(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The backends (eager first) and precisions (fp32 first) to run; whatever is not benchmarked for Mask2Former is
    refused in one line, exit status 2, before any model is built."""
    if not is_mask2former(args.model):
        refuse(f"--model {args.model} is not a Mask2Former (mask2former-<backbone>[-proscale])")
    backends = known_names(args.backend, BACKEND_NAMES)
    for backend in backends:
        if backend not in BENCH_BACKENDS:
            refuse(f"--backend {backend}: Mask2Former is benchmarked on {' and '.join(BENCH_BACKENDS)} (the compiled "
                   "and TensorRT paths are not measured for it)")
        missing = missing_requirements(backend, torch.device("cpu"))
        if missing:
            refuse(f"--backend {backend}: this machine lacks {', '.join(missing)}")
    precisions = known_names(args.precision, PRECISIONS)
    for precision in precisions:
        if precision == "fp16":
            refuse("--precision fp16: Mask2Former runs on the CPU, in fp32 or bf16 (fp16 needs CUDA)")
        if precision == "bf16" and backends_base.cpu_bf16_support():
            refuse(f"--precision bf16: {backends_base.cpu_bf16_support()} on this CPU; use fp32")
    unsupported = {"--presets": args.presets.strip() and "Mask2Former has no merge presets: pick knob settings "
                   "with --rates", "--attention-rates": args.attention_rates.strip() and "SegFormer only",
                   "--labels": args.labels and "no mIoU for Mask2Former yet (agreement with k=0 only)",
                   "--plot": args.plot and "no plot for Mask2Former yet",
                   "--device": args.device != "cpu" and "Mask2Former is benchmarked on the CPU only"}
    for flag, reason in unsupported.items():
        if reason:
            refuse(f"{flag}: {reason}")
    if args.rates.strip() not in ("", "ladder"):
        merge_rates(args.rates)  # out of range: the SegFormer message
    return (sorted(set(backends), key=lambda b: b != "eager"),
            sorted(set(precisions), key=lambda p: p != "fp32"))


def settings_for_rates(model: Mask2Former, rates: str) -> list[tuple[int, float]]:
    """(k, the smallest rate giving k) for the knob settings ``--rates`` selects: every one for ``ladder``, else
    k = 0 (the reference) and ``coarse_layers_for_rate`` of each rate listed."""
    settings = knob_settings(model)
    if rates.strip() == "ladder":
        return settings
    full = model.pixel_level_module.decoder.encoder.full_scale_layers
    chosen = {0} | {coarse_layers_for_rate(rate, full) for rate in merge_rates(rates)}
    return [(k, rate) for k, rate in settings if k in chosen]


def config_with_overrides(name: str, overrides: str | dict | None) -> Mask2FormerConfig:
    """``mask2former_config(name)`` with top-level fields and ``<backbone>.<field>`` fields replaced (JSON lists
    become tuples, as the frozen configs hold them)."""
    values = json.loads(overrides) if isinstance(overrides, str) else dict(overrides or {})
    values = {key: tuple(value) if isinstance(value, list) else value for key, value in values.items()}
    top = {key: value for key, value in values.items() if "." not in key}
    nested: dict[str, dict] = {}
    for key, value in values.items():
        if "." in key:
            part, _, name_in_part = key.partition(".")
            nested.setdefault(part, {})[name_in_part] = value
    base = mask2former_config(name, **top)
    try:
        replaced = {part: dataclasses.replace(getattr(base, part), **fields) for part, fields in nested.items()}
    except (AttributeError, TypeError) as error:
        raise SystemExit(f"segmerge-bench: bad --config-overrides {sorted(nested)}: {error}") from error
    return dataclasses.replace(base, **replaced)


@torch.no_grad()
def randomise_weights(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every float tensor random and fan-in scaled (norm scales around 1, running variances positive), so that
    activations stay O(1) and the masked attention sees mixed masks: a fresh model's zero attention logits and
    offset weights would hide differences in the deformable attention."""
    generator = torch.Generator().manual_seed(seed)
    for key, value in model.state_dict().items():
        if not value.is_floating_point():
            continue
        noise = torch.randn(value.shape, generator=generator)
        if key.endswith("running_var"):
            value.copy_(0.5 + torch.rand(value.shape, generator=generator))
        elif value.dim() == 1 and key.endswith("weight"):
            value.copy_(1.0 + 0.3 * noise)
        elif value.dim() <= 1:
            value.copy_(0.1 * noise)
        else:
            value.copy_(noise / value[0].numel() ** 0.5)
    return model


def transformers_twin(model: Mask2Former) -> tuple[torch.nn.Module | None, str]:
    """transformers' Mask2FormerForUniversalSegmentation with ``model``'s weights, or None and the reason."""
    config = model.config
    if config.backbone == "mit" or config.encoder == "proscale":
        return None, "transformers has no Mask2Former with a MiT backbone or the PRO-SCALE encoder"
    try:
        import transformers
    except ImportError:
        return None, "transformers is not installed (a test-only dependency): no comparison column"
    if config.backbone == "swin":
        swin = config.swin
        backbone = transformers.SwinConfig(
            embed_dim=swin.embed_dim, depths=list(swin.depths), num_heads=list(swin.num_heads),
            window_size=swin.window_size, patch_size=swin.patch_size, mlp_ratio=swin.mlp_ratio,
            qkv_bias=swin.qkv_bias, layer_norm_eps=swin.layer_norm_eps, out_features=HF_STAGES)
    else:
        resnet = config.resnet
        backbone = transformers.ResNetConfig(
            embedding_size=resnet.embedding_size, hidden_sizes=list(resnet.hidden_sizes), depths=list(resnet.depths),
            downsample_in_bottleneck=resnet.downsample_in_bottleneck, layer_type="bottleneck",
            out_features=HF_STAGES)
    hf_config = transformers.Mask2FormerConfig(
        backbone_config=backbone, num_labels=config.num_classes, num_queries=config.num_queries,
        hidden_dim=config.hidden_dim, mask_feature_size=config.mask_feature_size, feature_size=config.feature_size,
        encoder_feedforward_dim=config.encoder_feedforward_dim, dim_feedforward=config.decoder_feedforward_dim,
        decoder_layers=config.num_decoder_layers + 1, encoder_layers=config.encoder_layers,
        num_attention_heads=config.num_attention_heads, pre_norm=config.pre_norm)
    read_back = Mask2FormerConfig.from_hf_dict(hf_config.to_dict(), class_names=config.class_names)
    if read_back != config:
        raise RuntimeError(f"transformers' config does not read back as ours:\n{read_back}\n!=\n{config}")
    hf = transformers.Mask2FormerForUniversalSegmentation(hf_config).eval()
    hf_keys = set(hf.state_dict())
    state = {(f"model.{key}" if f"model.{key}" in hf_keys else key): value for key, value in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if set(missing) - {"criterion.empty_weight"} or unexpected:  # the loss's class weights only
        raise RuntimeError(f"our weights do not fit transformers' model: missing {missing}, unexpected {unexpected}")
    return hf, ""


def build_rows(model: Mask2Former, hf: torch.nn.Module | None, settings: list[tuple[int, float]] | None = None,
               precisions: Sequence[str] = ("fp32",), backends: Sequence[str] = ("eager",),
               cache_dir: str | None = None, model_name: str = "mask2former") -> list[Row]:
    """transformers' row (when given), then ours at every knob setting on every backend in every precision; eager
    fp32 at every setting always (the reference rows), eager fp32 k = 0 first of ours."""
    settings = knob_settings(model) if settings is None else settings
    network = KnobNetwork(model)
    compiled = {(backend, precision): make_backend(backend, network, "cpu", precision=precision, cache_dir=cache_dir,
                                                   model_name=model_name, strict=True)
                for backend in backends if backend != "eager" for precision in precisions}

    def runner(k: int, backend: str, precision: str) -> Callable[[torch.Tensor], Outputs]:
        if backend != "eager":
            def run_compiled(x: torch.Tensor) -> Outputs:
                packed = compiled[backend, precision].run(x, knob_config(k))
                return unpack(packed, model.config.num_classes, tuple(x.shape[-2:]))
            return run_compiled

        def run(x: torch.Tensor) -> Outputs:
            amp = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext())
            with amp:
                return tuple(out.float() for out in model(x, coarse_layers=k))
        return run

    combos = [(k, rate, "eager", "fp32") for k, rate in settings]
    combos += [(k, rate, b, p) for b in backends for p in precisions for k, rate in settings
               if (b, p) != ("eager", "fp32")]
    if 0 not in {k for k, _ in settings}:
        combos.insert(0, (0, 0.0, "eager", "fp32"))
    rows = [Row(row_name(k, b, p), runner(k, b, p), k, rate, p, b, compiled.get((b, p))) for k, rate, b, p in combos]
    if hf is not None:
        def run_hf(x: torch.Tensor) -> Outputs:
            out = hf(pixel_values=x)
            return out.class_queries_logits, out.masks_queries_logits
        rows.insert(0, Row("transformers", run_hf))
    return rows


def semantic_map(outputs: Outputs, size: tuple[int, int]) -> np.ndarray:
    class_logits, mask_logits = outputs
    return semantic_maps(class_logits[0], mask_logits[0], size)[0]


def measure(rows: list[Row], images: list[np.ndarray], size: tuple[int, int], repeats: int) -> None:
    """Quality on every image (the pass also warms every row up: OpenVINO converts and compiles there), then
    ``repeats`` interleaved timed rounds."""
    k0 = next(row for row in rows if row.is_eager_fp32 and row.coarse_layers == 0)
    with torch.inference_mode():
        for rgb in images:
            pixels = to_tensor(rgb, size, torch.device("cpu"))
            outputs = {row.name: row.run(pixels) for row in rows}
            maps = {name: semantic_map(output, size) for name, output in outputs.items()}
            for row in rows:
                class_logits, mask_logits = outputs[row.name]
                row.largest_logits = (max(row.largest_logits[0], class_logits.abs().max().item()),
                                      max(row.largest_logits[1], mask_logits.abs().max().item()))
                row.agreement.append(float((maps[row.name] == maps[k0.name]).mean()))
                reference = reference_row(row, rows)
                if reference is not None:
                    row.reference_agreement.append(float((maps[row.name] == maps[reference.name]).mean()))
                    row.class_diff = max(row.class_diff or 0.0,
                                         (class_logits - outputs[reference.name][0]).abs().max().item())
                    row.mask_diff = max(row.mask_diff or 0.0,
                                        (mask_logits - outputs[reference.name][1]).abs().max().item())
        pixels = to_tensor(images[0], size, torch.device("cpu"))
        for _ in range(repeats):
            for row in rows:
                start = time.perf_counter()
                row.run(pixels)
                row.times_ms.append((time.perf_counter() - start) * 1e3)


def size_result(config: Mask2FormerConfig, rows: list[Row], size: tuple[int, int]) -> dict:
    medians = {row.name: statistics.median(row.times_ms) for row in rows}
    k0 = next(row.name for row in rows if row.is_eager_fp32 and row.coarse_layers == 0)
    hf_ms = medians.get("transformers")
    macs = {}
    for row in rows:
        k = row.coarse_layers or 0
        total = model_macs(config, size, k)
        macs[row.name] = (total["total"], total["pixel_decoder"], pixel_decoder_macs_for(config, size, k)["encoder"])
    def ratio(reference: Row | None, row: Row) -> float | None:
        return round(medians[reference.name] / medians[row.name], 3) if reference is not None else None

    def relative(diff: float | None, reference: Row | None, index: int) -> float | None:
        return None if diff is None or reference is None else diff / max(reference.largest_logits[index], 1e-12)

    out = []
    for row in rows:
        total, pixel_decoder, layers = macs[row.name]
        reference = reference_row(row, rows)
        own_k0 = next((other for other in rows if other.coarse_layers == 0 and other.backend == row.backend
                       and other.precision == row.precision), None) if row.coarse_layers is not None else None
        out.append({
            "name": row.name,
            "coarse_layers": row.coarse_layers if row.coarse_layers is not None else 0,
            "min_rate": row.min_rate,
            "implementation": "transformers" if row.coarse_layers is None else "ours",
            "backend": row.backend,
            "precision": row.precision,
            "median_ms": round(medians[row.name], 2),
            "best_ms": round(min(row.times_ms), 2),  # on a shared machine the least disturbed call
            "times_ms": [round(t, 2) for t in row.times_ms],
            "speedup_vs_k0": round(medians[k0] / medians[row.name], 3),
            "speedup_vs_transformers": round(hf_ms / medians[row.name], 3) if hf_ms else None,
            "speedup_vs_eager": ratio(reference, row) if row.coarse_layers is not None else None,  # same setting
            "speedup_vs_own_k0": ratio(own_k0, row),  # same backend and precision at k = 0
            "gmac_total": round(total / 1e9, 3),
            "gmac_pixel_decoder": round(pixel_decoder / 1e9, 3),
            "gmac_encoder_layers": round(layers / 1e9, 3),
            "macs_share_vs_k0": round(total / macs[k0][0], 4),
            "agreement_vs_k0": round(statistics.mean(row.agreement), 4),
            "agreement_vs_reference": round(statistics.mean(row.reference_agreement), 4)
            if row.reference_agreement else None,  # arg-max, with eager fp32 at the same setting
            "max_abs_class_logit_diff_vs_ours": row.class_diff,
            "max_abs_mask_logit_diff_vs_ours": row.mask_diff,
            "max_rel_class_logit_diff_vs_ours": relative(row.class_diff, reference, 0),
            "max_rel_mask_logit_diff_vs_ours": relative(row.mask_diff, reference, 1),
            "max_abs_class_logit": round(row.largest_logits[0], 3),
            "max_abs_mask_logit": round(row.largest_logits[1], 3),
        })
    return {"size": list(size), "rows": out}


def print_table(result: dict) -> None:
    def fmt(value, spec):
        width = "".join(c for c in spec.split(".")[0] if c.isdigit())
        return format("-", f">{width}") if value is None else format(value, spec)

    for entry in result["sizes"]:
        print(f"\n{result['model']} ({result['encoder']}) {entry['size'][0]}x{entry['size'][1]}  {result['device']}  "
              f"{result['weights']}")
        header = (f"{'row':<27} {'rate>=':>6} {'median ms':>10} {'best ms':>9} {'x vs k=0':>8} {'x own k0':>8} "
                  f"{'x eager':>7} {'x vs hf':>7} {'GMAC':>7} {'pixdec GMAC':>11} {'MAC %':>6} {'agree k=0':>9} "
                  f"{'agree ref':>9} {'rel dcls':>9} {'rel dmask':>9}")
        print(header)
        print("-" * len(header))
        for row in entry["rows"]:
            print(f"{row['name']:<27} {fmt(row['min_rate'], '>6.2f')} {row['median_ms']:>10.1f} "
                  f"{row['best_ms']:>9.1f} {row['speedup_vs_k0']:>8.2f} {fmt(row['speedup_vs_own_k0'], '>8.2f')} "
                  f"{fmt(row['speedup_vs_eager'], '>7.2f')} {fmt(row['speedup_vs_transformers'], '>7.2f')} "
                  f"{row['gmac_total']:>7.2f} {row['gmac_pixel_decoder']:>11.2f} {100 * row['macs_share_vs_k0']:>6.1f} "
                  f"{row['agreement_vs_k0']:>9.4f} {fmt(row['agreement_vs_reference'], '>9.4f')} "
                  f"{fmt(row['max_rel_class_logit_diff_vs_ours'], '>9.2e')} "
                  f"{fmt(row['max_rel_mask_logit_diff_vs_ours'], '>9.2e')}")
    for note in result["notes"]:
        print(f"note: {note}")


def load_model(args: argparse.Namespace) -> tuple[Mask2Former, str]:
    if args.weights:
        from segmerge_ros.models.mask2former.checkpoints import load_mask2former
        from segmerge_ros.training.train_mask2former import distilled_checkpoint, load_distilled

        if distilled_checkpoint(args.weights):  # written by segmerge-train mask2former
            model = load_distilled(args.weights)
            if (model.config.backbone, model.config.encoder) != (mask2former_config(args.model).backbone,
                                                                  mask2former_config(args.model).encoder):
                raise SystemExit(f"segmerge-bench: {args.weights} is a {model.config.backbone} backbone with the "
                                 f"{model.config.encoder} encoder, not {args.model}")
            return model.eval(), f"weights {args.weights} (segmerge-train mask2former)"
        overrides = json.loads(args.config_overrides) if args.config_overrides else {}
        loaded = load_mask2former(args.weights, expect=args.model, **overrides)
        return loaded.model.eval(), f"weights {args.weights} ({loaded.format})"
    torch.manual_seed(args.seed)
    model = Mask2Former(config_with_overrides(args.model, args.config_overrides))
    return randomise_weights(model, args.seed).eval(), f"random weights (seed {args.seed})"


def run(args: argparse.Namespace) -> int:
    """The rows of ``args`` (``bench.parse_args``'s, for a Mask2Former), timed, printed and written."""
    backends, precisions = check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [parse_size(text) for text in args.sizes]
    model, weights = load_model(args)
    config = model.config
    notes = [] if args.weights else [RANDOM_WEIGHTS_NOTE]
    hf, reason = (None, "--no-hf given") if args.no_hf else transformers_twin(model)
    if hf is None:
        notes.append(f"no transformers column: {reason}")
        print(f"segmerge-bench: no transformers column: {reason}", file=sys.stderr)
    paths = find_images(args.image)[: max(1, args.max_images)]
    images = [read_rgb(path) for path in paths] or [
        np.random.default_rng(args.seed).integers(0, 256, (*sizes[0], 3), dtype=np.uint8)]
    if not paths:
        notes.append("input: random pixels (no image found)")
    settings = settings_for_rates(model, args.rates)
    rows = build_rows(model, hf, settings, precisions, backends, cache_dir=args.engine_cache_dir,
                      model_name=args.model)
    result = {
        "model": args.model, "encoder": config.encoder if config.encoder == "stock" else
        f"proscale {tuple(config.proscale_schedule)}", "device": f"cpu ({torch.get_num_threads()} threads)",
        "weights": weights, "images": [str(p) for p in paths], "repeats": args.repeat, "notes": notes, "sizes": [],
    }
    for size in sizes:
        print(f"segmerge-bench: {args.model} at {size[0]}x{size[1]}: {len(rows)} rows x {args.repeat} rounds",
              file=sys.stderr)
        for row in rows:
            row.times_ms, row.agreement, row.class_diff, row.mask_diff = [], [], None, None
            row.largest_logits = (0.0, 0.0)
        measure(rows, images, size, args.repeat)
        for row in rows:  # a compiled row that fell back measured eager: say so beside the figures
            if row.compiled is not None and (row.compiled.name != row.backend
                                             or knob_config(row.coarse_layers).name in row.compiled.eager_rungs):
                notes.append(f"{row.name} at {size[0]}x{size[1]} ran eagerly (its {row.backend} export failed; "
                             "see the log)")
        result["sizes"].append(size_result(config, rows, size))
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # segmerge-bench parses the command line (bench.py imports this module, not back)
    refuse("run segmerge-bench --model mask2former-... (python -m segmerge_ros.bench.bench), not this module")
