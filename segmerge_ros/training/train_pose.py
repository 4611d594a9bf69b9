"""The pose distillation loop of ``segmerge-train pose``: training samples (jittered person crops and target
heatmaps), the learning-rate schedule, checkpoints, ``--resume`` and the score calibration (see ``pose_cli``)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from segmerge_ros.models.checkpoint_errors import load_state_dict_strict
from segmerge_ros.models.pose.model import (
    COCO_FLIP_INDICES,
    POSE_INPUT_SIZE,
    POSE_MEAN,
    POSE_STD,
    SegformerPose,
    load_pose_checkpoint,
    save_pose_checkpoint,
)
from segmerge_ros.models.segformer.checkpoints import load_segformer
from segmerge_ros.inference.pose import BBOX_PADDING, box_to_center_scale, crop_people, image_to_crop, render_heatmaps
from segmerge_ros.training.optimizer_state import optimizer_tensors, restore_optimizer
from segmerge_ros.training.pose_people import People
from segmerge_ros.training.progress import Progress


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
    target, valid = heatmap_targets(points, scores, settings, input_size, stride)
    return crop, target, valid


def teaching_keypoints(points: np.ndarray, scores: np.ndarray, min_score: float,
                       input_size: tuple[int, int] = POSE_INPUT_SIZE) -> np.ndarray:
    """(..., 17) bool: keypoints (..., 17, 2) in crop pixels that teach: scored above ``min_score`` and inside
    the crop."""
    points = np.asarray(points, dtype=np.float64)
    inside = ((points[..., 0] >= 0) & (points[..., 0] <= input_size[0] - 1)
              & (points[..., 1] >= 0) & (points[..., 1] <= input_size[1] - 1))
    return (np.asarray(scores) > min_score) & inside


def heatmap_targets(points: np.ndarray, scores: np.ndarray, settings: PoseTrainSettings,
                    input_size: tuple[int, int] = POSE_INPUT_SIZE,
                    stride: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Target heatmaps (17, h, w) float32 and keypoint weights (17,) float32 of teacher keypoints (17, 2) in crop
    pixels: Gaussians at the keypoints that teach (``teaching_keypoints``), peaks at the teacher's scores when
    ``settings.calibrated``."""
    scores = np.asarray(scores, dtype=np.float64)
    valid = teaching_keypoints(points, scores, settings.min_score, input_size)
    heatmap_size = (input_size[0] // stride, input_size[1] // stride)
    target = render_heatmaps(np.asarray(points, dtype=np.float64)[None] / stride, heatmap_size, settings.sigma,
                             valid[None])[0]
    if settings.calibrated:
        target *= scores.astype(np.float32)[:, None, None]
    return target, valid.astype(np.float32)


def source_sampling_weights(people: People, min_score: float = 0.3, min_keypoints: int = 3) -> np.ndarray:
    """Per-person sampling probabilities: people with fewer than ``min_keypoints`` keypoints the teacher scores
    above ``min_score`` teach nothing and are never drawn; each source in proportion to sqrt(its other people),
    uniform within it."""
    teaches = (people.scores > min_score).sum(axis=1) >= min_keypoints
    if not teaches.any():
        raise ValueError(f"no person has {min_keypoints} keypoints the teacher scores above {min_score}")
    return sqrt_group_weights(people.source, teaches)


def sqrt_group_weights(groups: np.ndarray, teaches: np.ndarray) -> np.ndarray:
    """Sampling probabilities of records (N,) in groups (N,) int: rows that do not teach get 0, each group in
    proportion to sqrt(its teaching rows), uniform within it."""
    groups = np.asarray(groups, dtype=np.int64)
    counts = np.bincount(groups[teaches], minlength=int(groups.max()) + 1).astype(np.float64)
    per_row = np.sqrt(counts[groups]) / np.maximum(counts[groups], 1)
    p = np.where(teaches, per_row, 0.0)
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


def plain_batches(people: People, frames, settings: PoseTrainSettings, input_size: tuple[int, int] = POSE_INPUT_SIZE):
    """step -> ``sample_batch`` of ``people``, each source weighted by sqrt(its people that teach)."""
    probabilities = source_sampling_weights(people, settings.min_score, settings.min_keypoints)
    return lambda step: sample_batch(people, frames, probabilities, settings, step, input_size)


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
    encoder = load_segformer(path).model.encoder.state_dict()
    load_state_dict_strict(model.encoder, encoder, f"{path} (encoder for the pose model)")


def build_optimizer(model: SegformerPose, settings: PoseTrainSettings) -> torch.optim.Optimizer:
    return torch.optim.AdamW([
        {"params": list(model.encoder.parameters()), "lr": settings.lr_encoder, "base_lr": settings.lr_encoder},
        {"params": list(model.head.parameters()), "lr": settings.lr_head, "base_lr": settings.lr_head},
    ], weight_decay=settings.weight_decay)


def train_pose(model: SegformerPose, people: People, frames, settings: PoseTrainSettings, out: Path,
               resume: bool = False, info: dict | None = None, progress: bool = True,
               batches=None) -> list[dict]:
    """Distil ``model`` on ``people``; checkpoints in ``out``; returns the log records of this call.

    ``batches`` (step -> (pixels, targets, weights)), when given, draws the batches instead of ``sample_batch``
    (the augmented records of ``pose_augmented``; ``people`` then only needs a length).
    """
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
    draw = batches or plain_batches(people, frames, settings, model.input_size)
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
        pixels, targets, weights = draw(step)
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


