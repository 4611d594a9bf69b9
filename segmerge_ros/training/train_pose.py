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

    segmerge-train pose --teacher ../shared/data/coral_movenet_pose/movenet_single_pose_lightning_ptq.tflite \\
        --source ../shared/data/opencv_samples/vtest.avi --frames 0:640 \\
        --seg-weights ../shared/data/segformer_b0_vtest_student --steps 1000 --batch 8 --out runs/pose
    segmerge-train pose-eval --weights runs/pose/pose.pth
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch

from segmerge_ros.models.pose.model import COCO_FLIP_INDICES, POSE_INPUT_SIZE, POSE_MEAN, POSE_STD, SegformerPose
from segmerge_ros.inference.pose import (
    BBOX_PADDING,
    box_to_center_scale,
    crop_people,
    crop_to_image,
    image_to_crop,
    image_to_heatmap,
    person_boxes_from_segmentation,
    render_heatmaps,
)
from segmerge_ros.inference.sources import iter_frames, shared_data_dir

TEACHER_CROPS = ("tight", "node", "padded")
EVAL_COLLECT_PERSONS = 12
VIDEO_SUFFIXES = (".avi", ".mp4", ".mkv", ".mov", ".webm")


# --------------------------------------------------------------------------------------------------- people
@dataclass
class People:
    """Person records of a set of frames: frame keys, boxes, teacher keypoints (frame pixels) and scores."""

    source: np.ndarray  # (N,) int: index into the source list
    frame: np.ndarray  # (N,) int: frame index within its source
    boxes: np.ndarray  # (N, 4) float32 xyxy from the segmentation
    keypoints: np.ndarray  # (N, 17, 2) float32 teacher keypoints, frame pixels
    scores: np.ndarray  # (N, 17) float32 teacher scores

    def __len__(self) -> int:
        return len(self.boxes)

    def subset(self, rows: np.ndarray) -> "People":
        return People(self.source[rows], self.frame[rows], self.boxes[rows], self.keypoints[rows], self.scores[rows])

    @staticmethod
    def concatenate(parts: Sequence["People"]) -> "People":
        if not parts:
            return People(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4), np.float32),
                          np.zeros((0, 17, 2), np.float32), np.zeros((0, 17), np.float32))
        return People(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                        ("source", "frame", "boxes", "keypoints", "scores")))


def is_video(source: str | Path) -> bool:
    return Path(source).suffix.lower() in VIDEO_SUFFIXES


def source_frames(sources: Sequence[str | Path], frame_range: tuple[int, int | None, int]):
    """(source index, frame index, rgb) of every source; ``frame_range`` applies to videos only."""
    start, stop, step = frame_range
    for s, source in enumerate(sources):
        if is_video(source):
            for index, frame in enumerate(iter_frames(source, max_frames=stop)):
                if index >= start and (index - start) % step == 0:
                    yield s, index, frame
        else:
            for index, frame in enumerate(iter_frames(source)):
                yield s, index, frame


class PersonFinder:
    """The node's people: a segmentation checkpoint at the frame's resolution, then its person components."""

    def __init__(self, seg_weights: str | Path, model: str = "segformer-b0", min_area: int = 400,
                 max_persons: int = 12) -> None:
        from segmerge_ros.inference.engine import SegmentationEngine

        self.engine = SegmentationEngine(model=model, weights=str(seg_weights))
        self.min_area, self.max_persons = int(min_area), int(max_persons)

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        class_map = self.engine.infer(rgb).class_map
        boxes, _ = person_boxes_from_segmentation(class_map, self.engine.labels.person_ids, self.min_area,
                                                  self.max_persons)
        return boxes


def teacher_keypoints(teacher, rgb: np.ndarray, boxes: np.ndarray, crop: str = "tight") -> tuple[np.ndarray, np.ndarray]:
    """Teacher keypoints (N, 17, 2) in frame pixels and scores (N, 17) for person boxes.

    ``tight``: a square of ``TEACHER_PADDING`` times the box's longer side; ``node``: the square around the node's
    3:4 crop (its longer side), frame pixels throughout; ``padded``: the node's 288x384 crop itself, padded with
    black to a square (how the baseline student's teacher saw its people).
    """
    if crop == "tight":
        return teacher.on_boxes(rgb, boxes)
    center, scale = box_to_center_scale(boxes, POSE_INPUT_SIZE, BBOX_PADDING)
    side = np.repeat(scale.max(axis=1, keepdims=True), 2, axis=1)
    if crop == "node":
        return teacher.on_regions(rgb, center, side)
    if crop == "padded":
        width, height = POSE_INPUT_SIZE
        square = (height, height)
        crops = crop_people(np.ascontiguousarray(rgb), center, side, square)
        margin = (height - width) // 2
        crops[:, :, :margin] = 0
        crops[:, :, margin + width:] = 0
        raw = np.stack([teacher.on_image(c) for c in crops])  # (N, 17, 3) normalised y, x, score
        points = crop_to_image(raw[..., [1, 0]] * height, center, side, square)
        return points.astype(np.float32), raw[..., 2].astype(np.float32)
    raise ValueError(f"unknown teacher crop {crop!r}; use one of {TEACHER_CROPS}")


