"""``segmerge-train mask2former``: distil a small Mask2Former (MiT backbone; stock or PRO-SCALE pixel-decoder
encoder) from a semantic teacher on video frames, then score it per knob setting on held-out frames.

No Mask2Former weights exist on these machines, so this is how the project gets one that has learned (issue 13
item 5). The pieces are ``segmerge-train``'s: frames and the teacher's labels (``segmentation_data``'s
``distillation_samples``, with its label cache), augmentation and batches, the learning-rate schedule and the
held-out mIoU / pixel accuracy (``train_segmentation``'s ``sample_batch``, ``learning_rate``, ``evaluate``), the
optimiser-state files for ``--resume`` (``optimizer_state``) and the held-out folder (``heldout_pairs``). What is
Mask2Former's own:

* The student: ``mask2former-mit-b0`` (or ``-proscale``), its MiT encoder copied from a trained SegFormer
  (``--init``, default the shared vtest student: its ``encoder.*`` are ``pixel_level_module.encoder.*`` here), the
  pixel decoder and masked-attention decoder fresh, initialised as Mask2Former's training recipe
  (``initialise_for_training``).
* The loss: semantic distillation through Mask2Former's own semantic inference, not the set-prediction loss. Each
  prediction's per-pixel class scores ``einsum(softmax(class)[:, :-1], sigmoid(mask))``
  (``inference/postprocess/mask2former.semantic_scores``), normalised over the classes, upsampled to the crop, and the
  negative log-likelihood of the teacher's label (255 ignored), averaged over every decoder layer's prediction
  (``forward_all_layers``: the initial queries' and each layer's, Mask2Former's deep supervision). It needs no
  Hungarian matching and trains exactly what the node's semantic output reads; the price is that queries are not
  pushed towards one object each, so instance outputs of such a model are not trained (the teacher is semantic
  only).
* The teacher: ``deeplab:PATH`` (the Cityscapes DeepLab ``.tflite`` of ``../shared/data/coral_cityscapes_deeplab``,
  run at 513x513 as the SegFormer student's teacher was; needs ``ai-edge-litert``, a training/test dependency), or
  ``segmerge-train``'s ``segformer:PATH`` / ``vit:PATH``.

Output ``OUT/``: ``model/config.json`` + ``model/model.safetensors`` (our key names; ``load_distilled`` reads it
back through ``models/mask2former/checkpoints.load_mask2former`` with the config from the JSON),
``optimizer.safetensors`` + ``train_state.json`` (``--resume``), ``train_log.jsonl`` and ``metrics.json``: per knob
setting k, mIoU and pixel accuracy against the teacher's labels of the held-out frames, arg-max agreement with
k = 0, ms per frame and MACs.

Example::

    segmerge-train mask2former --frames 0:640:4 --frame-scale 0.5 --steps 400 --time-budget 3600 --threads 1 \\
        --bf16 --out runs/m2f_mit_b0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from segmerge_ros.models.segformer.checkpoints import load_segformer
from segmerge_ros.models.mask2former.model import (SEGMERGE_CHECKPOINT_FORMAT, Mask2Former, Mask2FormerOutput, knob_settings,
                                  mask2former_config)
from segmerge_ros.models.mask2former.checkpoints import load_mask2former
from segmerge_ros.models.mask2former.flops import model_macs
from segmerge_ros.models.imagenet import IMAGENET_MEAN, IMAGENET_STD
from segmerge_ros.models.vit.segmenter import IGNORE_INDEX
from segmerge_ros.inference.postprocess.mask2former import semantic_scores
from segmerge_ros.inference.metrics import ConfusionMatrix
from segmerge_ros.inference.sources import shared_data_dir
from segmerge_ros.training.arguments import parse_crop, parse_range
from segmerge_ros.training.optimizer_state import optimizer_tensors, restore_optimizer
from segmerge_ros.training.progress import Progress
from segmerge_ros.training.segmentation_data import (
    PairDataset,
    Teacher,
    distillation_samples,
    heldout_pairs,
    resize_frame,
    resize_labels,
    to_tensor_batch,
)
from segmerge_ros.training.segmentation_teachers import load_teacher as load_segmentation_teacher
from segmerge_ros.training.train_segmentation import TrainSettings, evaluate, learning_rate, sample_batch

CHECKPOINT_FORMAT = SEGMERGE_CHECKPOINT_FORMAT
DEEPLAB_SIZE = 513  # the DeepLab .tflite's fixed input


def _shared(*parts: str) -> str | None:
    root = shared_data_dir()
    return str(root.joinpath(*parts)) if root else None


# ---------------------------------------------------------------------------------------------------------------
# Teacher


class DeepLabTeacher:
    """The Cityscapes DeepLab ``.tflite`` (uint8 RGB 513x513 in, trainId arg-max out) as ``rgb -> class map``: the
    frame is resized to 513x513 and the labels back to the frame (nearest), as the SegFormer student was taught."""

    num_classes = 19

    def __init__(self, path: str | Path) -> None:
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as error:
            raise ImportError("the DeepLab teacher needs ai-edge-litert (pip install -r requirements-test.txt)") \
                from error
        if not Path(path).is_file():
            raise FileNotFoundError(f"DeepLab teacher {path} does not exist")
        self.interpreter = Interpreter(model_path=str(path), num_threads=1)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]["index"]
        self.output = self.interpreter.get_output_details()[0]["index"]

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        square = cv2.resize(rgb, (DEEPLAB_SIZE, DEEPLAB_SIZE), interpolation=cv2.INTER_LINEAR)
        self.interpreter.set_tensor(self.input, square[None])
        self.interpreter.invoke()
        labels = self.interpreter.get_tensor(self.output)[0].astype(np.uint8)
        return resize_labels(labels, rgb.shape[:2])


def load_teacher(spec: str) -> Teacher:
    """``deeplab:PATH`` or any of ``segmerge-train``'s teachers (``segformer:PATH``, ``vit:PATH``)."""
    kind, _, path = spec.partition(":")
    if kind == "deeplab":
        return DeepLabTeacher(path)
    return load_segmentation_teacher(spec)


