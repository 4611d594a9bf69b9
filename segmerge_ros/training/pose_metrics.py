"""Pose evaluation: COCO object keypoint similarity (OKS) and PCK.

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
