"""Ground-truth person sets with COCO-17 keypoints in ../shared/data, for measuring pose teachers (issue 22).

A person record is ``pose_eval.coco_persons``'s: ``image`` (path), ``box`` (xyxy), ``keypoints`` (17, 2),
``visibility`` (17,) and ``area``. Sets and their part of the split:

* ``coco_mini_train/train`` (train) and ``coco_mini_train/test`` (test): ``coco_mini_train/person_keypoints.json``
  cut by ``pose_split``;
* ``mmpose_coco`` (test): ``mmpose_coco_keypoints/test_coco.json`` (12 of its 14 annotations have keypoints);
* ``ochuman``, ``humanart``, ``posetrack18`` (extra: measured, never fitted on), the sets of
  ``mmpose_pose_testsets`` that are COCO-17 or trivially become it. OCHuman is COCO-17 (heavily occluded people).
  Human-Art's first 17 ``keypoints`` are COCO-17 (one photo with two people, a painting and a figurine; its
  ``file_name`` loses the ``HumanArt/images/`` prefix). PoseTrack18 has COCO's order with head_bottom and head_top
  where COCO has the eyes: those two are dropped (visibility 0), and as it gives no area, OKS uses the box's.

Left out: AIC, CrowdPose, ExLPose, JHMDB, MHP, MPII, H36M and MPI-INF-3DHP (other layouts with head-top, neck or
pelvis points and no face points; their hips and heads are defined differently from COCO's), and the COCO-WholeBody
and Halpe files (the same 4 images as ``mmpose_coco``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from segmerge_ros.training.pose_eval import coco_persons
from segmerge_ros.training.pose_split import split_persons

TESTSETS = "mmpose_pose_testsets"
# name -> (annotation file under TESTSETS, image folder under TESTSETS, file-name prefix to strip, dropped points)
MMPOSE_COCO17_SETS = {
    "ochuman": ("ochuman/test_ochuman.json", "ochuman", "", ()),
    "humanart": ("humanart/test_humanart.json", "humanart", "HumanArt/images/", ()),
    "posetrack18": ("posetrack18/annotations/test_posetrack18_val.json", "posetrack18", "", (1, 2)),
}
SET_PARTS = {"coco_mini_train/train": "train", "coco_mini_train/test": "test", "mmpose_coco": "test",
             "ochuman": "extra", "humanart": "extra", "posetrack18": "extra"}


def annotation_person(ann: dict, image: Path, dropped: Sequence[int] = ()) -> dict | None:
    """A person record from one COCO-style annotation; None for crowds and people without labelled keypoints."""
    points = np.asarray(ann["keypoints"], dtype=np.float64).reshape(-1, 3)[:17]
    visibility = points[:, 2].copy()
    visibility[list(dropped)] = 0
    if ann.get("iscrowd") or not (visibility > 0).any():
        return None
    x, y, w, h = (float(v) for v in ann["bbox"])
    area = float(ann["area"]) if ann.get("area") else w * h
    return {"image": image, "box": np.array([x, y, x + w, y + h]), "keypoints": points[:, :2],
            "visibility": visibility, "area": area}


def coco_file_persons(labels: Path, image_root: Path, prefix: str = "", dropped: Sequence[int] = ()) -> list[dict]:
    """Person records of a COCO-style keypoint file whose images lie under ``image_root`` (``file_name`` minus
    ``prefix``); ``dropped`` keypoints count as unlabelled."""
    data = json.loads(Path(labels).read_text())
    images = {im["id"]: Path(image_root) / im["file_name"].removeprefix(prefix) for im in data["images"]}
    records = (annotation_person(ann, images[ann["image_id"]], dropped) for ann in data["annotations"])
    return [r for r in records if r is not None]


def ground_truth_sets(shared: Path, names: Sequence[str] | None = None) -> dict[str, list[dict]]:
    """{set name: person records} for ``names`` (default: every set of ``SET_PARTS``), read from ``shared``."""
    shared = Path(shared)
    names = list(SET_PARTS) if names is None else list(names)
    unknown = [n for n in names if n not in SET_PARTS]
    if unknown:
        raise ValueError(f"unknown ground-truth sets {unknown}; known: {list(SET_PARTS)}")
    sets: dict[str, list[dict]] = {}
    if any(n.startswith("coco_mini_train/") for n in names):
        train, test = split_persons(coco_persons(shared / "coco_mini_train"))
        sets.update({"coco_mini_train/train": train, "coco_mini_train/test": test})
    if "mmpose_coco" in names:
        sets["mmpose_coco"] = coco_persons(shared / "mmpose_coco_keypoints")
    for name, (labels, folder, prefix, dropped) in MMPOSE_COCO17_SETS.items():
        if name in names:
            sets[name] = coco_file_persons(shared / TESTSETS / labels, shared / TESTSETS / folder, prefix, dropped)
    return {n: sets[n] for n in names}
