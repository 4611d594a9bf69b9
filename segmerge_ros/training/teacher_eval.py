"""``segmerge-train pose-teachers``: pose teachers measured against ground truth before any is trusted (issue 22).

Each teacher (MoveNet Lightning, BlazePose heavy and full; ``TEACHER_FILES``) runs on the ground-truth boxes of the
sets of ``pose_sets`` (a square crop of ``padding`` times the box's longer side, ``SquareCropTeacher.on_boxes``).
Figures per set and per part of the split (train, test, extra; ``pose_sets.SET_PARTS``):

* PCK@0.2 as the project measures it (``pose_eval.coco_scores``): a labelled keypoint counts when it is within 0.2
  of the ground-truth box's **diagonal**; mean OKS likewise;
* COCO keypoint AP (``pose_metrics.oks_ap``): one prediction per ground-truth box, ranked by its mean keypoint
  score, matched to the ground truths of its image, averaged over OKS 0.50:0.05:0.95;
* milliseconds per person on this CPU (crop and model, the interpreter's threads as given).

Everything chosen here is chosen on the **train** part (``coco_mini_train/train``): BlazePose's crop padding (among
``--paddings``), the hip correction (``teacher_fusion.fit_hip_correction``) and the ensemble's agreement distance.
The test part (the frozen ``coco_mini_train`` test images and ``mmpose_coco_keypoints``) and the extra sets are
only measured.

    segmerge-train pose-teachers --json /tmp/teachers.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from segmerge_ros.inference.sources import read_rgb, shared_data_dir
from segmerge_ros.training.blazepose import BlazePoseTeacher
from segmerge_ros.training.movenet import TEACHER_PADDING, MoveNetTeacher
from segmerge_ros.training.pose_eval import coco_scores
from segmerge_ros.training.pose_metrics import oks_ap
from segmerge_ros.training.pose_sets import SET_PARTS, ground_truth_sets
from segmerge_ros.training.teacher_fusion import fit_hip_correction, fuse_teachers

TEACHER_FILES = {
    "movenet": ("coral_movenet_pose", "movenet_single_pose_lightning_ptq.tflite"),
    "blazepose-heavy": ("mediapipe_blazepose", "pose_landmark_heavy.tflite"),
    "blazepose-full": ("mediapipe_blazepose", "pose_landmark_full.tflite"),
    "blazepose-lite": ("mediapipe_blazepose", "pose_landmark_lite.tflite"),
}
DEFAULT_TEACHERS = ("movenet", "blazepose-heavy", "blazepose-full")
BLAZEPOSE_PADDINGS = (TEACHER_PADDING, 1.25)
ENSEMBLE_AGREE = (0.05, 0.1, 0.15, 0.2)
PARTS = ("train", "test", "extra")
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")


def named_teacher(name: str, shared: Path, threads: int = 1):
    """The teacher called ``name`` (a key of ``TEACHER_FILES``) from the shared data folder."""
    if name not in TEACHER_FILES:
        raise ValueError(f"unknown teacher {name!r}; known: {list(TEACHER_FILES)}")
    path = Path(shared).joinpath(*TEACHER_FILES[name])
    return (MoveNetTeacher if name == "movenet" else BlazePoseTeacher)(path, threads=threads)


def predict(teacher, persons: Sequence[dict], padding: float,
            images: dict[Path, np.ndarray]) -> tuple[np.ndarray, np.ndarray, float]:
    """Teacher keypoints (N, 17, 2), scores (N, 17) on the persons' boxes, and the seconds ``on_boxes`` took."""
    keypoints = np.zeros((len(persons), 17, 2), np.float32)
    scores = np.zeros((len(persons), 17), np.float32)
    seconds = 0.0
    for image in dict.fromkeys(p["image"] for p in persons):
        rows = [i for i, p in enumerate(persons) if p["image"] == image]
        boxes = np.stack([persons[i]["box"] for i in rows])
        began = time.perf_counter()
        keypoints[rows], scores[rows] = teacher.on_boxes(images[image], boxes, padding)
        seconds += time.perf_counter() - began
    return keypoints, scores, seconds


def score(keypoints: np.ndarray, scores: np.ndarray, persons: Sequence[dict]) -> dict:
    """PCK@0.2 (box diagonal) and mean OKS (``coco_scores``) plus COCO keypoint AP of predictions on persons."""
    if not persons:
        return {"persons": 0}
    image_ids = np.unique([str(p["image"]) for p in persons], return_inverse=True)[1]
    ap = oks_ap(keypoints, np.asarray(scores).mean(axis=1), np.stack([p["keypoints"] for p in persons]),
                np.stack([p["visibility"] for p in persons]), np.array([p["area"] for p in persons]),
                image_ids=(image_ids, image_ids))
    return {**coco_scores(keypoints, persons), "ap": ap["ap"], "ap50": ap["ap50"], "ap75": ap["ap75"]}


