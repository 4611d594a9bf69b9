"""Track ids across frames (inference/tracking.py): synthetic boxes, then the trained SegFormer-B0 on vtest.avi."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from segmerge_ros.inference.detections import objects_from_class_map
from segmerge_ros.inference.tracking import TrackIds, Tracker, box_iou

PERSON, CAR = 0, 1


def _box(x: float, y: float = 0.0, w: float = 10.0, h: float = 10.0) -> list[float]:
    return [x, y, x + w, y + h]


def test_box_iou_values():
    iou = box_iou(np.array([_box(0), _box(0)]), np.array([_box(0), _box(5), _box(20), [3, 3, 3, 9]]))
    np.testing.assert_allclose(iou[0], [1.0, 50 / 150, 0.0, 0.0])
    assert iou.shape == (2, 4)
    assert box_iou(np.zeros((0, 4)), np.array([_box(0)])).shape == (0, 1)


def test_track_ids_count_up_and_are_topic_tokens():
    ids = TrackIds()
    assert [ids.next() for _ in range(3)] == ["t1", "t2", "t3"]
    assert TrackIds("body_").next() == "body_1"
    for bad in ("", "1x", "a-b", "a/b"):
        with pytest.raises(ValueError):
            TrackIds(bad)


def test_track_ids_are_unique_across_threads():
    ids = TrackIds()
    drawn: list[str] = []

    def draw() -> None:
        drawn.extend(ids.next() for _ in range(500))

    threads = [threading.Thread(target=draw) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(drawn)) == 2000


def test_ids_stay_with_moving_boxes_and_new_objects_get_new_ids():
    tracker = Tracker(TrackIds(), min_iou=0.3)
    first = tracker.update(np.array([_box(0), _box(100)]), np.array([PERSON, PERSON]))
    assert first == ["t1", "t2"]
    # Both move 2 px a frame; the order of the boxes changes; a third person appears.
    for step in range(1, 6):
        ids = tracker.update(np.array([_box(100 + 2 * step), _box(200), _box(2 * step)]),
                             np.array([PERSON, PERSON, PERSON]))
        assert ids[0] == "t2" and ids[2] == "t1"
        assert ids[1] == "t3"  # new on the first of these frames, kept afterwards
    assert sorted(tracker.tracked) == ["t1", "t2", "t3"]


def test_a_class_mismatch_is_never_matched():
    tracker = Tracker(TrackIds())
    assert tracker.update(np.array([_box(0)]), np.array([PERSON])) == ["t1"]
    assert tracker.update(np.array([_box(0)]), np.array([CAR])) == ["t2"]  # same box, other class
    assert tracker.tracked == ["t2"]


def test_boxes_below_min_iou_are_not_matched():
    tracker = Tracker(TrackIds(), min_iou=0.5)
    tracker.update(np.array([_box(0)]), np.array([PERSON]))
    assert tracker.update(np.array([_box(4)]), np.array([PERSON])) == ["t2"]  # IoU 6/14 = 0.43


def test_missed_tracks_keep_their_box_and_age_out_after_max_age():
    tracker = Tracker(TrackIds(), max_age=2)
    tracker.update(np.array([_box(0)]), np.array([PERSON]))
    empty = np.zeros((0, 4)), np.zeros(0, np.int64)
    assert tracker.update(*empty) == [] and tracker.tracked == []
    assert tracker.update(*empty) == []
    # Unseen for 2 frames (= max_age): still there, and the last box still matches.
    assert tracker.update(np.array([_box(1)]), np.array([PERSON])) == ["t1"]
    for _ in range(3):  # unseen for 3 frames > max_age: dropped
        tracker.update(*empty)
    assert tracker.update(np.array([_box(1)]), np.array([PERSON])) == ["t2"]


def test_reset_forgets_tracks_but_never_reuses_ids():
    tracker = Tracker(TrackIds())
    tracker.update(np.array([_box(0)]), np.array([PERSON]))
    tracker.reset()
    assert tracker.tracked == []
    assert tracker.update(np.array([_box(0)]), np.array([PERSON])) == ["t2"]


def test_two_trackers_sharing_track_ids_never_share_an_id():
    ids = TrackIds()
    left, right = Tracker(ids), Tracker(ids)
    a = left.update(np.array([_box(0), _box(50)]), np.array([PERSON, PERSON]))
    b = right.update(np.array([_box(0)]), np.array([PERSON]))
    c = left.update(np.array([_box(0), _box(50), _box(100)]), np.array([PERSON, PERSON, PERSON]))
    assert a == ["t1", "t2"] and b == ["t3"] and c == ["t1", "t2", "t4"]


def test_hungarian_assignment_beats_greedy():
    # Track A fits detection 1 best (IoU 0.82), but detection 2 only fits A (0.43; 0.11 with B < min_iou), and B
    # fits detection 1 (0.54). Greedy (best pair first) would give A detection 1 and start a new track for 2.
    tracks = np.array([_box(0), _box(4)])  # A, B
    detections = np.array([_box(1), _box(-4)])
    iou = box_iou(tracks, detections)
    assert np.unravel_index(iou.argmax(), iou.shape) == (0, 0) and iou[1, 1] < 0.3
    tracker = Tracker(TrackIds(), min_iou=0.3)
    assert tracker.update(tracks, np.array([PERSON, PERSON])) == ["t1", "t2"]
    assert tracker.update(detections, np.array([PERSON, PERSON])) == ["t2", "t1"]


def test_update_refuses_mismatched_lengths_and_bad_settings():
    with pytest.raises(ValueError):
        Tracker(TrackIds()).update(np.array([_box(0)]), np.array([PERSON, PERSON]))
    with pytest.raises(ValueError):
        Tracker(TrackIds(), min_iou=0.0)
    with pytest.raises(ValueError):
        Tracker(TrackIds(), max_age=-1)


def test_people_in_vtest_keep_a_track_for_20_frames(student_dir, shared_data, one_thread):
    # At the video's own 576x768: at 288x384 the student's masks of walkers who pass close merge into one component
    # within these 20 frames (and split again), so no component keeps one box long enough, whatever the tracker.
    from segmerge_ros.inference.engine import SegmentationEngine
    from segmerge_ros.inference.sources import iter_frames

    engine = SegmentationEngine(model="segformer-b0", weights=str(student_dir), backend="eager", precision="fp32",
                                input_size=None)
    person_ids = engine.labels.person_ids
    tracker = Tracker(TrackIds())
    per_frame: list[set[str]] = []
    for frame in iter_frames(shared_data / "opencv_samples" / "vtest.avi", max_frames=20):
        result = engine.infer(frame)
        objects = objects_from_class_map(result.class_map, person_ids, min_area=100, confidence=result.confidence)
        per_frame.append(set(tracker.update(objects.boxes, objects.class_ids)))
    assert len(per_frame) == 20
    assert all(per_frame), "no person found in some frame"
    assert set.intersection(*per_frame), f"no track lasted all 20 frames: {per_frame}"


def test_live_tracks_include_missed_ones_until_max_age_and_filter_by_class():
    tracker = Tracker(TrackIds(), max_age=1)
    person, car = np.array([[0, 0, 10, 20]], float), np.array([[50, 50, 80, 70]], float)
    first = tracker.update(np.concatenate([person, car]), np.array([1, 3]))
    assert tracker.live() == first and tracker.live([1]) == [first[0]]
    tracker.update(car, np.array([3]))  # the person missed once: still live, not seen
    assert tracker.live([1]) == [first[0]] and first[0] not in tracker.tracked
    tracker.update(car, np.array([3]))  # missed twice > max_age: dropped
    assert tracker.live([1]) == [] and tracker.live() == [first[1]]
