"""Objects from class maps and instance maps (inference/detections.py), on synthetic maps with known components."""

from __future__ import annotations

import numpy as np
import pytest

from segmerge_ros.inference.detections import Objects, objects_from_class_map, objects_from_instances
from segmerge_ros.inference.postprocess.mask2former import InstanceInfo, InstanceMap

PERSON, RIDER, CAR = 11, 12, 13


def _class_map() -> np.ndarray:
    """40x60 map: a 10x10 person touching (left-right) a 6x10 rider, a separate 4x5 person, a diagonal pair of
    person pixels (one 8-connected component of 2), and a car that is not asked for."""
    m = np.zeros((40, 60), np.uint8)
    m[2:12, 2:12] = PERSON     # area 100, box (2, 2, 12, 12)
    m[2:12, 12:18] = RIDER     # area 60 touching the person: another class, so another object
    m[20:25, 30:34] = PERSON   # area 20
    m[30, 50] = m[31, 51] = PERSON  # diagonal neighbours: one component of 2 pixels
    m[30:40, 0:20] = CAR       # area 200, not requested
    return m


def test_one_object_per_component_of_each_class_largest_first():
    objects = objects_from_class_map(_class_map(), [PERSON, RIDER], min_area=1)
    assert len(objects) == 4
    np.testing.assert_array_equal(objects.areas, [100, 60, 20, 2])
    np.testing.assert_array_equal(objects.class_ids, [PERSON, RIDER, PERSON, PERSON])
    np.testing.assert_array_equal(objects.boxes, [[2, 2, 12, 12], [12, 2, 18, 12], [30, 20, 34, 25], [50, 30, 52, 32]])
    assert objects.boxes.dtype == np.float32 and objects.class_ids.dtype == np.int64
    assert objects.areas.dtype == np.int64 and objects.scores.dtype == np.float32
    np.testing.assert_array_equal(objects.scores, 1.0)  # no confidence map


def test_min_area_drops_small_components_and_absent_classes_give_nothing():
    objects = objects_from_class_map(_class_map(), [PERSON, RIDER, 5], min_area=21)
    np.testing.assert_array_equal(objects.areas, [100, 60])
    assert len(objects_from_class_map(_class_map(), [5, 6], min_area=1)) == 0
    assert len(objects_from_class_map(_class_map(), [], min_area=1)) == 0
    # min_area below 1 means 1 (no empty components)
    assert len(objects_from_class_map(_class_map(), [PERSON], min_area=0)) == 3


def test_score_is_the_mean_confidence_of_the_component():
    class_map = _class_map()
    confidence = np.full(class_map.shape, 255, np.uint8)
    confidence[2:12, 2:7] = 51  # half the big person at 0.2, half at 1.0 -> 0.6
    confidence[2:12, 12:18] = 102  # rider at 0.4
    objects = objects_from_class_map(class_map, [PERSON, RIDER], min_area=20, confidence=confidence)
    np.testing.assert_allclose(objects.scores, [0.6, 0.4, 1.0], atol=1e-6)


def test_equal_areas_order_by_class_then_position():
    m = np.zeros((20, 20), np.uint8)
    m[10:12, 10:12] = RIDER
    m[0:2, 15:17] = PERSON
    m[5:7, 0:2] = PERSON
    objects = objects_from_class_map(m, [RIDER, PERSON], min_area=1)
    np.testing.assert_array_equal(objects.class_ids, [PERSON, PERSON, RIDER])
    np.testing.assert_array_equal(objects.boxes[:, :2], [[15, 0], [0, 5], [10, 10]])


def test_mismatched_confidence_shape_is_refused():
    with pytest.raises(ValueError, match="shape"):
        objects_from_class_map(_class_map(), [PERSON], 1, confidence=np.zeros((3, 3), np.uint8))


def test_subset_and_empty():
    objects = objects_from_class_map(_class_map(), [PERSON, RIDER], min_area=1)
    picked = objects.subset(np.array([2, 0]))
    np.testing.assert_array_equal(picked.areas, [20, 100])
    np.testing.assert_array_equal(picked.boxes[1], objects.boxes[0])
    masked = objects.subset(objects.class_ids == RIDER)
    assert len(masked) == 1 and masked.areas[0] == 60
    assert len(objects.subset([])) == 0
    empty = Objects.empty()
    assert len(empty) == 0 and empty.boxes.shape == (0, 4) and empty.class_ids.dtype == np.int64


def test_objects_from_instances_filters_classes_and_area_largest_first():
    id_map = np.zeros((30, 40), np.uint16)
    id_map[0:5, 0:4] = 1      # person, area 20, score 0.9
    id_map[10:20, 10:20] = 2  # person, area 100, score 0.7
    id_map[0:10, 30:40] = 3   # car, area 100
    id_map[25:27, 0:2] = 4    # person, area 4: below min_area
    info = (InstanceInfo(1, PERSON, 0.9), InstanceInfo(2, PERSON, 0.7), InstanceInfo(3, CAR, 0.95),
            InstanceInfo(4, PERSON, 0.8))
    objects = objects_from_instances(InstanceMap(id_map, info), [PERSON, RIDER], min_area=10)
    np.testing.assert_array_equal(objects.areas, [100, 20])
    np.testing.assert_array_equal(objects.class_ids, [PERSON, PERSON])
    np.testing.assert_allclose(objects.scores, [0.7, 0.9])
    np.testing.assert_array_equal(objects.boxes, [[10, 10, 20, 20], [0, 0, 4, 5]])
    none = objects_from_instances(InstanceMap(np.zeros((4, 4), np.uint16), ()), [PERSON], 1)
    assert len(none) == 0 and none.boxes.shape == (0, 4)
