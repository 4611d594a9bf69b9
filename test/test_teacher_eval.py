"""Teachers measured against ground truth (issue 22): COCO keypoint AP on hand-computed cases, the frozen
coco_mini_train split, the ground-truth sets, the hip correction and the ensemble, and ``segmerge-train
pose-teachers`` end to end on a few real persons."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from segmerge_ros.training import cli
from segmerge_ros.training.pose_eval import coco_persons
from segmerge_ros.training.pose_metrics import average_precision, oks_ap
from segmerge_ros.training.pose_sets import ground_truth_sets
from segmerge_ros.training.pose_split import (
    COCO_MINI_TRAIN_TEST_IMAGES,
    MIN_TEST_PERSONS,
    choose_test_images,
    persons_per_image,
    split_persons,
)
from segmerge_ros.training.teacher_eval import cpu_description, results_table, score
from segmerge_ros.training.teacher_fusion import HipCorrection, fit_hip_correction, fuse_teachers

UNIT = np.array([0.5])  # one keypoint, sigma 0.5 (k = 1): with area 1, OKS = exp(-d^2 / 2)


def at_oks(values) -> np.ndarray:
    """Predictions (N, 1, 2) whose OKS against a ground truth at the origin is each of ``values``."""
    preds = np.zeros((len(values), 1, 2))
    preds[:, 0, 0] = [math.sqrt(-2.0 * math.log(v)) for v in values]
    return preds


def test_oks_ap_hand_computed():
    # OKS 0.97, 0.72, 0.40 with scores 0.9, 0.8, 0.7 against three ground truths.
    # Thresholds 0.50-0.70 (5): TP TP FP -> precision 1 up to recall 2/3: 67 of the 101 recall points (0..0.66).
    # Thresholds 0.75-0.95 (5): TP FP FP -> precision 1 up to recall 1/3: 34 points. AP = (5*67 + 5*34) / 1010.
    preds, gts = at_oks([0.97, 0.72, 0.40]), np.zeros((3, 1, 2))
    vis, areas = np.ones((3, 1)), np.ones(3)
    result = oks_ap(preds, [0.9, 0.8, 0.7], gts, vis, areas, sigmas=UNIT)
    assert result["ap"] == pytest.approx(0.5, abs=1e-12)
    assert result["ap50"] == pytest.approx(67 / 101) and result["ap75"] == pytest.approx(34 / 101)
    # Reversed ranking: FP TP TP (envelope 2/3 up to recall 2/3) and FP FP TP (1/3 up to 1/3):
    # AP = (5 * 67 * 2/3 + 5 * 34 / 3) / 1010 = 280 / 1010.
    reversed_ = oks_ap(preds, [0.7, 0.8, 0.9], gts, vis, areas, sigmas=UNIT)
    assert reversed_["ap"] == pytest.approx(280 / 1010, abs=1e-12)
    # Perfect predictions score 1 whatever their order.
    assert oks_ap(gts, [0.1, 0.5, 0.3], gts, vis, areas, sigmas=UNIT)["ap"] == pytest.approx(1.0)


def test_oks_ap_matches_within_an_image():
    """Two people in one image, each prediction made on the other's box: paired one to one both miss (AP 0),
    matched within the image as COCO does both hit (AP 1). A ground truth with no labelled point is no positive."""
    gts = np.array([[[0.0, 0.0]], [[100.0, 0.0]]])
    preds = gts[::-1].copy()
    vis, areas = np.ones((2, 1)), np.ones(2)
    assert oks_ap(preds, [0.9, 0.8], gts, vis, areas, sigmas=UNIT)["ap"] == 0.0
    same_image = (np.zeros(2, int), np.zeros(2, int))
    assert oks_ap(preds, [0.9, 0.8], gts, vis, areas, same_image, sigmas=UNIT)["ap"] == pytest.approx(1.0)
    unlabelled = np.array([[1.0], [0.0]])
    # One positive; the prediction on it ranks second, after one on the unlabelled person (a false positive):
    # envelope 1/2 at every recall -> AP 0.5. Ranked first, it gives AP 1.
    assert oks_ap(gts, [0.8, 0.9], gts, unlabelled, areas, sigmas=UNIT)["ap"] == pytest.approx(0.5)
    assert oks_ap(gts, [0.9, 0.8], gts, unlabelled, areas, sigmas=UNIT)["ap"] == pytest.approx(1.0)
    assert average_precision(np.zeros(0, bool), 3) == 0.0
    assert math.isnan(average_precision(np.ones(2, bool), 0))


def test_the_frozen_split(shared_data):
    persons = coco_persons(shared_data / "coco_mini_train")
    counts = persons_per_image(persons)
    assert choose_test_images(counts) == COCO_MINI_TRAIN_TEST_IMAGES
    train, test = split_persons(persons)
    assert len(test) >= MIN_TEST_PERSONS and len(train) + len(test) == len(persons)
    train_images = {p["image"].name for p in train}
    test_images = {p["image"].name for p in test}
    assert not train_images & test_images
    assert test_images == set(COCO_MINI_TRAIN_TEST_IMAGES)
    # With too few persons on the alternate images, further images join in file-name order.
    assert choose_test_images({"a": 1, "b": 1, "c": 5, "d": 1}, min_persons=7) == ("a", "b", "c", "d")
    assert choose_test_images({"a": 1, "b": 1, "c": 5, "d": 1}, min_persons=3) == ("a", "b", "d")


def test_the_ground_truth_sets(shared_data):
    sets = ground_truth_sets(shared_data)
    assert {k: len(v) for k, v in sets.items()} == {"coco_mini_train/train": 50, "coco_mini_train/test": 36,
                                                    "mmpose_coco": 12, "ochuman": 5, "humanart": 4,
                                                    "posetrack18": 14}
    assert all(p["image"].is_file() and p["area"] > 0 for group in sets.values() for p in group)
    # PoseTrack's head_bottom and head_top stand where COCO has the eyes: dropped.
    assert all(p["visibility"][1] == 0 and p["visibility"][2] == 0 for p in sets["posetrack18"])
    assert all(p["visibility"][5:].sum() > 0 for p in sets["posetrack18"])
    with pytest.raises(ValueError):
        ground_truth_sets(shared_data, ["mpii"])


def skeletons(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random upright-ish COCO-17 skeletons (n, 17, 2) and their boxes."""
    rng = np.random.default_rng(seed)
    kps = rng.uniform(0, 100, (n, 17, 2))
    kps[:, [5, 6], 1] = rng.uniform(20, 30, (n, 2))  # shoulders above the hips
    kps[:, [11, 12], 1] = rng.uniform(60, 70, (n, 2))
    boxes = np.concatenate([kps.min(1), kps.max(1)], axis=1)
    return kps, boxes


