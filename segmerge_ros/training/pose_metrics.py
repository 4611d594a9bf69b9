"""Pose evaluation: COCO object keypoint similarity (OKS), COCO keypoint AP over OKS thresholds (``oks_ap``) and
PCK.

OKS (COCO): for each labelled keypoint i (visibility v_i > 0), with d_i the distance to the ground truth, s^2 the
object's area and k_i = 2 * sigma_i, ``exp(-d_i^2 / (2 s^2 k_i^2))``; OKS is the mean over labelled keypoints.
PCK@t: the fraction of labelled keypoints with distance / normaliser < t, the normaliser being per instance
(e.g. the longer box side, as mmpose's ``PCKAccuracy(norm_item='bbox')``, or per axis (w, h)).
"""

from __future__ import annotations

import numpy as np

# COCO person keypoint sigmas (pycocotools / cocoapi), COCO-17 order.
COCO_SIGMAS = np.array([0.26, 0.25, 0.25, 0.35, 0.35, 0.79, 0.79, 0.72, 0.72, 0.62, 0.62, 1.07, 1.07, 0.87, 0.87,
                        0.89, 0.89]) / 10.0


def oks(pred: np.ndarray, gt: np.ndarray, visibility: np.ndarray, area: float,
        sigmas: np.ndarray = COCO_SIGMAS) -> float:
    """OKS of one prediction (K, 2) against one ground truth (K, 2) with visibilities (K,); nan if none labelled."""
    return float(oks_matrix(np.asarray(pred)[None], np.asarray(gt)[None], np.asarray(visibility)[None],
                            np.asarray([area], dtype=np.float64), sigmas)[0, 0])


def oks_matrix(preds: np.ndarray, gts: np.ndarray, visibility: np.ndarray, areas: np.ndarray,
               sigmas: np.ndarray = COCO_SIGMAS) -> np.ndarray:
    """(P, G) OKS of P predictions (P, K, 2) against G ground truths (G, K, 2), visibilities (G, K), areas (G,).

    A ground truth without labelled keypoints gives nan in its column.
    """
    preds = np.asarray(preds, dtype=np.float64)
    gts = np.asarray(gts, dtype=np.float64)
    labelled = np.asarray(visibility) > 0  # (G, K)
    areas = np.asarray(areas, dtype=np.float64).reshape(-1)
    variances = (2.0 * np.asarray(sigmas, dtype=np.float64)) ** 2  # k_i^2
    d2 = ((preds[:, None] - gts[None]) ** 2).sum(-1)  # (P, G, K)
    e = d2 / (2.0 * variances[None, None, :] * (areas[None, :, None] + np.spacing(1)))
    sim = np.exp(-e) * labelled[None]
    count = labelled.sum(-1)  # (G,)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count[None] > 0, sim.sum(-1) / np.maximum(count[None], 1), np.nan)


def pck(preds: np.ndarray, gts: np.ndarray, visibility: np.ndarray, normalizer: np.ndarray | float,
        threshold: float = 0.1) -> tuple[float, np.ndarray]:
    """PCK@threshold of matched predictions (N, K, 2) and ground truths (N, K, 2).

    ``normalizer``: a scalar, (N,) per instance, or (N, 2) per instance and axis (distances are taken on
    (dx / nx, dy / ny)). Returns the overall PCK (over all labelled keypoints; nan if none) and per-keypoint PCK
    (K,) (nan for keypoints never labelled).
    """
    preds = np.asarray(preds, dtype=np.float64)
    gts = np.asarray(gts, dtype=np.float64)
    labelled = np.asarray(visibility) > 0
    norm = np.asarray(normalizer, dtype=np.float64)
    if norm.ndim == 0:
        norm = np.full((len(gts), 2), float(norm))
    elif norm.ndim == 1:
        norm = np.repeat(norm[:, None], 2, axis=1)
    if np.any(norm <= 0):
        raise ValueError("PCK normalisers must be positive")
    dist = np.linalg.norm((preds - gts) / norm[:, None, :], axis=-1)  # (N, K)
    hit = (dist < threshold) & labelled
    with np.errstate(invalid="ignore", divide="ignore"):
        per_kpt = np.where(labelled.sum(0) > 0, hit.sum(0) / np.maximum(labelled.sum(0), 1), np.nan)
        overall = hit.sum() / labelled.sum() if labelled.any() else np.nan
    return float(overall), per_kpt