def figures(keypoints: np.ndarray, scores: np.ndarray, persons: Sequence[dict], groups: dict[str, np.ndarray]) -> dict:
    """``score`` per group of rows (sets and parts): {group: figures}."""
    return {name: score(keypoints[rows], scores[rows], [persons[i] for i in rows]) for name, rows in groups.items()}


def cpu_description(cpuinfo: str | None = None) -> dict:
    """The CPU's model name and which of ``CPU_FLAGS`` it has, from /proc/cpuinfo (or its text)."""
    text = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)  # the last core's
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    return {"model": fields.get("model name", "unknown"), "flags": {f: f in flags for f in CPU_FLAGS}}


def best_by_ap(variants: dict, names: Sequence[str], part: str = "train") -> str:
    """The name among ``names`` with the highest AP on ``part`` (ties: higher PCK, then the first)."""
    return max(names, key=lambda n: (variants[n]["parts"][part].get("ap", -1.0),
                                     variants[n]["parts"][part].get("pck", -1.0)))


def evaluate_teachers(shared: str | Path, teachers: Sequence[str] = DEFAULT_TEACHERS,
                      paddings: Sequence[float] = BLAZEPOSE_PADDINGS, set_names: Sequence[str] | None = None,
                      threads: int = 1, max_persons: int = 0, progress: bool = True) -> dict:
    """The figures of ``pose-teachers`` (module docstring): {"sets", "variants", "choices", "best"}.

    ``variants`` maps ``teacher@padding`` (and ``+hip``, and ``a & b`` for the ensemble) to its per-set and per-part
    figures and its milliseconds per person. MoveNet runs at ``TEACHER_PADDING`` only, BlazePose at ``paddings``.
    ``max_persons`` > 0 keeps that many persons per set (tests)."""
    shared = Path(shared)
    sets = ground_truth_sets(shared, set_names)
    if max_persons > 0:
        sets = {name: persons[:max_persons] for name, persons in sets.items()}
    persons = [p for group in sets.values() for p in group]
    groups = person_groups(sets)
    images = {path: read_rgb(path) for path in dict.fromkeys(p["image"] for p in persons)}
    outputs, variants = {}, {}

    def add(name: str, keypoints, scores, seconds: float, **info) -> None:
        outputs[name] = (np.asarray(keypoints), np.asarray(scores))
        variants[name] = {**info, "ms_per_person": 1000.0 * seconds / max(len(persons), 1),
                          **split_figures(figures(outputs[name][0], outputs[name][1], persons, groups))}
        if progress:
            print(json.dumps({name: variants[name]["parts"]}), file=sys.stderr, flush=True)

    for teacher_name in teachers:
        teacher = named_teacher(teacher_name, shared, threads)
        for padding in ((TEACHER_PADDING,) if teacher_name == "movenet" else tuple(paddings)):
            keypoints, scores, seconds = predict(teacher, persons, padding, images)
            add(f"{teacher_name}@{padding:g}", keypoints, scores, seconds, teacher=teacher_name, padding=padding)
    chosen = [best_by_ap(variants, [n for n in variants if variants[n]["teacher"] == t]) for t in teachers]
    choices: dict = {"padding": {variants[n]["teacher"]: variants[n]["padding"] for n in chosen}, "hip": {},
                     "ensemble": None}
    train = groups["train"]
    gts = np.stack([p["keypoints"] for p in persons])
    vis = np.stack([p["visibility"] for p in persons])
    boxes = np.stack([p["box"] for p in persons])
    for name in chosen:
        correction = fit_hip_correction(outputs[name][0][train], gts[train], vis[train], boxes[train])
        choices["hip"][name] = correction.as_dict()
        add(f"{name}+hip", correction.apply(outputs[name][0]), outputs[name][1],
            variants[name]["ms_per_person"] * len(persons) / 1000.0, **{**variants_info(variants[name]), "hip": True})
        choices["hip"][name]["change"] = figure_changes(variants[name]["parts"], variants[f"{name}+hip"]["parts"])
    blaze = [n for n in variants if variants[n]["teacher"].startswith("blazepose") and
             (n in chosen or n.removesuffix("+hip") in chosen)]
    movenet = [n for n in chosen if variants[n]["teacher"] == "movenet"]
    if blaze and movenet:
        choices["ensemble"] = fit_ensemble(outputs, variants, movenet[0], best_by_ap(variants, blaze), boxes, train,
                                           persons)
        a, b, agree = choices["ensemble"]["members"] + [choices["ensemble"]["agree"]]
        seconds = (variants[a]["ms_per_person"] + variants[b]["ms_per_person"]) * len(persons) / 1000.0
        add(f"{a} & {b}", *fuse_teachers(*outputs[a], *outputs[b], boxes, agree), seconds, teacher="ensemble",
            padding=None, members=[a, b], agree=agree)
    best = {part: best_by_ap(variants, list(variants), part) for part in PARTS if len(groups[part])}
    return {"sets": {name: {"part": SET_PARTS[name], "persons": len(group),
                            "keypoints": int(sum((p["visibility"] > 0).sum() for p in group))}
                     for name, group in sets.items()},
            "variants": variants, "choices": choices, "best": best}


