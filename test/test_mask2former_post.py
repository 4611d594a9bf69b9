"""Mask2Former post-processing on hand-made query outputs with known answers (detectron2 semantics)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segmerge_ros.models.labels import LabelSet, generic, label_set
from segmerge_ros.inference.postprocess.mask2former import (
    first_argmax,
    InstanceInfo,
    Instances,
    instance_boxes,
    instance_id_map,
    instance_segmentation,
    panoptic_segmentation,
    person_boxes_from_instances,
    semantic_maps,
    semantic_scores,
    thing_classes,
)

INSIDE, OUTSIDE = 8.0, -8.0  # mask logits: sigmoid 0.99966 / 0.00034


def class_logits(*rows: dict[int, float], num_classes: int) -> torch.Tensor:
    """(Q, K+1) logits whose softmax gives each row's {class: probability}; the rest goes to "no object" (K)."""
    logits = torch.full((len(rows), num_classes + 1), -30.0)
    for q, probabilities in enumerate(rows):
        rest = 1.0 - sum(probabilities.values())
        for c, p in {**probabilities, num_classes: rest}.items():
            if p > 0:
                logits[q, c] = math.log(p)
    return logits


def square_masks(shape: tuple[int, int], *boxes: tuple[int, int, int, int], inside: float = INSIDE) -> torch.Tensor:
    """(Q, h, w) mask logits: ``inside`` in each box (top, left, bottom, right exclusive), OUTSIDE elsewhere."""
    masks = torch.full((len(boxes), *shape), OUTSIDE)
    for q, (top, left, bottom, right) in enumerate(boxes):
        masks[q, top:bottom, left:right] = inside
    return masks


# --- semantic ----------------------------------------------------------------------------------------------------


def test_semantic_two_disjoint_squares_and_background_query():
    classes = class_logits({0: 0.9}, {2: 0.9}, {1: 0.95}, num_classes=3)
    masks = square_masks((8, 8), (0, 0, 4, 4), (4, 4, 8, 8), (0, 0, 8, 8))
    masks[2, :4, :4] = OUTSIDE  # the background query covers everything but the squares
    masks[2, 4:, 4:] = OUTSIDE
    class_map, confidence = semantic_maps(classes, masks, (16, 16))
    assert class_map.dtype == np.uint8 and class_map.shape == (16, 16)
    # Square interiors (away from the bilinear transition band) and the background, at twice the mask size.
    assert (class_map[:6, :6] == 0).all() and (class_map[10:, 10:] == 2).all()
    assert (class_map[:6, 10:] == 1).all() and (class_map[10:, :6] == 1).all()
    # Confidence = the winning score: 0.9 * sigmoid(8) inside the squares, 0.95 * sigmoid(8) on the background.
    assert abs(int(confidence[2, 2]) - round(255 * 0.9 / (1 + math.exp(-8)))) <= 1
    assert abs(int(confidence[2, 13]) - round(255 * 0.95 / (1 + math.exp(-8)))) <= 1


def test_semantic_ignores_the_no_object_column():
    # Query 0 says class 1 with 0.3 and "no object" with 0.7; query 1 says class 0 with 0.4, both over everything.
    classes = class_logits({1: 0.3}, {0: 0.4}, num_classes=2)
    masks = square_masks((4, 4), (0, 0, 4, 4), (0, 0, 4, 4))
    scores = semantic_scores(classes, masks)
    assert torch.allclose(scores[:, 0, 0], torch.tensor([0.4, 0.3]) / (1 + math.exp(-INSIDE)), atol=1e-6)
    class_map, _ = semantic_maps(classes, masks, (8, 8))
    assert (class_map == 0).all()  # the no-object mass of query 0 does not count for any class


def test_semantic_map_is_the_argmax_of_the_einsum_over_upsampled_probabilities():
    torch.manual_seed(0)
    classes, masks = torch.randn(6, 5) * 3, torch.randn(6, 7, 9) * 4
    size = (29, 37)
    reference_scores = torch.einsum(
        "qc,qhw->chw", classes.softmax(-1)[:, :-1],
        F.interpolate(masks.sigmoid()[None], size=size, mode="bilinear", align_corners=False)[0],
    )
    class_map, _ = semantic_maps(classes[None], masks[None], size)  # a batch of one is accepted
    assert (class_map == reference_scores.argmax(0).numpy()).mean() > 0.999  # only float ties may differ