def collect_people(sources: Sequence[str | Path], frame_range: tuple[int, int | None, int], finder, teacher,
                   teacher_crop: str = "tight", progress: bool = True,
                   keep_frames: bool = True) -> tuple[People, dict[tuple[int, int], np.ndarray]]:
    """Find the people of every frame and run the teacher on them; returns the records and (when
    ``keep_frames``) the frames that hold people, keyed by (source, frame)."""
    from segmerge_ros.training.train import Progress

    parts, frames = [], {}
    items = list(source_frames(sources, frame_range))
    bar = Progress(len(items), "people") if progress else None
    for i, (s, index, rgb) in enumerate(items):
        boxes = finder(rgb)
        if len(boxes):
            kps, scores = teacher_keypoints(teacher, rgb, boxes, teacher_crop)
            n = len(boxes)
            parts.append(People(np.full(n, s), np.full(n, index), boxes.astype(np.float32), kps, scores))
            if keep_frames:
                frames[(s, index)] = rgb
        if bar:
            bar.update(i + 1)
    if bar:
        bar.close()
    return People.concatenate(parts), frames


def load_frames(sources: Sequence[str | Path], frame_range: tuple[int, int | None, int],
                wanted: set[tuple[int, int]]) -> dict[tuple[int, int], np.ndarray]:
    return {(s, i): rgb for s, i, rgb in source_frames(sources, frame_range) if (s, i) in wanted}


def cached_people(cache: Path, key: dict, sources, frame_range, finder_factory, teacher_factory, teacher_crop):
    """People from ``cache`` when its key matches, else collected (and stored); frames are read again."""
    key_text = json.dumps(key, sort_keys=True)
    if cache.is_file():
        stored = np.load(cache)
        if str(stored["key"]) == key_text:
            people = People(*(stored[f] for f in ("source", "frame", "boxes", "keypoints", "scores")))
            wanted = {(int(s), int(f)) for s, f in zip(people.source, people.frame)}
            return people, load_frames(sources, frame_range, wanted), True
    people, frames = collect_people(sources, frame_range, finder_factory(), teacher_factory(), teacher_crop)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, key=np.array(key_text), **asdict(people))
    return people, frames, False


# --------------------------------------------------------------------------------------------------- samples
@dataclass
class PoseTrainSettings:
    steps: int = 1000
    batch: int = 8
    lr_encoder: float = 2e-4
    lr_head: float = 1e-3
    weight_decay: float = 1e-4
    warmup: int = 100
    sigma: float = 2.0
    min_score: float = 0.3
    min_keypoints: int = 3  # people with fewer keypoints above min_score are not drawn
    calibrated: bool = True
    scale_jitter: float = 0.25  # crop scale times U(1 - j, 1 + j)
    shift_jitter: float = 0.1  # centre moved by U(-j, j) times the crop scale
    flip: bool = True
    colour_jitter: bool = True  # brightness and contrast
    save_every: int = 100
    seed: int = 0
    grad_clip: float = 1.0
    time_budget: float = 0.0  # seconds of training; > 0: the schedule runs on max(step, time) progress and stops
    bf16: bool = False  # CPU autocast to bfloat16 (weights, optimiser and loss stay float32)


def flip_crop_keypoints(points: np.ndarray, width: int) -> np.ndarray:
    """Keypoints (..., 17, 2) in crop pixels -> those of the mirrored crop: x -> width - 1 - x, left/right swapped."""
    out = np.asarray(points, dtype=np.float64)[..., list(COCO_FLIP_INDICES), :].copy()
    out[..., 0] = width - 1 - out[..., 0]
    return out


def sample_geometry(box: np.ndarray, settings: PoseTrainSettings, rng: np.random.Generator | None = None,
                    input_size: tuple[int, int] = POSE_INPUT_SIZE) -> tuple[np.ndarray, np.ndarray, bool]:
    """Crop centre (1, 2), scale (1, 2) and flip of one training sample: the node's crop of ``box``, jittered when
    an ``rng`` is given."""
    center, scale = box_to_center_scale(np.asarray(box)[None], input_size, BBOX_PADDING)
    if rng is None:
        return center, scale, False
    scale = scale * rng.uniform(1 - settings.scale_jitter, 1 + settings.scale_jitter)
    center = center + rng.uniform(-settings.shift_jitter, settings.shift_jitter, size=2) * scale
    return center, scale, bool(settings.flip and rng.random() < 0.5)


