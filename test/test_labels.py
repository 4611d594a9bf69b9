"""Label tables (checked against the real ADE20K release files) and the colouring helpers."""

from __future__ import annotations

import csv
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from segmerge_ros.models.labels import ADE20K, CITYSCAPES, LabelSet, colorize, generic, label_set, overlay


def read_color150(path: Path) -> np.ndarray:
    """The ``colors`` matrix of color150.mat: a MATLAB v5 file with one zlib-compressed 150 x 3 uint8 matrix.

    Parsed by hand because scipy is not a dependency.
    """
    data = path.read_bytes()
    kind, size = struct.unpack("<II", data[128:136])
    assert kind == 15, "expected a compressed (miCOMPRESSED) element"
    matrix = zlib.decompress(data[136:136 + size])

    def element(offset: int) -> tuple[bytes, int]:
        kind, size = struct.unpack("<II", matrix[offset:offset + 8])
        if kind >> 16:  # "small data element": size and type packed into 4 bytes, payload in the next 4
            return matrix[offset + 4:offset + 4 + (kind >> 16)], offset + 8
        return matrix[offset + 8:offset + 8 + size], offset + 8 + (size + 7) // 8 * 8

    offset = 8  # skip the miMATRIX tag
    _, offset = element(offset)  # array flags
    dims_raw, offset = element(offset)
    name, offset = element(offset)
    values, _ = element(offset)
    rows, cols = struct.unpack("<2i", dims_raw)
    assert name == b"colors"
    return np.frombuffer(values, dtype=np.uint8).reshape(cols, rows).T  # MATLAB stores column-major


@pytest.fixture(scope="module")
def ade_dir(shared_data: Path) -> Path:
    return shared_data / "ade20k_val_csail"


def test_cityscapes_table():
    assert CITYSCAPES.num_classes == 19 and len(CITYSCAPES.classes) == 19
    assert CITYSCAPES.classes[0] == "road" and CITYSCAPES.classes[-1] == "bicycle"
    assert CITYSCAPES.classes[11:13] == ("person", "rider")
    assert CITYSCAPES.person_ids == (11, 12)
    assert CITYSCAPES.palette.shape == (19, 3) and CITYSCAPES.palette.dtype == np.uint8
    assert tuple(CITYSCAPES.palette[0]) == (128, 64, 128)  # road
    assert tuple(CITYSCAPES.palette[13]) == (0, 0, 142)  # car
    assert len({tuple(c) for c in CITYSCAPES.palette}) == 19


def test_ade20k_table_basics():
    assert ADE20K.num_classes == 150 and len(set(ADE20K.classes)) == 150
    assert ADE20K.palette.shape == (150, 3) and ADE20K.palette.dtype == np.uint8
    assert ADE20K.classes[:3] == ("wall", "building", "sky")
    assert ADE20K.classes[12] == "person" and ADE20K.person_ids == (12,)
    assert ADE20K.classes[-1] == "flag"


