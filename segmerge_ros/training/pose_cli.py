"""``segmerge-train pose`` and ``segmerge-train pose-eval``: a Segformer++ pose student distilled from MoveNet.

Distillation (``pose``):

* People are found by the node's own pipeline: the segmentation checkpoint ``--seg-weights`` on each frame at its
  own resolution, ``person_boxes_from_segmentation`` (``--min-person-area``, ``--max-persons``) and the node's crop
  (``box_to_center_scale`` with padding 1.25 at 288x384), so the student learns the crops it will see.
* The teacher (MoveNet SinglePose ``.tflite``, ``training/movenet.py``) runs once per person on a square region of
  the frame: ``--teacher-crop tight`` (default: ``TEACHER_PADDING`` times the box's longer side, real pixels) or
  ``node`` (the node's crop padded to a square, the baseline's choice). Boxes, teacher keypoints (frame pixels) and
  scores are cached in ``OUT/pose_cache.npz`` (reused when sources, frames and settings match), so the training
  steps only crop and render.
* Each training sample is a person crop with scale/shift jitter (``--scale-jitter``, ``--shift-jitter``),
  horizontal flip with the COCO flip pairs and mild brightness/contrast jitter. Targets are unbiased Gaussians
  (sigma ``--sigma`` heatmap pixels) at the teacher's keypoints; with ``--calibrated`` (default) each Gaussian's
  peak is the teacher's score, so the student's heatmap maximum (the keypoint score the node thresholds with
  ``pose.keypoint_threshold``) learns the teacher's confidence. Keypoints the teacher scores at or below
  ``--min-score``, or outside the crop, do not teach (weight 0), and people with fewer than ``--min-keypoints``
  such keypoints are never drawn. Loss: weighted MSE.
* ``--augmented K`` (issue 22, ``pose_augmented``): many more kinds of people. ``--source`` takes
  ``PATH@START:END[:STEP]`` and folders of videos (one sampling group); video people come from the segmentation
  or, where it finds no plausible number of people on a few probe frames (none, or its ``--max-persons`` cap:
  clutter), from the teacher's own boxes on the whole frame and on overlapping squares (``--finder``);
  ``--coco-train FOLDER`` adds COCO ground-truth boxes except the frozen test images (``pose_split``). Per person
  the node's crop and K strongly augmented crops (rotation, scale, shift, flip, occlusion, blur, low resolution,
  colour: ``pose_augment``), each labelled by the teacher as it looks (no label is moved); records and
  augmentation parameters are cached per key in ``--data-cache`` and the crops are regenerated when drawn (the
  jitter and flip options above do not apply). ``--teacher-kind`` (or the file name) picks MoveNet or BlazePose.
* Sources are sampled in proportion to the square root of their number of people, so a few still images are not
  drowned by a long video.
* Model: ``SegformerPose`` with the encoder of the segmentation checkpoint (``--init-encoder``, default the
  ``--seg-weights``), head from scratch; AdamW (encoder ``--lr-encoder``, head ``--lr-head``), warm-up then cosine.
* Output: ``OUT/pose.pth`` (Segformer++ mmpose layout, what ``pose.weights`` loads) every ``--save-every`` steps and
  at the end, ``OUT/optimizer.safetensors`` + ``OUT/train_state.json`` for ``--resume``, ``OUT/train_log.jsonl``,
  ``OUT/metrics.json`` (data, settings, losses, time, and the evaluation below when ``--eval`` is given).

Evaluation (``pose-eval``, see ``evaluate_pose``): PCK@0.2 and mean error against the teacher on held-out video
frames, PCK@0.2 and OKS against COCO ground truth for the student and the teacher on the same boxes, per rung of
the merge-rate ladder.

The pieces: ``pose_people`` (people and teacher keypoints, their cache), ``train_pose`` (samples, the loop,
the score calibration) and ``pose_eval`` (the figures).

    segmerge-train pose --teacher ../shared/data/coral_movenet_pose/movenet_single_pose_lightning_ptq.tflite \\
        --source ../shared/data/opencv_samples/vtest.avi --frames 0:640 \\
        --seg-weights ../shared/data/segformer_b0_vtest_student --steps 1000 --batch 8 --out runs/pose
    segmerge-train pose --augmented 4 --source ../shared/data/opencv_samples/vtest.avi@0:640:4 \\
        --source ../shared/data/pose2sim_videos@0::5 --source ../shared/data/sports2d_videos@0::5 \\
        --coco-train ../shared/data/coco_mini_train --data-cache /tmp/pose_data --out runs/pose_augmented
    segmerge-train pose-eval --weights runs/pose/pose.pth
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from segmerge_ros.models.pose.model import (
    POSE_INPUT_SIZE,
    SegformerPose,
    build_pose_model,
    load_pose_checkpoint,
    save_pose_checkpoint,
)
from segmerge_ros.inference.sources import shared_data_dir
from segmerge_ros.training.arguments import parse_range
from segmerge_ros.training.movenet import MoveNetTeacher
from segmerge_ros.training.pose_augment import AugmentSettings
from segmerge_ros.training.pose_augmented import (
    FinderSettings,
    augmented_batches,
    augmented_key,
    cached_augmented,
    collect_augmented,
    plain_people,
    source_groups,
)
from segmerge_ros.training.pose_eval import EVAL_COLLECT_PERSONS, evaluate_pose
from segmerge_ros.training.pose_gt_eval import ground_truth_report, report_table
from segmerge_ros.training.pose_people import TEACHER_CROPS, PersonFinder, cached_people
from segmerge_ros.training.pose_sources import FINDERS, coco_source, parse_source
from segmerge_ros.training.pose_split import COCO_MINI_TRAIN_TEST_IMAGES
from segmerge_ros.training.pose_teachers import TEACHER_KINDS, build_teacher
from segmerge_ros.training.train_pose import (
    PoseTrainSettings,
    calibrate_scores,
    init_encoder_from_segmentation,
    train_pose,
    write_metrics,
)

TEST_ONLY_FOLDERS = ("mmpose_coco_keypoints",)  # test-only ground truth (pose_split): never a --coco-train


def default_path(*parts: str) -> str | None:
    shared = shared_data_dir()
    path = shared.joinpath(*parts) if shared else None
    return str(path) if path is not None and path.exists() else None


def build_train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="segmerge-train pose", description="Distil a Segformer++ pose student "
                                "from MoveNet on person crops found by the node's pipeline.")
    p.add_argument("--teacher", default=default_path("coral_movenet_pose", "movenet_single_pose_lightning_ptq.tflite"),
                   help="MoveNet SinglePose or BlazePose landmark .tflite")
    p.add_argument("--teacher-kind", choices=TEACHER_KINDS, default="auto",
                   help="teacher class; auto: from the file name (movenet* or pose_landmark*)")
    p.add_argument("--source", action="append", default=[],
                   help="video, image folder or image (repeatable); with --augmented also PATH@START:END[:STEP] "
                        "and folders of videos (one sampling group)")
    p.add_argument("--frames", default="0:", help="START:END[:STEP] of the videos (images: all)")
    p.add_argument("--augmented", type=int, metavar="K",
                   help="teacher-labelled augmented people (pose_augmented): per person the node's crop and K "
                        "augmented crops, each labelled by the teacher as it looks")
    p.add_argument("--coco-train", help="with --augmented: COCO keypoint folder whose ground-truth boxes are "
                   "people too (never the frozen test images of pose_split)")
    p.add_argument("--finder", choices=FINDERS, default="auto", help="with --augmented: how video people are "
                   "found (auto: the segmentation where it finds a plausible number of people on a few probe "
                   "frames, else the teacher's own boxes)")
    p.add_argument("--max-side", type=int, default=1280,
                   help="with --augmented: frames are resized down to this longer side first (0: never)")
    p.add_argument("--data-seed", type=int, default=0, help="with --augmented: seed of the augmentations")
    p.add_argument("--data-cache", help="with --augmented: folder of the records cache (default --out)")
    p.add_argument("--prepare-only", action="store_true", help="build or load the people and stop")
    p.add_argument("--seg-weights", default=default_path("segformer_b0_vtest_student"),
                   help="segmentation checkpoint that finds the people")
    p.add_argument("--init-encoder", help="segmentation checkpoint whose encoder starts the student "
                   "(default --seg-weights; 'none': random)")
    p.add_argument("--init-pose", help="pose checkpoint (.pth, mmpose layout) the whole student starts from, e.g. "
                   "to fine-tune an earlier student on more people (instead of --init-encoder)")
    p.add_argument("--teacher-crop", choices=TEACHER_CROPS, default="tight")
    p.add_argument("--min-person-area", type=int, default=400)
    p.add_argument("--max-persons", type=int, default=12)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr-encoder", type=float, default=2e-4)
    p.add_argument("--lr-head", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--sigma", type=float, default=2.0, help="target Gaussian sigma, heatmap pixels")
    p.add_argument("--min-score", type=float, default=0.3, help="teacher keypoints at or below do not teach")
    p.add_argument("--min-keypoints", type=int, default=3,
                   help="people with fewer keypoints above --min-score are not trained on")
    p.add_argument("--no-calibrated", dest="calibrated", action="store_false",
                   help="unit-peak targets instead of peaks at the teacher's score")
    p.add_argument("--scale-jitter", type=float, default=0.25)
    p.add_argument("--shift-jitter", type=float, default=0.1)
    p.add_argument("--no-flip", dest="flip", action="store_false")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast on the CPU (about 2x faster where the "
                   "CPU has AVX512-BF16/AMX; weights and optimiser stay float32)")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds of training: the learning-rate schedule follows the larger of step and time "
                        "progress and the run stops when either is done (0: steps only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--calibrate", type=int, default=256, help="fit per-keypoint score factors on this many "
                   "training people at the end (folded into pose.pth; 0: off), see calibrate_scores")
    p.add_argument("--eval", action="store_true", help="run pose-eval at the end and add it to metrics.json")
    return p


def build_eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="segmerge-train pose-eval", description="Pose student figures: PCK@0.2 and "
                                "mean error against the teacher on held-out video frames, PCK@0.2 and OKS against "
                                "COCO ground truth (student and teacher), per merge-ladder rung.")
    p.add_argument("--weights", help="pose checkpoint (.pth, mmpose layout); omitted: a random model")
    p.add_argument("--teacher", default=default_path("coral_movenet_pose", "movenet_single_pose_lightning_ptq.tflite"))
    p.add_argument("--seg-weights", default=default_path("segformer_b0_vtest_student"))
    p.add_argument("--video", default=default_path("opencv_samples", "vtest.avi"))
    p.add_argument("--frames", default="660:796", help="held-out frames START:END[:STEP]")
    p.add_argument("--coco", action="append", help="COCO keypoint folder (one .json + images), repeatable: the "
                   "student (each rung, backend, precision) and the teachers against its ground truth, on its boxes "
                   "and on the node's (default: mmpose_coco_keypoints)")
    p.add_argument("--backends", default="eager", help="comma-separated backends the student runs on (with --coco)")
    p.add_argument("--precisions", default="fp32", help="comma-separated precisions (with --coco)")
    p.add_argument("--teachers", default="movenet", help="comma-separated teachers on the same boxes (movenet, "
                   "blazepose-heavy, blazepose-full; '' for none)")
    p.add_argument("--no-node-boxes", dest="node_boxes", action="store_false",
                   help="only ground-truth boxes (else also the people --seg-weights finds)")
    p.add_argument("--png", help="draw predicted beside true skeletons of a few persons of the first --coco folder")
    p.add_argument("--no-video", dest="use_video", action="store_false",
                   help="skip the held-out video figures against the teacher")
    p.add_argument("--no-rungs", dest="rungs", action="store_false", help="only the unmerged model")
    p.add_argument("--max-persons", type=int, default=4, help="people per frame, largest first (the node's "
                   "pose.max_persons default)")
    p.add_argument("--min-person-area", type=int, default=400)
    p.add_argument("--rung-frame-step", type=int, default=1, help="use every n-th held-out frame for merged rungs")
    p.add_argument("--input-size", default="288x384",
                   help="pose crop WxH (multiples of 32) the checkpoint is run at; the weights are size-free")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", help="npz cache of the held-out people and teacher keypoints (reused when it matches)")
    p.add_argument("--json", help="also write the figures to this file")
    return p


def split_list(text: str) -> list[str]:
    """'a, b' -> ['a', 'b']; '' -> []."""
    return [part.strip() for part in text.split(",") if part.strip()]


def require(value: str | None, what: str) -> str:
    if not value:
        raise SystemExit(f"{what} not given and not found under the shared data folder")
    return value


@dataclass
class PoseData:
    """What a ``segmerge-train pose`` run trains on: people (or augmented records), their frames, the cache key,
    people per source, the batches (None: ``train_pose``'s plain ones) and the people the scores calibrate on."""

    people: object
    frames: dict
    key: dict
    per_source: dict
    from_cache: bool
    batches: object = None
    calibration: object = None


def plain_data(args, teacher_path: str, seg_weights: str, out: Path) -> PoseData:
    """The people of the plain pipeline (``pose_people``): segmentation boxes, teacher keypoints, ``OUT`` cache."""
    if not args.source:
        raise SystemExit("--source is required (or --augmented with --coco-train)")
    frame_range = parse_range(args.frames)
    sources = [str(Path(s).resolve()) for s in args.source]
    key = {"sources": sources, "frames": args.frames, "seg_weights": str(Path(seg_weights).resolve()),
           "teacher": str(Path(teacher_path).resolve()), "teacher_crop": args.teacher_crop,
           "min_person_area": args.min_person_area, "max_persons": args.max_persons}
    if args.teacher_kind != "auto":
        key["teacher_kind"] = args.teacher_kind
    people, frames, from_cache = cached_people(
        out / "pose_cache.npz", key, sources, frame_range,
        lambda: PersonFinder(seg_weights, min_area=args.min_person_area, max_persons=args.max_persons),
        lambda: build_teacher(teacher_path, args.teacher_kind), args.teacher_crop)
    per_source = {Path(s).name: int((people.source == i).sum()) for i, s in enumerate(sources)}
    return PoseData(people, frames, key, per_source, from_cache, calibration=people)


def augmented_data(args, teacher_path: str, seg_weights: str, out: Path, settings: PoseTrainSettings) -> PoseData:
    """The records of the augmented pipeline (``pose_augmented``), from their cache when the key matches."""
    specs = [spec for text in args.source for spec in parse_source(text, args.frames, args.finder)]
    if args.coco_train:
        if Path(args.coco_train).resolve().name in TEST_ONLY_FOLDERS:
            raise SystemExit(f"{args.coco_train} is test-only ground truth (pose_split); it is never trained on")
        specs.append(coco_source(args.coco_train))
    if not specs:
        raise SystemExit("--augmented needs people: --source and/or --coco-train")
    teacher, augment = build_teacher(teacher_path, args.teacher_kind), AugmentSettings()
    finder = FinderSettings(str(Path(seg_weights).resolve()), args.min_person_area, args.max_persons)
    key = augmented_key(specs, teacher, args.augmented, args.data_seed, augment, finder, args.max_side,
                        COCO_MINI_TRAIN_TEST_IMAGES)
    records, frames, info, from_cache = cached_augmented(
        args.data_cache or out, key, specs, lambda: collect_augmented(
            specs, lambda: PersonFinder(seg_weights, min_area=args.min_person_area, max_persons=args.max_persons),
            teacher, args.augmented, args.data_seed, augment, finder, args.max_side,
            COCO_MINI_TRAIN_TEST_IMAGES))
    print(json.dumps({"augmented_data": info}), file=sys.stderr, flush=True)
    people_of = np.bincount(records.source[records.variant == 0], minlength=len(specs))
    per_source = {str(Path(s.path).relative_to(Path(s.group).parent)) if s.group else Path(s.path).name:
                  int(people_of[i]) for i, s in enumerate(specs)}
    batches = augmented_batches(records, frames, source_groups(specs), settings) if len(records) else None
    return PoseData(records, frames, {**key, "cache": info["cache"]}, per_source, from_cache, batches,
                    plain_people(records))


def main_train(argv: Sequence[str]) -> int:
    """``segmerge-train pose``: prepare the people (plain or ``--augmented``), train, calibrate, evaluate."""
    args = build_train_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    teacher_path = require(args.teacher, "--teacher")
    seg_weights = require(args.seg_weights, "--seg-weights")
    out = Path(args.out)
    settings = PoseTrainSettings(
        steps=args.steps, batch=args.batch, lr_encoder=args.lr_encoder, lr_head=args.lr_head, warmup=args.warmup,
        sigma=args.sigma, min_score=args.min_score, min_keypoints=args.min_keypoints, calibrated=args.calibrated,
        scale_jitter=args.scale_jitter, shift_jitter=args.shift_jitter, flip=args.flip, save_every=args.save_every,
        seed=args.seed,
        time_budget=args.time_budget, bf16=args.bf16)
    began = time.perf_counter()
    if args.augmented is not None:
        data = augmented_data(args, teacher_path, seg_weights, out, settings)
    else:
        data = plain_data(args, teacher_path, seg_weights, out)
    people, frames, key, per_source = data.people, data.frames, data.key, data.per_source
    prepare_seconds = time.perf_counter() - began
    print(json.dumps({"people": len(data.calibration), "records": len(people), "per_source": per_source,
                      "from_cache": data.from_cache, "prepare_seconds": round(prepare_seconds, 1)}),
          file=sys.stderr, flush=True)
    if args.prepare_only:
        return 0
    model = SegformerPose("b0")
    if args.init_pose and args.init_encoder:
        raise SystemExit("--init-pose and --init-encoder both set: the student starts from one of them")
    init = args.init_pose or args.init_encoder or seg_weights
    if args.resume:
        pass  # train_pose loads the run's own checkpoint
    elif args.init_pose:
        load_pose_checkpoint(model, args.init_pose)
    elif init != "none":
        init_encoder_from_segmentation(model, init)
    info = {"command": "segmerge-train pose " + " ".join(argv), "data": key, "people_per_source": per_source,
            "teacher_keypoints_above_min_score": float((people.scores > args.min_score).mean()) if len(people) else 0,
            "prepare_seconds": round(prepare_seconds, 1), "encoder_init": init,
            "init": "pose checkpoint" if args.init_pose else "encoder"}
    records = train_pose(model, people, frames, settings, out, args.resume, info, batches=data.batches)
    losses = [r["loss"] for r in records]
    window = max(1, min(50, len(losses) // 4))
    # A resumed run that had nothing left to train (e.g. only to calibrate) keeps the losses already recorded.
    summary = {"first_loss": float(np.mean(losses[:window])), "last_loss": float(np.mean(losses[-window:]))} \
        if losses else {}
    if args.calibrate > 0:
        stats: dict = {}
        calibrate_scores(model, data.calibration, frames, args.calibrate, args.seed, stats)
        save_pose_checkpoint(model, out / "pose.pth.tmp")
        (out / "pose.pth.tmp").replace(out / "pose.pth")
        summary["score_calibration"] = stats
        print(json.dumps({"score_calibration": summary["score_calibration"]}), file=sys.stderr, flush=True)
    if args.eval:
        teacher = build_teacher(teacher_path, args.teacher_kind)
        summary["eval"] = evaluate_pose(out / "pose.pth", teacher, seg_weights,
                                        require(default_path("opencv_samples", "vtest.avi"), "vtest.avi"),
                                        coco=default_path("mmpose_coco_keypoints"), rungs=False)
    write_metrics(out, summary)
    print(json.dumps({"out": str(out), **summary}))
    return 0


def main_eval(argv: Sequence[str]) -> int:
    args = build_eval_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    teacher = MoveNetTeacher(require(args.teacher, "--teacher"))
    width, height = (int(v) for v in args.input_size.lower().split("x"))
    model = None
    if (width, height) != POSE_INPUT_SIZE:
        model = build_pose_model("segformer-b0", args.weights, (width, height))
    folders = args.coco or [require(default_path("mmpose_coco_keypoints"), "--coco")]
    result: dict = {}
    if args.use_video:
        result = evaluate_pose(args.weights, teacher, require(args.seg_weights, "--seg-weights"),
                               require(args.video, "--video"), parse_range(args.frames), folders[0],
                               rungs=args.rungs, rung_frame_step=args.rung_frame_step, cache=args.cache, model=model,
                               max_persons=args.max_persons, min_person_area=args.min_person_area)
    finder = PersonFinder(require(args.seg_weights, "--seg-weights"), min_area=args.min_person_area,
                          max_persons=EVAL_COLLECT_PERSONS) if args.node_boxes else None
    result["ground_truth"] = ground_truth_report(
        folders, args.weights, (width, height), split_list(args.backends), split_list(args.precisions),
        split_list(args.teachers), shared_data_dir(), finder, args.rungs, args.png)
    print(report_table(result["ground_truth"]), file=sys.stderr)
    result["input_size"] = [width, height]
    result["seconds"] = round(time.perf_counter() - began, 1)
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    return 0
