"""Augmented pose distillation data (issue 22, part 2): crops under a ``CropAugment``, the teacher on each augmented
crop, people from videos / COCO boxes, the records cache and the training batches. Real data (../shared/data) where
it matters; small enough to take seconds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from segmerge_ros.models.pose.model import COCO_FLIP_INDICES
from segmerge_ros.inference.pose import box_to_center_scale, crop_people, image_to_crop
from segmerge_ros.inference.sources import iter_frames, read_rgb
from segmerge_ros.training import cli
from segmerge_ros.training.movenet import MoveNetTeacher
from segmerge_ros.training.pose_augment import (
    OCCLUSION_GREY,
    OCCLUSION_NOISE,
    AugmentSettings,
    CropAugment,
    augmented_crop,
    augmented_to_image,
    augmented_transform,
    map_points,
    sample_augment,
    teacher_on_crop,
)
from segmerge_ros.training.pose_augmented import (
    AugmentedPeople,
    FinderSettings,
    augmented_batch,
    augmented_key,
    augmented_sampling_weights,
    cache_file,
    cached_augmented,
    collect_augmented,
    plain_people,
    source_groups,
)
from segmerge_ros.training.pose_people import teacher_keypoints
from segmerge_ros.training.pose_sources import (
    FOUND_GROUND_TRUTH,
    choose_finder,
    coco_images,
    coco_source,
    coco_train_boxes,
    keypoint_box,
    overlap_ratio,
    parse_source,
    region_box,
    square_tiles,
    teacher_boxes,
)
from segmerge_ros.training.pose_split import COCO_MINI_TRAIN_TEST_IMAGES
from segmerge_ros.training.pose_teachers import build_teacher, teacher_identity, teacher_kind
from segmerge_ros.training.train_pose import PoseTrainSettings, teaching_keypoints

MOVENET = "coral_movenet_pose/movenet_single_pose_lightning_ptq.tflite"
SIZE = (288, 384)


@pytest.fixture(scope="module")
def teacher(shared_data) -> MoveNetTeacher:
    return MoveNetTeacher(shared_data / MOVENET)


@pytest.fixture(scope="module")
def street(shared_data) -> np.ndarray:
    return next(iter_frames(shared_data / "opencv_samples" / "vtest.avi"))


def coco_records(shared_data, teacher, variants=1, seed=0):
    """Records of the coco_mini_train training persons (no segmentation needed: ground-truth boxes)."""
    spec = coco_source(shared_data / "coco_mini_train")
    return collect_augmented([spec], lambda: None, teacher, variants, seed, AugmentSettings(), FinderSettings(),
                             exclude=COCO_MINI_TRAIN_TEST_IMAGES, progress=False)


@pytest.fixture(scope="module")
def coco_data(shared_data, teacher):
    return coco_records(shared_data, teacher)


def test_augmented_crop_without_augmentation_is_the_node_crop(street):
    boxes = np.array([[300.0, 200.0, 340.0, 300.0], [-20.0, 500.0, 60.0, 590.0]])  # the second leaves the frame
    for box in boxes:
        center, scale = box_to_center_scale(box[None], SIZE)
        np.testing.assert_array_equal(augmented_crop(street, box, CropAugment(), SIZE),
                                      crop_people(street, center, scale, SIZE)[0])
    assert np.array_equal(CropAugment.from_array(CropAugment().to_array()).to_array(), CropAugment().to_array())


def test_a_quarter_turn_moves_a_point_where_expected():
    rgb = np.zeros((400, 400, 3), np.uint8)
    box = np.array([100.0, 50.0, 250.0, 350.0])
    dot = np.array([200.0, 120.0])  # right of and above the box centre (175, 200)
    rgb[119:122, 199:202] = 255
    before = image_to_crop(dot[None, None], *box_to_center_scale(box[None], SIZE), SIZE)[0, 0]
    centre = np.array(SIZE) / 2
    dx, dy = before - centre
    expected = centre + np.array([dy, -dx])  # counter-clockwise on screen: right -> up, up -> left
    assert np.linalg.norm(expected - before) > 100  # a rotation that did nothing would fail
    turned = CropAugment(angle=90.0)
    np.testing.assert_allclose(map_points(augmented_transform(box, turned, SIZE), dot), expected, atol=1e-9)
    crop = augmented_crop(rgb, box, turned, SIZE)
    y, x = np.unravel_index(crop[..., 0].astype(np.int64).argmax(), crop.shape[:2])
    assert np.hypot(x - expected[0], y - expected[1]) <= 1.5
    np.testing.assert_allclose(augmented_to_image(expected, box, turned, SIZE), dot, atol=1e-9)
    flipped = map_points(augmented_transform(box, CropAugment(flip=1.0), SIZE), dot)
    np.testing.assert_allclose(flipped, [SIZE[0] - 1 - before[0], before[1]], atol=1e-9)


def test_every_augmentation_changes_the_crop_and_regenerates_exactly(street):
    box = np.array([300.0, 200.0, 360.0, 330.0])
    plain = augmented_crop(street, box, CropAugment(), SIZE)
    changes = [CropAugment(scale=1.3), CropAugment(shift_x=0.1), CropAugment(blur_sigma=1.5),
               CropAugment(low_res_height=40.0), CropAugment(brightness=20.0, contrast=1.2, saturation=0.5),
               CropAugment(occlusion_x=0.2, occlusion_y=0.3, occlusion_w=0.4, occlusion_h=0.3,
                           occlusion_kind=OCCLUSION_GREY, occlusion_grey=77)]
    for params in changes:
        assert np.abs(augmented_crop(street, box, params, SIZE).astype(int) - plain).mean() > 0.5, params
    grey = augmented_crop(street, box, changes[-1], SIZE)
    assert (grey[int(0.3 * 384) + 2:int(0.6 * 384) - 2, int(0.2 * 288) + 2:int(0.6 * 288) - 2] == 77).all()
    rng = np.random.default_rng(3)
    drawn = [sample_augment(rng) for _ in range(40)]
    assert any(p.occlusion_kind == OCCLUSION_NOISE for p in drawn) and any(p.angle != 0 for p in drawn)
    assert all(-30 <= p.angle <= 30 and 0.7 <= p.scale <= 1.3 for p in drawn)
    for params in drawn[:8]:
        again = CropAugment.from_array(params.to_array())
        np.testing.assert_array_equal(augmented_crop(street, box, params, SIZE),
                                      augmented_crop(street, box, again, SIZE))


def test_the_teacher_on_the_plain_crop_matches_the_padded_teacher_crop(shared_data, teacher):
    rgb = read_rgb(shared_data / "coral_movenet_pose" / "squat.bmp")
    box = np.array([40.0, 60.0, 470.0, 600.0])
    points, scores = teacher_on_crop(teacher, augmented_crop(rgb, box, CropAugment(), SIZE))
    reference, reference_scores = teacher_keypoints(teacher, rgb, box[None], "padded")
    # The two crops differ by at most one grey level in a few pixels (OpenCV's fixed-point warps), which moves the
    # int8 model's outputs by a few quantisation steps (about 3 px each here); a wrong mapping (the 48 px margin,
    # the scale) would be off by tens of pixels.
    error = np.linalg.norm(augmented_to_image(points, box, CropAugment(), SIZE) - reference[0], axis=1)
    assert np.median(error) <= 0.015 * (box[3] - box[1]) and error.max() <= 0.03 * (box[3] - box[1]), error
    assert ((scores > 0.3) == (reference_scores[0] > 0.3)).mean() >= 0.8
    # The teacher labels the crop as it looks: on the mirrored crop it finds the mirrored person (its left and
    # right swapped), not the keypoints of the plain crop.
    flipped, _ = teacher_on_crop(teacher, augmented_crop(rgb, box, CropAugment(flip=1.0), SIZE))
    mirrored = np.stack([SIZE[0] - 1 - points[:, 0], points[:, 1]], axis=1)[list(COCO_FLIP_INDICES)]
    confident = (scores > 0.5) & (scores[list(COCO_FLIP_INDICES)] > 0.5)
    assert confident.sum() >= 10
    assert np.median(np.linalg.norm(flipped - mirrored, axis=1)[confident]) < 0.03 * SIZE[1]
    assert np.median(np.linalg.norm(flipped - points, axis=1)[confident]) > 0.1 * SIZE[1]


def test_the_teacher_box_covers_the_person_and_keypoint_boxes_need_confidence(shared_data, teacher):
    rgb = read_rgb(shared_data / "coral_movenet_pose" / "squat.bmp")  # 500x610, one person
    boxes = teacher_boxes(teacher, rgb)  # the whole frame and two overlapping squares: one person
    assert boxes.shape == (1, 4)
    x0, y0, x1, y1 = boxes[0]
    assert 0 <= x0 < 200 and x1 > 300 and y0 < 150 and y1 > 500 and x1 <= 500 and y1 <= 610
    points = np.array([[10.0, 10.0], [20.0, 30.0]] * 3 + [[0.0, 0.0]] * 11)
    scores = np.array([0.9] * 5 + [0.1] * 12)
    np.testing.assert_allclose(keypoint_box(points, scores, (100, 100), padding=0.5), [[5.0, 0.0, 25.0, 40.0]])
    assert keypoint_box(points, np.full(17, 0.1), (100, 100)).shape == (0, 4)
    assert square_tiles(1280, 720) == [(0, 0, 720), (280, 0, 720), (560, 0, 720)]
    assert square_tiles(576, 1000) == [(0, 0, 576), (0, 212, 576), (0, 424, 576)] and square_tiles(50, 50) == []
    assert overlap_ratio(np.array([0, 0, 10, 10]), np.array([5, 0, 8, 10])) == 1.0
    assert overlap_ratio(np.array([0, 0, 10, 10]), np.array([20, 0, 30, 10])) == 0.0


def test_the_teacher_finds_both_people_of_a_two_person_video_on_its_squares(shared_data, teacher):
    rgb = next(iter_frames(shared_data / "pose2sim_videos" / "Demo_MultiPerson" / "videos" / "cam02.mp4"))
    whole, _ = region_box(teacher, rgb, None)  # the single-pose teacher on the whole frame sees one person
    boxes = teacher_boxes(teacher, rgb)
    assert len(whole) == 1 and len(boxes) == 2
    assert overlap_ratio(boxes[0], boxes[1]) < 0.6 and all((b[3] - b[1]) > 0.25 * rgb.shape[0] for b in boxes)


def test_sources_parse_ranges_and_folders_of_videos(shared_data):
    specs = parse_source(f"{shared_data / 'pose2sim_videos'}@0::5")
    assert len(specs) == 8 and len({s.group for s in specs}) == 1
    assert all(s.kind == "video" and (s.start, s.stop, s.step) == (0, None, 5) for s in specs)
    [vtest] = parse_source(str(shared_data / "opencv_samples" / "vtest.avi"), "0:640:4", "segmentation")
    assert (vtest.start, vtest.stop, vtest.step, vtest.finder) == (0, 640, 4, "segmentation")
    groups = source_groups(specs + [vtest, coco_source(shared_data / "coco_mini_train")])
    assert groups.tolist() == [0] * 8 + [1, 2]
    assert choose_finder([0, 1, 2]) == "segmentation" and choose_finder([0, 0, 3]) == "teacher"
    assert choose_finder([12, 12, 5], max_persons=12) == "teacher"  # a finder at its cap is seeing clutter
    assert choose_finder([]) == "teacher"


def test_the_frozen_test_images_never_become_training_people(shared_data, coco_data):
    records, frames, infos = coco_data
    names = coco_images(shared_data / "coco_mini_train")
    used = {names[i] for i in np.unique(records.frame)}
    assert used and not used & set(COCO_MINI_TRAIN_TEST_IMAGES)
    assert {names[i] for _, i in frames} == used
    everything = coco_train_boxes(shared_data / "coco_mini_train")  # without the exclusion they would be there
    assert {names[i] for i in everything} & set(COCO_MINI_TRAIN_TEST_IMAGES)
    people = int((records.variant == 0).sum())
    assert people == infos[0]["people"] == sum(len(b) for b in coco_train_boxes(
        shared_data / "coco_mini_train", COCO_MINI_TRAIN_TEST_IMAGES).values())
    assert (records.found_by == FOUND_GROUND_TRUTH).all() and len(records) == 2 * people


def test_the_records_cache_round_trips_and_a_changed_key_recomputes(shared_data, teacher, coco_data, tmp_path):
    specs = [coco_source(shared_data / "coco_mini_train")]
    builds = []

    def build(variants):
        builds.append(variants)
        return coco_data if variants == 1 else coco_records(shared_data, teacher, variants)

    def key(variants):
        return augmented_key(specs, teacher, variants, 0, AugmentSettings(), FinderSettings(), 0,
                             COCO_MINI_TRAIN_TEST_IMAGES)

    first = cached_augmented(tmp_path, key(1), specs, lambda: build(1))
    second = cached_augmented(tmp_path, key(1), specs, lambda: build(1))
    assert builds == [1] and (first[3], second[3]) == (False, True)
    for name in ("source", "frame", "person", "variant", "boxes", "params", "keypoints", "scores"):
        np.testing.assert_array_equal(getattr(first[0], name), getattr(second[0], name), err_msg=name)
    assert second[1].keys() == first[1].keys()
    for k in first[1]:
        np.testing.assert_array_equal(first[1][k], second[1][k])
    assert second[2]["sources"] == first[2]["sources"]
    third = cached_augmented(tmp_path, key(2), specs, lambda: build(2))
    assert builds == [1, 2] and not third[3] and len(third[0]) == 3 * len(first[0]) // 2
    assert cache_file(tmp_path, key(1)) != cache_file(tmp_path, key(2))
    assert teacher_identity(teacher)["name"] == "MoveNetTeacher" and key(1)["teacher"]["bytes"] > 0


def test_the_teacher_labelled_each_augmented_crop(coco_data, teacher):
    records, frames, _ = coco_data
    rows = np.flatnonzero(records.variant == 1)[:3]
    for row in rows:
        crop = augmented_crop(frames[(int(records.source[row]), int(records.frame[row]))], records.boxes[row],
                              CropAugment.from_array(records.params[row]), SIZE)
        points, scores = teacher_on_crop(teacher, crop)
        np.testing.assert_allclose(points, records.keypoints[row], atol=1e-4)
        np.testing.assert_allclose(scores, records.scores[row], atol=1e-6)
    assert (records.params[records.variant == 0] == CropAugment().to_array()).all()
    assert not (records.params[records.variant == 1] == CropAugment().to_array()).all(axis=1).any()


def test_a_batch_of_augmented_records_has_its_shapes_and_weights(coco_data):
    records, frames, _ = coco_data
    settings = PoseTrainSettings(batch=3, seed=5)
    p = augmented_sampling_weights(records, np.zeros(1, np.int64), settings.min_score, settings.min_keypoints)
    pixels, targets, weights = augmented_batch(records, frames, p, settings, step=7)
    assert pixels.shape == (3, 3, 384, 288) and targets.shape == (3, 17, 96, 72) and weights.shape == (3, 17)
    rows = np.random.default_rng([5, 7]).choice(len(records), size=3, p=p)  # the batch's own draw
    expected = teaching_keypoints(records.keypoints[rows], records.scores[rows], settings.min_score)
    np.testing.assert_array_equal(weights.numpy(), expected.astype(np.float32))
    peaks = targets.flatten(2).amax(dim=2).numpy()
    teacher = records.scores[rows][expected]  # a sub-pixel Gaussian's grid maximum: at least exp(-1/16) of its peak
    assert (peaks[expected] <= teacher + 1e-6).all() and (peaks[expected] >= 0.93 * teacher).all()
    assert (peaks[~expected] == 0).all() and torch.isfinite(pixels).all()


def test_groups_are_weighted_by_the_square_root_of_their_teaching_records():
    n = 4 + 16 + 2
    points = np.full((n, 17, 2), 100.0)
    scores = np.full((n, 17), 0.9, np.float32)
    scores[-2:] = 0.1  # two records that teach nothing
    source = np.array([0] * 4 + [1] * 16 + [1] * 2)
    records = AugmentedPeople(source, np.arange(n), np.arange(n), np.zeros(n, int), np.zeros((n, 4), np.float32),
                              np.zeros(n, int), np.zeros((n, 17)), points.astype(np.float32), scores)
    p = augmented_sampling_weights(records, np.array([0, 1]))
    assert p[-2:].sum() == 0
    assert p[:4].sum() / p[4:].sum() == pytest.approx(np.sqrt(4) / np.sqrt(16))
    assert np.allclose(p[:4], p[0]) and np.allclose(p[4:20], p[4])


def test_plain_people_are_the_variant_zero_records_in_frame_pixels(coco_data):
    records, _, _ = coco_data
    people = plain_people(records)
    plain = records.variant == 0
    assert len(people) == plain.sum()
    center, scale = box_to_center_scale(people.boxes, SIZE)
    np.testing.assert_allclose(image_to_crop(people.keypoints, center, scale, SIZE), records.keypoints[plain],
                               atol=1e-3)


def test_teacher_kinds_follow_the_file_name(shared_data):
    assert teacher_kind(shared_data / MOVENET) == "movenet"
    assert teacher_kind("x/pose_landmark_heavy.tflite") == "blazepose"
    assert teacher_kind("x/model.tflite", "blazepose") == "blazepose"
    with pytest.raises(ValueError):
        teacher_kind("x/model.tflite")
    assert type(build_teacher(shared_data / MOVENET)).__name__ == "MoveNetTeacher"


def test_pose_cli_builds_the_augmented_records_once_and_trains_on_them(shared_data, student_dir, tmp_path, capsys,
                                                                       one_thread):
    out, cache = tmp_path / "run", tmp_path / "cache"
    common = ["pose", "--teacher", str(shared_data / MOVENET), "--seg-weights", str(student_dir),
              "--augmented", "1", "--coco-train", str(shared_data / "coco_mini_train"),
              "--source", f"{shared_data / 'opencv_samples' / 'basketball1.png'}",
              "--data-cache", str(cache), "--batch", "1", "--calibrate", "4", "--out", str(out)]
    assert cli.main(common + ["--prepare-only"]) == 0
    assert '"from_cache": false' in capsys.readouterr().err and len(list(cache.glob("*.npz"))) == 1
    assert not (out / "pose.pth").exists()
    assert cli.main(common + ["--steps", "1"]) == 0
    assert '"from_cache": true' in capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 1 and metrics["people_per_source"]["coco_mini_train"] == 46
    assert metrics["people_per_source"]["basketball1.png"] >= 1
    assert metrics["data"]["variants"] == 1 and metrics["score_calibration"]["people"] == 4
    assert cli.main(common + ["--steps", "2", "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    test_only = ["pose", "--teacher", str(shared_data / MOVENET), "--seg-weights", str(student_dir),
                 "--augmented", "1", "--coco-train", str(shared_data / "mmpose_coco_keypoints"), "--out", str(out)]
    with pytest.raises(SystemExit):
        cli.main(test_only)
