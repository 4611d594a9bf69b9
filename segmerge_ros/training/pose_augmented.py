"""Teacher-labelled augmented person crops for ``segmerge-train pose --augmented K`` (issue 22): build, cache, batch.

* People: every ``SourceSpec`` of ``pose_sources`` (videos with the segmentation finder or the teacher's own box,
  image folders, COCO ground-truth boxes without the frozen test images).
* Per person ``1 + K`` records: variant 0 is the node's plain crop (``CropAugment()``), variants 1..K random
  ``CropAugment``s drawn from ``default_rng([seed, source, frame, person])`` (so a record does not depend on the
  order or on the other sources). The teacher labels each crop as the crop looks (``teacher_on_crop``): keypoints
  in crop pixels and scores, nothing is moved afterwards.
* Cache: one ``.npz`` per key (sources and frame ranges, teacher name and file, K, seed, augmentation and finder
  settings, ``max_side``, excluded images, crop size, ``CACHE_VERSION``), named by the key's hash in the cache
  folder: a second run with the same key loads the records and re-reads only the frames that hold people.
* Training: a batch draws records (each sampling group in proportion to sqrt(its teaching records)), regenerates
  each crop from its frame, box and ``CropAugment`` (``augmented_crop``) and renders the targets from the cached
  teacher keypoints (``heatmap_targets``); ``plain_people`` gives the variant-0 records as ``People`` in frame
  pixels for the score calibration.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from segmerge_ros.models.pose.model import POSE_INPUT_SIZE
from segmerge_ros.training.pose_augment import (
    AugmentSettings,
    PARAM_FIELDS,
    CropAugment,
    augmented_crop,
    augmented_to_image,
    sample_augment,
    teacher_on_crop,
)
from segmerge_ros.training.pose_people import People
from segmerge_ros.training.pose_sources import (
    FOUND_GROUND_TRUTH,
    FOUND_SEGMENTATION,
    FOUND_TEACHER,
    SourceSpec,
    choose_finder,
    coco_frames,
    probe_counts,
    spec_frames,
    teacher_boxes,
)
from segmerge_ros.training.pose_teachers import teacher_identity
from segmerge_ros.training.progress import Progress
from segmerge_ros.training.train_pose import (
    PoseTrainSettings,
    heatmap_targets,
    sqrt_group_weights,
    teaching_keypoints,
    to_pixels,
)

CACHE_VERSION = 1


@dataclass(frozen=True)
class FinderSettings:
    """How people are found (part of the cache key): the segmentation finder, the teacher's box, COCO boxes."""

    seg_weights: str = ""
    min_area: int = 400
    max_persons: int = 12
    probe_frames: int = 3  # frames of a video the "auto" decision runs the segmentation finder on
    box_min_score: float = 0.3  # teacher box: keypoints above this score ...
    box_min_keypoints: int = 5  # ... at least this many, else no person
    box_padding: float = 0.15  # ... box widened by this times its size on every side
    box_max_overlap: float = 0.6  # ... dropped when this much of it overlaps a stronger teacher box
    coco_min_keypoints: int = 5  # COCO persons with fewer labelled keypoints are left out


@dataclass
class AugmentedPeople:
    """Teacher-labelled augmented crops: one row per (person, variant)."""

    source: np.ndarray  # (N,) int: index into the spec list
    frame: np.ndarray  # (N,) int: frame (video) or image index (COCO: into coco_images) of the source
    person: np.ndarray  # (N,) int: person id; the variants of one person share it
    variant: np.ndarray  # (N,) int: 0 the node's plain crop, 1..K augmented
    boxes: np.ndarray  # (N, 4) float32 xyxy, frame pixels (after max_side)
    found_by: np.ndarray  # (N,) int: FOUND_SEGMENTATION, FOUND_TEACHER or FOUND_GROUND_TRUTH
    params: np.ndarray  # (N, len(PARAM_FIELDS)) float64: CropAugment.to_array()
    keypoints: np.ndarray  # (N, 17, 2) float32 teacher keypoints, augmented-crop pixels
    scores: np.ndarray  # (N, 17) float32 teacher scores

    def __len__(self) -> int:
        """The number of records."""
        return len(self.boxes)

    def subset(self, rows: np.ndarray) -> "AugmentedPeople":
        """The records of ``rows``."""
        return AugmentedPeople(*(getattr(self, f.name)[rows] for f in fields(self)))

    @staticmethod
    def concatenate(parts: Sequence["AugmentedPeople"]) -> "AugmentedPeople":
        """All records of ``parts`` in order (empty arrays of the right shapes when there are none)."""
        if not parts:
            return AugmentedPeople(*(np.zeros(shape, dtype) for shape, dtype in EMPTY_SHAPES))
        return AugmentedPeople(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(AugmentedPeople)))


