"""``segmerge-train``: train a segmentation model (Segmenter ViT, ALGM, ClustViT, DoViT, SegFormer).

Data sources (``--data``):

* ``cityscapes:ROOT``: ``ROOT/leftImg8bit/<split>/<city>/*_leftImg8bit.png`` with
  ``ROOT/gtFine/<split>/<city>/*_gtFine_labelTrainIds.png`` (trainIds 0..18, 255 ignored).
* ``ade20k:ROOT``: ``ROOT/images/<split>/*.jpg`` with ``ROOT/annotations/<split>/*.png`` (0 = ignore, 1..150 ->
  0..149).
* ``frames:SOURCE``: distillation on unlabelled frames (a video or an image folder, ``--frames start:stop[:step]``)
  labelled once by a teacher (``--teacher segformer:PATH`` = a SegFormer the project loads, e.g. the trained B0
  student; ``--teacher vit:DIR`` = a checkpoint written by this tool). Teacher labels can be cached
  (``--label-cache``). A teacher is any callable ``rgb (H, W, 3) uint8 -> class map (H, W) uint8``.

Held-out evaluation (mIoU, pixel accuracy): the ``--val-split`` of a dataset, or ``--heldout DIR`` with
``DIR/images/<name>.png`` and ``DIR/labels/<name>*.png`` (e.g. the student's ``heldout`` folder).

Checkpoints: ``OUT/model.safetensors`` + ``OUT/config.json`` (``save_vit_checkpoint``; SegFormer likewise),
``OUT/optimizer.safetensors`` + ``OUT/train_state.json`` for ``--resume``; ``OUT/train_log.jsonl`` logs losses and
evaluations. A plain-text progress bar goes to stderr.

Subcommands (the first argument; the rest are the subcommand's own): ``segmerge-train pose ...`` distils a
Segformer++ pose student from MoveNet and ``segmerge-train pose-eval --weights DIR/pose.pth`` evaluates one
(``training/pose_cli.py``, docs/pose.md); ``segmerge-train pose-teachers`` measures the pose teachers against
ground truth (``training/teacher_eval.py``); ``segmerge-train mask2former ...`` distils a Mask2Former
(``training/train_mask2former.py``, docs/mask2former.md).

The pieces: ``segmentation_data`` (datasets, teacher-labelled frames, augmentation), ``segmentation_teachers``,
``segmentation_models`` (the families by name, save and load) and ``train_segmentation`` (the loop).

Example (distillation from the trained SegFormer-B0 on vtest frames 0-639)::

    segmerge-train --model algm-vit-t-linear --data frames:../shared/data/opencv_samples/vtest.avi \\
        --frames 0:640:2 --frame-scale 0.5 --teacher segformer:../shared/data/segformer_b0_vtest_student \\
        --heldout ../shared/data/segformer_b0_vtest_student/heldout --steps 600 --out runs/algm_t
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

import torch

from segmerge_ros.training import pose_cli, teacher_eval, train_mask2former
from segmerge_ros.training.arguments import parse_crop, parse_key_values, parse_range
from segmerge_ros.training.segmentation_data import (
    PairDataset,
    ade20k_label_transform,
    ade20k_pairs,
    cityscapes_pairs,
    distillation_samples,
    heldout_pairs,
)
from segmerge_ros.training.segmentation_models import build_model
from segmerge_ros.training.segmentation_teachers import load_teacher
from segmerge_ros.training.train_segmentation import TrainSettings, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segmerge-train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="e.g. segmenter-vit-t-linear, algm-vit-s-mask, segformer-b0")
    parser.add_argument("--data", required=True, help="cityscapes:ROOT | ade20k:ROOT | frames:VIDEO_OR_FOLDER")
    parser.add_argument("--out", required=True, help="output directory (checkpoint, logs)")
    parser.add_argument("--teacher", help="segformer:PATH | vit:PATH (required for frames:)")
    parser.add_argument("--frames", default="0:", help="frame selection start:stop[:step] for frames: sources")
    parser.add_argument("--frame-scale", type=float, default=1.0, help="scale of the stored training frames")
    parser.add_argument("--label-cache", help="npz cache of the teacher's labels")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--val-split", default="val")
    parser.add_argument("--heldout", help="held-out folder with images/ and labels/ (overrides --val-split)")
    parser.add_argument("--num-classes", type=int, help="default: 19 (Cityscapes), 150 (ADE20K), teacher's classes")
    parser.add_argument("--init", help="start from these weights (any ViT checkpoint format)")
    parser.add_argument("--method-arg", action="append", default=[], help="key=value for the method, repeatable")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--crop", type=parse_crop, default="256x256", help="training crop HxW (multiples of 16 for ViTs)"
    )
    parser.add_argument("--scale-range", default="0.5,1.5")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument(
        "--eval-scale", type=float, help="scale of held-out images at evaluation (default --frame-scale)"
    )
    parser.add_argument("--max-eval", type=int, default=0, help="evaluate on at most this many held-out images")
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    return parser


# The first argument names these; their own arguments follow it.
SUBCOMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "pose": pose_cli.main_train,
    "pose-eval": pose_cli.main_eval,
    "pose-teachers": teacher_eval.main,
    "mask2former": train_mask2former.main,
}


def main(argv: Sequence[str] | None = None) -> int:
    """``segmerge-train [pose | pose-eval | pose-teachers | mask2former] ARGS``: a subcommand, else a segmentation
    training run."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    return main_segmentation(argv)


