"""The segmentation training loop of ``segmerge-train``: settings, learning-rate schedule, batches, held-out
evaluation (mIoU, pixel accuracy), checkpoints and ``--resume``."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from segmerge_ros.inference.metrics import ConfusionMatrix
from segmerge_ros.training.optimizer_state import optimizer_tensors, restore_optimizer
from segmerge_ros.training.progress import Progress
from segmerge_ros.training.segmentation_data import augment, resize_frame, to_tensor_batch
from segmerge_ros.training.segmentation_models import model_losses, model_normalisation, predict_logits, save_model


@dataclass
class TrainSettings:
    steps: int = 1000
    batch_size: int = 4
    crop: tuple[int, int] = (256, 256)
    scale_range: tuple[float, float] = (0.5, 1.5)
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 50
    eval_every: int = 0
    save_every: int = 0
    eval_scale: float = 1.0
    max_eval: int = 0
    seed: int = 0
    grad_clip: float = 1.0


def learning_rate(step: int, settings: TrainSettings) -> float:
    """Linear warm-up, then polynomial (0.9) decay to 0."""
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return settings.lr * (1.0 - min(progress, 1.0)) ** 0.9


def sample_batch(dataset, settings: TrainSettings, step: int, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic function of (seed, step), so a resumed run sees the same batches."""
    rng = np.random.default_rng([settings.seed, step])
    picks = rng.integers(0, len(dataset), settings.batch_size)
    samples = [augment(*dataset[int(i)], settings.crop, settings.scale_range, rng) for i in picks]
    images = to_tensor_batch([s[0] for s in samples], mean, std)
    labels = torch.from_numpy(np.stack([s[1] for s in samples])).long()
    return images, labels


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, dataset, num_classes: int, input_scale: float = 1.0, max_samples: int = 0
) -> dict:
    """mIoU and pixel accuracy on a held-out set: each image scaled by ``input_scale``, predictions upsampled to the
    label resolution."""
    was_training = model.training
    model.eval()
    mean, std = model_normalisation(model)
    matrix = ConfusionMatrix(num_classes)
    count = len(dataset) if max_samples <= 0 else min(max_samples, len(dataset))
    for index in range(count):
        rgb, label = dataset[index]
        logits = predict_logits(model, to_tensor_batch([resize_frame(rgb, input_scale)], mean, std))
        logits = F.interpolate(logits, size=label.shape, mode="bilinear", align_corners=False)
        matrix.update(logits.argmax(1)[0], label)
    model.train(was_training)
    return {"miou": matrix.miou, "pixel_accuracy": matrix.pixel_accuracy, "frames": count}


def train(
    model: torch.nn.Module,
    dataset,
    settings: TrainSettings,
    out_dir: str | Path | None = None,
    heldout=None,
    num_classes: int | None = None,
    resume: bool = False,
    extra_config: dict | None = None,
    log: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Train ``model`` on ``dataset`` (indexable, ``(rgb, label)`` samples); returns the log records.

    Saves to ``out_dir`` at ``save_every`` steps and at the end; ``resume`` continues from ``out_dir``'s state.
    """
    out = Path(out_dir) if out_dir else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    num_classes = num_classes or model.config.num_classes
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    start = 0
    if resume:
        if out is None or not (out / "train_state.json").is_file():
            raise FileNotFoundError(f"nothing to resume in {out}")
        state = json.loads((out / "train_state.json").read_text())
        from segmerge_ros.models.checkpoint_errors import load_state_dict_strict

        load_state_dict_strict(model, load_file(str(out / "model.safetensors")), str(out / "model.safetensors"))
        restore_optimizer(optimizer, load_file(str(out / "optimizer.safetensors")), state["optimizer"])
        start = state["step"]
    mean, std = model_normalisation(model)
    records: list[dict] = []
    log_file = (out / "train_log.jsonl").open("a") if out else None
    progress = Progress(settings.steps, "train", start=start)

    def emit(record: dict) -> None:
        records.append(record)
        if log_file:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
        if log:
            log(record)

    def checkpoint(step: int) -> None:
        if out is None:
            return
        save_model(model, out, {"training": asdict(settings), **(extra_config or {})})
        tensors, rest = optimizer_tensors(optimizer)
        save_file(tensors, str(out / "optimizer.safetensors"))
        (out / "train_state.json").write_text(json.dumps({"step": step, "optimizer": rest}))

    model.train()
    began = time.perf_counter()
    for step in range(start, settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings)
        if hasattr(model, "on_train_step"):
            model.on_train_step(step, settings.steps)
        images, labels = sample_batch(dataset, settings, step, mean, std)
        losses = model_losses(model, images, labels)
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        if settings.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        values = {k: float(v.detach()) for k, v in losses.items()}
        seconds = time.perf_counter() - began
        emit({"step": step + 1, "lr": optimizer.param_groups[0]["lr"], "seconds": seconds, **values})
        progress.update(step + 1, loss=values["total"])
        done = step + 1
        if heldout is not None and settings.eval_every and (done % settings.eval_every == 0) and done < settings.steps:
            emit({"step": done, "eval": evaluate(model, heldout, num_classes, settings.eval_scale, settings.max_eval)})
        if settings.save_every and done % settings.save_every == 0:
            checkpoint(done)
    progress.close()
    if heldout is not None:
        scores = evaluate(model, heldout, num_classes, settings.eval_scale, settings.max_eval)
        emit({"step": settings.steps, "eval": scores})
    checkpoint(settings.steps)
    if log_file:
        log_file.close()
    model.eval()
    return records
