"""Where the augmented pose distillation finds its people (``segmerge-train pose --augmented K``, issue 22).

Three kinds of source, each a ``SourceSpec``:

* a video (or a folder of videos, one spec per video, all in one sampling group) with a frame range
  ``PATH@START:END[:STEP]``; its people come from the node's segmentation finder (``PersonFinder``) or, where the
  segmentation (a student trained on one overhead street video) does not see people, from the teacher itself:
  the single-pose teacher on the whole frame padded to a square and on overlapping squares across it, a box
  around each answer's confident keypoints (``teacher_boxes``). ``finder="auto"`` decides per video by running
  the segmentation finder on a few frames (``probe_counts``, ``choose_finder``);
* a folder of images or one image: people from the segmentation finder;
* a COCO keypoint folder (``--coco-train``): the ground-truth boxes of persons with at least ``min_keypoints``
  labelled keypoints, never on the frozen test images of ``pose_split`` (their keypoints are not used: the teacher
  labels every person).

Frames larger than ``max_side`` pixels on their longer side are resized down (area) before anything sees them, so
the finders, the teacher and the training crops all work on the same pixels.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np

from segmerge_ros.inference.sources import iter_frames, read_rgb
from segmerge_ros.training.arguments import parse_range
from segmerge_ros.training.pose_augment import teacher_on_crop
from segmerge_ros.training.pose_people import VIDEO_SUFFIXES, is_video

FINDERS = ("auto", "segmentation", "teacher")
FOUND_SEGMENTATION, FOUND_TEACHER, FOUND_GROUND_TRUTH = 0, 1, 2
RANGE_PATTERN = re.compile(r"^\d*:\d*(:\d+)?$")


@dataclass(frozen=True)
class SourceSpec:
    """One source of people: a video (with its frame range), images, or a COCO keypoint folder."""

    path: str  # resolved
    kind: str  # "video", "images" or "coco"
    start: int = 0
    stop: int | None = None
    step: int = 1
    group: str = ""  # sampling group: sources of one group share the sqrt(people) weight
    finder: str = "auto"  # FINDERS, or "ground_truth" for COCO

    def key(self) -> dict:
        """The spec as plain JSON values (part of the cache key)."""
        return {"path": self.path, "kind": self.kind, "frames": [self.start, self.stop, self.step],
                "group": self.group, "finder": self.finder}


def split_range(text: str, default_frames: str) -> tuple[str, str]:
    """``"a.mp4@0:100:5"`` -> ("a.mp4", "0:100:5"); without a range suffix: (text, default_frames)."""
    path, sep, frames = text.rpartition("@")
    if sep and RANGE_PATTERN.match(frames):
        return path, frames
    return text, default_frames


def folder_videos(folder: Path) -> list[Path]:
    """Every video below ``folder`` (recursive), sorted by path."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)


def parse_source(text: str, default_frames: str = "0:", finder: str = "auto") -> list[SourceSpec]:
    """Specs of one ``--source`` value ``PATH[@START:END[:STEP]]``; a folder holding videos gives one spec per
    video (one sampling group), a folder of images or an image one ``images`` spec."""
    if finder not in FINDERS:
        raise ValueError(f"unknown finder {finder!r}; use one of {FINDERS}")
    path_text, frames = split_range(text, default_frames)
    path = Path(path_text).resolve()
    if not path.exists():
        raise FileNotFoundError(f"source {path} does not exist")
    start, stop, step = parse_range(frames)
    videos = folder_videos(path) if path.is_dir() else [path] if is_video(path) else []
    if videos:
        return [SourceSpec(str(v), "video", start, stop, step, str(path), finder) for v in videos]
    return [SourceSpec(str(path), "images", group=str(path), finder="segmentation")]


def coco_source(folder: str | Path) -> SourceSpec:
    """The spec of a COCO keypoint folder (ground-truth boxes, teacher labels)."""
    path = Path(folder).resolve()
    return SourceSpec(str(path), "coco", group=str(path), finder="ground_truth")