# ---------------------------------------------------------------------------------------------------------------
# Student, loss, checkpoints


def build_student(name: str, init: str | None, proscale: bool = False, **overrides) -> Mask2Former:
    """A fresh Mask2Former (recipe initialisation) whose MiT encoder is copied from the SegFormer at ``init``."""
    name = name.lower().removesuffix("-proscale") + ("-proscale" if proscale else "")
    if init is None:
        return Mask2Former(mask2former_config(name, **overrides))
    segformer = load_segformer(init).model
    config = mask2former_config(name, **overrides)
    if config.backbone != "mit":
        raise ValueError(f"--init copies a SegFormer's MiT encoder; {name} has a {config.backbone} backbone")
    student_mit = segformer.config
    if (student_mit.hidden_sizes, student_mit.depths) != (config.mit.hidden_sizes, config.mit.depths):
        raise ValueError(f"--init {init} is a MiT with widths {student_mit.hidden_sizes} and depths "
                         f"{student_mit.depths}, {name} has {config.mit.hidden_sizes} and {config.mit.depths}")
    config = dataclasses.replace(config, mit=student_mit)
    model = Mask2Former(config)
    encoder = {f"pixel_level_module.{key}": value for key, value in segformer.state_dict().items()
               if key.startswith("encoder.")}
    missing, unexpected = model.load_state_dict(encoder, strict=False)
    backbone_missing = [key for key in missing if key.startswith("pixel_level_module.encoder.")]
    if backbone_missing or unexpected:
        raise ValueError(f"--init {init}: the SegFormer encoder does not fit the Mask2Former backbone: missing "
                         f"{backbone_missing[:5]}, unexpected {unexpected[:5]}")
    return model


def class_probabilities(prediction: Mask2FormerOutput, size: tuple[int, int]) -> torch.Tensor:
    """Mask2Former's semantic inference as a per-pixel distribution over the K classes at ``size``: the class
    scores normalised over the classes (they sum to the covering queries' mass, not to 1), upsampled bilinearly."""
    scores = semantic_scores(prediction.class_logits, prediction.mask_logits)
    scores = F.interpolate(scores, size=size, mode="bilinear", align_corners=False)
    return scores / scores.sum(dim=1, keepdim=True).clamp_min(1e-6)