def make_sample(rgb: np.ndarray, box: np.ndarray, keypoints: np.ndarray, scores: np.ndarray,
                settings: PoseTrainSettings, rng: np.random.Generator | None = None,
                input_size: tuple[int, int] = POSE_INPUT_SIZE,
                stride: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One training sample: crop (H, W, 3) uint8, target heatmaps (17, h, w) float32, keypoint weights (17,).

    Without ``rng`` the crop is the node's exactly (no jitter, no flip).
    """
    center, scale, flip = sample_geometry(box, settings, rng, input_size)
    crop = crop_people(rgb, center, scale, input_size)[0]
    points = image_to_crop(np.asarray(keypoints)[None], center, scale, input_size)[0]
    scores = np.asarray(scores, dtype=np.float64)
    if flip:
        crop = np.ascontiguousarray(crop[:, ::-1])
        points = flip_crop_keypoints(points, input_size[0])
        scores = scores[list(COCO_FLIP_INDICES)]
    if rng is not None and settings.colour_jitter:
        contrast, brightness = rng.uniform(0.8, 1.2), rng.uniform(-20, 20)
        crop = np.clip(crop.astype(np.float32) * contrast + brightness, 0, 255).astype(np.uint8)
    inside = ((points[:, 0] >= 0) & (points[:, 0] <= input_size[0] - 1)
              & (points[:, 1] >= 0) & (points[:, 1] <= input_size[1] - 1))
    valid = (scores > settings.min_score) & inside
    heatmap_size = (input_size[0] // stride, input_size[1] // stride)
    target = render_heatmaps(points[None] / stride, heatmap_size, settings.sigma, valid[None])[0]
    if settings.calibrated:
        target *= scores.astype(np.float32)[:, None, None]
    return crop, target, valid.astype(np.float32)


def source_sampling_weights(people: People, min_score: float = 0.3, min_keypoints: int = 3) -> np.ndarray:
    """Per-person sampling probabilities: people with fewer than ``min_keypoints`` keypoints the teacher scores
    above ``min_score`` teach nothing and are never drawn; each source in proportion to sqrt(its other people),
    uniform within it."""
    teaches = (people.scores > min_score).sum(axis=1) >= min_keypoints
    if not teaches.any():
        raise ValueError(f"no person has {min_keypoints} keypoints the teacher scores above {min_score}")
    counts = np.bincount(people.source[teaches], minlength=int(people.source.max()) + 1).astype(np.float64)
    per_person = np.sqrt(counts[people.source]) / np.maximum(counts[people.source], 1)
    p = np.where(teaches, per_person, 0.0)
    return p / p.sum()


def to_pixels(crops: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float()
    mean = torch.tensor(POSE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(POSE_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def sample_batch(people: People, frames, probabilities: np.ndarray, settings: PoseTrainSettings, step: int,
                 input_size: tuple[int, int] = POSE_INPUT_SIZE):
    """A deterministic function of (seed, step), so a resumed run sees the same batches."""
    rng = np.random.default_rng([settings.seed, step])
    rows = rng.choice(len(people), size=settings.batch, p=probabilities)
    samples = [make_sample(frames[(int(people.source[r]), int(people.frame[r]))], people.boxes[r],
                           people.keypoints[r], people.scores[r], settings, rng, input_size) for r in rows]
    crops, targets, weights = (np.stack(parts) for parts in zip(*samples))
    return to_pixels(crops), torch.from_numpy(targets), torch.from_numpy(weights)


def heatmap_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """MSE over heatmap pixels, each keypoint's map weighted (mmpose's KeypointMSELoss with target weights)."""
    return (((pred - target) ** 2).mean(dim=(2, 3)) * weight).mean()


def schedule_progress(step: int, seconds: float, settings: PoseTrainSettings) -> float:
    """Fraction of the run done: by steps, or by training time when a time budget is set (whichever is further),
    so that a run on a shared machine still anneals before its deadline."""
    progress = step / max(1, settings.steps)
    if settings.time_budget > 0:
        progress = max(progress, seconds / settings.time_budget)
    return progress


def learning_rate_factor(step: int, settings: PoseTrainSettings, progress: float | None = None) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine to 0 over the rest of the run's progress."""
    if step < settings.warmup:
        return (step + 1) / settings.warmup
    if progress is None:
        progress = step / max(1, settings.steps)
    start = settings.warmup / max(1, settings.steps)
    after = (progress - start) / max(1e-9, 1.0 - start)
    return 0.5 * (1.0 + math.cos(math.pi * min(max(after, 0.0), 1.0)))


