"""Pose against ground truth (``segmerge-train pose-eval --coco FOLDER``, issue 22): the student at each merge rung,
backend and precision, and each teacher, on COCO-format keypoint folders, on the ground-truth boxes and on the
boxes the node itself finds (its segmentation's person regions), plus a PNG of predicted beside true skeletons.

Figures (``teacher_eval.score``): PCK@0.2 of the box diagonal, mean OKS and COCO keypoint AP over OKS 0.50:0.95.
With the node's boxes a ground-truth person takes the found box it overlaps most (IoU >= ``MIN_MATCH_IOU``); a
person no found box matches counts as missed in PCK (every labelled keypoint wrong), and AP ranks every found
box's prediction against every person of its image, so boxes found where nobody is cost precision.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np

from segmerge_ros.inference.pose import draw_skeletons
from segmerge_ros.inference.sources import read_rgb
from segmerge_ros.inference.tracking import box_iou
from segmerge_ros.training.pose_eval import coco_scores, distinct_rung_configs
from segmerge_ros.training.pose_metrics import oks_ap

MIN_MATCH_IOU = 0.3
MISSED = 1e9  # keypoints of a person no found box matches: far from everything
# estimate(rgb, boxes (N, 4)) -> keypoints (N, 17, 2) frame pixels, scores (N, 17)
Estimate = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def load_images(persons: Sequence[dict]) -> dict[Path, np.ndarray]:
    """Each image of the persons, read once (RGB)."""
    return {path: read_rgb(path) for path in dict.fromkeys(p["image"] for p in persons)}


def on_ground_truth_boxes(estimate: Estimate, persons: Sequence[dict], images: dict) -> dict:
    """Figures of predictions on each person's own ground-truth box."""
    keypoints = np.zeros((len(persons), 17, 2), np.float32)
    scores = np.zeros((len(persons), 17), np.float32)
    for image, rgb in images.items():
        rows = [i for i, p in enumerate(persons) if p["image"] == image]
        keypoints[rows], scores[rows] = estimate(rgb, np.stack([persons[i]["box"] for i in rows]))
    return figures(keypoints, scores.mean(axis=1), persons, keypoints, np.arange(len(persons)))


def on_found_boxes(estimate: Estimate, persons: Sequence[dict], images: dict, found: dict) -> dict:
    """Figures of predictions on the boxes the node found in each image (``found``: image -> boxes (M, 4))."""
    matched = np.full((len(persons), 17, 2), MISSED, np.float32)
    all_keypoints, all_scores, all_images = [], [], []
    for index, (image, rgb) in enumerate(images.items()):
        boxes = np.asarray(found.get(image, np.zeros((0, 4))), np.float32).reshape(-1, 4)
        if not len(boxes):
            continue
        keypoints, scores = estimate(rgb, boxes)
        all_keypoints.append(keypoints)
        all_scores.append(np.asarray(scores).mean(axis=1))
        all_images.append(np.full(len(boxes), index))
        rows = [i for i, p in enumerate(persons) if p["image"] == image]
        overlap = box_iou(np.stack([persons[i]["box"] for i in rows]), boxes)
        for row, best in zip(rows, overlap.argmax(axis=1)):
            if overlap[rows.index(row), best] >= MIN_MATCH_IOU:
                matched[row] = keypoints[best]
    image_index = {image: i for i, image in enumerate(images)}
    gt_images = np.array([image_index[p["image"]] for p in persons])
    predictions = np.concatenate(all_keypoints) if all_keypoints else np.zeros((0, 17, 2), np.float32)
    pred_scores = np.concatenate(all_scores) if all_scores else np.zeros(0)
    pred_images = np.concatenate(all_images) if all_images else np.zeros(0, np.int64)
    result = figures(predictions, pred_scores, persons, matched, gt_images, pred_images)
    result["found_boxes"] = int(len(predictions))
    result["persons_matched"] = int((matched[:, 0, 0] < MISSED).sum())
    return result