def downscale(rgb: np.ndarray, max_side: int) -> np.ndarray:
    """``rgb`` resized (area) so that its longer side is at most ``max_side`` (0: unchanged)."""
    height, width = rgb.shape[:2]
    factor = max_side / max(height, width) if max_side else 1.0
    if factor >= 1.0:
        return rgb
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def coco_file(folder: str | Path) -> Path:
    """The one COCO keypoint .json of ``folder``."""
    files = sorted(Path(folder).glob("*.json"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one COCO .json in {folder}, found {len(files)}")
    return files[0]


def coco_images(folder: str | Path) -> list[str]:
    """The image file names of a COCO keypoint folder, sorted: a COCO frame index points into this list."""
    return sorted(im["file_name"] for im in json.loads(coco_file(folder).read_text())["images"])


def coco_train_boxes(folder: str | Path, exclude: Sequence[str] = (), min_keypoints: int = 5) -> dict[int, np.ndarray]:
    """{image index: ground-truth xyxy boxes (N, 4)} of the non-crowd persons with at least ``min_keypoints``
    labelled keypoints, on the images not in ``exclude`` (file names)."""
    data = json.loads(coco_file(folder).read_text())
    names = {im["id"]: im["file_name"] for im in data["images"]}
    index = {name: i for i, name in enumerate(sorted(names.values()))}
    excluded = set(exclude)
    boxes: dict[int, list] = {}
    for ann in data["annotations"]:
        name = names[ann["image_id"]]
        if ann.get("iscrowd") or ann.get("num_keypoints", 0) < min_keypoints or name in excluded:
            continue
        x, y, w, h = ann["bbox"]
        boxes.setdefault(index[name], []).append([x, y, x + w, y + h])
    return {i: np.asarray(b, dtype=np.float32) for i, b in sorted(boxes.items())}


def scaled_frame(path: Path, max_side: int) -> tuple[np.ndarray, float]:
    """An image read and downscaled, with the factor its pixel coordinates were multiplied by."""
    rgb = read_rgb(path)
    small = downscale(rgb, max_side)
    return small, small.shape[1] / rgb.shape[1]


def spec_frames(spec: SourceSpec, max_side: int = 0,
                wanted: set[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(frame index, rgb) of a video or image spec within its range (downscaled); only ``wanted`` indices when
    given. COCO specs are read with ``coco_frames``."""
    if spec.kind == "coco":
        raise ValueError("COCO sources are read with coco_frames")
    for index, rgb in enumerate(iter_frames(spec.path, max_frames=spec.stop if spec.kind == "video" else None)):
        if spec.kind == "video" and (index < spec.start or (index - spec.start) % spec.step):
            continue
        if wanted is None or index in wanted:
            yield index, downscale(rgb, max_side)


def coco_frames(spec: SourceSpec, max_side: int = 0, exclude: Sequence[str] = (), min_keypoints: int = 5,
                wanted: set[int] | None = None) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(image index, rgb, ground-truth boxes in its pixels) of the training persons of a COCO spec."""
    names = coco_images(spec.path)
    for index, boxes in coco_train_boxes(spec.path, exclude, min_keypoints).items():
        if wanted is None or index in wanted:
            rgb, factor = scaled_frame(Path(spec.path) / names[index], max_side)
            yield index, rgb, boxes * np.float32(factor)


def keypoint_box(points: np.ndarray, scores: np.ndarray, image_size: tuple[int, int], min_score: float = 0.3,
                 min_keypoints: int = 5, padding: float = 0.15) -> np.ndarray:
    """An xyxy box (1, 4) around the keypoints scored above ``min_score``, widened by ``padding`` times its size on
    every side (the head above the eyes, the feet below the ankles) and clipped to the image (w, h); (0, 4) when
    fewer than ``min_keypoints`` are confident."""
    confident = np.asarray(scores) > min_score
    if confident.sum() < min_keypoints:
        return np.zeros((0, 4), np.float32)
    lo, hi = points[confident].min(axis=0), points[confident].max(axis=0)
    margin = (hi - lo) * padding
    lo, hi = np.maximum(lo - margin, 0.0), np.minimum(hi + margin, np.asarray(image_size, dtype=np.float64))
    if np.any(hi - lo < 2.0):
        return np.zeros((0, 4), np.float32)
    return np.concatenate([lo, hi])[None].astype(np.float32)


def square_tiles(width: int, height: int, overlap: float = 0.5) -> list[tuple[int, int, int]]:
    """(x0, y0, side) of squares of the image's shorter side along its longer side, neighbours overlapping by
    at least ``overlap`` of a side, the first and last at the image's edges; none for a square image."""
    side, length = min(width, height), max(width, height)
    if length == side:
        return []
    count = int(np.ceil((length - side) / (side * (1.0 - overlap)))) + 1
    starts = np.linspace(0, length - side, count).round().astype(int)
    return [(int(s), 0, side) if width > height else (0, int(s), side) for s in starts]


def region_box(teacher, rgb: np.ndarray, region: tuple[int, int, int] | None, min_score: float = 0.3,
               min_keypoints: int = 5, padding: float = 0.15) -> tuple[np.ndarray, float]:
    """The ``keypoint_box`` (frame pixels) of the one person the teacher sees on a square ``region`` (x0, y0,
    side) of the frame, or on the whole frame padded to a square (None), and its strength: the sum of the scores
    above ``min_score``."""
    x0, y0, side = region if region is not None else (0, 0, max(rgb.shape[:2]))
    points, scores = teacher_on_crop(teacher, rgb[y0:y0 + side, x0:x0 + side])
    points = points.astype(np.float64) + np.array([x0, y0], dtype=np.float64)
    box = keypoint_box(points, scores, (rgb.shape[1], rgb.shape[0]), min_score, min_keypoints, padding)
    return box, float(scores[scores > min_score].sum())


def overlap_ratio(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection of two xyxy boxes over the smaller one's area (1: one lies inside the other)."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return float(max(width, 0.0) * max(height, 0.0) / max(smaller, 1e-9))


def teacher_boxes(teacher, rgb: np.ndarray, min_score: float = 0.3, min_keypoints: int = 5, padding: float = 0.15,
                  max_overlap: float = 0.6, max_persons: int = 12) -> np.ndarray:
    """People the single-pose teacher finds itself: its ``region_box`` on the whole frame (padded to a square) and
    on the overlapping squares of ``square_tiles`` (small people are larger there), strongest first, a box dropped
    when more than ``max_overlap`` of it (or of a kept one) overlaps a stronger kept box. (N, 4) float32 xyxy."""
    height, width = rgb.shape[:2]
    found = [region_box(teacher, rgb, region, min_score, min_keypoints, padding)
             for region in [None] + square_tiles(width, height)]
    found = sorted(((box[0], strength) for box, strength in found if len(box)), key=lambda f: -f[1])
    kept: list[np.ndarray] = []
    for box, _ in found:
        if len(kept) < max_persons and all(overlap_ratio(box, k) <= max_overlap for k in kept):
            kept.append(box)
    return np.asarray(kept, dtype=np.float32).reshape(-1, 4)


def probe_counts(finder, frames: Sequence[np.ndarray], count: int = 3) -> list[int]:
    """People the finder finds on ``count`` frames spread evenly over ``frames``."""
    if not frames:
        return []
    picks = np.unique(np.linspace(0, len(frames) - 1, num=min(count, len(frames))).round().astype(int))
    return [int(len(finder(frames[i]))) for i in picks]


def choose_finder(counts: Sequence[int], max_persons: int = 12) -> str:
    """"segmentation" when the segmentation finder found a plausible number of people (at least one, fewer than
    its cap ``max_persons``) on at least half of the probe frames, else "teacher" (``teacher_boxes``).

    The cap matters: on footage unlike its training video the segmentation student marks clutter (mats, lamps,
    windows, trees) as people and hits the cap on every frame (measured: 12 of 12 on every probe frame of the
    pose2sim and sports2d videos, 3 to 7 on vtest's).
    """
    plausible = sum(1 for c in counts if 0 < c < max_persons)
    return "segmentation" if counts and 2 * plausible >= len(counts) else "teacher"