def init_encoder_from_segmentation(model: SegformerPose, path: str | Path) -> None:
    """Copy the MiT encoder of a segmentation checkpoint the project loads into the pose model."""
    from segmerge_ros.models.checkpoint_errors import load_state_dict_strict
    from segmerge_ros.models.segformer.checkpoints import load_segformer

    encoder = load_segformer(path).model.encoder.state_dict()
    load_state_dict_strict(model.encoder, encoder, f"{path} (encoder for the pose model)")


def build_optimizer(model: SegformerPose, settings: PoseTrainSettings) -> torch.optim.Optimizer:
    return torch.optim.AdamW([
        {"params": list(model.encoder.parameters()), "lr": settings.lr_encoder, "base_lr": settings.lr_encoder},
        {"params": list(model.head.parameters()), "lr": settings.lr_head, "base_lr": settings.lr_head},
    ], weight_decay=settings.weight_decay)


def train_pose(model: SegformerPose, people: People, frames, settings: PoseTrainSettings, out: Path,
               resume: bool = False, info: dict | None = None, progress: bool = True) -> list[dict]:
    """Distil ``model`` on ``people``; checkpoints in ``out``; returns the log records of this call."""
    from safetensors.torch import load_file, save_file

    from segmerge_ros.models.pose.model import load_pose_checkpoint, save_pose_checkpoint
    from segmerge_ros.training.train import Progress, optimizer_tensors, restore_optimizer

    if len(people) == 0:
        raise ValueError("no people to train on: the segmentation found none in the sources")
    out.mkdir(parents=True, exist_ok=True)
    optimizer = build_optimizer(model, settings)
    start, seconds_before = 0, 0.0
    if resume:
        state_path = out / "train_state.json"
        if not state_path.is_file():
            raise FileNotFoundError(f"nothing to resume in {out}")
        state = json.loads(state_path.read_text())
        load_pose_checkpoint(model, out / "pose.pth")
        restore_optimizer(optimizer, load_file(str(out / "optimizer.safetensors")), state["optimizer"])
        start, seconds_before = int(state["step"]), float(state.get("seconds", 0.0))
    probabilities = source_sampling_weights(people, settings.min_score, settings.min_keypoints)
    records: list[dict] = []
    log_file = (out / "train_log.jsonl").open("a")
    bar = Progress(settings.steps, "pose", start=start) if progress else None
    began = time.perf_counter()

    def checkpoint(step: int) -> None:
        was_training = model.training
        model.eval()
        save_pose_checkpoint(model, out / "pose.pth.tmp")
        (out / "pose.pth.tmp").replace(out / "pose.pth")  # a cut-off run never leaves a half-written checkpoint
        model.train(was_training)
        tensors, rest = optimizer_tensors(optimizer)
        save_file(tensors, str(out / "optimizer.safetensors"))
        seconds = seconds_before + time.perf_counter() - began
        (out / "train_state.json").write_text(json.dumps({"step": step, "seconds": seconds, "optimizer": rest}))
        write_metrics(out, {**(info or {}), "settings": asdict(settings), "step": step,
                            "train_seconds": round(seconds, 1), "people": len(people)})

    model.train()
    last = start
    for step in range(start, settings.steps):
        progress = schedule_progress(step, seconds_before + time.perf_counter() - began, settings)
        if progress >= 1.0:
            break  # the time budget is spent
        factor = learning_rate_factor(step, settings, progress)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        pixels, targets, weights = sample_batch(people, frames, probabilities, settings, step, model.input_size)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.bf16):
            heatmaps = model(pixels)
        loss = heatmap_loss(heatmaps.float(), targets, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if settings.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        record = {"step": step + 1, "loss": float(loss.detach()), "lr_head": optimizer.param_groups[1]["lr"],
                  "seconds": round(seconds_before + time.perf_counter() - began, 2)}
        records.append(record)
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()
        if bar:
            bar.update(step + 1, loss=record["loss"])
        last = step + 1
        if settings.save_every and (step + 1) % settings.save_every == 0 and step + 1 < settings.steps:
            checkpoint(step + 1)
    if bar:
        bar.close()
    checkpoint(last)
    log_file.close()
    model.eval()
    return records


@torch.no_grad()
def student_scores(model: SegformerPose, people: People, frames, batch: int = 8) -> np.ndarray:
    """The model's keypoint scores (heatmap maxima, (N, 17)) on the node's crops of ``people``."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(people), batch):
        rows = range(start, min(start + batch, len(people)))
        crops = np.stack([make_sample(frames[(int(people.source[r]), int(people.frame[r]))], people.boxes[r],
                                      people.keypoints[r], people.scores[r], PoseTrainSettings(),
                                      input_size=model.input_size)[0] for r in rows])
        heatmaps = model(to_pixels(crops)).float()
        out.append(heatmaps.flatten(2).amax(dim=2).numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, model.num_keypoints), np.float32)


def calibrate_scores(model: SegformerPose, people: People, frames, count: int = 256, seed: int = 0,
                     stats: dict | None = None) -> np.ndarray:
    """Make the student's keypoint scores estimate the teacher's: per keypoint, the least-squares factor
    ``c_k = sum(s t) / sum(s^2)`` between student scores ``s`` and teacher scores ``t`` on ``count`` training people
    (the node's crops), folded into the final 1x1 convolution (weights and bias times ``c_k``). Heatmaps scale by
    ``c_k``, so arg-max and the DARK refinement (log-heatmap derivatives) are unchanged: only scores move, and
    ``pose.keypoint_threshold`` reads as a teacher confidence. Returns the factors (17,); ``stats`` (a dict) gets
    the share of keypoints at or above 0.3 for the teacher and the student before and after.
    """
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(people), size=min(count, len(people)), replace=False))
    chosen = people.subset(rows)
    student = student_scores(model, chosen, frames).astype(np.float64)
    teacher = chosen.scores.astype(np.float64)
    factors = (student * teacher).sum(0) / np.maximum((student**2).sum(0), 1e-12)
    factors = np.where(factors > 0, factors, 1.0)  # a degenerate keypoint keeps its scale
    if stats is not None:
        stats.update({"people": len(chosen), "teacher_at_0.3": float((teacher >= 0.3).mean()),
                      "student_at_0.3_before": float((student >= 0.3).mean()),
                      "student_at_0.3_after": float((student * factors >= 0.3).mean()),
                      "factors": [round(float(f), 4) for f in factors]})
    final = model.head.final_layer
    scale = torch.as_tensor(factors, dtype=final.weight.dtype)
    final.weight.data.mul_(scale.view(-1, 1, 1, 1))
    final.bias.data.mul_(scale)
    return factors


def write_metrics(out: Path, values: dict) -> None:
    path = out / "metrics.json"
    current = json.loads(path.read_text()) if path.is_file() else {}
    current.update(values)
    path.write_text(json.dumps(current, indent=2))


# --------------------------------------------------------------------------------------------------- evaluation
def pck_against_teacher(student_crop: np.ndarray, teacher_crop: np.ndarray, teacher_scores: np.ndarray,
                        min_score: float = 0.3, threshold: float = 0.2) -> dict:
    """PCK@threshold and mean error (crop pixels) of student keypoints against the teacher's, both (N, 17, 2) in
    crop pixels; keypoints the teacher scores above ``min_score`` count, normalised by the diagonal of the box
    around them (people with fewer than two such keypoints are left out)."""
    from segmerge_ros.training.pose_metrics import pck

    visible = teacher_scores > min_score
    lo = np.where(visible[..., None], teacher_crop, np.inf).min(axis=1)
    hi = np.where(visible[..., None], teacher_crop, -np.inf).max(axis=1)
    diagonal = np.linalg.norm(hi - lo, axis=1)
    keep = (visible.sum(axis=1) >= 2) & (diagonal > 0)
    if not keep.any():
        return {"pck": float("nan"), "mean_error_px": float("nan"), "persons": 0, "keypoints": 0}
    overall, _ = pck(student_crop[keep], teacher_crop[keep], visible[keep], diagonal[keep], threshold)
    errors = np.linalg.norm(student_crop[keep] - teacher_crop[keep], axis=-1)[visible[keep]]
    return {"pck": overall, "mean_error_px": float(errors.mean()), "persons": int(keep.sum()),
            "keypoints": int(visible[keep].sum())}


def coco_persons(folder: str | Path) -> list[dict]:
    """The annotated persons of a COCO keypoint file in ``folder`` (``test_coco.json`` + images)."""
    folder = Path(folder)
    files = sorted(folder.glob("*.json"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one COCO .json in {folder}, found {len(files)}")
    data = json.loads(files[0].read_text())
    images = {im["id"]: folder / im["file_name"] for im in data["images"]}
    persons = []
    for ann in data["annotations"]:
        if ann.get("iscrowd") or ann.get("num_keypoints", 0) == 0:
            continue
        k = np.asarray(ann["keypoints"], dtype=np.float64).reshape(-1, 3)
        x, y, w, h = ann["bbox"]
        persons.append({"image": images[ann["image_id"]], "box": np.array([x, y, x + w, y + h]),
                        "keypoints": k[:, :2], "visibility": k[:, 2], "area": float(ann["area"])})
    return persons


def coco_scores(keypoints: np.ndarray, persons: list[dict], threshold: float = 0.2) -> dict:
    """PCK@threshold of the box diagonal and mean OKS of predictions (N, 17, 2) for the annotated persons."""
    from segmerge_ros.training.pose_metrics import oks, pck

    gts = np.stack([p["keypoints"] for p in persons])
    vis = np.stack([p["visibility"] for p in persons])
    diag = np.array([np.hypot(p["box"][2] - p["box"][0], p["box"][3] - p["box"][1]) for p in persons])
    overall, _ = pck(keypoints, gts, vis, diag, threshold)
    oks_values = [oks(kp, p["keypoints"], p["visibility"], p["area"]) for kp, p in zip(keypoints, persons)]
    return {"pck": overall, "oks": float(np.mean(oks_values)), "persons": len(persons),
            "keypoints": int((vis > 0).sum())}


def rank_in_frame(people: People) -> np.ndarray:
    """Position of each person within its frame (people are stored frame by frame, largest first)."""
    first = {}
    ranks = np.zeros(len(people), np.int64)
    for i, key in enumerate(zip(people.source.tolist(), people.frame.tolist())):
        ranks[i] = i - first.setdefault(key, i)
    return ranks


def distinct_rung_configs():
    """The ladder's distinct pose encoder settings: [(config or None, [rung names])] (head-only rungs merge
    nothing in the pose encoder)."""
    from segmerge_ros.merging.segformerpp import LADDER

    groups: dict[str, tuple] = {}
    for rung in LADDER:
        identity = all(stage.is_identity for stage in rung.config.stages)
        stages = "none" if identity else repr(rung.config.stages)
        entry = groups.setdefault(stages, (None if identity else rung.config, []))
        entry[1].append(f"{rung.rate:g}:{rung.config.name}")
    return list(groups.values())


def evaluate_pose(weights: str | Path | None, teacher, seg_weights: str | Path, video: str | Path,
                  frame_range: tuple[int, int | None, int] = (660, 796, 1), coco: str | Path | None = None,
                  teacher_crops: Sequence[str] = TEACHER_CROPS, rungs: bool = True, rung_frame_step: int = 1,
                  min_person_area: int = 400, max_persons: int = 4, progress: bool = True,
                  model: SegformerPose | None = None, cache: str | Path | None = None) -> dict:
    """The figures of ``pose-eval`` for a pose checkpoint (or ``model``); see the module docstring.

    ``cache``: an .npz for the held-out people and the teacher's keypoints (the segmentation of the held-out frames
    is the slow part, and it is the same for every checkpoint)."""
    from segmerge_ros.inference.pose import PoseEstimator

    estimator = PoseEstimator(model if model is not None else "segformer-b0",
                              weights=weights if model is None else None, max_persons=max_persons)
    # People are collected up to EVAL_COLLECT_PERSONS per frame (largest first) and cut to max_persons here, so
    # one cache serves every max_persons up to it.
    collect = max(max_persons, EVAL_COLLECT_PERSONS)

    def finder():
        return PersonFinder(seg_weights, min_area=min_person_area, max_persons=collect)

    if cache:
        key = {"video": str(Path(video).resolve()), "frames": list(frame_range), "teacher_crop": teacher_crops[0],
               "seg_weights": str(Path(seg_weights).resolve()), "min_person_area": min_person_area,
               "max_persons": collect, "teacher": str(getattr(teacher, "path", ""))}
        people, frames, _ = cached_people(Path(cache), key, [video], frame_range, finder, lambda: teacher,
                                          teacher_crops[0])
    else:
        people, frames = collect_people([video], frame_range, finder(), teacher, teacher_crops[0], progress)
    people = people.subset(np.flatnonzero(rank_in_frame(people) < max_persons))
    references = {teacher_crops[0]: (people.keypoints, people.scores)}
    for crop in teacher_crops[1:]:
        kps, scores = [], []
        for key in sorted(frames):
            rows = np.flatnonzero((people.source == key[0]) & (people.frame == key[1]))
            k, s = teacher_keypoints(teacher, frames[key], people.boxes[rows], crop)
            kps.append(k)
            scores.append(s)
        references[crop] = (np.concatenate(kps), np.concatenate(scores))
    order = np.lexsort((np.arange(len(people)), people.frame, people.source))
    assert np.all(order == np.arange(len(people))), "people are collected frame by frame"

    result: dict = {"weights": str(weights) if weights else None, "video": str(video), "max_persons": max_persons,
                    "frames": f"{frame_range[0]}:{frame_range[1]}", "video_persons": len(people), "rungs": []}
    persons = coco_persons(coco) if coco else []
    if persons:
        images = {p["image"]: None for p in persons}
        from segmerge_ros.inference.sources import read_rgb

        images = {path: read_rgb(path) for path in images}
        boxes = np.stack([p["box"] for p in persons])
        for crop in teacher_crops:  # the teacher on the same boxes, as it sees them in each crop mode
            teacher_kps = np.concatenate([teacher_keypoints(teacher, images[p["image"]], p["box"][None], crop)[0]
                                          for p in persons])
            result["coco_teacher" if crop == teacher_crops[0] else f"coco_teacher_{crop}"] = coco_scores(
                teacher_kps, persons)

    configs = distinct_rung_configs() if rungs else [(None, ["0:none"])]
    for config, names in configs:
        estimator.set_merge_config(config)
        step = 1 if config is None else max(1, rung_frame_step)
        kept_frames = sorted(frames)[::step]
        student_img, student_scores, rows_all = [], [], []
        for key in kept_frames:
            rows = np.flatnonzero((people.source == key[0]) & (people.frame == key[1]))
            res = estimator.estimate_boxes(frames[key], people.boxes[rows])
            student_img.append(res.keypoints)
            student_scores.append(res.scores)
            rows_all.append(rows)
        rows = np.concatenate(rows_all)
        student_img = np.concatenate(student_img)
        student_scores = np.concatenate(student_scores)
        center, scale = box_to_center_scale(people.boxes[rows], POSE_INPUT_SIZE, estimator.padding)
        student_crop = image_to_crop(student_img, center, scale)
        entry = {"rungs": names, "merge": "none" if config is None else config.name,
                 "frames_used": len(kept_frames)}
        # The merged rungs run on every rung_frame_step-th frame; "rung_frames" scores every rung (the unmerged
        # one included) on exactly those frames, so rungs compare on the same people.
        rung_keys = set(sorted(frames)[::max(1, rung_frame_step)])
        on_rung_frames = np.array([(int(people.source[r]), int(people.frame[r])) in rung_keys for r in rows])
        for crop, (kps, scores) in references.items():
            teacher_crop = image_to_crop(kps[rows], center, scale)
            entry[f"vs_teacher_{crop}"] = pck_against_teacher(student_crop, teacher_crop, scores[rows])
            visible = scores[rows] > 0.3
            entry[f"vs_teacher_{crop}"]["drawn_at_0.3"] = float((student_scores[visible] >= 0.3).mean())
            entry[f"vs_teacher_{crop}"]["rung_frames"] = pck_against_teacher(
                student_crop[on_rung_frames], teacher_crop[on_rung_frames], scores[rows][on_rung_frames])
        entry["student_score_median"] = float(np.median(student_scores))
        if persons:
            kps = np.concatenate([estimator.estimate_boxes(images[p["image"]], p["box"][None]).keypoints
                                  for p in persons])
            entry["coco_student"] = coco_scores(kps, persons)
        result["rungs"].append(entry)
        if progress:
            print(json.dumps(entry), file=sys.stderr, flush=True)
    estimator.set_merge_config(None)
    return result


# --------------------------------------------------------------------------------------------------- command line
def default_path(*parts: str) -> str | None:
    shared = shared_data_dir()
    path = shared.joinpath(*parts) if shared else None
    return str(path) if path is not None and path.exists() else None


def build_train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="segmerge-train pose", description="Distil a Segformer++ pose student "
                                "from MoveNet on person crops found by the node's pipeline.")
    p.add_argument("--teacher", default=default_path("coral_movenet_pose", "movenet_single_pose_lightning_ptq.tflite"),
                   help="MoveNet SinglePose .tflite")
    p.add_argument("--source", action="append", required=True, help="video, image folder or image (repeatable)")
    p.add_argument("--frames", default="0:", help="START:END[:STEP] of the videos (images: all)")
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
    p.add_argument("--coco", default=default_path("mmpose_coco_keypoints"), help="folder with a COCO keypoint json")
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


def require(value: str | None, what: str) -> str:
    if not value:
        raise SystemExit(f"{what} not given and not found under the shared data folder")
    return value


def main_train(argv: Sequence[str]) -> int:
    from segmerge_ros.training.movenet import MoveNetTeacher
    from segmerge_ros.training.train import parse_range

    args = build_train_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    teacher_path = require(args.teacher, "--teacher")
    seg_weights = require(args.seg_weights, "--seg-weights")
    frame_range = parse_range(args.frames)
    out = Path(args.out)
    sources = [str(Path(s).resolve()) for s in args.source]
    key = {"sources": sources, "frames": args.frames, "seg_weights": str(Path(seg_weights).resolve()),
           "teacher": str(Path(teacher_path).resolve()), "teacher_crop": args.teacher_crop,
           "min_person_area": args.min_person_area, "max_persons": args.max_persons}
    began = time.perf_counter()
    people, frames, from_cache = cached_people(
        out / "pose_cache.npz", key, sources, frame_range,
        lambda: PersonFinder(seg_weights, min_area=args.min_person_area, max_persons=args.max_persons),
        lambda: MoveNetTeacher(teacher_path), args.teacher_crop)
    prepare_seconds = time.perf_counter() - began
    per_source = {Path(s).name: int((people.source == i).sum()) for i, s in enumerate(sources)}
    print(json.dumps({"people": len(people), "per_source": per_source, "from_cache": from_cache,
                      "prepare_seconds": round(prepare_seconds, 1)}), file=sys.stderr, flush=True)
    settings = PoseTrainSettings(
        steps=args.steps, batch=args.batch, lr_encoder=args.lr_encoder, lr_head=args.lr_head, warmup=args.warmup,
        sigma=args.sigma, min_score=args.min_score, min_keypoints=args.min_keypoints, calibrated=args.calibrated, scale_jitter=args.scale_jitter,
        shift_jitter=args.shift_jitter, flip=args.flip, save_every=args.save_every, seed=args.seed,
        time_budget=args.time_budget, bf16=args.bf16)
    model = SegformerPose("b0")
    if args.init_pose and args.init_encoder:
        raise SystemExit("--init-pose and --init-encoder both set: the student starts from one of them")
    init = args.init_pose or args.init_encoder or seg_weights
    if args.resume:
        pass  # train_pose loads the run's own checkpoint
    elif args.init_pose:
        from segmerge_ros.models.pose.model import load_pose_checkpoint

        load_pose_checkpoint(model, args.init_pose)
    elif init != "none":
        init_encoder_from_segmentation(model, init)
    info = {"command": "segmerge-train pose " + " ".join(argv), "data": key, "people_per_source": per_source,
            "teacher_keypoints_above_min_score": float((people.scores > args.min_score).mean()) if len(people) else 0,
            "prepare_seconds": round(prepare_seconds, 1), "encoder_init": init,
            "init": "pose checkpoint" if args.init_pose else "encoder"}
    records = train_pose(model, people, frames, settings, out, args.resume, info)
    losses = [r["loss"] for r in records]
    window = max(1, min(50, len(losses) // 4))
    # A resumed run that had nothing left to train (e.g. only to calibrate) keeps the losses already recorded.
    summary = {"first_loss": float(np.mean(losses[:window])), "last_loss": float(np.mean(losses[-window:]))} \
        if losses else {}
    if args.calibrate > 0:
        from segmerge_ros.models.pose.model import save_pose_checkpoint

        stats: dict = {}
        calibrate_scores(model, people, frames, args.calibrate, args.seed, stats)
        save_pose_checkpoint(model, out / "pose.pth.tmp")
        (out / "pose.pth.tmp").replace(out / "pose.pth")
        summary["score_calibration"] = stats
        print(json.dumps({"score_calibration": summary["score_calibration"]}), file=sys.stderr, flush=True)
    if args.eval:
        teacher = MoveNetTeacher(teacher_path)
        summary["eval"] = evaluate_pose(out / "pose.pth", teacher, seg_weights,
                                        require(default_path("opencv_samples", "vtest.avi"), "vtest.avi"),
                                        coco=default_path("mmpose_coco_keypoints"), rungs=False)
    write_metrics(out, summary)
    print(json.dumps({"out": str(out), **summary}))
    return 0


def main_eval(argv: Sequence[str]) -> int:
    from segmerge_ros.training.movenet import MoveNetTeacher
    from segmerge_ros.training.train import parse_range

    args = build_eval_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    teacher = MoveNetTeacher(require(args.teacher, "--teacher"))
    width, height = (int(v) for v in args.input_size.lower().split("x"))
    model = None
    if (width, height) != POSE_INPUT_SIZE:
        from segmerge_ros.models.pose.model import build_pose_model

        model = build_pose_model("segformer-b0", args.weights, (width, height))
    result = evaluate_pose(args.weights, teacher, require(args.seg_weights, "--seg-weights"),
                           require(args.video, "--video"), parse_range(args.frames), args.coco,
                           rungs=args.rungs, rung_frame_step=args.rung_frame_step, cache=args.cache, model=model,
                           max_persons=args.max_persons, min_person_area=args.min_person_area)
    result["input_size"] = [width, height]
    result["seconds"] = round(time.perf_counter() - began, 1)
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    return 0