def figures(predictions: np.ndarray, prediction_scores: np.ndarray, persons: Sequence[dict], matched: np.ndarray,
            gt_images: np.ndarray, pred_images: np.ndarray | None = None) -> dict:
    """PCK@0.2 and mean OKS of the per-person ``matched`` keypoints; AP of all ``predictions`` by image."""
    if not persons:
        return {"persons": 0}
    pred_images = gt_images if pred_images is None else pred_images
    ap = oks_ap(predictions, prediction_scores, np.stack([p["keypoints"] for p in persons]),
                np.stack([p["visibility"] for p in persons]), np.array([p["area"] for p in persons]),
                image_ids=(pred_images, gt_images))
    return {**coco_scores(matched, list(persons)), "ap": ap["ap"], "ap50": ap["ap50"], "ap75": ap["ap75"]}


def student_estimate(estimator) -> Estimate:
    """A PoseEstimator as an ``Estimate``."""
    def estimate(rgb: np.ndarray, boxes: np.ndarray):
        result = estimator.estimate_boxes(rgb, boxes)
        return result.keypoints, result.scores
    return estimate


def teacher_estimate(teacher) -> Estimate:
    """A teacher (``on_boxes``) as an ``Estimate``."""
    return lambda rgb, boxes: teacher.on_boxes(rgb, boxes)


def evaluate_student(make_estimator: Callable[[str, str], object], persons: Sequence[dict], images: dict,
                     found: dict | None, backends: Sequence[str], precisions: Sequence[str],
                     rungs: bool = True) -> list[dict]:
    """One row per (backend, precision, encoder setting of the ladder): figures on ground-truth boxes and, with
    ``found``, on the node's boxes. ``make_estimator(backend, precision)`` builds the student."""
    rows = []
    configs = distinct_rung_configs() if rungs else [(None, ["0:none"])]
    for backend in backends:
        for precision in precisions:
            estimator = make_estimator(backend, precision)
            for config, names in configs:
                estimator.set_merge_config(config)
                row = {"model": "student", "backend": estimator.backend, "asked_backend": backend,
                       "precision": precision, "rungs": names,
                       "gt_boxes": on_ground_truth_boxes(student_estimate(estimator), persons, images)}
                if found is not None:
                    row["node_boxes"] = on_found_boxes(student_estimate(estimator), persons, images, found)
                rows.append(row)
    return rows


def evaluate_teacher(name: str, teacher, persons: Sequence[dict], images: dict, found: dict | None) -> dict:
    """A teacher's figures on ground-truth boxes and, with ``found``, on the node's boxes."""
    row = {"model": name, "gt_boxes": on_ground_truth_boxes(teacher_estimate(teacher), persons, images)}
    if found is not None:
        row["node_boxes"] = on_found_boxes(teacher_estimate(teacher), persons, images, found)
    return row


def found_boxes(finder: Callable[[np.ndarray], np.ndarray], images: dict) -> dict:
    """The node's person boxes in each image."""
    return {image: finder(rgb) for image, rgb in images.items()}


