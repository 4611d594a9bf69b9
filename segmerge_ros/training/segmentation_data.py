"""Segmentation training data: dataset layouts (Cityscapes, ADE20K, held-out folders), teacher-labelled frames,
augmentation and batching."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Sequence

import cv2
import numpy as np
import torch

from segmerge_ros.models.vit.segmenter import IGNORE_INDEX
from segmerge_ros.inference.sources import iter_frames, read_rgb
from segmerge_ros.training.progress import Progress

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