def test_the_hip_correction_recovers_a_known_move():
    kps, boxes = skeletons(40)
    truth = HipCorrection(alpha=0.12, beta=-0.05)
    gts = truth.apply(kps)
    moved = np.abs(gts - kps).sum(-1) > 0
    assert moved[:, [11, 12]].all() and not moved[:, :11].any() and not moved[:, 13:].any()
    fitted = fit_hip_correction(kps, gts, np.ones((40, 17)), boxes)
    assert fitted.alpha == pytest.approx(0.12, abs=1e-9) and fitted.beta == pytest.approx(-0.05, abs=1e-9)
    assert fitted.samples == 80
    # Unlabelled hips teach nothing; too few samples leave the identity.
    vis = np.ones((40, 17))
    vis[:, [11, 12]] = 0
    assert fit_hip_correction(kps, gts, vis, boxes) == HipCorrection()


def test_the_ensemble_per_keypoint():
    boxes = np.array([[0.0, 0.0, 100.0, 50.0]])  # longer side 100
    a = np.zeros((1, 17, 2))
    b = np.zeros((1, 17, 2))
    b[0, 0] = (4.0, 0.0)  # 0.04 apart: agree
    b[0, 1] = (30.0, 0.0)  # 0.30 apart: disagree
    sa = np.full((1, 17), 0.6)
    sb = np.full((1, 17), 0.2)
    sb[0, 1] = 0.9
    kps, scores = fuse_teachers(a, sa, b, sb, boxes, agree=0.1, penalty=0.5)
    np.testing.assert_allclose(kps[0, 0], (1.0, 0.0), atol=1e-6)  # 0.6 * 0 + 0.2 * 4, over 0.8
    assert scores[0, 0] == pytest.approx(0.6)
    np.testing.assert_allclose(kps[0, 1], (30.0, 0.0))  # b scores higher there
    assert scores[0, 1] == pytest.approx(0.45)


def test_score_and_cpu_description(shared_data):
    persons = coco_persons(shared_data / "mmpose_coco_keypoints")[:3]
    gts = np.stack([p["keypoints"] for p in persons])
    perfect = score(gts, np.ones((3, 17)), persons)
    assert perfect["pck"] == 1.0 and perfect["ap"] == pytest.approx(1.0) and perfect["persons"] == 3
    shifted = score(gts + 40.0, np.ones((3, 17)), persons)
    assert shifted["ap"] < 0.5 and shifted["pck"] < perfect["pck"]
    info = cpu_description("model name\t: Some CPU\nflags\t\t: fpu avx2 amx_tile\n")
    assert info["model"] == "Some CPU"
    assert info["flags"]["avx2"] and info["flags"]["amx_tile"] and not info["flags"]["avx512_bf16"]


def test_pose_teachers_command_end_to_end(shared_data, tmp_path, capsys):
    out = tmp_path / "teachers.json"
    assert cli.main(["pose-teachers", "--data", str(shared_data), "--teachers", "movenet,blazepose-lite",
                     "--sets", "coco_mini_train/train,mmpose_coco", "--max-persons", "3", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out)["best"] == result["best"]
    assert result["sets"]["mmpose_coco"] == {"part": "test", "persons": 3, "keypoints": 46}
    variants = result["variants"]
    assert {"movenet@1.15", "blazepose-lite@1.15", "blazepose-lite@1.25"} <= set(variants)
    padding = result["choices"]["padding"]["blazepose-lite"]
    assert f"blazepose-lite@{padding:g}+hip" in variants and "movenet@1.15+hip" in variants
    ensemble = result["choices"]["ensemble"]
    assert " & ".join(ensemble["members"]) in variants and ensemble["agree"] in (0.05, 0.1, 0.15, 0.2)
    movenet = variants["movenet@1.15"]
    assert movenet["parts"]["test"]["pck"] > 0.6 and 0.0 < movenet["parts"]["test"]["ap"] <= 1.0
    assert movenet["ms_per_person"] > 0 and movenet["sets"]["mmpose_coco"]["persons"] == 3
    assert result["best"]["train"] in variants and result["cpu"]["model"]
    assert results_table(result).count("\n") == len(variants) + 1
