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

Pose: ``segmerge-train pose ...`` distils a Segformer++ pose student from MoveNet and ``segmerge-train pose-eval
--weights DIR/pose.pth`` evaluates one (``segmerge_ros/training/train_pose.py``, docs/pose.md).

Example (distillation from the trained SegFormer-B0 on vtest frames 0-639)::

    segmerge-train --model algm-vit-t-linear --data frames:../shared/data/opencv_samples/vtest.avi \\
        --frames 0:640:2 --frame-scale 0.5 --teacher segformer:../shared/data/segformer_b0_vtest_student \\
        --heldout ../shared/data/segformer_b0_vtest_student/heldout --steps 600 --out runs/algm_t
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from segmerge_ros.models.vit.methods import build_vit_model, is_vit_model_name, load_vit_model
from segmerge_ros.models.imagenet import IMAGENET_MEAN, IMAGENET_STD
from segmerge_ros.models.vit.segmenter import IGNORE_INDEX, segmentation_loss
from segmerge_ros.models.vit.checkpoints import save_vit_checkpoint
from segmerge_ros.inference.metrics import ConfusionMatrix
from segmerge_ros.inference.sources import iter_frames, read_rgb

Teacher = Callable[[np.ndarray], np.ndarray]
Sample = tuple[np.ndarray, np.ndarray]  # rgb uint8 (H, W, 3), labels uint8 (H, W)

# ---------------------------------------------------------------------------------------------------------------
# Datasets


def cityscapes_pairs(root: str | Path, split: str) -> list[tuple[Path, Path]]:
    """(image, trainId label) paths of a Cityscapes-layout split, sorted."""
    root = Path(root)
    images = sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
    if not images:
        raise FileNotFoundError(f"no */*_leftImg8bit.png under {root / 'leftImg8bit' / split}")
    pairs = []
    for image in images:
        stem = image.name.removesuffix("_leftImg8bit.png")
        label = root / "gtFine" / split / image.parent.name / f"{stem}_gtFine_labelTrainIds.png"
        if not label.is_file():
            raise FileNotFoundError(f"label {label} for {image} is missing")
        pairs.append((image, label))
    return pairs


def ade20k_pairs(root: str | Path, split: str) -> list[tuple[Path, Path]]:
    root = Path(root)
    images = sorted((root / "images" / split).glob("*.jpg"))
    if not images:
        raise FileNotFoundError(f"no *.jpg under {root / 'images' / split}")
    pairs = []
    for image in images:
        label = root / "annotations" / split / f"{image.stem}.png"
        if not label.is_file():
            raise FileNotFoundError(f"label {label} for {image} is missing")
        pairs.append((image, label))
    return pairs


def heldout_pairs(folder: str | Path) -> list[tuple[Path, Path]]:
    """``folder/images/<stem>.*`` paired with the one ``folder/labels/<stem>*.png``."""
    folder = Path(folder)
    images = sorted(p for p in (folder / "images").iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    pairs = []
    for image in images:
        labels = sorted((folder / "labels").glob(f"{image.stem}*.png"))
        if len(labels) != 1:
            raise FileNotFoundError(f"expected one label for {image.name} in {folder / 'labels'}, found {len(labels)}")
        pairs.append((image, labels[0]))
    if not pairs:
        raise FileNotFoundError(f"no images in {folder / 'images'}")
    return pairs


def ade20k_label_transform(label: np.ndarray) -> np.ndarray:
    """ADE20K annotations: 0 = unlabelled -> 255, classes 1..150 -> 0..149."""
    return np.where(label == 0, IGNORE_INDEX, label.astype(np.int32) - 1).astype(np.uint8)


def read_label(path: str | Path) -> np.ndarray:
    label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if label is None:
        raise FileNotFoundError(f"cannot read label {path}")
    if label.ndim == 3:
        raise ValueError(f"label {path} has {label.shape[2]} channels; a single-channel id image is expected")
    return label.astype(np.uint8)


class PairDataset:
    """Samples read from (image, label) files on demand."""

    def __init__(self, pairs: Sequence[tuple[Path, Path]], label_transform: Callable | None = None) -> None:
        self.pairs = list(pairs)
        self.label_transform = label_transform

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Sample:
        image, label_path = self.pairs[index]
        label = read_label(label_path)
        if self.label_transform is not None:
            label = self.label_transform(label)
        return read_rgb(image), label


class MemoryDataset:
    """Samples held in memory (teacher-labelled frames)."""

    def __init__(self, samples: Sequence[Sample]) -> None:
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]