def semantic_distillation_loss(predictions: list[Mask2FormerOutput], labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean over the predictions of the NLL of the teacher's labels (B, H, W) under ``class_probabilities``."""
    size = tuple(labels.shape[-2:])
    losses = [F.nll_loss(class_probabilities(p, size).clamp_min(1e-6).log(), labels, ignore_index=IGNORE_INDEX)
              for p in predictions]
    return {"total": torch.stack(losses).mean(), "last": losses[-1]}


class SemanticView(torch.nn.Module):
    """A Mask2Former at one knob setting as a per-pixel classifier: ``segment(images)`` gives class probabilities
    at the input size, the protocol of ``segmerge-train``'s ``evaluate``."""

    def __init__(self, model: Mask2Former, coarse_layers: int = 0) -> None:
        super().__init__()
        self.model, self.coarse_layers, self.config = model, coarse_layers, model.config

    def segment(self, images: torch.Tensor) -> torch.Tensor:
        return class_probabilities(self.model(images, coarse_layers=self.coarse_layers), tuple(images.shape[-2:]))


def save_checkpoint(model: Mask2Former, directory: Path, extra: dict) -> None:
    """``directory/config.json`` (our config's fields under ``"mask2former"``) and ``model.safetensors``."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(directory / "model.safetensors"))
    config = {"format": CHECKPOINT_FORMAT, "mask2former": model.config.to_dict(), **extra}
    (directory / "config.json").write_text(json.dumps(config, indent=2))


def distilled_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by ``save_checkpoint``."""
    config = Path(path) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("format") == CHECKPOINT_FORMAT


def load_distilled(directory: str | Path) -> Mask2Former:
    """A model written by ``save_checkpoint``, loaded by the project's loader (strict, clear mismatch errors)."""
    directory = Path(directory)
    stored = json.loads((directory / "config.json").read_text())
    if stored.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{directory / 'config.json'} is not a {CHECKPOINT_FORMAT} checkpoint "
                         f"(format {stored.get('format')!r})")
    return load_mask2former(directory).model


# ---------------------------------------------------------------------------------------------------------------
# Knob report


@torch.no_grad()
def knob_report(model: Mask2Former, heldout, input_scale: float, max_samples: int = 0) -> list[dict]:
    """Per knob setting: ``segmerge-train``'s held-out mIoU / pixel accuracy against the teacher's labels, arg-max
    agreement with k = 0, the median ms of the forward pass over the frames and the model's MACs at that size."""
    model.eval()
    settings = knob_settings(model)
    views = {k: SemanticView(model, k) for k, _ in settings}
    count = len(heldout) if max_samples <= 0 else min(max_samples, len(heldout))
    num_classes = model.config.num_classes
    confusion = {k: ConfusionMatrix(num_classes) for k in views}
    agreement: dict[int, list[float]] = {k: [] for k in views}
    times: dict[int, list[float]] = {k: [] for k in views}
    size = None
    for index in range(count):
        rgb, label = heldout[index]
        pixels = to_tensor_batch([resize_frame(rgb, input_scale)], IMAGENET_MEAN, IMAGENET_STD)
        size = tuple(pixels.shape[-2:])
        predictions = {}
        for k, view in views.items():  # interleaved per frame, so load drifts hit every setting alike
            start = time.perf_counter()
            probabilities = view.segment(pixels)
            times[k].append((time.perf_counter() - start) * 1e3)
            upsampled = F.interpolate(probabilities, size=label.shape, mode="bilinear", align_corners=False)
            predictions[k] = upsampled.argmax(1)[0]
            confusion[k].update(predictions[k], label)
        for k in views:
            agreement[k].append(float((predictions[k] == predictions[0]).float().mean()))
    base_macs = model_macs(model.config, size, 0)["total"]
    report = []
    for k, rate in settings:
        macs = model_macs(model.config, size, k)
        report.append({
            "coarse_layers": k, "min_rate": rate, "input_size": list(size), "frames": count,
            "miou_vs_teacher": round(confusion[k].miou, 4), "pixel_accuracy_vs_teacher": round(
                confusion[k].pixel_accuracy, 4), "agreement_vs_k0": round(statistics.mean(agreement[k]), 4),
            "median_ms": round(statistics.median(times[k]), 1), "gmac_total": round(macs["total"] / 1e9, 3),
            "gmac_pixel_decoder": round(macs["pixel_decoder"] / 1e9, 3),
            "macs_share_vs_k0": round(macs["total"] / base_macs, 4),
            "per_class_iou": confusion[k].summary(model_class_names(model))["per_class_iou"],
        })
    return report


