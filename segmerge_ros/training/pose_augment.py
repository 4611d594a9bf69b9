"""Strong augmentation of person crops for pose distillation, where the teacher labels each AUGMENTED crop.

No label is moved: a crop is made from the frame with the node's crop geometry plus a random augmentation, the
teacher (any object with ``on_image(square_rgb) -> (17, 3)`` normalised y, x, score) sees that crop padded to a
square, and its keypoints in crop pixels are the training target. So rotation, occlusion, blur, downscaling and
colour change the teacher's answer exactly as they change the student's input.

An augmentation is a small record (``CropAugment``, 17 numbers) so that ``augmented_crop(rgb, box, params,
input_size)`` regenerates the same crop at training time from the cached record and the re-read frame.

Order of the operations in ``augmented_crop``:

1. geometry: the node's crop (``box_to_center_scale`` with ``BBOX_PADDING`` at ``input_size``) with its scale
   times ``scale`` (> 1: the person looks smaller), its centre moved by ``shift`` times the crop scale, rotated by
   ``angle`` degrees about the crop centre (positive: counter-clockwise on screen, as ``cv2.getRotationMatrix2D``)
   and mirrored left-right when ``flip`` (crop x -> W - 1 - x); one ``cv2.warpAffine`` (bilinear, black outside);
2. colour: saturation (blend with the pixel's grey), contrast about 128, brightness;
3. low resolution: the crop resized (area) so that the person box is ``low_res_height`` pixels tall, then back
   up (bilinear): vtest-sized people;
4. blur: a Gaussian of ``blur_sigma`` crop pixels;
5. occlusion: a rectangle (fractions of the crop) of one grey level or of uniform noise from ``noise_seed``.

Every operation at its identity value does nothing, so ``CropAugment()`` gives exactly the node's crop.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass, fields

import cv2
import numpy as np

from segmerge_ros.models.pose.model import POSE_INPUT_SIZE
from segmerge_ros.inference.pose import BBOX_PADDING, box_to_center_scale, crop_matrices

OCCLUSION_NONE, OCCLUSION_GREY, OCCLUSION_NOISE = 0, 1, 2


@dataclass(frozen=True)
class CropAugment:
    """One crop's augmentation; the defaults are the identity (the node's crop)."""

    angle: float = 0.0  # degrees, counter-clockwise on screen, about the crop centre
    scale: float = 1.0  # crop scale factor (> 1: zoom out)
    shift_x: float = 0.0  # centre shift, fraction of the crop scale
    shift_y: float = 0.0
    flip: float = 0.0  # 1: mirrored left-right
    occlusion_x: float = 0.0  # rectangle, fractions of the crop width / height
    occlusion_y: float = 0.0
    occlusion_w: float = 0.0
    occlusion_h: float = 0.0
    occlusion_kind: float = OCCLUSION_NONE  # OCCLUSION_NONE, OCCLUSION_GREY or OCCLUSION_NOISE
    occlusion_grey: float = 128.0
    noise_seed: float = 0.0
    blur_sigma: float = 0.0  # crop pixels; 0: none
    low_res_height: float = 0.0  # person height in pixels to pass through; 0: none
    brightness: float = 0.0  # added, 0..255 scale
    contrast: float = 1.0  # about 128
    saturation: float = 1.0  # 0: grey, 1: unchanged

    def to_array(self) -> np.ndarray:
        """The record as float64 numbers in ``PARAM_FIELDS`` order (how the cache stores it)."""
        return np.asarray(astuple(self), dtype=np.float64)

    @staticmethod
    def from_array(row: np.ndarray) -> "CropAugment":
        """The record of a cached row (inverse of ``to_array``)."""
        row = np.asarray(row, dtype=np.float64).reshape(-1)
        if len(row) != len(PARAM_FIELDS):
            raise ValueError(f"an augmentation has {len(PARAM_FIELDS)} numbers, got {len(row)}")
        return CropAugment(*(float(v) for v in row))


PARAM_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(CropAugment))


@dataclass(frozen=True)
class AugmentSettings:
    """How ``sample_augment`` draws augmentations (probabilities and ranges); part of the cache key."""

    rotation_p: float = 0.7
    max_angle: float = 30.0
    scale_range: tuple[float, float] = (0.7, 1.3)
    max_shift: float = 0.1
    flip_p: float = 0.5
    occlusion_p: float = 0.4
    occlusion_area: tuple[float, float] = (0.1, 0.3)  # fraction of the crop's area
    blur_p: float = 0.3
    blur_sigma: tuple[float, float] = (0.6, 2.0)
    low_res_p: float = 0.3
    low_res_height: tuple[float, float] = (40.0, 80.0)
    colour_p: float = 0.8
    max_brightness: float = 25.0
    contrast_range: tuple[float, float] = (0.75, 1.25)
    saturation_range: tuple[float, float] = (0.6, 1.4)


def sample_occlusion(rng: np.random.Generator, area_range: tuple[float, float]) -> dict:
    """A random rectangle (fractions of the crop) covering a share of the crop drawn from ``area_range``."""
    area = rng.uniform(*area_range)
    ratio = rng.uniform(0.5, 2.0)  # width / height, in crop fractions
    width, height = min(np.sqrt(area * ratio), 0.95), min(np.sqrt(area / ratio), 0.95)
    return {"occlusion_x": rng.uniform(0.0, 1.0 - width), "occlusion_y": rng.uniform(0.0, 1.0 - height),
            "occlusion_w": width, "occlusion_h": height,
            "occlusion_kind": float(rng.choice([OCCLUSION_GREY, OCCLUSION_NOISE])),
            "occlusion_grey": float(rng.integers(0, 256)), "noise_seed": float(rng.integers(0, 2**31 - 1))}


def sample_augment(rng: np.random.Generator, settings: AugmentSettings = AugmentSettings()) -> CropAugment:
    """A random ``CropAugment``: scale and shift always, the other operations each with their probability."""
    values: dict = {"scale": rng.uniform(*settings.scale_range),
                    "shift_x": rng.uniform(-settings.max_shift, settings.max_shift),
                    "shift_y": rng.uniform(-settings.max_shift, settings.max_shift)}
    if rng.random() < settings.rotation_p:
        values["angle"] = rng.uniform(-settings.max_angle, settings.max_angle)
    values["flip"] = float(rng.random() < settings.flip_p)
    if rng.random() < settings.occlusion_p:
        values.update(sample_occlusion(rng, settings.occlusion_area))
    if rng.random() < settings.blur_p:
        values["blur_sigma"] = rng.uniform(*settings.blur_sigma)
    if rng.random() < settings.low_res_p:
        values["low_res_height"] = rng.uniform(*settings.low_res_height)
    if rng.random() < settings.colour_p:
        values.update(brightness=rng.uniform(-settings.max_brightness, settings.max_brightness),
                      contrast=rng.uniform(*settings.contrast_range),
                      saturation=rng.uniform(*settings.saturation_range))
    return CropAugment(**{k: float(v) for k, v in values.items()})


def augmented_transform(box: np.ndarray, params: CropAugment,
                        input_size: tuple[int, int] = POSE_INPUT_SIZE) -> np.ndarray:
    """The (3, 3) affine map frame pixels -> augmented crop pixels of an xyxy ``box``."""
    center, scale = box_to_center_scale(np.asarray(box, dtype=np.float64)[None], input_size, BBOX_PADDING)
    scale = scale * params.scale
    center = center + np.array([params.shift_x, params.shift_y]) * scale
    crop = np.vstack([crop_matrices(center, scale, input_size)[0], [0.0, 0.0, 1.0]])
    width, height = input_size
    cos, sin = np.cos(np.radians(params.angle)), np.sin(np.radians(params.angle))
    cx, cy = width * 0.5, height * 0.5
    rotate = np.array([[cos, sin, cx - cos * cx - sin * cy],
                       [-sin, cos, cy + sin * cx - cos * cy],
                       [0.0, 0.0, 1.0]])
    out = rotate @ crop
    if params.flip:
        out = np.array([[-1.0, 0.0, width - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) @ out
    return out


def map_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Points (..., 2) through a (3, 3) affine map."""
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:2, :2].T + matrix[:2, 2]


