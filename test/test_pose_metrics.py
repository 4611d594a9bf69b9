"""OKS and PCK on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from segmerge_ros.training.pose_metrics import COCO_SIGMAS, oks, oks_matrix, pck


def test_oks_hand_computed_unit_sigmas():
    # sigma 0.5 -> k = 2 sigma = 1; area 1 -> e = d^2 / 2. d^2 = 2 ln 2 gives exp(-ln 2) = 0.5.
    sigmas = np.array([0.5, 0.5, 0.5])
    gt = np.array([[0.0, 0.0], [10.0, 10.0], [5.0, 5.0]])
    pred = gt.copy()
    pred[1, 0] += math.sqrt(2 * math.log(2))
    pred[2] = (500.0, 500.0)  # unlabelled: ignored
    vis = np.array([2, 1, 0])
    assert oks(pred, gt, vis, area=1.0, sigmas=sigmas) == pytest.approx(0.75, abs=1e-12)
    assert oks(gt, gt, vis, area=1.0, sigmas=sigmas) == pytest.approx(1.0)
    assert math.isnan(oks(pred, gt, np.zeros(3), area=1.0, sigmas=sigmas))


def test_oks_hand_computed_coco_sigmas():
    # Nose exact (1.0); left hip (sigma 0.107) 2 px off with area 100:
    # k^2 = 0.214^2 = 0.045796, e = 4 / (2 * 100 * 0.045796) = 0.436719, exp(-e) = 0.646153. OKS = 0.823076.
    gt = np.zeros((17, 2))
    gt[11] = (40.0, 60.0)
    pred = gt.copy()
    pred[11, 1] += 2.0
    vis = np.zeros(17)
    vis[[0, 11]] = 2
    assert COCO_SIGMAS[11] == pytest.approx(0.107)
    assert oks(pred, gt, vis, area=100.0) == pytest.approx(0.823076, abs=1e-6)


def test_oks_matrix_shape_and_values():
    sigmas = np.full(2, 0.5)
    gts = np.array([[[0.0, 0.0], [0.0, 0.0]], [[100.0, 100.0], [100.0, 100.0]]])
    preds = np.stack([gts[1], gts[0], gts[0] + [0.0, math.sqrt(2 * math.log(2))]])
    m = oks_matrix(preds, gts, np.ones((2, 2)), np.array([1.0, 1.0]), sigmas)
    assert m.shape == (3, 2)
    np.testing.assert_allclose(m[:, 0], [0.0, 1.0, 0.5], atol=1e-12)
    np.testing.assert_allclose(m[:, 1], [1.0, 0.0, 0.0], atol=1e-12)


def test_pck_hand_computed():
    gts = np.zeros((3, 4, 2))
    preds = gts.copy()
    # Normaliser 100, threshold 0.1 -> 10 px.
    preds[0, 0] = (5.0, 0.0)  # 0.05 hit
    preds[0, 1] = (11.0, 0.0)  # 0.11 miss
    preds[0, 2] = (0.0, 15.0)  # 0.15 miss
    preds[0, 3] = (99.0, 99.0)  # unlabelled
    preds[1] = (12.0, 16.0)  # 0.20 miss for all four
    preds[2] = (3.0, 4.0)  # 0.05 hit for all four
    vis = np.ones((3, 4))
    vis[0, 3] = 0
    overall, per_kpt = pck(preds, gts, vis, np.array([100.0, 100.0, 100.0]), 0.1)
    # hits: instance 0: 1 of 3, instance 1: 0 of 4, instance 2: 4 of 4 -> 5 / 11.
    assert overall == pytest.approx(5 / 11)
    np.testing.assert_allclose(per_kpt, [2 / 3, 1 / 3, 1 / 3, 1 / 2])
    # Per-axis normaliser (w, h) = (100, 50): (8, 4) px -> (0.08, 0.08) -> 0.113 miss; by the long side 0.089 hit.
    p, g = np.array([[[8.0, 4.0]]]), np.zeros((1, 1, 2))
    assert pck(p, g, np.ones((1, 1)), np.array([[100.0, 50.0]]), 0.1)[0] == 0.0
    assert pck(p, g, np.ones((1, 1)), 100.0, 0.1)[0] == 1.0
    assert math.isnan(pck(p, g, np.zeros((1, 1)), 100.0)[0])
    with pytest.raises(ValueError):
        pck(p, g, np.ones((1, 1)), 0.0)