# COCO keypoint AP: OKS thresholds 0.50:0.05:0.95 and 101 recall points 0:0.01:1 (as pycocotools' COCOeval).
OKS_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


def oks_ap(predictions: np.ndarray, scores: np.ndarray, ground_truths: np.ndarray, visibility: np.ndarray,
           areas: np.ndarray, image_ids=None, thresholds: np.ndarray = OKS_THRESHOLDS,
           sigmas: np.ndarray = COCO_SIGMAS) -> dict:
    """COCO keypoint AP of predictions (P, K, 2) with one score each (P,) against ground truths (G, K, 2).

    ``visibility`` (G, K) and ``areas`` (G,) belong to the ground truths. ``image_ids``: None when prediction i
    belongs to ground truth i alone (P == G, each pair its own image); else a pair ``(prediction image ids (P,),
    ground-truth image ids (G,))``, and as in COCOeval, within an image each prediction, best score first, takes
    the unmatched ground truth of highest OKS at or above the threshold. Ground truths without labelled keypoints
    are no positives and match nothing (COCOeval would also ignore a prediction only they could take). Per
    threshold: the precision envelope sampled at 101 recall points. Returns ``ap`` (the mean over ``thresholds``),
    ``ap50``, ``ap75`` and ``per_threshold``.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    gts = np.asarray(ground_truths, dtype=np.float64)
    labelled = (np.asarray(visibility) > 0).any(axis=1)
    if image_ids is None:
        if len(scores) != len(gts):
            raise ValueError("without image_ids, predictions and ground truths pair up one to one")
        image_ids = (np.arange(len(scores)), np.arange(len(gts)))
    pred_images, gt_images = (np.asarray(ids) for ids in image_ids)
    order = np.argsort(-scores, kind="mergesort")
    per_threshold = []
    for threshold in np.asarray(thresholds, dtype=np.float64):
        matched = np.zeros(len(scores), dtype=bool)
        for image in np.unique(pred_images):
            preds = order[pred_images[order] == image]  # best score first
            owners = np.flatnonzero((gt_images == image) & labelled)
            if len(owners):
                similarity = oks_matrix(np.asarray(predictions)[preds], gts[owners],
                                        np.asarray(visibility)[owners], np.asarray(areas)[owners], sigmas)
                matched[preds] = greedy_matches(similarity, threshold)
        per_threshold.append(average_precision(matched[order], int(labelled.sum())))
    per_threshold = np.asarray(per_threshold)
    at = dict(zip(np.round(np.asarray(thresholds, dtype=np.float64), 6).tolist(), per_threshold.tolist()))
    return {"ap": float(per_threshold.mean()), "ap50": at.get(0.5, float("nan")), "ap75": at.get(0.75, float("nan")),
            "per_threshold": per_threshold.tolist()}


def greedy_matches(similarity: np.ndarray, threshold: float) -> np.ndarray:
    """Which rows (predictions, best score first) of a (P, G) OKS matrix take a ground truth: each row in turn takes
    the unmatched column of highest similarity at or above ``threshold``."""
    free = np.ones(similarity.shape[1], dtype=bool)
    matched = np.zeros(similarity.shape[0], dtype=bool)
    for row, values in enumerate(np.nan_to_num(similarity, nan=-1.0)):
        candidates = np.where(free & (values >= threshold), values, -np.inf)
        if candidates.size and np.isfinite(candidates.max()):
            free[int(np.argmax(candidates))] = False
            matched[row] = True
    return matched


def average_precision(true_positive: np.ndarray, positives: int) -> float:
    """COCO AP of detections in score order (True = matched) against ``positives`` ground truths: the precision
    envelope (best precision at this recall or beyond) at 101 recall points, 0 where the recall is never reached."""
    if positives == 0:
        return float("nan")
    true_positive = np.asarray(true_positive, dtype=bool)
    tp = np.cumsum(true_positive)
    fp = np.cumsum(~true_positive)
    recall = tp / positives
    precision = tp / np.maximum(tp + fp, np.spacing(1))
    if len(precision) == 0:
        return 0.0
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    index = np.searchsorted(recall, RECALL_POINTS, side="left")
    return float(np.where(index < len(envelope), envelope[np.minimum(index, len(envelope) - 1)], 0.0).mean())