def test_ade20k_names_follow_object150_info(ade_dir):
    with open(ade_dir / "object150_info.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["Idx"]) for r in rows] == list(range(1, 151))
    for index, (row, name) in enumerate(zip(rows, ADE20K.classes)):
        tokens = row["Name"].split(";")
        # This CSV spells spaces as ';' too, so a multi-word name shows up as its words, first word first.
        words = name.split(" ")
        assert tokens[0] == words[0] and set(words) <= set(tokens), f"{index}: {name!r} vs {row['Name']!r}"


def test_ade20k_palette_is_color150(ade_dir):
    np.testing.assert_array_equal(ADE20K.palette, read_color150(ade_dir / "color150.mat"))


def test_palettes_are_read_only():
    with pytest.raises(ValueError):
        ADE20K.palette[0, 0] = 1


def test_label_set_lookup():
    assert label_set("cityscapes") is CITYSCAPES and label_set(19) is CITYSCAPES
    assert label_set("ADE20K") is ADE20K and label_set(150) is ADE20K
    assert label_set(np.int64(150)) is ADE20K
    assert label_set(21) == generic(21)
    with pytest.raises(ValueError):
        label_set("coco")
    with pytest.raises(ValueError):
        label_set(0)


def test_generic_is_deterministic_and_distinct():
    labels = generic(300)
    assert labels.classes[0] == "class_0" and labels.classes[-1] == "class_299"
    assert labels.palette.shape == (300, 3) and labels.palette.dtype == np.uint8
    assert len({tuple(c) for c in labels.palette}) == 300
    np.testing.assert_array_equal(labels.palette, generic(300).palette)
    assert labels.person_ids == ()
    # The VOC colormap: background black, aeroplane (1) dark red, person (15) (192, 128, 128).
    assert tuple(labels.palette[1]) == (128, 0, 0) and tuple(labels.palette[15]) == (192, 128, 128)


def test_label_set_validates_palette():
    with pytest.raises(ValueError):
        LabelSet(name="bad", classes=("a", "b"), palette=np.zeros((3, 3), np.uint8))
    with pytest.raises(ValueError):
        LabelSet(name="bad", classes=("a",), palette=np.zeros((1, 3), np.uint8), person_ids=(1,))


PALETTE = np.array([(10, 20, 30), (200, 100, 0), (0, 0, 255)], dtype=np.uint8)


def test_colorize_maps_ids_and_blackens_unknown():
    class_map = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    rgb = colorize(class_map, PALETTE)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb, [[(10, 20, 30), (200, 100, 0)], [(0, 0, 255), (0, 0, 0)]])
    np.testing.assert_array_equal(colorize(np.array([[-1, 2]]), PALETTE), [[(0, 0, 0), (0, 0, 255)]])


def test_colorize_rejects_non_integer_maps():
    with pytest.raises(ValueError):
        colorize(np.zeros((2, 2), np.float32), PALETTE)


def test_overlay_blends_and_keeps_unknown_pixels():
    image = np.full((2, 2, 3), 100, dtype=np.uint8)
    class_map = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(overlay(image, class_map, PALETTE, alpha=0.0), image)
    full = overlay(image, class_map, PALETTE, alpha=1.0)
    np.testing.assert_array_equal(full[:1], colorize(class_map, PALETTE)[:1])
    np.testing.assert_array_equal(full[1, 1], image[1, 1])
    half = overlay(image, class_map, PALETTE, alpha=0.5)
    assert half.dtype == np.uint8
    expected = np.rint((image.astype(float) + colorize(class_map, PALETTE)) / 2 + 1e-9)
    np.testing.assert_array_equal(half[0], expected[0])
    np.testing.assert_array_equal(half[1, 0], expected[1, 0])
    np.testing.assert_array_equal(half[1, 1], image[1, 1])


def test_overlay_validates_inputs():
    image = np.zeros((2, 2, 3), dtype=np.uint8)
    with pytest.raises(ValueError):
        overlay(image, np.zeros((3, 2), np.uint8), PALETTE)
    with pytest.raises(ValueError):
        overlay(image, np.zeros((2, 2), np.uint8), PALETTE, alpha=1.5)
    with pytest.raises(ValueError):
        overlay(image.astype(np.float32), np.zeros((2, 2), np.uint8), PALETTE)


def test_overlay_matches_float_reference_on_real_labels():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    class_map = rng.integers(0, 150, (48, 64), dtype=np.uint8)
    out = overlay(image, class_map, ADE20K.palette, alpha=0.4)
    reference = 0.6 * image + 0.4 * colorize(class_map, ADE20K.palette)
    assert np.abs(out.astype(float) - reference).max() <= 1.0


def test_coco_panoptic_label_set_has_the_80_things_first_and_person_at_0():
    from segmerge_ros.models.labels import COCO_PANOPTIC, known_label_set

    assert label_set(133) is COCO_PANOPTIC and label_set("coco_panoptic") is COCO_PANOPTIC
    assert known_label_set(133) is COCO_PANOPTIC and known_label_set(21) is None
    assert len(set(COCO_PANOPTIC.classes)) == 133 and COCO_PANOPTIC.person_ids == (0,)
    assert COCO_PANOPTIC.classes[79] == "toothbrush" and COCO_PANOPTIC.classes[80] == "banner"
    assert COCO_PANOPTIC.classes[-1] == "rug-merged"

