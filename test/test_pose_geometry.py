"""Pose geometry end to end on real COCO images and annotations; decoding; person boxes; drawing.

From each annotated box: centre/scale (padding 1.25, crop aspect), crop the real image, place Gaussians at the
annotated keypoints in heatmap space, decode, map back to the image.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from segmerge_ros.models.labels import ADE20K, CITYSCAPES
from segmerge_ros.inference.pose import (
    box_to_center_scale,
    crop_matrices,
    crop_people,
    crop_to_image,
    decode_heatmaps,
    draw_skeletons,
    fix_aspect_ratio,
    heatmap_to_image,
    image_to_crop,
    image_to_heatmap,
    person_boxes_from_segmentation,
    render_heatmaps,
)

INPUT_SIZE = (288, 384)
HEATMAP_SIZE = (72, 96)


@pytest.fixture(scope="module")
def coco(shared_data: Path):
    folder = shared_data / "mmpose_coco_keypoints"
    data = json.loads((folder / "test_coco.json").read_text())
    images = {im["id"]: folder / im["file_name"] for im in data["images"]}
    people = []
    for ann in data["annotations"]:
        kpts = np.array(ann["keypoints"], dtype=np.float64).reshape(17, 3)
        if (kpts[:, 2] > 0).sum() == 0:
            continue
        x, y, w, h = ann["bbox"]
        people.append((ann["image_id"], np.array([x, y, x + w, y + h]), kpts))
    assert len(people) == 12  # 14 annotations, 2 without keypoints
    return images, people


def test_center_scale_padding_and_aspect():
    center, scale = box_to_center_scale(np.array([[10, 20, 110, 420], [0, 0, 300, 100]]), INPUT_SIZE, 1.25)
    np.testing.assert_allclose(center, [[60, 220], [150, 50]])
    # Tall box: height 400 * 1.25 = 500, width enlarged to 500 * 288 / 384 = 375.
    # Wide box: width 375, height enlarged to 375 * 384 / 288 = 500.
    np.testing.assert_allclose(scale, [[375, 500], [375, 500]])
    np.testing.assert_allclose(fix_aspect_ratio(np.array([[3.0, 4.0]]), 0.75), [[3, 4]])


def test_crop_matrix_matches_point_transform():
    center, scale = np.array([[100.0, 80.0]]), np.array([[150.0, 200.0]])
    pts = np.array([[[100.0, 80.0], [25.0, -20.0], [175.0, 180.0], [3.3, 7.7]]])
    m = crop_matrices(center, scale, INPUT_SIZE)[0]
    via_matrix = pts[0] @ m[:, :2].T + m[:, 2]
    np.testing.assert_allclose(image_to_crop(pts, center, scale, INPUT_SIZE)[0], via_matrix, atol=1e-9)
    # Centre -> crop centre, box corners -> crop corners, and the inverse round-trips.
    np.testing.assert_allclose(via_matrix[:3], [[144, 192], [0, 0], [288, 384]], atol=1e-9)
    np.testing.assert_allclose(crop_to_image(image_to_crop(pts, center, scale), center, scale), pts)


def _bilinear(img: np.ndarray, xy: np.ndarray) -> np.ndarray:
    x0, y0 = np.floor(xy[:, 0]).astype(int), np.floor(xy[:, 1]).astype(int)
    fx, fy = (xy[:, 0] - x0)[:, None], (xy[:, 1] - y0)[:, None]
    img = img.astype(np.float64)
    return ((1 - fx) * (1 - fy) * img[y0, x0] + fx * (1 - fy) * img[y0, x0 + 1]
            + (1 - fx) * fy * img[y0 + 1, x0] + fx * fy * img[y0 + 1, x0 + 1])


def test_coco_crop_heatmap_decode_roundtrip(coco):
    """Annotated keypoints -> crop -> Gaussian heatmaps -> decode -> image: within 0.5 px."""
    images, people = coco
    worst = {"dark": 0.0, "dark_blur": 0.0}
    for image_id, box, kpts in people:
        rgb = cv2.cvtColor(cv2.imread(str(images[image_id])), cv2.COLOR_BGR2RGB)
        center, scale = box_to_center_scale(box[None], INPUT_SIZE, 1.25)
        labelled = kpts[:, 2] > 0

        # The crop really is the image under this transform: crop pixels near each keypoint equal the image
        # sampled bilinearly at the inverse-mapped position.
        crop = crop_people(rgb, center, scale, INPUT_SIZE)[0]
        assert crop.shape == (384, 288, 3) and crop.dtype == np.uint8
        in_crop = np.round(image_to_crop(kpts[None, :, :2], center, scale, INPUT_SIZE)[0][labelled])
        back = crop_to_image(in_crop[None], center, scale, INPUT_SIZE)[0]
        inside = ((back >= 0) & (back < np.array([rgb.shape[1] - 1, rgb.shape[0] - 1]))).all(1)
        assert inside.sum() >= 10
        sampled = _bilinear(rgb, back[inside])
        got = crop[in_crop[inside, 1].astype(int), in_crop[inside, 0].astype(int)].astype(np.float64)
        assert np.abs(got - sampled).max() <= 2.0

        hm_xy = image_to_heatmap(kpts[None, :, :2], center, scale, INPUT_SIZE)
        heatmaps = render_heatmaps(hm_xy, HEATMAP_SIZE, sigma=2.0, valid=labelled[None])
        assert heatmaps.shape == (1, 17, 96, 72)
        hm_px = scale[0] / np.array(HEATMAP_SIZE)  # image pixels per heatmap pixel (x, y)

        for name, method, blur in (("dark", "dark", 0), ("dark_blur", "dark", 11)):
            coords, scores = decode_heatmaps(heatmaps, method, blur)
            xy = heatmap_to_image(coords, center, scale, INPUT_SIZE)[0]
            err = np.linalg.norm(xy - kpts[:, :2], axis=1)[labelled]
            worst[name] = max(worst[name], err.max())
            # Peak sampled at most half a pixel off per axis: exp(-0.5 / (2 sigma^2)) = 0.939 at sigma 2.
            assert np.all(scores[0][labelled] > 0.93)
            assert np.all(scores[0][~labelled] == 0)

        # mmpose's quarter-offset decoding: at most a quarter heatmap pixel per axis off.
        coords, _ = decode_heatmaps(heatmaps, "quarter")
        xy = heatmap_to_image(coords, center, scale, INPUT_SIZE)[0]
        assert np.all(np.abs(xy - kpts[:, :2])[labelled] <= 0.25 * hm_px + 1e-3)
        # Plain arg-max: at most half a heatmap pixel per axis.
        coords, _ = decode_heatmaps(heatmaps, "argmax")
        xy = heatmap_to_image(coords, center, scale, INPUT_SIZE)[0]
        assert np.all(np.abs(xy - kpts[:, :2])[labelled] <= 0.5 * hm_px + 1e-3)
    assert worst["dark"] < 0.5 and worst["dark_blur"] < 0.5, worst


def test_decode_subpixel_synthetic():
    pts = np.array([[[10.3, 20.7], [0.0, 5.0], [40.45, 50.05]]])
    maps = render_heatmaps(pts, (48, 64), sigma=3.0)
    coords, scores = decode_heatmaps(maps, "dark")
    np.testing.assert_allclose(coords[0, [0, 2]], pts[0, [0, 2]], atol=1e-3)
    np.testing.assert_allclose(coords[0, 1], [0.0, 5.0], atol=1e-3)  # on the border: arg-max, no refinement
    coords, _ = decode_heatmaps(maps, "quarter")
    np.testing.assert_allclose(coords[0, 0], [10.25, 20.75])
    with pytest.raises(ValueError):
        decode_heatmaps(maps, "nope")


def test_person_boxes_from_synthetic_segmentation():
    road, car = 0, 13
    person, rider = CITYSCAPES.person_ids
    seg = np.zeros((240, 320), np.uint8)
    seg[20:200, 30:90] = person  # 180 x 60 = 10800 px
    seg[100:160, 200:240] = rider  # 60 x 40 = 2400 px
    seg[160:200, 190:250] = car  # a car under the rider: not a person
    seg[5:10, 300:305] = person  # 25 px blob, filtered out
    cv2.circle(seg, (150, 120), 3, road, -1)
    boxes, areas = person_boxes_from_segmentation(seg, CITYSCAPES.person_ids, min_area=100, max_persons=8)
    np.testing.assert_array_equal(boxes, [[30, 20, 90, 200], [200, 100, 240, 160]])
    np.testing.assert_array_equal(areas, [10800, 2400])
    boxes, _ = person_boxes_from_segmentation(seg, CITYSCAPES.person_ids, min_area=10, max_persons=8)
    assert len(boxes) == 3
    boxes, _ = person_boxes_from_segmentation(seg, CITYSCAPES.person_ids, min_area=100, max_persons=1)
    np.testing.assert_array_equal(boxes, [[30, 20, 90, 200]])
    # ADE20K's person id (12) is Cityscapes' rider: only that component.
    boxes, _ = person_boxes_from_segmentation(seg, ADE20K.person_ids, min_area=100)
    np.testing.assert_array_equal(boxes, [[200, 100, 240, 160]])
    assert person_boxes_from_segmentation(seg, (), 100)[0].shape == (0, 4)
    # Padded crops of these boxes have the crop's aspect ratio.
    _, scale = box_to_center_scale(boxes, INPUT_SIZE, 1.25)
    np.testing.assert_allclose(scale[:, 0] / scale[:, 1], 288 / 384)


def test_draw_skeletons():
    img = np.zeros((120, 100, 3), np.uint8)
    kpts = np.zeros((1, 17, 2), np.float32)
    kpts[0, :, 0] = np.linspace(10, 90, 17)
    kpts[0, :, 1] = 60
    scores = np.ones((1, 17), np.float32)
    scores[0, 0] = 0.1  # the nose is below threshold
    kpts[0, 0] = (50, 10)
    out = draw_skeletons(img, kpts, scores, threshold=0.3)
    assert img.max() == 0  # not in place by default
    assert out[60, 15].any() and out[60, 85].any()
    assert not out[10, 50].any()  # no nose joint
    assert not out[35, 50].any()  # no limb to the nose
    # left_shoulder (5) is orange (left side), right_shoulder (6) blue.
    x5, x6 = int(round(kpts[0, 5, 0])), int(round(kpts[0, 6, 0]))
    assert out[60, x5, 0] > out[60, x5, 2] and out[60, x6, 2] > out[60, x6, 0]