def parse_range(text: str) -> tuple[int, int | None, int]:
    """``"0:640:2"`` -> (0, 640, 2); ``"100:"`` -> (100, None, 1)."""
    parts = (text.split(":") + ["", ""])[:3]
    start = int(parts[0] or 0)
    stop = int(parts[1]) if parts[1] else None
    step = int(parts[2] or 1)
    return start, stop, step


def resize_frame(rgb: np.ndarray, scale: float) -> np.ndarray:
    if scale == 1.0:
        return rgb
    height, width = rgb.shape[:2]
    return cv2.resize(rgb, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)


def resize_labels(label: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    if label.shape[:2] == tuple(size_hw):
        return label
    return cv2.resize(label, (size_hw[1], size_hw[0]), interpolation=cv2.INTER_NEAREST)


def distillation_samples(
    source: str | Path,
    teacher: Teacher,
    frame_range: tuple[int, int | None, int] = (0, None, 1),
    frame_scale: float = 1.0,
    cache: str | Path | None = None,
    progress: bool = True,
) -> MemoryDataset:
    """Frames ``start:stop:step`` of a video or folder, labelled by ``teacher`` at full resolution, then scaled by
    ``frame_scale``. With ``cache`` (an .npz), the labels are stored and reused for the same frame selection."""
    start, stop, step = frame_range
    frames = [
        frame
        for index, frame in enumerate(iter_frames(source, max_frames=stop))
        if index >= start and (index - start) % step == 0
    ]
    if not frames:
        raise FileNotFoundError(f"no frames {start}:{stop}:{step} in {source}")
    cache_path = Path(cache) if cache else None
    key = f"{Path(source).name}|{start}:{stop}:{step}"
    labels = None
    if cache_path and cache_path.is_file():
        stored = np.load(cache_path)
        if str(stored["key"]) == key and len(stored["labels"]) == len(frames):
            labels = list(stored["labels"])
    if labels is None:
        bar = Progress(len(frames), "teacher") if progress else None
        labels = []
        for i, frame in enumerate(frames):
            labels.append(np.asarray(teacher(frame), dtype=np.uint8))
            if bar:
                bar.update(i + 1)
        if bar:
            bar.close()
        if cache_path:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(cache_path, key=np.array(key), labels=np.stack(labels))
    samples = []
    for frame, label in zip(frames, labels):
        small = resize_frame(frame, frame_scale)
        samples.append((small, resize_labels(label, small.shape[:2])))
    return MemoryDataset(samples)


# ---------------------------------------------------------------------------------------------------------------
# Teachers


class SegFormerTeacher:
    """A SegFormer checkpoint the project loads (hub layout or mmseg ``.pth``) as ``rgb -> class map``."""

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        from segmerge_ros.models.segformer.checkpoints import load_segformer

        loaded = load_segformer(path)
        self.model = loaded.model.to(device).eval()
        self.labels = loaded.labels
        self.num_classes = loaded.labels.num_classes
        self.device = device

    @torch.no_grad()
    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        pixels = to_tensor_batch([rgb], IMAGENET_MEAN, IMAGENET_STD).to(self.device)
        logits = F.interpolate(self.model(pixels), size=rgb.shape[:2], mode="bilinear", align_corners=False)
        return logits.argmax(1)[0].to(torch.uint8).cpu().numpy()


class ViTTeacher:
    """A ViT-family checkpoint written by this tool as ``rgb -> class map``."""

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        self.model = load_vit_model(path).to(device).eval()
        self.num_classes = self.model.config.num_classes
        self.device = device

    @torch.no_grad()
    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        config = self.model.config
        pixels = to_tensor_batch([rgb], config.image_mean, config.image_std).to(self.device)
        return self.model.segment(pixels).argmax(1)[0].to(torch.uint8).cpu().numpy()


def load_teacher(spec: str, device: str = "cpu") -> Teacher:
    """``segformer:PATH`` or ``vit:PATH``."""
    kind, _, path = spec.partition(":")
    if kind == "segformer":
        return SegFormerTeacher(path, device)
    if kind == "vit":
        return ViTTeacher(path, device)
    raise ValueError(f"unknown teacher {spec!r}; use segformer:PATH or vit:PATH")


# ---------------------------------------------------------------------------------------------------------------
# Augmentation and batching


def augment(
    rgb: np.ndarray,
    label: np.ndarray,
    crop_hw: tuple[int, int],
    scale_range: tuple[float, float],
    rng: np.random.Generator,
) -> Sample:
    """Random scale, random crop (padded with ignore where the image is smaller), horizontal flip and mild
    brightness/contrast jitter."""
    scale = rng.uniform(*scale_range)
    height, width = label.shape
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_LINEAR)
    label = cv2.resize(label, size, interpolation=cv2.INTER_NEAREST)
    crop_h, crop_w = crop_hw
    pad_h, pad_w = max(0, crop_h - label.shape[0]), max(0, crop_w - label.shape[1])
    if pad_h or pad_w:
        rgb = np.pad(rgb, ((0, pad_h), (0, pad_w), (0, 0)))
        label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=IGNORE_INDEX)
    top = int(rng.integers(0, label.shape[0] - crop_h + 1))
    left = int(rng.integers(0, label.shape[1] - crop_w + 1))
    rgb = rgb[top : top + crop_h, left : left + crop_w]
    label = label[top : top + crop_h, left : left + crop_w]
    if rng.random() < 0.5:
        rgb, label = rgb[:, ::-1], label[:, ::-1]
    contrast, brightness = rng.uniform(0.8, 1.2), rng.uniform(-20, 20)
    rgb = np.clip(rgb.astype(np.float32) * contrast + brightness, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(rgb), np.ascontiguousarray(label)


def to_tensor_batch(images: Iterable[np.ndarray], mean, std) -> torch.Tensor:
    """RGB uint8 arrays of one size -> normalised float ``(B, 3, H, W)``."""
    batch = torch.from_numpy(np.stack(list(images))).permute(0, 3, 1, 2).float() / 255.0
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (batch - mean_t) / std_t


# ---------------------------------------------------------------------------------------------------------------
# Models


def build_model(
    name: str, num_classes: int, labels: str = "cityscapes", method_kwargs: dict | None = None
) -> torch.nn.Module:
    """Any trainable family by name: ``<segmenter|algm|clustvit|dovit>-vit-<t|s|b>[-linear|-mask]`` or
    ``segformer-b0`` .. ``segformer-b5`` (the lead's ``segmerge_ros.models.segformer.model``)."""
    method_kwargs = method_kwargs or {}
    if is_vit_model_name(name):
        return build_vit_model(name, num_classes, labels=labels, **method_kwargs)
    if name.lower().startswith("segformer-"):
        from segmerge_ros.models.segformer.model import SegFormer, mit_config

        model = SegFormer(mit_config(name, num_classes=num_classes))
        model.model_name = name.lower()
        return model
    raise ValueError(f"unknown model {name!r}")


def model_losses(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The model's own ``training_losses`` (ViT methods add their auxiliary terms), else plain cross-entropy."""
    if hasattr(model, "training_losses"):
        return model.training_losses(images, labels)
    loss = segmentation_loss(model(images), labels)
    return {"total": loss, "seg": loss}


def predict_logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Logits at the input resolution (ViT ``segment`` pads to the patch multiple; SegFormer's 1/4 output is
    upsampled)."""
    if hasattr(model, "segment"):
        return model.segment(images)
    return F.interpolate(model(images), size=images.shape[-2:], mode="bilinear", align_corners=False)


def model_normalisation(model: torch.nn.Module) -> tuple[tuple, tuple]:
    config = getattr(model, "config", None)
    return getattr(config, "image_mean", IMAGENET_MEAN), getattr(config, "image_std", IMAGENET_STD)


def save_model(model: torch.nn.Module, directory: Path, extra: dict) -> None:
    if hasattr(model, "family"):
        save_vit_checkpoint(model, directory, extra)
        return
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(directory / "model.safetensors"))
    config = {
        "format": "segmerge-segformer", "name": model.model_name, "num_classes": model.config.num_classes, **extra
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))


def load_trained_model(directory: str | Path) -> torch.nn.Module:
    """A model written by this tool (any family), in eval mode."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    if config.get("format") == "segmerge-segformer":
        from segmerge_ros.models.checkpoint_errors import load_state_dict_strict

        model = build_model(config["name"], config["num_classes"])
        load_state_dict_strict(model, load_file(str(directory / "model.safetensors")), str(directory))
        return model.eval()
    return load_vit_model(directory)


# ---------------------------------------------------------------------------------------------------------------
# Progress, optimiser state, evaluation


class Progress:
    """A dependency-free progress bar on stderr: redrawn in place on a terminal, a line every 5 % otherwise."""

    def __init__(self, total: int, label: str = "", stream=None, start: int = 0) -> None:
        self.total, self.label, self.start = max(total, 1), label, start
        self.stream = stream or sys.stderr
        self.began = time.perf_counter()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every = max(1, self.total // 20)

    def update(self, done: int, **values: float) -> None:
        elapsed = time.perf_counter() - self.began
        rate = (done - self.start) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        filled = int(30 * done / self.total)
        extras = " ".join(f"{k} {v:.4g}" for k, v in values.items())
        line = (
            f"{self.label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total} "
            f"{rate:.2f} it/s eta {eta:.0f}s {extras}"
        )
        if self.tty:
            self.stream.write("\r" + line)
        elif done % self.every == 0 or done == self.total:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten an optimiser state into safetensors-ready tensors + a JSON-ready rest (no pickle)."""
    state = optimizer.state_dict()
    tensors = {
        f"state.{index}.{name}": value.detach().cpu().contiguous() if value.dim() else value.detach().cpu().reshape(1)
        for index, entry in state["state"].items()
        for name, value in entry.items()
        if isinstance(value, torch.Tensor)
    }
    return tensors, {"param_groups": state["param_groups"]}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], rest: dict) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value.reshape(()) if name == "step" else value
    optimizer.load_state_dict({"state": state, "param_groups": rest["param_groups"]})


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


# ---------------------------------------------------------------------------------------------------------------
# Training loop


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


# ---------------------------------------------------------------------------------------------------------------
# Command line


def parse_size(text: str) -> tuple[int, int]:
    """``"256x320"`` (height x width) or ``"256"``."""
    parts = [int(v) for v in text.lower().split("x")]
    return (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1])


def parse_method_args(items: Sequence[str]) -> dict:
    """``key=value`` pairs; values parsed as JSON when possible (numbers, lists, null), else strings."""
    parsed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--method-arg expects key=value, got {item!r}")
        try:
            parsed[key] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key] = value
    return parsed


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
    parser.add_argument("--crop", default="256x256", help="training crop HxW (multiples of 16 for ViTs)")
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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("pose", "pose-eval"):
        from segmerge_ros.training.train_pose import main_eval, main_train

        return (main_train if argv[0] == "pose" else main_eval)(argv[1:])
    if argv and argv[0] == "mask2former":  # distil a Mask2Former (docs/mask2former.md)
        from segmerge_ros.training.train_mask2former import main as main_mask2former

        return main_mask2former(argv[1:])
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
    model = build_model(args.model, num_classes, labels_name, parse_method_args(args.method_arg))
    if args.init:
        from segmerge_ros.models.vit.methods import METHOD_PREFIXES
        from segmerge_ros.models.vit.checkpoints import load_vit_weights

        load_vit_weights(model, args.init, allow_missing_prefixes=METHOD_PREFIXES.get(getattr(model, "family", ""), ()))
    settings = TrainSettings(
        steps=args.steps,
        batch_size=args.batch_size,
        crop=parse_size(args.crop),
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
