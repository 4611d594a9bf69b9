"""Pose distillation (issue 11): the MoveNet teacher, training samples and targets, a short distillation run, and
the evaluation on the COCO file. Real data throughout (../shared/data); tiny runs so the file takes seconds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from segmerge_ros.merging.segformerpp import LADDER
from segmerge_ros.models.pose.model import COCO_FLIP_INDICES, SegformerPose, build_pose_model
from segmerge_ros.training.movenet import MoveNetTeacher
from segmerge_ros.inference.pose import box_to_center_scale, crop_people, crop_to_image, decode_heatmaps
from segmerge_ros.inference.sources import iter_frames, read_rgb
from segmerge_ros.training import cli
from segmerge_ros.training.pose_eval import (
    coco_persons,
    coco_scores,
    distinct_rung_configs,
    evaluate_pose,
    pck_against_teacher,
    rank_in_frame,
)
from segmerge_ros.training.pose_people import People, PersonFinder, teacher_keypoints
from segmerge_ros.training.train_pose import (
    PoseTrainSettings,
    learning_rate_factor,
    make_sample,
    sample_geometry,
    schedule_progress,
    source_sampling_weights,
    train_pose,
)

MOVENET = "coral_movenet_pose/movenet_single_pose_lightning_ptq.tflite"


@pytest.fixture(scope="module")
def teacher(shared_data) -> MoveNetTeacher:
    return MoveNetTeacher(shared_data / MOVENET)


@pytest.fixture(scope="module")
def squat(shared_data) -> np.ndarray:
    return read_rgb(shared_data / "coral_movenet_pose" / "squat.bmp")


@pytest.fixture(scope="module")
def street_people(shared_data, student_dir, teacher):
    """vtest frame 0, its people found by the node's pipeline, and the teacher's keypoints for them."""
    torch.set_num_threads(1)
    frame = next(iter_frames(shared_data / "opencv_samples" / "vtest.avi"))
    boxes = PersonFinder(student_dir)(frame)
    assert len(boxes) >= 3, "the segmentation student finds the pedestrians of vtest frame 0"
    kps, scores = teacher_keypoints(teacher, frame, boxes, "tight")
    n = len(boxes)
    return frame, People(np.zeros(n, np.int64), np.zeros(n, np.int64), boxes, kps, scores)


def test_movenet_teacher_reproduces_the_squat_reference(shared_data, teacher, squat):
    reference = np.loadtxt(shared_data / "coral_movenet_pose" / "movenet_single_pose_lightning_ptq_reference.csv",
                           delimiter=",", skiprows=1)
    assert reference.shape == (17, 6)
    out = teacher.on_image(squat)  # (y, x, score) normalised
    np.testing.assert_array_equal(reference[:, 2], np.arange(17))
    assert np.abs(out[:, 1] - reference[:, 4]).max() <= 0.03
    assert np.abs(out[:, 0] - reference[:, 5]).max() <= 0.03


def test_teacher_on_a_person_box_maps_back_to_frame_pixels(teacher, squat):
    """The square-crop path agrees with the whole-image run once mapped back (a wrong mapping is off by 100s px)."""
    h, w = squat.shape[:2]
    whole = teacher.on_image(squat)
    whole_px = whole[:, [1, 0]] * [w, h]
    confident = whole[:, 2] > 0.3
    lo, hi = whole_px[confident].min(0), whole_px[confident].max(0)
    kps, scores = teacher.on_boxes(squat, np.concatenate([lo, hi])[None])
    assert kps.shape == (1, 17, 2) and scores.shape == (1, 17)
    error = np.linalg.norm(kps[0] - whole_px, axis=1)[confident]
    assert np.median(error) < 0.05 * max(h, w), error


def decode_to_image(target, center, scale, flip, size):
    coords, _ = decode_heatmaps(target[None], "dark")
    crop_xy = coords[0].astype(np.float64) * 4
    if flip:
        crop_xy = crop_xy[list(COCO_FLIP_INDICES)]
        crop_xy[:, 0] = size[0] - 1 - crop_xy[:, 0]
    return crop_to_image(crop_xy[None], center, scale, size)[0]


@pytest.mark.parametrize("augmented", [False, True])
def test_crops_and_heatmap_targets_round_trip_the_teacher_keypoints(street_people, augmented):
    frame, people = street_people
    settings = PoseTrainSettings(min_score=0.0, colour_jitter=False)
    size = (288, 384)
    checked, flips = 0, 0
    for i in range(len(people)):
        rng = np.random.default_rng(i) if augmented else None
        crop, target, weight = make_sample(frame, people.boxes[i], people.keypoints[i], people.scores[i], settings,
                                           rng, size)
        center, scale, flip = sample_geometry(people.boxes[i], settings, np.random.default_rng(i) if augmented
                                              else None, size)
        flips += flip
        plain = crop_people(frame, center, scale, size)[0]
        np.testing.assert_array_equal(crop, plain[:, ::-1] if flip else plain)
        back = decode_to_image(target, center, scale, flip, size)  # original keypoint order
        # Keypoints well inside the heatmap (the sub-pixel step needs both neighbours) come back within 0.5 px.
        peak = target.reshape(17, -1).argmax(1)
        hx, hy = peak % target.shape[2], peak // target.shape[2]
        inside = (weight > 0) & (hx > 1) & (hx < target.shape[2] - 2) & (hy > 1) & (hy < target.shape[1] - 2)
        if flip:
            inside = inside[list(COCO_FLIP_INDICES)]
        err = np.linalg.norm(back - people.keypoints[i], axis=1)[inside]
        assert err.max(initial=0) <= 0.5, err
        checked += int(inside.sum())
    assert checked >= 10 * len(people)
    if augmented:
        assert 0 < flips < len(people) or len(people) < 4


def test_targets_peak_at_the_teacher_score_and_low_scores_do_not_teach(street_people):
    frame, people = street_people
    scores = people.scores[0].copy()
    scores[:4] = 0.2  # at or below min_score: no teaching
    crop, target, weight = make_sample(frame, people.boxes[0], people.keypoints[0], scores,
                                       PoseTrainSettings(min_score=0.3))
    low = scores <= 0.3
    assert (weight[low] == 0).all() and (target[low] == 0).all()
    taught = weight > 0
    assert taught.sum() >= 5
    # The Gaussian's centre lies between heatmap pixels: the sampled maximum is within exp(-1/16) of its peak.
    peaks = target[taught].max(axis=(1, 2))
    assert (peaks <= scores[taught] + 1e-6).all() and (peaks >= 0.93 * scores[taught]).all()
    _, unit, _ = make_sample(frame, people.boxes[0], people.keypoints[0], scores,
                             PoseTrainSettings(min_score=0.3, calibrated=False))
    np.testing.assert_allclose(unit[taught].max(axis=(1, 2)) / peaks, 1.0 / scores[taught], rtol=1e-5)
    far = people.keypoints[0].copy()
    far[5] = (-1000.0, -1000.0)  # outside the crop
    _, _, w_far = make_sample(frame, people.boxes[0], far, np.full(17, 0.9), PoseTrainSettings())
    assert w_far[5] == 0 and w_far.sum() >= 10


def test_sources_are_sampled_by_the_square_root_of_their_teaching_people():
    scores = np.full((22, 17), 0.9, np.float32)
    scores[20:, 2:] = 0.2  # two people of source 1 with only 2 keypoints above 0.3: never drawn
    people = People(np.array([0] * 16 + [1] * 6), np.arange(22), np.zeros((22, 4), np.float32),
                    np.zeros((22, 17, 2), np.float32), scores)
    p = source_sampling_weights(people, min_score=0.3, min_keypoints=3)
    assert p.sum() == pytest.approx(1.0)
    assert (p[20:] == 0).all()
    assert p[:16].sum() / p[16:].sum() == pytest.approx(2.0)  # sqrt(16) : sqrt(4)
    assert np.ptp(p[:16]) == 0 and np.ptp(p[16:20]) == 0
    with pytest.raises(ValueError, match="no person"):
        source_sampling_weights(people.subset(np.array([20, 21])))


def test_a_few_distillation_steps_lower_the_loss_and_the_checkpoint_loads(street_people, tmp_path, one_thread):
    frame, people = street_people
    one = people.subset(np.array([int(np.argmax((people.scores > 0.3).sum(1)))]))
    torch.manual_seed(0)
    model = SegformerPose("b0", input_size=(96, 128))  # small crops: seconds, and the weights are size-free
    settings = PoseTrainSettings(steps=12, batch=2, warmup=1, lr_head=3e-3, lr_encoder=1e-3, scale_jitter=0.0,
                                 shift_jitter=0.0, flip=False, colour_jitter=False, save_every=6)
    records = train_pose(model, one, {(0, 0): frame}, settings, tmp_path, progress=False)
    losses = [r["loss"] for r in records]
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses
    loaded = build_pose_model("segformer-b0", tmp_path / "pose.pth")  # the node's loader, at 288x384
    state = json.loads((tmp_path / "train_state.json").read_text())
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert state["step"] == 12 and metrics["step"] == 12 and metrics["people"] == 1
    trained = {k: v for k, v in model.state_dict().items()}
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, trained[key], msg=key)


def test_pose_cli_caches_people_and_resumes(shared_data, student_dir, tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    common = ["pose", "--teacher", str(shared_data / MOVENET), "--seg-weights", str(student_dir),
              "--source", str(shared_data / "opencv_samples" / "basketball1.png"), "--batch", "1", "--out", str(out)]
    assert cli.main(common + ["--steps", "1"]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (out / "pose.pth").is_file() and (out / "pose_cache.npz").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["people"] >= 1 and metrics["step"] == 1 and first["last_loss"] > 0
    assert metrics["data"]["teacher_crop"] == "tight"
    calibration = metrics["score_calibration"]  # folded into pose.pth at the end (default --calibrate 256)
    assert calibration["people"] == metrics["people"] and len(calibration["factors"]) == 17
    assert cli.main(common + ["--steps", "2", "--resume"]) == 0
    captured = capsys.readouterr()
    assert '"from_cache": true' in captured.err
    assert json.loads((out / "train_state.json").read_text())["step"] == 2
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    build_pose_model("segformer-b0", out / "pose.pth")


def test_the_ladder_rungs_group_into_distinct_pose_encoder_settings():
    groups = distinct_rung_configs()
    names = [n for _, group in groups for n in group]
    assert len(names) == len(LADDER) and len(set(names)) == len(LADDER)
    assert groups[0][0] is None and "0:none" in groups[0][1] and "0.15:head2" in groups[0][1]
    assert all(config is not None for config, _ in groups[1:])


def test_pck_against_the_teacher_on_hand_made_people():
    teacher = np.zeros((2, 17, 2))
    teacher[:, :, 0] = np.linspace(0, 30, 17)
    teacher[:, :, 1] = np.linspace(0, 40, 17)  # box 30 x 40: diagonal 50
    scores = np.full((2, 17), 0.9)
    scores[1, :15] = 0.1  # person 2: two visible keypoints
    same = pck_against_teacher(teacher, teacher, scores)
    assert same["pck"] == 1.0 and same["mean_error_px"] == 0.0 and same["keypoints"] == 19
    moved = teacher.copy()
    moved[0, :8, 0] += 11.0  # > 0.2 * 50 = 10: misses
    moved[0, 8:, 0] += 9.0  # < 10: hits
    r = pck_against_teacher(moved, teacher, scores)
    assert r["pck"] == pytest.approx((9 + 2) / 19)
    assert r["mean_error_px"] == pytest.approx((8 * 11 + 9 * 9) / 19)


def test_evaluation_on_the_coco_file_end_to_end(shared_data, student_dir, teacher, one_thread):
    coco = shared_data / "mmpose_coco_keypoints"
    persons = coco_persons(coco)
    assert len(persons) == 12  # 14 annotations, 2 without keypoints
    assert sum(int((p["visibility"] > 0).sum()) for p in persons) == 181
    gt = np.stack([p["keypoints"] for p in persons])
    perfect = coco_scores(gt, persons)
    assert perfect["pck"] == 1.0 and perfect["oks"] == pytest.approx(1.0)
    result = evaluate_pose(None, teacher, student_dir, shared_data / "opencv_samples" / "vtest.avi", (660, 661, 1),
                           coco, rungs=False, progress=False)
    assert result["coco_teacher"]["keypoints"] == 181
    # MoveNet on the annotated boxes is a real pose model: most keypoints are right.
    assert result["coco_teacher"]["pck"] > 0.85 and result["coco_teacher"]["oks"] > 0.6
    [rung] = result["rungs"]
    assert rung["merge"] == "none" and result["video_persons"] >= 3
    # A random student is far from both the teacher and the ground truth.
    assert rung["coco_student"]["pck"] < 0.5 * result["coco_teacher"]["pck"]
    assert rung["vs_teacher_tight"]["pck"] < 0.5 and rung["vs_teacher_tight"]["persons"] >= 3


def test_a_time_budget_anneals_the_schedule_before_the_deadline():
    settings = PoseTrainSettings(steps=1000, warmup=10, time_budget=100.0)
    assert learning_rate_factor(0, settings) == pytest.approx(0.1)  # warm-up by steps
    assert schedule_progress(100, 10.0, settings) == pytest.approx(0.1)  # steps ahead of time
    assert schedule_progress(100, 50.0, settings) == pytest.approx(0.5)  # time ahead of steps
    half = learning_rate_factor(100, settings, schedule_progress(100, 50.0, settings))
    assert 0.45 < half < 0.55
    assert learning_rate_factor(100, settings, 1.0) == pytest.approx(0.0, abs=1e-12)
    steps_only = PoseTrainSettings(steps=1000, warmup=10)
    assert schedule_progress(500, 1e9, steps_only) == pytest.approx(0.5)  # no budget: time does not count


def test_rank_in_frame_counts_people_within_each_frame():
    people = People(np.array([0, 0, 0, 0, 1, 1]), np.array([5, 5, 5, 6, 5, 5]), np.zeros((6, 4), np.float32),
                    np.zeros((6, 17, 2), np.float32), np.zeros((6, 17), np.float32))
    np.testing.assert_array_equal(rank_in_frame(people), [0, 1, 2, 0, 0, 1])


def test_a_checkpoint_runs_at_a_smaller_pose_input_size(street_people, tmp_path):
    from segmerge_ros.models.pose.model import save_pose_checkpoint
    from segmerge_ros.inference.pose import PoseEstimator

    frame, people = street_people
    torch.manual_seed(0)
    save_pose_checkpoint(SegformerPose("b0"), tmp_path / "pose.pth")
    small = PoseEstimator("segformer-b0", tmp_path / "pose.pth", input_size=(192, 256))
    assert small.input_size == (192, 256) and small.heatmap_size == (48, 64)
    result = small.estimate_boxes(frame, people.boxes)
    assert result.keypoints.shape == (len(people), 17, 2)
    # Keypoints land in the person's crop region in frame pixels, not in 192x256 crop pixels.
    center, scale = box_to_center_scale(people.boxes, (192, 256))
    assert np.all(np.abs(result.keypoints - center[:, None]) <= scale[:, None] / 2 + 1)


def test_score_calibration_is_folded_into_the_head_and_moves_only_scores(street_people, one_thread):
    from segmerge_ros.training.train_pose import calibrate_scores, student_scores

    frame, people = street_people
    frames = {(0, 0): frame}
    torch.manual_seed(3)
    model = SegformerPose("b0", input_size=(96, 128)).eval()
    torch.nn.init.normal_(model.head.final_layer.weight, std=0.05)
    before = student_scores(model, people, frames)
    wanted = np.linspace(0.5, 3.0, 17)  # per-keypoint factors to recover
    target = People(people.source, people.frame, people.boxes, people.keypoints,
                    (before * wanted).astype(np.float32))
    pixels = torch.from_numpy(np.stack([make_sample(frame, b, k, s, PoseTrainSettings(), input_size=(96, 128))[0]
                                        for b, k, s in zip(people.boxes, people.keypoints, people.scores)]))
    from segmerge_ros.training.train_pose import to_pixels

    with torch.no_grad():
        heat_before = model(to_pixels(pixels.numpy())).numpy()
    factors = calibrate_scores(model, target, frames, count=len(people))
    np.testing.assert_allclose(factors, wanted, rtol=1e-3)
    after = student_scores(model, people, frames)
    np.testing.assert_allclose(after, before * wanted, rtol=1e-3, atol=1e-6)
    with torch.no_grad():
        heat_after = model(to_pixels(pixels.numpy())).numpy()
    np.testing.assert_allclose(heat_after, heat_before * wanted[None, :, None, None], rtol=1e-3, atol=1e-6)
    kp_before, _ = decode_heatmaps(heat_before)
    kp_after, _ = decode_heatmaps(heat_after)
    np.testing.assert_allclose(kp_after, kp_before, atol=0.01)  # heatmap pixels (float32 rounding)


def test_the_shared_pose_student_follows_the_teacher_on_held_out_people(shared_data, student_dir, teacher):
    """The distilled checkpoint the node and the demo use (../shared/data/segformer_pose_b0_vtest_student): on
    people of a held-out vtest frame its keypoints follow MoveNet's (its README: PCK@0.2 0.78 over frames
    660-795), far above a random model's."""
    from segmerge_ros.inference.pose import PoseEstimator

    weights = shared_data / "segformer_pose_b0_vtest_student" / "pose.pth"
    if not weights.is_file():
        pytest.fail(f"the shared pose student is missing: {weights}", pytrace=False)
    torch.set_num_threads(1)
    frame = list(iter_frames(shared_data / "opencv_samples" / "vtest.avi", max_frames=701))[-1]  # frame 700
    boxes = PersonFinder(student_dir)(frame)[:4]
    assert len(boxes) >= 2, "the segmentation student finds pedestrians in vtest frame 700"
    target, scores = teacher_keypoints(teacher, frame, boxes, "padded")

    def agreement(estimator: PoseEstimator) -> float:
        keypoints = estimator.estimate_boxes(frame, boxes).keypoints
        return pck_against_teacher(keypoints, target, scores)["pck"]

    student = agreement(PoseEstimator("segformer-b0", weights))
    torch.manual_seed(0)
    random = agreement(PoseEstimator("segformer-b0"))
    print(f"PCK@0.2 against the teacher: shared student {student:.3f}, random model {random:.3f}")
    assert student >= 0.6 and random <= 0.35, (student, random)
