"""PoseWork (inference/budget.py): the people posed per frame in budget mode, against a simulated frame whose
pose time grows with the people posed."""

from __future__ import annotations

import pytest

from segmerge_ros.inference.budget import PoseWork

SEGMENTATION_MS = 120.0   # the segmentation part of the frame at the highest merge rate
PER_PERSON_MS = 45.0      # pose per person


def frame_ms(persons: int, segmentation_ms: float = SEGMENTATION_MS) -> tuple[float, float]:
    pose_ms = persons * PER_PERSON_MS
    return segmentation_ms + pose_ms, pose_ms


def run(work: PoseWork, people_in_view: int, user_max: int, target_ms: float | None, frames: int,
        rates=lambda frame: 0.9, segmentation_ms: float = SEGMENTATION_MS) -> list[int]:
    """``rates(frame)``: the merge rate budget mode chose after each frame (settled by default)."""
    posed = []
    for frame in range(frames):
        persons = min(people_in_view, work.limit(user_max))
        processing, pose = frame_ms(persons, segmentation_ms)
        work.update(processing, pose, persons, target_ms, rates(frame), user_max)
        posed.append(persons)
    return posed


def rising(frame: int) -> float:
    """A merge rate still moving up, a rung every few frames (budget mode at work)."""
    return min(0.9, 0.15 * (frame // 4))


def test_pose_dominating_with_the_merge_rate_settled_poses_fewer_people_until_the_target_is_met():
    work = PoseWork()
    posed = run(work, people_in_view=6, user_max=6, target_ms=250.0, frames=80)
    assert posed[0] == 6  # 390 ms: the user's maximum to start with
    settled = posed[40:]
    assert set(settled) == {2}, settled  # 120 + 2 x 45 = 210 ms <= 250; 3 people would be 255 ms
    assert all(frame_ms(p)[0] <= 1.1 * 250.0 for p in settled)
    assert work.cap == 2


def test_at_least_one_person_is_still_posed_when_even_that_misses():
    work = PoseWork()
    posed = run(work, people_in_view=4, user_max=4, target_ms=100.0, frames=80)
    assert set(posed[40:]) == {1}


def test_people_come_back_one_by_one_as_they_fit_again():
    work = PoseWork()
    run(work, people_in_view=6, user_max=6, target_ms=250.0, frames=60)
    assert work.cap == 2
    posed = run(work, people_in_view=6, user_max=6, target_ms=250.0, frames=80, segmentation_ms=40.0)
    assert posed[-1] == 4 and work.cap == 4  # 40 + 4 x 45 = 220 ms; a fifth would leave no room (265 ms)
    posed = run(work, people_in_view=6, user_max=6, target_ms=400.0, frames=80, segmentation_ms=40.0)
    assert posed[-1] == 6 and work.cap is None  # a looser target: every person again


def test_no_cap_while_segmentation_dominates_or_the_rate_still_moves_or_budget_is_off():
    work = PoseWork()
    # one person, 45 of 345 ms: pose is not what misses the target
    assert set(run(work, 1, 4, 200.0, 60, segmentation_ms=300.0)) == {1} and work.cap is None
    assert set(run(work, 6, 6, 250.0, 24, rates=rising)) == {6} and work.cap is None  # merging first
    run(work, 6, 6, 250.0, 60)
    assert work.cap is not None
    run(work, 6, 6, None, 1)  # budget mode switched off: the user's maximum at once
    assert work.cap is None and work.limit(6) == 6


def test_never_above_the_users_maximum():
    work = PoseWork()
    run(work, 6, 6, 250.0, 60)
    assert work.limit(1) == 1 and work.limit(6) == work.cap


@pytest.mark.parametrize("user_max", [1])
def test_a_user_maximum_of_one_is_never_lowered(user_max):
    work = PoseWork()
    assert set(run(work, 5, user_max, 60.0, 60)) == {1} and work.cap is None


def test_where_merging_does_not_pay_the_rate_stays_low_and_people_are_still_capped():
    """Budget mode keeps merge rate 0 where merging saves too little (pose dominating the frame): the cap must not
    wait for a highest rate that never comes (it did, and the node test missed its target)."""
    work = PoseWork()
    posed = run(work, people_in_view=6, user_max=6, target_ms=250.0, frames=80, rates=lambda frame: 0.0)
    assert set(posed[40:]) == {2}
