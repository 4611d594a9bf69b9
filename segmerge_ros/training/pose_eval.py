"""The figures of ``segmerge-train pose-eval`` (``evaluate_pose``): PCK@0.2 and mean error against the teacher on
held-out video frames, PCK@0.2 and OKS against COCO ground truth for the student and the teacher on the same boxes,
per rung of the merge-rate ladder."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from segmerge_ros.merging.segformerpp import LADDER
from segmerge_ros.models.pose.model import POSE_INPUT_SIZE, SegformerPose
from segmerge_ros.inference.pose import PoseEstimator, box_to_center_scale, image_to_crop
from segmerge_ros.inference.sources import read_rgb
from segmerge_ros.training.pose_metrics import oks, pck
from segmerge_ros.training.pose_people import (
    TEACHER_CROPS,
    People,
    PersonFinder,
    cached_people,
    collect_people,
    teacher_keypoints,
)

EVAL_COLLECT_PERSONS = 12


def pck_against_teacher(student_crop: np.ndarray, teacher_crop: np.ndarray, teacher_scores: np.ndarray,
                        min_score: float = 0.3, threshold: float = 0.2) -> dict:
    """PCK@threshold and mean error (crop pixels) of student keypoints against the teacher's, both (N, 17, 2) in
    crop pixels; keypoints the teacher scores above ``min_score`` count, normalised by the diagonal of the box
    around them (people with fewer than two such keypoints are left out)."""
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
        images = {path: read_rgb(path) for path in images}
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