def side_by_side_png(path: str | Path, estimate: Estimate, persons: Sequence[dict], images: dict,
                     count: int = 6, height: int = 256, threshold: float = 0.0) -> Path:
    """A PNG of ``count`` persons: each one's crop with the true skeleton (left) beside the predicted (right); the
    predicted keypoints scoring at least ``threshold`` are drawn (default all: a comparison, not the node's view)."""
    tiles = []
    for person in list(persons)[:count]:
        rgb = images[person["image"]]
        keypoints, scores = estimate(rgb, person["box"][None])
        x1, y1, x2, y2 = (int(round(v)) for v in person["box"])
        pad = int(0.1 * max(x2 - x1, y2 - y1))
        x1, y1 = max(0, x1 - pad), max(0, y1 - pad)
        x2, y2 = min(rgb.shape[1], x2 + pad), min(rgb.shape[0], y2 + pad)
        offset = np.array([x1, y1], np.float32)
        truth = rgb[y1:y2, x1:x2].copy()
        draw_skeletons(truth, (person["keypoints"] - offset)[None].astype(np.float32),
                       (person["visibility"] > 0).astype(np.float32)[None], 0.5, inplace=True)
        predicted = rgb[y1:y2, x1:x2].copy()
        draw_skeletons(predicted, (keypoints - offset).astype(np.float32), scores, threshold, inplace=True)
        pair = np.concatenate([truth, predicted], axis=1)
        scale = height / pair.shape[0]
        tiles.append(cv2.resize(pair, (max(1, int(pair.shape[1] * scale)), height)))
    if not tiles:
        raise ValueError("no persons to draw")
    sheet = np.concatenate(tiles, axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    return path


def ground_truth_report(folders: Sequence[str | Path], weights: str | None, input_size: tuple[int, int],
                        backends: Sequence[str] = ("eager",), precisions: Sequence[str] = ("fp32",),
                        teachers: Sequence[str] = (), shared: str | Path | None = None,
                        finder: Callable[[np.ndarray], np.ndarray] | None = None, rungs: bool = True,
                        png: str | Path | None = None, cache_dir: str | None = None) -> dict:
    """``pose-eval --coco FOLDER ...``: per folder, the student's rows (backend x precision x rung) and each
    teacher's, on ground-truth boxes and (with ``finder``, the node's people) on found boxes; ``png`` draws the
    student's (unmerged, first backend) skeletons beside the truth for a few persons of the first folder."""
    from segmerge_ros.inference.pose import PoseEstimator
    from segmerge_ros.training.pose_eval import coco_persons
    from segmerge_ros.training.pose_split import split_persons
    from segmerge_ros.training.teacher_eval import named_teacher

    def make_estimator(backend: str, precision: str):
        return PoseEstimator("segformer-b0", weights, input_size=input_size, backend=backend, precision=precision,
                             cache_dir=cache_dir)

    report: dict = {"weights": weights, "input_size": list(input_size), "folders": {}}
    for folder in folders:
        persons = coco_persons(folder)
        train, test = split_persons(persons)
        if test:  # coco_mini_train: the student trained on the other images; only its frozen test split counts
            persons = test
        images = load_images(persons)
        found = found_boxes(finder, images) if finder is not None else None
        rows = evaluate_student(make_estimator, persons, images, found, backends, precisions, rungs)
        rows += [evaluate_teacher(name, named_teacher(name, Path(shared)), persons, images, found)
                 for name in teachers]
        report["folders"][str(folder)] = {"persons": len(persons), "images": len(images), "rows": rows,
                                          "part": "frozen test split" if test else "all"}
        if png and folder == folders[0]:
            estimator = make_estimator(backends[0], precisions[0])
            report["png"] = str(side_by_side_png(png, student_estimate(estimator), persons, images))
    return report


def report_table(report: dict) -> str:
    """A markdown table of a ``ground_truth_report``: one row per folder and model setting."""
    lines = ["| folder | model | backend-precision | rungs | GT boxes PCK@0.2 | GT boxes AP | node boxes PCK@0.2 | "
             "node boxes AP |", "|---|---|---|---|---:|---:|---:|---:|"]
    for folder, entry in report["folders"].items():
        for row in entry["rows"]:
            gt, node = row["gt_boxes"], row.get("node_boxes", {})
            setting = f"{row['backend']}-{row['precision']}" if "backend" in row else "tflite"
            lines.append(f"| {Path(folder).name} ({entry['persons']}) | {row['model']} | {setting} | "
                         f"{' '.join(row.get('rungs', ['-']))} | {gt['pck']:.3f} | {gt['ap']:.3f} | "
                         f"{node.get('pck', float('nan')):.3f} | {node.get('ap', float('nan')):.3f} |")
    return "\n".join(lines)
