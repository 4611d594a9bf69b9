"""The BlazePose teacher (issue 22): the reference CSV of the heavy model on squat.bmp, the BlazePose-33 to COCO-17
map, the crop path back to frame pixels, and the checks on its inputs. Real models from ../shared/data."""

from __future__ import annotations

import csv

import cv2
import numpy as np
import pytest

from segmerge_ros.inference.sources import read_rgb
from segmerge_ros.training.blazepose import BLAZEPOSE_TO_COCO, BlazePoseTeacher, landmarks_to_coco, sigmoid
from segmerge_ros.training.movenet import MoveNetTeacher

BLAZE = "mediapipe_blazepose"
# MANIFEST: a copyMakeBorder + resize rerun reproduces the CSV's x and y within 1.4 px on average and 2.7 px at
# most, and visibility within 0.05.
MEAN_PX, MAX_PX, VISIBILITY = 1.4, 2.7, 0.05
PAD = 55  # squat.bmp is 500x610: 55 black columns each side make the centred 610x610 square


@pytest.fixture(scope="module")
def heavy(shared_data) -> BlazePoseTeacher:
    return BlazePoseTeacher(shared_data / BLAZE / "pose_landmark_heavy.tflite")


@pytest.fixture(scope="module")
def squat(shared_data) -> np.ndarray:
    return read_rgb(shared_data / "coral_movenet_pose" / "squat.bmp")


@pytest.fixture(scope="module")
def reference(shared_data) -> list[dict]:
    with open(shared_data / BLAZE / "pose_landmark_heavy_reference.csv", newline="") as f:
        return list(csv.DictReader(f))


def reference_array(rows: list[dict]) -> np.ndarray:
    """(33, 3) x, y (image pixels) and visibility of the reference CSV."""
    return np.array([[float(r["x"]), float(r["y"]), float(r["visibility"])] for r in rows])


def padded_square(squat: np.ndarray) -> np.ndarray:
    return cv2.copyMakeBorder(squat, 0, 0, PAD, PAD, cv2.BORDER_CONSTANT, value=(0, 0, 0))


def test_the_coco_map_is_the_reference_csvs(reference):
    rows = [i for i, r in enumerate(reference) if r["coco17_id"]]
    assert tuple(rows) == BLAZEPOSE_TO_COCO
    assert [int(reference[i]["coco17_id"]) for i in rows] == list(range(17))
    names = [reference[i]["name"] for i in BLAZEPOSE_TO_COCO]
    assert names[:5] == ["nose", "left_eye", "right_eye", "left_ear", "right_ear"]
    assert names[5::2] == ["left_shoulder", "left_elbow", "left_wrist", "left_hip", "left_knee", "left_ankle"]


def test_heavy_reproduces_the_reference_on_the_centred_padded_crop(heavy, squat, reference):
    ref = reference_array(reference)
    square = padded_square(squat)
    side = square.shape[0]
    coco = heavy.on_image(square)  # (17, 3) normalised (y, x, score)
    xy = coco[:, [1, 0]] * side - [PAD, 0]
    error = np.linalg.norm(xy - ref[list(BLAZEPOSE_TO_COCO), :2], axis=1)
    assert error.mean() <= MEAN_PX and error.max() <= MAX_PX
    assert np.abs(coco[:, 2] - ref[list(BLAZEPOSE_TO_COCO), 2]).max() <= VISIBILITY
    # All 33 landmarks, as the MANIFEST checked them; the score is the sigmoid of the visibility logit.
    landmarks = heavy.landmarks(cv2.resize(square, (256, 256), interpolation=cv2.INTER_LINEAR))
    error33 = np.linalg.norm(landmarks[:, :2] * side / 256 - [PAD, 0] - ref[:, :2], axis=1)
    assert error33.mean() <= MEAN_PX and error33.max() <= MAX_PX
    assert np.abs(landmarks[:, 3] - ref[:, 2]).max() <= VISIBILITY
    np.testing.assert_allclose(landmarks_to_coco(landmarks)[:, 2], coco[:, 2], atol=1e-6)


def test_the_crop_path_maps_back_to_frame_pixels(heavy, squat, reference):
    """``on_regions`` with the same centred square (warpAffine instead of pad and resize: half-pixel conventions
    differ, so a few pixels) and ``on_boxes`` on a box; a wrong mapping would be off by tens of pixels."""
    ref = reference_array(reference)[list(BLAZEPOSE_TO_COCO)]
    h, w = squat.shape[:2]
    kps, scores = heavy.on_regions(squat, np.array([[w / 2, h / 2]]), np.array([[h, h]]))
    assert kps.shape == (1, 17, 2) and scores.shape == (1, 17)
    error = np.linalg.norm(kps[0] - ref[:, :2], axis=1)
    assert error.mean() < 3.0 and error.max() < 8.0
    assert np.abs(scores[0] - ref[:, 2]).max() < 0.15
    lo, hi = ref[:, :2].min(0), ref[:, :2].max(0)
    box_kps, box_scores = heavy.on_boxes(squat, np.concatenate([lo, hi])[None])
    assert np.median(np.linalg.norm(box_kps[0] - ref[:, :2], axis=1)) < 15.0
    assert np.all((box_scores >= 0) & (box_scores <= 1))
    empty_kps, empty_scores = heavy.on_boxes(squat, np.zeros((0, 4)))
    assert empty_kps.shape == (0, 17, 2) and empty_scores.shape == (0, 17)


def test_both_teachers_share_the_crop_interface():
    for method in ("on_image", "on_boxes", "on_regions"):
        assert getattr(BlazePoseTeacher, method) is getattr(MoveNetTeacher, method)
    assert BlazePoseTeacher.input_size == 256 and MoveNetTeacher.input_size == 192


def test_sigmoid_of_logits():
    x = np.array([-800.0, -2.0, 0.0, 3.0, 800.0])
    out = sigmoid(x)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out[1:4], 1.0 / (1.0 + np.exp(-x[1:4])), rtol=1e-12)
    assert out[0] == 0.0 and out[4] == 1.0


def test_refuses_wrong_models_and_inputs(shared_data, heavy):
    with pytest.raises(FileNotFoundError):
        BlazePoseTeacher(shared_data / BLAZE / "missing.tflite")
    with pytest.raises(ValueError, match="float32"):
        BlazePoseTeacher(shared_data / "coral_movenet_pose" / "movenet_single_pose_lightning_ptq.tflite")
    with pytest.raises(ValueError, match="256x256"):
        heavy.run(np.zeros((192, 192, 3), np.uint8))