def main_segmentation(argv: Sequence[str]) -> int:
    """Train the ``--model`` on ``--data`` (see the module docstring); prints a JSON summary."""
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    kind, _, location = args.data.partition(":")
    heldout = None
    labels_name = "cityscapes"
    if kind == "cityscapes":
        dataset = PairDataset(cityscapes_pairs(location, args.train_split))
        num_classes = args.num_classes or 19
        if not args.heldout:
            heldout = PairDataset(cityscapes_pairs(location, args.val_split))
    elif kind == "ade20k":
        dataset = PairDataset(ade20k_pairs(location, args.train_split), ade20k_label_transform)
        num_classes, labels_name = args.num_classes or 150, "ade20k"
        if not args.heldout:
            heldout = PairDataset(ade20k_pairs(location, args.val_split), ade20k_label_transform)
    elif kind == "frames":
        if not args.teacher:
            raise SystemExit("--data frames: needs --teacher segformer:PATH or vit:PATH")
        teacher = load_teacher(args.teacher)
        num_classes = args.num_classes or getattr(teacher, "num_classes", 19)
        dataset = distillation_samples(location, teacher, parse_range(args.frames), args.frame_scale, args.label_cache)
    else:
        raise SystemExit(f"unknown --data kind {kind!r}; use cityscapes:, ade20k: or frames:")
    if args.heldout:
        heldout = PairDataset(heldout_pairs(args.heldout))
    model = build_model(args.model, num_classes, labels_name, parse_key_values(args.method_arg, "--method-arg"))
    if args.init:
        from segmerge_ros.models.vit.methods import METHOD_PREFIXES
        from segmerge_ros.models.vit.checkpoints import load_vit_weights

        load_vit_weights(model, args.init, allow_missing_prefixes=METHOD_PREFIXES.get(getattr(model, "family", ""), ()))
    settings = TrainSettings(
        steps=args.steps,
        batch_size=args.batch_size,
        crop=args.crop,
        scale_range=tuple(float(v) for v in args.scale_range.split(",")),
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup=args.warmup,
        eval_every=args.eval_every,
        save_every=args.save_every,
        eval_scale=args.eval_scale if args.eval_scale is not None else args.frame_scale,
        max_eval=args.max_eval,
        seed=args.seed,
    )
    extra = {"data": args.data, "teacher": args.teacher, "frames": args.frames, "frame_scale": args.frame_scale}
    records = train(model, dataset, settings, args.out, heldout, num_classes, args.resume, extra)
    final = [r["eval"] for r in records if "eval" in r]
    losses = [r["total"] for r in records if "total" in r]
    summary = {
        "out": args.out, "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None
    }
    if final:
        summary["eval"] = final[-1]
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