def test_semantic_scores_batched_equal_per_image():
    torch.manual_seed(1)
    classes, masks = torch.randn(2, 4, 3), torch.randn(2, 4, 5, 6)
    batched = semantic_scores(classes, masks)
    assert batched.shape == (2, 2, 5, 6)
    assert torch.allclose(batched[1], semantic_scores(classes[1], masks[1]))


def test_semantic_rejects_a_batch_of_two_and_mismatched_queries():
    with pytest.raises(ValueError, match="one image"):
        semantic_maps(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4, 4), (8, 8))
    with pytest.raises(ValueError, match=r"\(Q, K\+1\)"):
        semantic_maps(torch.zeros(3, 4), torch.zeros(2, 4, 4), (8, 8))


# --- instance ----------------------------------------------------------------------------------------------------


def test_instances_scores_masks_and_threshold():
    classes = class_logits({3: 0.9}, {1: 0.8}, {2: 0.2}, num_classes=4)
    # Query 0: inside logit 2 (sigmoid 0.8808); query 1: inside logit 8; query 2: a weak class, dropped below 0.5.
    masks = square_masks((4, 4), (0, 0, 2, 2), (2, 2, 4, 4), (0, 2, 2, 4))
    masks[0, :2, :2] = 2.0
    result = instance_segmentation(classes, masks, (8, 8), score_threshold=0.5)
    assert result.classes.tolist() == [1, 3]  # best score first: 0.8 * 0.99966 > 0.9 * 0.8808
    expected = [0.8 / (1 + math.exp(-8)), 0.9 / (1 + math.exp(-2))]
    assert result.scores.tolist() == pytest.approx(expected, abs=1e-5)
    assert result.masks.shape == (2, 8, 8) and result.masks.dtype == torch.bool
    # Bilinear upsampling of a 2x2 block of +8 among -8 crosses zero at the block's edge: the block doubles.
    square = torch.zeros(8, 8, dtype=torch.bool)
    square[4:, 4:] = True
    assert torch.equal(result.masks[0], square)
    # A block of +2 among -8 shrinks: output pixel 3 lies at source 1.25, 0.75 * 2 + 0.25 * -8 = -0.5 < 0.
    square = torch.zeros(8, 8, dtype=torch.bool)
    square[:3, :3] = True
    assert torch.equal(result.masks[1], square)
    # Without a threshold (detectron2) the weak query stays, last; so do the (query, class) pairs of near-zero
    # probability, with near-zero scores.
    everything = instance_segmentation(classes, masks, (8, 8))
    assert len(everything) == 3 * 4 and everything.classes[2].item() == 2
    assert everything.scores[2].item() == pytest.approx(0.2 / (1 + math.exp(-8)), abs=1e-5)
    assert everything.scores[3:].max().item() < 1e-6


def test_instances_top_k_is_over_queries_times_classes():
    # Query 0 splits between classes 1 (0.5) and 2 (0.4); query 1 is class 0 with 0.45.
    classes = class_logits({1: 0.5, 2: 0.4}, {0: 0.45}, num_classes=3)
    masks = square_masks((4, 4), (0, 0, 2, 2), (2, 2, 4, 4))
    two = instance_segmentation(classes, masks, (4, 4), top_k=2)
    assert two.classes.tolist() == [1, 0]
    three = instance_segmentation(classes, masks, (4, 4), top_k=3)
    assert three.classes.tolist() == [1, 0, 2]
    assert torch.equal(three.masks[0], three.masks[2])  # the same query's mask for both of its classes
    assert three.scores.tolist() == pytest.approx([0.5 * 0.99966, 0.45 * 0.99966, 0.4 * 0.99966], abs=1e-4)


def test_instances_keep_only_thing_classes_when_given():
    classes = class_logits({1: 0.9}, {0: 0.8}, num_classes=2)
    masks = square_masks((4, 4), (0, 0, 2, 2), (2, 2, 4, 4))
    result = instance_segmentation(classes, masks, (4, 4), score_threshold=0.5, thing_ids=[0])
    assert result.classes.tolist() == [0]


def test_instances_of_no_query():
    result = instance_segmentation(class_logits({0: 0.1}, num_classes=2), square_masks((4, 4), (0, 0, 1, 1)),
                                   (6, 6), score_threshold=0.5)
    assert len(result) == 0 and result.masks.shape == (0, 6, 6)
    mapped = instance_id_map(result)
    assert mapped.id_map.shape == (6, 6) and not mapped.id_map.any() and mapped.info == ()


# --- instance id map ---------------------------------------------------------------------------------------------