def augmented_to_image(points: np.ndarray, box: np.ndarray, params: CropAugment,
                       input_size: tuple[int, int] = POSE_INPUT_SIZE) -> np.ndarray:
    """Augmented-crop pixels (..., 2) -> frame pixels (the inverse of the crop's geometry)."""
    return map_points(np.linalg.inv(augmented_transform(box, params, input_size)), points)


def person_height_in_crop(box: np.ndarray, matrix: np.ndarray) -> float:
    """Height in crop pixels of an xyxy box under an isotropic crop map (its scale times the box height)."""
    return float((box[3] - box[1]) * np.sqrt(abs(np.linalg.det(matrix[:2, :2]))))


def adjust_colour(crop: np.ndarray, brightness: float, contrast: float, saturation: float) -> np.ndarray:
    """Saturation (blend with each pixel's grey), contrast about 128 and brightness, clipped to uint8."""
    x = crop.astype(np.float32)
    grey = x.mean(axis=2, keepdims=True)
    x = grey + saturation * (x - grey)
    x = (x - 128.0) * contrast + 128.0 + brightness
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def pass_low_resolution(crop: np.ndarray, factor: float) -> np.ndarray:
    """Resize down by ``factor`` (< 1, area) and back up (bilinear): the detail a smaller person would have."""
    height, width = crop.shape[:2]
    small = (max(1, round(width * factor)), max(1, round(height * factor)))
    down = cv2.resize(crop, small, interpolation=cv2.INTER_AREA)
    return cv2.resize(down, (width, height), interpolation=cv2.INTER_LINEAR)


