"""The people pose distillation learns from: person boxes found by the node's segmentation pipeline, the MoveNet
teacher's keypoints on them, and their cache (``segmerge-train pose`` and ``pose-eval``, see ``pose_cli``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from segmerge_ros.models.pose.model import POSE_INPUT_SIZE
from segmerge_ros.inference.engine import SegmentationEngine
from segmerge_ros.inference.pose import (
    BBOX_PADDING,
    box_to_center_scale,
    crop_people,
    crop_to_image,
    person_boxes_from_segmentation,
)
from segmerge_ros.inference.sources import iter_frames
from segmerge_ros.training.progress import Progress

TEACHER_CROPS = ("tight", "node", "padded")
VIDEO_SUFFIXES = (".avi", ".mp4", ".mkv", ".mov", ".webm")


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
        self.engine = SegmentationEngine(model=model, weights=str(seg_weights))
        self.min_area, self.max_persons = int(min_area), int(max_persons)

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        class_map = self.engine.infer(rgb).class_map
        boxes, _ = person_boxes_from_segmentation(class_map, self.engine.labels.person_ids, self.min_area,
                                                  self.max_persons)
        return boxes


def teacher_keypoints(teacher, rgb: np.ndarray, boxes: np.ndarray,
                      crop: str = "tight") -> tuple[np.ndarray, np.ndarray]:
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

