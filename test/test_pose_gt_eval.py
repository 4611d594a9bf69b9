"""Pose against ground truth (training/pose_gt_eval.py) on the real mmpose COCO persons, with estimators whose
answers are known: an oracle that returns the true keypoints of the box it is given, and one that is off by a
known amount."""

from __future__ import annotations

import numpy as np
import pytest

from segmerge_ros.training.pose_eval import coco_persons
from segmerge_ros.training.pose_gt_eval import (load_images, on_found_boxes, on_ground_truth_boxes,
                                                side_by_side_png)


@pytest.fixture(scope="module")
def persons(shared_data):
    return coco_persons(shared_data / "mmpose_coco_keypoints")


@pytest.fixture(scope="module")
def images(persons):
    return load_images(persons)


def oracle(persons, shift: float = 0.0):
    """Returns the true keypoints (moved right by ``shift`` of the box diagonal) of the person whose box is given."""
    def estimate(rgb, boxes):
        out = []
        for box in np.asarray(boxes).reshape(-1, 4):
            person = min(persons, key=lambda p: np.abs(p["box"] - box).sum())
            diagonal = np.hypot(*(person["box"][2:] - person["box"][:2]))
            out.append(person["keypoints"] + np.array([shift * diagonal, 0.0]))
        keypoints = np.asarray(out, np.float32).reshape(-1, 17, 2)
        return keypoints, np.ones(keypoints.shape[:2], np.float32)
    return estimate


def test_an_oracle_scores_perfectly_and_a_shifted_one_does_not(persons, images):
    perfect = on_ground_truth_boxes(oracle(persons), persons, images)
    assert perfect["persons"] == len(persons) >= 10
    assert perfect["pck"] == pytest.approx(1.0) and perfect["ap"] == pytest.approx(1.0)
    shifted = on_ground_truth_boxes(oracle(persons, shift=0.3), persons, images)
    assert shifted["pck"] == pytest.approx(0.0) and shifted["ap"] < 0.2  # 0.3 of the diagonal: beyond PCK@0.2


def test_found_boxes_miss_and_add_people(persons, images):
    first = persons[0]["image"]
    found = {image: np.stack([p["box"] for p in persons if p["image"] == image]) for image in images}
    all_found = on_found_boxes(oracle(persons), persons, images, found)
    assert all_found["persons_matched"] == len(persons) and all_found["pck"] == pytest.approx(1.0)
    assert all_found["ap"] == pytest.approx(1.0)
    missed = dict(found)
    missed[first] = found[first][1:]  # the node misses one person of the first image
    one_missed = on_found_boxes(oracle(persons), persons, images, missed)
    assert one_missed["persons_matched"] == len(persons) - 1 and one_missed["pck"] < 1.0
    assert one_missed["ap"] < 1.0
    extra = dict(found)
    extra[first] = np.concatenate([found[first], [[0, 0, 8, 8]]])  # a box where nobody is, scored like the rest
    assert on_found_boxes(oracle(persons), persons, images, extra)["found_boxes"] == len(persons) + 1


def test_side_by_side_png_draws_each_person_twice(persons, images, tmp_path):
    path = side_by_side_png(tmp_path / "pose.png", oracle(persons), persons, images, count=3, height=128)
    import cv2

    sheet = cv2.imread(str(path))
    assert sheet.shape[0] == 128 and sheet.shape[1] > 3 * 64
    plain = side_by_side_png(tmp_path / "none.png", lambda rgb, boxes: (np.zeros((len(boxes), 17, 2), np.float32),
                                                                        np.zeros((len(boxes), 17), np.float32)),
                             persons, images, count=3, height=128)
    assert not np.array_equal(cv2.imread(str(plain)), sheet)  # the predicted skeletons were drawn


def test_pose_eval_coco_reports_student_and_teacher_rows_and_draws_the_png(shared_data, tmp_path, one_thread):
    import json

    from segmerge_ros.training.pose_cli import main_eval

    out = tmp_path / "eval.json"
    main_eval(["--weights", str(shared_data / "segformer_pose_b0_vtest_student" / "pose.pth"), "--no-video",
               "--no-rungs", "--no-node-boxes", "--coco", str(shared_data / "mmpose_coco_keypoints"),
               "--coco", str(shared_data / "coco_mini_train"), "--teachers", "movenet",
               "--png", str(tmp_path / "pose.png"), "--json", str(out)])
    report = json.loads(out.read_text())["ground_truth"]
    folders = list(report["folders"].values())
    assert [f["persons"] for f in folders] == [12, 36]  # coco_mini_train: only its frozen test split
    assert folders[1]["part"] == "frozen test split"
    for folder in folders:
        student, teacher = folder["rows"]
        assert student["model"] == "student" and teacher["model"] == "movenet"
        assert 0.0 <= student["gt_boxes"]["pck"] <= 1.0 and "node_boxes" not in student
        # the vtest-only shared student is far behind its teacher on COCO photos (why issue 22 retrains it)
        assert teacher["gt_boxes"]["pck"] > student["gt_boxes"]["pck"]
    assert (tmp_path / "pose.png").stat().st_size > 1000