def masks_of(shape: tuple[int, int], *boxes: tuple[int, int, int, int]) -> torch.Tensor:
    return square_masks(shape, *boxes) > 0


def test_id_map_higher_score_wins_and_ids_follow_scores():
    masks = masks_of((6, 6), (0, 0, 4, 4), (2, 2, 6, 6), (5, 0, 6, 1))
    instances = Instances(masks, torch.tensor([4, 7, 1]), torch.tensor([0.6, 0.9, 0.3]))
    mapped = instance_id_map(instances)
    id_map, info = mapped.id_map, mapped.info
    assert id_map.dtype == np.uint16
    assert info == (InstanceInfo(1, 7, pytest.approx(0.9)), InstanceInfo(2, 4, pytest.approx(0.6)),
                    InstanceInfo(3, 1, pytest.approx(0.3)))
    expected = np.zeros((6, 6), np.uint16)
    expected[:4, :4] = 2
    expected[2:, 2:] = 1  # the overlap 2..4 x 2..4 goes to the 0.9 instance
    expected[5, 0] = 3
    np.testing.assert_array_equal(id_map, expected)


def test_id_map_gives_no_id_to_empty_or_wholly_covered_instances():
    masks = masks_of((6, 6), (1, 1, 3, 3), (0, 0, 4, 4), (0, 0, 0, 0), (4, 4, 6, 6))
    instances = Instances(masks, torch.tensor([2, 3, 5, 6]), torch.tensor([0.5, 0.8, 0.99, 0.4]))
    mapped = instance_id_map(instances)
    id_map, info = mapped.id_map, mapped.info
    assert [(i.id, i.class_id) for i in info] == [(1, 3), (2, 6)]
    assert set(np.unique(id_map).tolist()) == {0, 1, 2}
    assert (id_map[:4, :4] == 1).all() and (id_map[4:, 4:] == 2).all()


def test_instance_boxes_areas_and_info_dict():
    masks = masks_of((6, 8), (0, 0, 4, 4), (2, 2, 6, 7), (5, 0, 6, 1))
    mapped = instance_id_map(Instances(masks, torch.tensor([4, 7, 1]), torch.tensor([0.6, 0.9, 0.3])))
    boxes, areas = instance_boxes(mapped)
    # id 1: the 0.9 square 2..6 x 2..7; id 2: the 0.6 square without the overlap (its box stays 0..4 x 0..4).
    np.testing.assert_array_equal(boxes, [[2, 2, 7, 6], [0, 0, 4, 4], [0, 5, 1, 6]])
    assert areas.tolist() == [20, 16 - 4, 1]
    names = [f"c{i}" for i in range(8)]
    assert mapped.as_dict(names) == {"1": {"class_id": 7, "class": "c7", "score": 0.9},
                                     "2": {"class_id": 4, "class": "c4", "score": 0.6},
                                     "3": {"class_id": 1, "class": "c1", "score": 0.3}}


def test_person_boxes_from_instances_one_box_per_touching_person():
    # Two people side by side (touching: one connected component in a class map) and a car.
    masks = masks_of((10, 12), (1, 0, 9, 4), (0, 4, 10, 9), (8, 9, 10, 12))
    mapped = instance_id_map(Instances(masks, torch.tensor([0, 0, 2]), torch.tensor([0.7, 0.8, 0.95])))
    boxes, areas = person_boxes_from_instances(mapped, person_ids=[0], min_area=10)
    np.testing.assert_array_equal(boxes, [[4, 0, 9, 10], [0, 1, 4, 9]])  # largest first
    assert areas.tolist() == [50, 32]
    assert len(person_boxes_from_instances(mapped, person_ids=[0], min_area=40)[0]) == 1
    assert len(person_boxes_from_instances(mapped, person_ids=[0], min_area=1, max_persons=1)[0]) == 1
    assert len(person_boxes_from_instances(mapped, person_ids=[], min_area=1)[0]) == 0


# --- panoptic ----------------------------------------------------------------------------------------------------


def test_panoptic_drops_low_score_and_no_object_queries_and_numbers_from_one():
    # Classes 0, 1 are things, 2 is stuff. Query 1 is below 0.8; query 3's best class is "no object".
    classes = class_logits({0: 0.95}, {1: 0.7}, {1: 0.9}, {0: 0.05}, num_classes=3)
    masks = square_masks((8, 8), (0, 0, 4, 4), (4, 4, 8, 8), (4, 0, 8, 4), (0, 4, 4, 8))
    result = panoptic_segmentation(classes, masks, (8, 8), thing_ids=[0, 1])
    assert [(s.id, s.class_id, s.is_thing) for s in result.segments] == [(1, 0, True), (2, 1, True)]
    assert result.segments[0].score == pytest.approx(0.95, abs=1e-6)
    expected = np.zeros((8, 8), np.int32)
    expected[:4, :4] = 1
    expected[4:, :4] = 2
    np.testing.assert_array_equal(result.segment_map, expected)


