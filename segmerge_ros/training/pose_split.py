"""The frozen train/test split of ``coco_mini_train`` (issue 22), fixed before any pose model was fitted on it.

``COCO_MINI_TRAIN_TEST_IMAGES`` was chosen by ``choose_test_images``: the images sorted by file name, every other one
from the second (indices 1, 3, 5, ...), then further images in file-name order until the test images hold at least
``MIN_TEST_PERSONS`` annotated persons with a labelled keypoint (the alternate images alone hold 36, so none was
added). The test images plus ``mmpose_coco_keypoints`` are the test-only split: nothing (teacher choices,
corrections, students) may be fitted on them; the other 14 ``coco_mini_train`` images are the train part.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

MIN_TEST_PERSONS = 30

COCO_MINI_TRAIN_TEST_IMAGES = (
    "000000030752.jpg", "000000069468.jpg", "000000100667.jpg", "000000129648.jpg", "000000183872.jpg",
    "000000214704.jpg", "000000234748.jpg", "000000322517.jpg", "000000418049.jpg", "000000442450.jpg",
    "000000466137.jpg", "000000489520.jpg", "000000538113.jpg", "000000551757.jpg",
)


def choose_test_images(persons_per_image: Mapping[str, int], min_persons: int = MIN_TEST_PERSONS) -> tuple[str, ...]:
    """Test images by the rule above from {file name: annotated persons with a labelled keypoint}, sorted."""
    names = sorted(persons_per_image)
    chosen = names[1::2]
    rest = names[0::2]
    while sum(persons_per_image[n] for n in chosen) < min_persons and rest:
        chosen.append(rest.pop(0))
    return tuple(sorted(chosen))


def persons_per_image(persons: Sequence[dict]) -> dict[str, int]:
    """{image file name: persons} of person records with an ``image`` path (as ``pose_eval.coco_persons`` gives)."""
    counts: dict[str, int] = {}
    for person in persons:
        name = Path(person["image"]).name
        counts[name] = counts.get(name, 0) + 1
    return counts


def split_persons(persons: Sequence[dict],
                  test_images: Sequence[str] = COCO_MINI_TRAIN_TEST_IMAGES) -> tuple[list[dict], list[dict]]:
    """(train, test) person records of ``coco_mini_train``: test = those on ``test_images`` (by file name)."""
    test_names = set(test_images)
    train = [p for p in persons if Path(p["image"]).name not in test_names]
    test = [p for p in persons if Path(p["image"]).name in test_names]
    return train, test