def occlude(crop: np.ndarray, params: CropAugment) -> np.ndarray:
    """``crop`` with the record's rectangle filled with its grey level or its seeded noise."""
    height, width = crop.shape[:2]
    x0, y0 = int(round(params.occlusion_x * width)), int(round(params.occlusion_y * height))
    x1 = min(width, x0 + max(1, int(round(params.occlusion_w * width))))
    y1 = min(height, y0 + max(1, int(round(params.occlusion_h * height))))
    out = crop.copy()
    if params.occlusion_kind == OCCLUSION_NOISE:
        noise = np.random.default_rng(int(params.noise_seed)).integers(0, 256, (y1 - y0, x1 - x0, 3))
        out[y0:y1, x0:x1] = noise.astype(np.uint8)
    else:
        out[y0:y1, x0:x1] = np.uint8(int(params.occlusion_grey))
    return out


def augmented_crop(rgb: np.ndarray, box: np.ndarray, params: CropAugment,
                   input_size: tuple[int, int] = POSE_INPUT_SIZE) -> np.ndarray:
    """The (H, W, 3) uint8 crop of an xyxy person ``box`` of frame ``rgb`` under ``params`` (see the module doc).

    ``CropAugment()`` gives exactly the node's crop (``crop_people`` of ``box_to_center_scale(box)``).
    """
    box = np.asarray(box, dtype=np.float64).reshape(4)
    matrix = augmented_transform(box, params, input_size)
    crop = cv2.warpAffine(np.ascontiguousarray(rgb), matrix[:2], tuple(input_size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
    if (params.brightness, params.contrast, params.saturation) != (0.0, 1.0, 1.0):
        crop = adjust_colour(crop, params.brightness, params.contrast, params.saturation)
    if params.low_res_height > 0:
        factor = params.low_res_height / max(person_height_in_crop(box, matrix), 1e-6)
        if factor < 1.0:
            crop = pass_low_resolution(crop, factor)
    if params.blur_sigma > 0:
        crop = cv2.GaussianBlur(crop, (0, 0), params.blur_sigma)
    if params.occlusion_kind != OCCLUSION_NONE and params.occlusion_w > 0 and params.occlusion_h > 0:
        crop = occlude(crop, params)
    return crop


def square_pad(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``rgb`` centred on a black square of its longer side, and the (x, y) offset of the image in it."""
    height, width = rgb.shape[:2]
    side = max(height, width)
    x0, y0 = (side - width) // 2, (side - height) // 2
    square = np.zeros((side, side, 3), dtype=np.uint8)
    square[y0:y0 + height, x0:x0 + width] = rgb
    return square, np.array([x0, y0], dtype=np.float64)


def teacher_on_crop(teacher, crop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's keypoints (17, 2) in crop pixels (x, y) and scores (17,) for one crop (or a whole frame).

    The teacher sees the crop centred on a black square (its longer side), as ``teacher_keypoints(...,
    crop="padded")`` shows it the node's crop; ``teacher.on_image`` returns normalised (y, x, score).
    """
    square, offset = square_pad(crop)
    raw = np.asarray(teacher.on_image(square), dtype=np.float64)
    points = raw[:, [1, 0]] * square.shape[0] - offset
    return points.astype(np.float32), raw[:, 2].astype(np.float32)