EMPTY_SHAPES = (((0,), np.int64), ((0,), np.int64), ((0,), np.int64), ((0,), np.int64), ((0, 4), np.float32),
                ((0,), np.int64), ((0, len(PARAM_FIELDS)), np.float64), ((0, 17, 2), np.float32),
                ((0, 17), np.float32))


def person_variants(seed: int, source: int, frame: int, person: int, count: int,
                    settings: AugmentSettings = AugmentSettings()) -> list[CropAugment]:
    """The plain crop and ``count`` random augmentations of one person (a function of its ids and the seed)."""
    rng = np.random.default_rng([seed, source, frame, person])
    return [CropAugment()] + [sample_augment(rng, settings) for _ in range(count)]


def label_person(teacher, rgb: np.ndarray, box: np.ndarray, variants: Sequence[CropAugment],
                 input_size: tuple[int, int] = POSE_INPUT_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's keypoints (V, 17, 2) in crop pixels and scores (V, 17) on each variant's crop of ``box``."""
    labels = [teacher_on_crop(teacher, augmented_crop(rgb, box, v, input_size)) for v in variants]
    return np.stack([k for k, _ in labels]), np.stack([s for _, s in labels])


def person_records(teacher, rgb: np.ndarray, box: np.ndarray, ids: tuple[int, int, int], found_by: int,
                   variants: Sequence[CropAugment], input_size: tuple[int, int]) -> AugmentedPeople:
    """The records of one person (``ids`` = source, frame, person) with the teacher's labels."""
    keypoints, scores = label_person(teacher, rgb, box, variants, input_size)
    n = len(variants)
    source, frame, person = ids
    return AugmentedPeople(np.full(n, source), np.full(n, frame), np.full(n, person), np.arange(n),
                           np.repeat(np.asarray(box, np.float32).reshape(1, 4), n, axis=0), np.full(n, found_by),
                           np.stack([v.to_array() for v in variants]), keypoints, scores)


def find_in_frames(spec: SourceSpec, frames: list[tuple[int, np.ndarray]], finder: Callable, teacher,
                   settings: FinderSettings) -> tuple[list[tuple[int, np.ndarray, np.ndarray, int]], dict]:
    """(frame index, rgb, boxes, found_by) of a video or image spec's frames, and how they were found
    (``finder`` builds the segmentation finder on first use)."""
    mode, info = spec.finder, {"frames": len(frames)}
    if mode == "auto":
        info["probe_counts"] = probe_counts(finder(), [rgb for _, rgb in frames], settings.probe_frames)
        mode = choose_finder(info["probe_counts"], settings.max_persons)
    info["finder"] = mode
    out = []
    for index, rgb in frames:
        if mode == "segmentation":
            out.append((index, rgb, finder()(rgb), FOUND_SEGMENTATION))
        else:
            out.append((index, rgb, teacher_boxes(teacher, rgb, settings.box_min_score, settings.box_min_keypoints,
                                                  settings.box_padding, settings.box_max_overlap,
                                                  settings.max_persons), FOUND_TEACHER))
    return out, info


def people_of_source(spec: SourceSpec, finder: Callable, teacher, settings: FinderSettings, max_side: int,
                     exclude: Sequence[str]) -> tuple[list[tuple[int, np.ndarray, np.ndarray, int]], dict]:
    """(frame index, rgb, boxes, found_by) of every frame of ``spec`` and how its people were found."""
    if spec.kind == "coco":
        items = [(i, rgb, boxes, FOUND_GROUND_TRUTH)
                 for i, rgb, boxes in coco_frames(spec, max_side, exclude, settings.coco_min_keypoints)]
        return items, {"frames": len(items), "finder": "ground_truth"}
    return find_in_frames(spec, list(spec_frames(spec, max_side)), finder, teacher, settings)


def collect_augmented(specs: Sequence[SourceSpec], finder_factory: Callable, teacher, variants: int, seed: int,
                      augment: AugmentSettings, finder_settings: FinderSettings, max_side: int = 0,
                      exclude: Sequence[str] = (), input_size: tuple[int, int] = POSE_INPUT_SIZE,
                      progress: bool = True) -> tuple[AugmentedPeople, dict, list[dict]]:
    """Find, augment and label the people of every source: records, the frames that hold people ({(source,
    frame): rgb}) and one info dict per source (frames, finder, probe counts, people)."""
    finder = functools.lru_cache(maxsize=None)(finder_factory)  # built once, on first use
    parts, frames, infos, person = [], {}, [], 0
    for s, spec in enumerate(specs):
        items, info = people_of_source(spec, finder, teacher, finder_settings, max_side, exclude)
        bar = Progress(len(items), f"people {Path(spec.path).name}") if progress else None
        count = 0
        for done, (index, rgb, boxes, found_by) in enumerate(items, 1):
            for box in boxes:
                options = person_variants(seed, s, index, person, variants, augment)
                parts.append(person_records(teacher, rgb, box, (s, index, person), found_by, options, input_size))
                person, count = person + 1, count + 1
            if len(boxes):
                frames[(s, index)] = rgb
            if bar:
                bar.update(done)
        if bar:
            bar.close()
        infos.append({"source": Path(spec.path).name, **info, "people": count})
    return AugmentedPeople.concatenate(parts), frames, infos


def augmented_key(specs: Sequence[SourceSpec], teacher, variants: int, seed: int, augment: AugmentSettings,
                  finder: FinderSettings, max_side: int, exclude: Sequence[str],
                  input_size: tuple[int, int] = POSE_INPUT_SIZE) -> dict:
    """Everything the records depend on, as plain JSON values."""
    return {"version": CACHE_VERSION, "sources": [s.key() for s in specs], "teacher": teacher_identity(teacher),
            "variants": int(variants), "seed": int(seed), "augment": asdict(augment), "finder": asdict(finder),
            "max_side": int(max_side), "exclude": sorted(exclude), "input_size": list(input_size)}


def cache_file(folder: str | Path, key: dict) -> Path:
    """``folder/pose_augmented_<hash of the key>.npz``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(folder) / f"pose_augmented_{digest}.npz"


def save_records(path: Path, records: AugmentedPeople, key: dict, info: dict) -> None:
    """Write records, key and info to ``path`` (through a temporary file, so a cut-off run leaves none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as handle:
        np.savez(handle, key=np.array(json.dumps(key, sort_keys=True)), info=np.array(json.dumps(info)),
                 **asdict(records))
    tmp.replace(path)


def load_records(path: Path) -> tuple[AugmentedPeople, dict, dict]:
    """Records, key and info of a cache file."""
    with np.load(path) as stored:
        records = AugmentedPeople(*(stored[f.name] for f in fields(AugmentedPeople)))
        return records, json.loads(str(stored["key"])), json.loads(str(stored["info"]))


def load_frames(specs: Sequence[SourceSpec], records: AugmentedPeople, max_side: int = 0,
                exclude: Sequence[str] = (), coco_min_keypoints: int = 5) -> dict[tuple[int, int], np.ndarray]:
    """The frames the records point to, read again from their sources ({(source, frame): rgb})."""
    frames = {}
    for s, spec in enumerate(specs):
        wanted = {int(f) for f in np.unique(records.frame[records.source == s])}
        if not wanted:
            continue
        if spec.kind == "coco":
            found = ((i, rgb) for i, rgb, _ in coco_frames(spec, max_side, exclude, coco_min_keypoints, wanted))
        else:
            found = spec_frames(spec, max_side, wanted)
        frames.update({(s, i): rgb for i, rgb in found})
    return frames


def cached_augmented(folder: str | Path, key: dict, specs: Sequence[SourceSpec],
                     build: Callable) -> tuple[AugmentedPeople, dict, dict, bool]:
    """Records, frames, info and whether they came from the cache: the cache file of ``key`` in ``folder`` when it
    exists (frames re-read), else ``build()`` -> (records, frames, per-source infos), stored."""
    path = cache_file(folder, key)
    if path.is_file():
        records, stored_key, info = load_records(path)
        if stored_key == json.loads(json.dumps(key, sort_keys=True)):
            frames = load_frames(specs, records, key["max_side"], key["exclude"], key["finder"]["coco_min_keypoints"])
            return records, frames, {**info, "cache": str(path)}, True
    began = time.perf_counter()
    records, frames, sources = build()
    info = {"sources": sources, "build_seconds": round(time.perf_counter() - began, 1), "records": len(records)}
    save_records(path, records, key, info)
    return records, frames, {**info, "cache": str(path)}, False


# ------------------------------------------------------------------------------------------------- training
def source_groups(specs: Sequence[SourceSpec]) -> np.ndarray:
    """(S,) int: the sampling group of each spec (specs with the same ``group`` share one)."""
    names: dict[str, int] = {}
    return np.array([names.setdefault(s.group or s.path, len(names)) for s in specs], dtype=np.int64)


def augmented_sampling_weights(records: AugmentedPeople, groups: np.ndarray, min_score: float = 0.3,
                               min_keypoints: int = 3, input_size: tuple[int, int] = POSE_INPUT_SIZE) -> np.ndarray:
    """Per-record probabilities: records with fewer than ``min_keypoints`` teaching keypoints (scored above
    ``min_score``, inside the crop) are never drawn; each group in proportion to sqrt(its teaching records)."""
    teaches = teaching_keypoints(records.keypoints, records.scores, min_score, input_size).sum(axis=1) >= min_keypoints
    if not teaches.any():
        raise ValueError(f"no record has {min_keypoints} keypoints the teacher scores above {min_score}")
    return sqrt_group_weights(np.asarray(groups)[records.source], teaches)


def augmented_sample(rgb: np.ndarray, records: AugmentedPeople, row: int, settings: PoseTrainSettings,
                     input_size: tuple[int, int] = POSE_INPUT_SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One training sample of record ``row``: its crop regenerated from the frame, targets and weights."""
    crop = augmented_crop(rgb, records.boxes[row], CropAugment.from_array(records.params[row]), input_size)
    target, weight = heatmap_targets(records.keypoints[row], records.scores[row], settings, input_size)
    return crop, target, weight


def augmented_batch(records: AugmentedPeople, frames, probabilities: np.ndarray, settings: PoseTrainSettings,
                    step: int, input_size: tuple[int, int] = POSE_INPUT_SIZE):
    """Pixels (B, 3, H, W), targets (B, 17, h, w) and weights (B, 17): a function of (seed, step)."""
    rng = np.random.default_rng([settings.seed, step])
    rows = rng.choice(len(records), size=settings.batch, p=probabilities)
    samples = [augmented_sample(frames[(int(records.source[r]), int(records.frame[r]))], records, int(r), settings,
                                input_size) for r in rows]
    crops, targets, weights = (np.stack(parts) for parts in zip(*samples))
    return to_pixels(crops), torch.from_numpy(targets), torch.from_numpy(weights)


def augmented_batches(records: AugmentedPeople, frames, groups: np.ndarray, settings: PoseTrainSettings,
                      input_size: tuple[int, int] = POSE_INPUT_SIZE) -> Callable:
    """step -> ``augmented_batch`` (for ``train_pose(..., batches=...)``)."""
    probabilities = augmented_sampling_weights(records, groups, settings.min_score, settings.min_keypoints,
                                               input_size)
    return lambda step: augmented_batch(records, frames, probabilities, settings, step, input_size)


def plain_people(records: AugmentedPeople, input_size: tuple[int, int] = POSE_INPUT_SIZE) -> People:
    """The variant-0 records (the node's plain crops) as ``People`` with keypoints in frame pixels (for
    ``calibrate_scores``, which crops them as the node does)."""
    plain = records.subset(np.flatnonzero(records.variant == 0))
    points = np.stack([augmented_to_image(k, b, CropAugment(), input_size) for k, b in
                       zip(plain.keypoints, plain.boxes)]) if len(plain) else np.zeros((0, 17, 2))
    return People(plain.source, plain.frame, plain.boxes, points.astype(np.float32), plain.scores)