def person_groups(sets: dict[str, list]) -> dict[str, np.ndarray]:
    """Rows of each set and of each part (``PARTS``) in the persons of ``sets`` laid end to end, in order."""
    labels = np.array([name for name, group in sets.items() for _ in group])
    groups = {name: np.flatnonzero(labels == name) for name in sets}
    groups.update({part: np.flatnonzero(np.isin(labels, [s for s in sets if SET_PARTS[s] == part]))
                   for part in PARTS})
    return groups


def variants_info(entry: dict) -> dict:
    """The descriptive fields of a variant entry (teacher, padding), without its figures."""
    return {"teacher": entry["teacher"], "padding": entry["padding"]}


def figure_changes(before: dict, after: dict) -> dict:
    """{part: {"pck": change, "ap": change}} from one variant's part figures to another's (after minus before)."""
    return {part: {m: after[part][m] - before[part][m] for m in ("pck", "ap")}
            for part in before if before[part].get("persons")}


def split_figures(by_group: dict) -> dict:
    """{"sets": {...}, "parts": {...}} from figures keyed by set and part names."""
    return {"sets": {k: v for k, v in by_group.items() if k not in PARTS},
            "parts": {k: v for k, v in by_group.items() if k in PARTS}}


def fit_ensemble(outputs: dict, variants: dict, a: str, b: str, boxes: np.ndarray, train: np.ndarray,
                 persons: Sequence[dict]) -> dict:
    """The ensemble of variants ``a`` and ``b`` with the agreement distance (``ENSEMBLE_AGREE``) of the highest AP
    on the train rows: {"members": [a, b], "agree", "train_ap" per distance}."""
    train_persons = [persons[i] for i in train]
    train_ap = {}
    for agree in ENSEMBLE_AGREE:
        kps, scores = fuse_teachers(outputs[a][0][train], outputs[a][1][train], outputs[b][0][train],
                                    outputs[b][1][train], boxes[train], agree)
        train_ap[agree] = score(kps, scores, train_persons).get("ap", float("nan"))
    agree = max(ENSEMBLE_AGREE, key=lambda d: np.nan_to_num(train_ap[d], nan=-1.0))
    return {"members": [a, b], "agree": agree, "train_ap": {f"{d:g}": v for d, v in train_ap.items()}}


def results_table(result: dict, parts: Sequence[str] = PARTS) -> str:
    """Markdown table: a row per variant; ms per person, then PCK@0.2, AP and mean OKS per part."""
    parts = [p for p in parts if any(p in v["parts"] and v["parts"][p].get("persons") for v in
                                     result["variants"].values())]
    head = ["teacher (padding)", "ms/person"] + [f"{p} {m}" for p in parts for m in ("PCK@0.2", "AP", "OKS")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, entry in result["variants"].items():
        cells = [f"`{name}`", f"{entry['ms_per_person']:.1f}"]
        for part in parts:
            f = entry["parts"].get(part, {})
            cells += [f"{f['pck']:.3f}", f"{f['ap']:.3f}", f"{f['oks']:.3f}"] if f.get("persons") else ["", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The arguments of ``segmerge-train pose-teachers``."""
    p = argparse.ArgumentParser(prog="segmerge-train pose-teachers", description="Pose teachers against "
                                "ground truth: PCK@0.2, COCO keypoint AP and time per person, per set and part.")
    p.add_argument("--data", default=None, help="shared data folder (default: ../shared/data)")
    p.add_argument("--teachers", default=",".join(DEFAULT_TEACHERS), help=f"comma list of {list(TEACHER_FILES)}")
    p.add_argument("--paddings", default=",".join(f"{v:g}" for v in BLAZEPOSE_PADDINGS),
                   help="BlazePose crop paddings to try (MoveNet keeps TEACHER_PADDING)")
    p.add_argument("--sets", default=",".join(SET_PARTS), help="comma list of ground-truth sets")
    p.add_argument("--threads", type=int, default=1, help="interpreter threads per teacher")
    p.add_argument("--max-persons", type=int, default=0, help="at most this many persons per set (0: all)")
    p.add_argument("--json", help="also write the result to this file")
    return p


def main(argv: Sequence[str]) -> int:
    """Run ``evaluate_teachers`` from the command line; the JSON to stdout, the table to stderr."""
    args = build_parser().parse_args(argv)
    shared = Path(args.data) if args.data else shared_data_dir()
    if shared is None or not shared.is_dir():
        raise SystemExit("shared data folder not found; pass --data")
    began = time.perf_counter()
    result = evaluate_teachers(shared, args.teachers.split(","), [float(v) for v in args.paddings.split(",")],
                               args.sets.split(","), args.threads, args.max_persons)
    result.update({"command": "segmerge-train pose-teachers " + " ".join(argv), "threads": args.threads,
                   "cpu": cpu_description(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   "seconds": round(time.perf_counter() - began, 1)})
    result["table"] = results_table(result)
    print(result["table"], file=sys.stderr)
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    return 0