def test_panoptic_overlap_ratio_drop():
    # Query 1's mask (4x4) lies 3/4 under the more confident query 0: it would own 25 % < 80 % of it -> dropped.
    # Query 2 owns 12/16 = 75 % of its mask with overlap 0.7 allowed -> kept at that threshold only.
    classes = class_logits({0: 0.99}, {1: 0.9}, {1: 0.85}, num_classes=2)
    masks = square_masks((8, 8), (0, 0, 4, 8), (2, 0, 6, 4), (3, 4, 7, 8))
    strict = panoptic_segmentation(classes, masks, (8, 8), thing_ids=[0, 1])
    assert [s.class_id for s in strict.segments] == [0]
    assert (strict.segment_map[:4] == 1).all() and not strict.segment_map[4:].any()
    lenient = panoptic_segmentation(classes, masks, (8, 8), thing_ids=[0, 1], overlap_threshold=0.7)
    assert [s.class_id for s in lenient.segments] == [0, 1]
    assert (lenient.segment_map[4:7, 4:] == 2).all() and not lenient.segment_map[4:, :4].any()


def test_panoptic_merges_stuff_per_class_but_not_things():
    # Queries 0 and 2: stuff class 2 in two places -> one segment; queries 1 and 3: thing class 0 -> two segments.
    classes = class_logits({2: 0.9}, {0: 0.95}, {2: 0.85}, {0: 0.9}, num_classes=3)
    masks = square_masks((8, 8), (0, 0, 4, 4), (0, 4, 4, 8), (4, 0, 8, 4), (4, 4, 8, 8))
    result = panoptic_segmentation(classes, masks, (8, 8), thing_ids=[0, 1])
    assert [(s.id, s.class_id, s.is_thing) for s in result.segments] == [(1, 2, False), (2, 0, True), (3, 0, True)]
    assert result.as_dict(("car", "bus", "road")) == {
        "1": {"class_id": 2, "class": "road", "is_thing": False, "score": 0.9},
        "2": {"class_id": 0, "class": "car", "is_thing": True, "score": 0.95},
        "3": {"class_id": 0, "class": "car", "is_thing": True, "score": 0.9}}
    np.testing.assert_array_equal(result.segment_map[:4, :4], 1)
    np.testing.assert_array_equal(result.segment_map[4:, :4], 1)  # merged into the first stuff segment
    np.testing.assert_array_equal(result.segment_map[:4, 4:], 2)
    np.testing.assert_array_equal(result.segment_map[4:, 4:], 3)


def test_panoptic_upsamples_masks_before_deciding():
    classes = class_logits({0: 0.95}, num_classes=1)
    masks = square_masks((4, 4), (0, 0, 2, 2))
    result = panoptic_segmentation(classes, masks, (8, 8), thing_ids=[0])
    expected = np.zeros((8, 8), np.int32)
    expected[:4, :4] = 1
    np.testing.assert_array_equal(result.segment_map, expected)


def test_first_argmax_equals_argmax_with_ties_to_the_first():
    values = torch.randint(0, 3, (5, 7, 9)).float()  # many ties
    assert torch.equal(first_argmax(values), values.argmax(dim=0))
    assert torch.equal(first_argmax(values[:1]), torch.zeros(7, 9, dtype=torch.long))


def test_panoptic_of_nothing_is_all_zero():
    result = panoptic_segmentation(class_logits({0: 0.5}, num_classes=2), square_masks((4, 4), (0, 0, 2, 2)),
                                   (5, 7), thing_ids=[0])
    assert result.segments == () and result.segment_map.shape == (5, 7) and not result.segment_map.any()


def test_thing_classes_of_known_label_sets():
    assert [label_set(19).classes[i] for i in thing_classes(label_set(19))] == [
        "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]
    coco = LabelSet("custom", ("person",) + tuple(f"c{i}" for i in range(132)), generic(133).palette)
    assert thing_classes(coco) == tuple(range(80))
    assert thing_classes(generic(7)) is None  # unknown split: every class may be an instance