def model_class_names(model: Mask2Former) -> list[str]:
    from segmerge_ros.models.labels import label_set

    return list(model.config.class_names or label_set(model.config.num_classes).classes)


# ---------------------------------------------------------------------------------------------------------------
# Training


def distil(model: Mask2Former, dataset, settings: TrainSettings, out: Path, heldout=None,
           time_budget: float = 0.0, bf16: bool = False, resume: bool = False, extra: dict | None = None,
           backbone_lr_factor: float = 0.1) -> list[dict]:
    """Train on ``dataset`` ((rgb, label) samples) with ``semantic_distillation_loss``; save to ``out``.

    ``time_budget`` (seconds of training, 0 = none) ends the run early; the learning-rate schedule then runs on
    whichever of steps and time is further along, so a time-boxed run still decays to 0.
    """
    out.mkdir(parents=True, exist_ok=True)
    backbone = [p for n, p in model.named_parameters() if n.startswith("pixel_level_module.encoder.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("pixel_level_module.encoder.")]
    optimizer = torch.optim.AdamW([{"params": backbone, "lr_factor": backbone_lr_factor},
                                   {"params": rest, "lr_factor": 1.0}],
                                  lr=settings.lr, weight_decay=settings.weight_decay)
    start, elapsed_before = 0, 0.0
    if resume:
        if not (out / "train_state.json").is_file():
            raise FileNotFoundError(f"nothing to resume in {out} (no train_state.json)")
        state = json.loads((out / "train_state.json").read_text())
        from segmerge_ros.models.checkpoint_errors import load_state_dict_strict

        load_state_dict_strict(model, load_file(str(out / "model" / "model.safetensors")), str(out / "model"))
        restore_optimizer(optimizer, load_file(str(out / "optimizer.safetensors")), state["optimizer"])
        start, elapsed_before = state["step"], state["seconds"]
    records: list[dict] = []
    log_file = (out / "train_log.jsonl").open("a")

    def emit(record: dict) -> None:
        records.append(record)
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()

    def checkpoint(step: int, seconds: float) -> None:
        save_checkpoint(model, out / "model", {"training": dataclasses.asdict(settings), "step": step,
                                               "train_seconds": round(seconds, 1), **(extra or {})})
        tensors, rest_state = optimizer_tensors(optimizer)
        save_file(tensors, str(out / "optimizer.safetensors"))
        (out / "train_state.json").write_text(json.dumps({"step": step, "seconds": seconds, "optimizer": rest_state}))

    progress = Progress(settings.steps, "mask2former", start=start)
    model.train()
    began = time.perf_counter()
    step = start
    seconds = elapsed_before
    while step < settings.steps and not (time_budget and seconds >= time_budget):
        done_share = max(step / settings.steps, seconds / time_budget if time_budget else 0.0)
        lr = learning_rate(max(step, int(done_share * settings.steps)), settings)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_factor"]
        images, labels = sample_batch(dataset, settings, step, IMAGENET_MEAN, IMAGENET_STD)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            predictions = model.forward_all_layers(images)
        losses = semantic_distillation_loss([Mask2FormerOutput(p.class_logits.float(), p.mask_logits.float())
                                             for p in predictions], labels)
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        if settings.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        step += 1
        seconds = elapsed_before + time.perf_counter() - began
        values = {k: float(v.detach()) for k, v in losses.items()}
        emit({"step": step, "lr": lr, "seconds": round(seconds, 2), **values})
        progress.update(step, loss=values["total"])
        if heldout is not None and settings.eval_every and step % settings.eval_every == 0:
            scores = evaluate(SemanticView(model), heldout, model.config.num_classes, settings.eval_scale,
                                   settings.max_eval)
            emit({"step": step, "eval": scores})
            model.train()
        if settings.save_every and step % settings.save_every == 0:
            checkpoint(step, seconds)
    progress.close()
    checkpoint(step, seconds)
    log_file.close()
    model.eval()
    return records


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="segmerge-train mask2former", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mask2former-mit-b0", help="mask2former-mit-b0 .. -mit-b5 (default b0)")
    p.add_argument("--proscale", action="store_true", help="the PRO-SCALE encoder instead of the stock one")
    p.add_argument("--schedule", default="3,3,3", help="PRO-SCALE (p1, p2, p3) with --proscale (default 3,3,3)")
    deeplab = _shared("coral_cityscapes_deeplab", "deeplab_mobilenet_edgetpu_slim_cityscapes_quant.tflite")
    p.add_argument("--teacher", default=f"deeplab:{deeplab}",
                   help="deeplab:TFLITE | segformer:PATH | vit:PATH (default: the shared Cityscapes DeepLab)")
    p.add_argument("--source", default=_shared("opencv_samples", "vtest.avi"), help="video or image folder")
    p.add_argument("--frames", default="0:640:4", help="training frames start:stop[:step] (default 0:640:4)")
    p.add_argument("--frame-scale", type=float, default=0.5, help="scale of the stored training frames (0.5)")
    p.add_argument("--label-cache", default=None, help="npz cache of the teacher's labels (shared between runs)")
    p.add_argument("--heldout", default=_shared("segformer_b0_vtest_student", "heldout"),
                   help="held-out images/ + labels/ (default: the student's 27 vtest frames, teacher labels)")
    p.add_argument("--init", default=_shared("segformer_b0_vtest_student"),
                   help="SegFormer whose MiT encoder starts the backbone ('none': random)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--crop", type=parse_crop, default="256x320", help="training crop HxW")
    p.add_argument("--scale-range", default="0.75,1.25")
    p.add_argument("--lr", type=float, default=3e-4, help="decoders' learning rate; the backbone gets 0.1x")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--max-eval", type=int, default=0, help="held-out frames for the evaluations (0: all)")
    p.add_argument("--save-every", type=int, default=25)
    p.add_argument("--time-budget", type=float, default=0.0, help="seconds of training at most (0: no limit)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward pass (CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--evaluate-only", action="store_true", help="only the knob report of the model in --out")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    heldout = PairDataset(heldout_pairs(args.heldout)) if args.heldout else None
    if args.evaluate_only:
        model = load_distilled(out / "model")
    else:
        schedule = tuple(int(v) for v in args.schedule.split(","))
        init = None if args.init in (None, "", "none") else args.init
        model = build_student(args.model, init, args.proscale, proscale_schedule=schedule)
        teacher = load_teacher(args.teacher)
        dataset = distillation_samples(args.source, teacher, parse_range(args.frames), args.frame_scale,
                                            args.label_cache)
        settings = TrainSettings(
            steps=args.steps, batch_size=args.batch, crop=args.crop,
            scale_range=tuple(float(v) for v in args.scale_range.split(",")), lr=args.lr,
            weight_decay=args.weight_decay, warmup=args.warmup, eval_every=args.eval_every,
            save_every=args.save_every, eval_scale=args.frame_scale, max_eval=args.max_eval, seed=args.seed)
        extra = {"teacher": args.teacher, "source": args.source, "frames": args.frames,
                 "frame_scale": args.frame_scale, "init": init, "bf16": args.bf16, "threads": torch.get_num_threads()}
        records = distil(model, dataset, settings, out, heldout, args.time_budget, args.bf16, args.resume, extra)
        losses = [r["total"] for r in records if "total" in r]
        print(json.dumps({"out": str(out), "steps": records[-1]["step"] if records else 0,
                          "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}))
    metrics: dict[str, Any] = {"model": str(out / "model"), "encoder": model.config.encoder}
    stored = json.loads((out / "model" / "config.json").read_text())
    metrics.update({key: stored.get(key) for key in ("step", "train_seconds", "training", "teacher", "frames")})
    log = out / "train_log.jsonl"
    if log.is_file():
        losses = [json.loads(line) for line in log.read_text().splitlines()]
        losses = [r["total"] for r in losses if "total" in r]
        metrics["loss_first_last"] = [losses[0], losses[-1]] if losses else None
    if heldout is not None:
        metrics["knob"] = knob_report(model, heldout, float(stored.get("frame_scale") or args.frame_scale),
                                      args.max_eval)
        for row in metrics["knob"]:
            print(f"k={row['coarse_layers']} mIoU {row['miou_vs_teacher']:.4f} pixel acc "
                  f"{row['pixel_accuracy_vs_teacher']:.4f} agreement k=0 {row['agreement_vs_k0']:.4f} "
                  f"{row['median_ms']:.0f} ms {row['gmac_total']:.1f} GMAC")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
