"""Human pose on the people the segmentation found: person boxes, crops, one batched forward, decoding, drawing.

Geometry (mmpose top-down conventions, pixel centres at integer coordinates as in OpenCV):

* box (x1, y1, x2, y2) -> centre ((x1+x2)/2, (y1+y2)/2) and scale (w, h) * padding (1.25), then the scale is
  enlarged to the crop's aspect ratio (288/384), never shrunk;
* the crop is the affine map x_crop = (x - cx) * W / sw + W / 2 (likewise y), applied with cv2.warpAffine
  (bilinear, zero border): parts of the crop outside the image are black;
* heatmaps are at 1/4 of the crop, and heatmap coordinates map to crop coordinates by x_crop = 4 * x_hm (mmpose's
  MSRAHeatmap codec convention, which the checkpoints were trained with);
* decoding is arg-max plus sub-pixel refinement: ``"dark"`` (default: a Newton step on the log heatmap, optionally
  after Gaussian modulation; exact for a Gaussian peak), ``"quarter"`` (mmpose's quarter-pixel shift toward the
  higher neighbour) or ``"argmax"``; the score of a keypoint is its heatmap maximum.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from segmerge_ros.models.pose.model import (
    COCO_FLIP_INDICES,
    COCO_KEYPOINT_SIDES,
    COCO_SKELETON,
    POSE_HEATMAP_STRIDE,
    POSE_INPUT_SIZE,
    POSE_MEAN,
    POSE_STD,
)

BBOX_PADDING = 1.25
POSE_MODES = ("segmentation", "full_frame")
DECODE_METHODS = ("dark", "quarter", "argmax")


# --------------------------------------------------------------------------------------------------- geometry
def box_to_center_scale(boxes: np.ndarray, input_size: tuple[int, int] = POSE_INPUT_SIZE,
                        padding: float = BBOX_PADDING) -> tuple[np.ndarray, np.ndarray]:
    """(N, 4) xyxy boxes -> centres (N, 2) and crop scales (N, 2) in image pixels, padded and at the crop's aspect."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    center = np.stack([(boxes[:, 0] + boxes[:, 2]) * 0.5, (boxes[:, 1] + boxes[:, 3]) * 0.5], axis=1)
    scale = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=1) * padding
    return center, fix_aspect_ratio(scale, input_size[0] / input_size[1])


def fix_aspect_ratio(scale: np.ndarray, aspect: float) -> np.ndarray:
    """Enlarge (w, h) scales so that w / h == aspect (mmpose ``_fix_aspect_ratio``)."""
    scale = np.asarray(scale, dtype=np.float64).reshape(-1, 2)
    w, h = scale[:, 0], scale[:, 1]
    wide = w > h * aspect
    return np.stack([np.where(wide, w, h * aspect), np.where(wide, w / aspect, h)], axis=1)


def crop_matrices(center: np.ndarray, scale: np.ndarray, input_size: tuple[int, int] = POSE_INPUT_SIZE) -> np.ndarray:
    """(N, 2, 3) affine matrices image -> crop for cv2.warpAffine."""
    center = np.asarray(center, dtype=np.float64).reshape(-1, 2)
    scale = np.asarray(scale, dtype=np.float64).reshape(-1, 2)
    out_w, out_h = input_size
    sx, sy = out_w / scale[:, 0], out_h / scale[:, 1]
    m = np.zeros((len(center), 2, 3))
    m[:, 0, 0] = sx
    m[:, 0, 2] = out_w * 0.5 - center[:, 0] * sx
    m[:, 1, 1] = sy
    m[:, 1, 2] = out_h * 0.5 - center[:, 1] * sy
    return m


def image_to_crop(points: np.ndarray, center: np.ndarray, scale: np.ndarray,
                  input_size: tuple[int, int] = POSE_INPUT_SIZE) -> np.ndarray:
    """(N, K, 2) image pixels -> crop pixels."""
    points = np.asarray(points, dtype=np.float64)
    size = np.asarray(input_size, dtype=np.float64)
    return (points - center[:, None, :]) * (size / scale)[:, None, :] + size * 0.5


def crop_to_image(points: np.ndarray, center: np.ndarray, scale: np.ndarray,
                  input_size: tuple[int, int] = POSE_INPUT_SIZE) -> np.ndarray:
    """(N, K, 2) crop pixels -> image pixels (the inverse of image_to_crop)."""
    points = np.asarray(points, dtype=np.float64)
    size = np.asarray(input_size, dtype=np.float64)
    return (points - size * 0.5) * (scale / size)[:, None, :] + center[:, None, :]


def heatmap_to_image(points: np.ndarray, center: np.ndarray, scale: np.ndarray,
                     input_size: tuple[int, int] = POSE_INPUT_SIZE, stride: int = POSE_HEATMAP_STRIDE) -> np.ndarray:
    """(N, K, 2) heatmap coordinates -> image pixels (x_crop = stride * x_hm, then the inverse crop)."""
    return crop_to_image(np.asarray(points, dtype=np.float64) * stride, center, scale, input_size)


def image_to_heatmap(points: np.ndarray, center: np.ndarray, scale: np.ndarray,
                     input_size: tuple[int, int] = POSE_INPUT_SIZE, stride: int = POSE_HEATMAP_STRIDE) -> np.ndarray:
    """(N, K, 2) image pixels -> heatmap coordinates."""
    return image_to_crop(points, center, scale, input_size) / stride


def crop_people(rgb: np.ndarray, center: np.ndarray, scale: np.ndarray,
                input_size: tuple[int, int] = POSE_INPUT_SIZE) -> np.ndarray:
    """(N, H, W, 3) uint8 crops (bilinear, black outside the image)."""
    mats = crop_matrices(center, scale, input_size)
    out = np.zeros((len(mats), input_size[1], input_size[0], 3), dtype=np.uint8)
    for i, m in enumerate(mats):
        cv2.warpAffine(rgb, m, input_size, dst=out[i], flags=cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
    return out


# --------------------------------------------------------------------------------------------------- heatmaps
def render_heatmaps(points: np.ndarray, heatmap_size: tuple[int, int], sigma: float = 2.0,
                    valid: np.ndarray | None = None) -> np.ndarray:
    """Unit-peak Gaussians at sub-pixel heatmap coordinates: (N, K, 2) -> (N, K, h, w) float32.

    The unbiased encoding (centre not rounded); invalid keypoints give all-zero maps.
    """
    points = np.asarray(points, dtype=np.float64)
    w, h = heatmap_size
    xs = np.arange(w, dtype=np.float64)
    ys = np.arange(h, dtype=np.float64)
    gx = np.exp(-((xs[None, None, :] - points[..., 0:1]) ** 2) / (2 * sigma**2))  # (N, K, w)
    gy = np.exp(-((ys[None, None, :] - points[..., 1:2]) ** 2) / (2 * sigma**2))  # (N, K, h)
    maps = gy[..., :, None] * gx[..., None, :]
    if valid is not None:
        maps *= np.asarray(valid, dtype=bool)[..., None, None]
    return maps.astype(np.float32)


def _modulate(heatmaps: np.ndarray, kernel: int) -> np.ndarray:
    """DARK's distribution modulation: Gaussian blur of each map, rescaled to its original maximum."""
    flat = heatmaps.reshape(-1, *heatmaps.shape[-2:])
    out = np.empty_like(flat)
    for i, hm in enumerate(flat):
        peak = hm.max()
        blurred = cv2.GaussianBlur(hm, (kernel, kernel), 0, borderType=cv2.BORDER_CONSTANT)  # zeros outside
        bmax = blurred.max()
        out[i] = blurred * (peak / bmax) if bmax > 0 else blurred
    return out.reshape(heatmaps.shape)


def decode_heatmaps(heatmaps: np.ndarray, method: str = "dark",
                    blur_kernel: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N, K, h, w) heatmaps -> keypoints (N, K, 2) in heatmap coordinates (float32) and scores (N, K).

    ``blur_kernel`` (odd, 0 = off) applies DARK's Gaussian modulation before the ``"dark"`` refinement; scores are
    always the raw heatmap maxima.
    """
    if method not in DECODE_METHODS:
        raise ValueError(f"unknown decode method {method!r}; use one of {DECODE_METHODS}")
    heatmaps = np.asarray(heatmaps, dtype=np.float32)
    n, k, h, w = heatmaps.shape
    flat = heatmaps.reshape(n * k, h * w)
    idx = flat.argmax(axis=1)
    scores = flat[np.arange(n * k), idx]
    x = idx % w
    y = idx // w
    coords = np.stack([x, y], axis=1).astype(np.float64)

    if method == "quarter":
        maps = heatmaps.reshape(n * k, h, w)
        rows = np.arange(n * k)
        ok_x = (x > 0) & (x < w - 1)
        ok_y = (y > 0) & (y < h - 1)
        dx = maps[rows, y, np.minimum(x + 1, w - 1)] - maps[rows, y, np.maximum(x - 1, 0)]
        dy = maps[rows, np.minimum(y + 1, h - 1), x] - maps[rows, np.maximum(y - 1, 0), x]
        coords[:, 0] += np.where(ok_x, np.sign(dx) * 0.25, 0.0)
        coords[:, 1] += np.where(ok_y, np.sign(dy) * 0.25, 0.0)
    elif method == "dark":
        maps = heatmaps if blur_kernel <= 1 else _modulate(heatmaps, blur_kernel | 1)
        logm = np.log(np.maximum(maps.reshape(n * k, h, w).astype(np.float64), 1e-10))
        padded = np.pad(logm, ((0, 0), (1, 1), (1, 1)), mode="edge")
        rows = np.arange(n * k)
        px, py = x + 1, y + 1

        def at(ddx: int, ddy: int) -> np.ndarray:
            return padded[rows, py + ddy, px + ddx]

        c = at(0, 0)
        gx = 0.5 * (at(1, 0) - at(-1, 0))
        gy = 0.5 * (at(0, 1) - at(0, -1))
        hxx = at(1, 0) - 2 * c + at(-1, 0)
        hyy = at(0, 1) - 2 * c + at(0, -1)
        hxy = 0.25 * (at(1, 1) - at(-1, 1) - at(1, -1) + at(-1, -1))
        det = hxx * hyy - hxy * hxy
        interior = (x > 0) & (x < w - 1) & (y > 0) & (y < h - 1)
        # A maximum: negative-definite Hessian.
        ok = interior & (det > 1e-12) & (hxx < 0) & (scores > 0)
        safe = np.where(ok, det, 1.0)
        off_x = -(hyy * gx - hxy * gy) / safe
        off_y = -(-hxy * gx + hxx * gy) / safe
        coords[:, 0] += np.where(ok, np.clip(off_x, -1.0, 1.0), 0.0)
        coords[:, 1] += np.where(ok, np.clip(off_y, -1.0, 1.0), 0.0)
    return coords.reshape(n, k, 2).astype(np.float32), scores.reshape(n, k).astype(np.float32)


# --------------------------------------------------------------------------------------------------- people
def person_boxes_from_segmentation(class_map: np.ndarray, person_ids: Sequence[int], min_area: int = 400,
                                   max_persons: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Person boxes from a class map: connected components (8-connected) of the person classes.

    Returns boxes (N, 4) float32 xyxy (x2, y2 exclusive) and areas (N,) int64, largest first, components smaller
    than ``min_area`` pixels dropped, at most ``max_persons``. People who touch in the mask form one component.
    """
    ids = np.asarray(list(person_ids), dtype=np.int64)
    if ids.size == 0:
        return np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)
    mask = np.isin(np.asarray(class_map), ids).astype(np.uint8)
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    stats = stats[1:count].astype(np.int64)  # label 0 is the background
    areas = stats[:, cv2.CC_STAT_AREA]
    keep = areas >= max(int(min_area), 1)
    stats, areas = stats[keep], areas[keep]
    order = np.argsort(-areas, kind="stable")
    if max_persons is not None:
        order = order[: max(int(max_persons), 0)]
    stats, areas = stats[order], areas[order]
    x, y = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
    boxes = np.stack([x, y, x + stats[:, cv2.CC_STAT_WIDTH], y + stats[:, cv2.CC_STAT_HEIGHT]], axis=1)
    return boxes.astype(np.float32).reshape(-1, 4), areas


# --------------------------------------------------------------------------------------------------- estimator
@dataclass
class PoseResult:
    """Keypoints of the people in one frame, in image pixels (COCO-17 order)."""

    keypoints: np.ndarray  # (P, 17, 2) float32 (x, y) pixels
    scores: np.ndarray  # (P, 17) float32 heatmap maxima
    boxes: np.ndarray  # (P, 4) float32 xyxy person boxes (from the segmentation, or the full frame)
    pose_ms: float = 0.0
    keypoint_threshold: float = 0.3

    @property
    def num_persons(self) -> int:
        return int(self.keypoints.shape[0])

    @property
    def visible(self) -> np.ndarray:
        """(P, 17) bool: score >= keypoint_threshold."""
        return self.scores >= self.keypoint_threshold

    @staticmethod
    def empty(num_keypoints: int = 17, pose_ms: float = 0.0, keypoint_threshold: float = 0.3) -> "PoseResult":
        return PoseResult(np.zeros((0, num_keypoints, 2), np.float32), np.zeros((0, num_keypoints), np.float32),
                          np.zeros((0, 4), np.float32), pose_ms, keypoint_threshold)


def encoder_settings(config):
    """The part of a MergeConfig that pose's encoder uses: its per-stage settings, as the preset with the same stages
    where there is one (so rungs that differ only in head or input scale share one compiled pose graph); None when
    no stage merges."""
    from segmerge_ros.merging.segformerpp import PRESETS, MergeConfig

    if config is None or all(stage.is_identity for stage in config.stages):
        return None
    same = [candidate for candidate in PRESETS.values() if candidate.stages == config.stages]
    return same[0] if same else MergeConfig(config.stages, name=config.name)


class PoseEstimator:
    """Top-down pose on person crops, batched, with the segmentation's token-merging setting.

    ``model`` is a name (``"segformer-b0"`` ...) or a SegformerPose (any module with ``input_size``,
    ``heatmap_size``, ``num_keypoints`` and ``forward(pixels, merge=None)`` does); ``weights`` a Segformer++ mmpose
    ``.pth``.
    ``mode="segmentation"`` takes person boxes from the class map; ``"full_frame"`` treats the whole frame as one
    person (single-person cameras) and ignores the class map. ``input_size`` (w, h; multiples of 32) is the crop
    of a model built by name (a module passed in keeps its own).
    """

    def __init__(self, model="segformer-b0", weights=None, device: str = "cpu", merge_rate: float = 0.0,
                 preset: str = "none", max_persons: int = 4, min_person_area: int = 400,
                 keypoint_threshold: float = 0.3, mode: str = "segmentation", padding: float = BBOX_PADDING,
                 decode: str = "dark", blur_kernel: int = 11, flip_test: bool = False,
                 input_size: tuple[int, int] = POSE_INPUT_SIZE, backend: str = "eager", precision: str = "fp32",
                 cache_dir: str | None = None, cache_max_mb: float | None = None) -> None:
        import torch

        from segmerge_ros.inference.backends.auto import AUTO
        from segmerge_ros.inference.backends.registry import auto_candidates, make_backend, split_device
        from segmerge_ros.inference.ladder import precision_plan

        from segmerge_ros.models.pose.model import SegformerPose, build_pose_model, load_pose_checkpoint

        if mode not in POSE_MODES:
            raise ValueError(f"unknown pose mode {mode!r}; use one of {POSE_MODES}")
        if decode not in DECODE_METHODS:
            raise ValueError(f"unknown decode method {decode!r}; use one of {DECODE_METHODS}")
        self._torch = torch
        device, openvino_device = split_device(str(device), backend)
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"  # as the segmentation engine: fall back rather than fail on a CPU-only machine
        self.device = torch.device(device)
        if isinstance(model, torch.nn.Module):  # a SegformerPose, or any module with its interface
            self.model = model
            if weights is not None:
                if not isinstance(model, SegformerPose):
                    raise ValueError("weights can only be loaded into a SegformerPose")
                load_pose_checkpoint(model, weights)
        else:
            self.model = build_pose_model(model, weights, input_size)
        self.randomly_initialised = weights is None
        self.model.eval().to(self.device)
        self.input_size = self.model.input_size
        self.heatmap_size = self.model.heatmap_size
        # The segmentation's backend and precision (pose has no rate 0 to keep exact: "auto" means the half
        # precision wherever the hardware has it). Compiled backends hold one graph per batch size: crops go
        # through the batch-1 graph one at a time; eager takes them as one batch.
        model_name = f"pose-{model}" if isinstance(model, str) else "pose-custom"

        def make(name: str):
            plan, half = precision_plan(precision, self.device, openvino_device if name == "openvino" else None)
            return make_backend(name, self.model, self.device, precision="fp32" if plan == "fp32" else half,
                                input_size=(self.input_size[1], self.input_size[0]), cache_dir=cache_dir,
                                model_name=model_name, openvino_device=openvino_device, cache_max_mb=cache_max_mb)

        self.backend_choice = None  # backend auto: what it chose and why
        candidates = auto_candidates(self.device, openvino_device) if backend == AUTO else [backend]
        if len(candidates) > 1:  # backend auto on a CPU: the one measured fastest on a crop (backends/auto.py)
            self._backend = self._choose_backend(candidates, make, model_name, precision, cache_dir)
        else:
            self._backend = make(candidates[0])
        self.backend = self._backend.name
        self.precision = self._backend.precision
        self.mode = mode
        self.padding = float(padding)
        self.decode = decode
        self.blur_kernel = int(blur_kernel)
        self.flip_test = bool(flip_test)
        self.max_persons = int(max_persons)
        self.min_person_area = int(min_person_area)
        self.keypoint_threshold = float(keypoint_threshold)
        self._mean, self._std = torch.tensor(POSE_MEAN), torch.tensor(POSE_STD)
        self._merge = None
        self._merge_rate = 0.0
        self._preset = "none"
        if preset != "none":
            self.set_preset(preset)
        else:
            self.set_merge_rate(merge_rate)

    def _choose_backend(self, candidates, make, model_name: str, precision: str, cache_dir: str | None):
        """``backend: auto``: the candidate that runs one unmerged crop fastest here (or the remembered choice)."""
        import logging
        import statistics

        from segmerge_ros.inference.backends.auto import choice_fields, choose_backend
        from segmerge_ros.inference.backends.cache import default_cache_dir
        from segmerge_ros.merging.segformerpp import NONE

        made = {}
        pixels = self._torch.zeros((1, 3, self.input_size[1], self.input_size[0]), device=self.device)

        def measure(name: str) -> list[float]:
            backend = made.setdefault(name, make(name))
            times = []
            for index in range(4):  # the first call compiles
                start = time.perf_counter()
                backend.run(pixels, NONE)
                times.append((time.perf_counter() - start) * 1e3)
            if backend.name != name or getattr(backend, "eager_rungs", []):  # a silent fallback: not its figures
                raise RuntimeError(f"{name} fell back to {backend.name}")
            return [statistics.median(times[1:])]

        fields = choice_fields(model_name, self.input_size, precision)
        log = logging.getLogger(__name__)
        choice = choose_backend(candidates, measure, fields, cache_dir or default_cache_dir(), log)
        log.info("pose backend auto: %s", choice.reason)
        self.backend_choice = choice
        return made.get(choice.name) or make(choice.name)

    # -- merging (same knobs as the segmentation engine)
    @property
    def merge_rate(self) -> float:
        return self._merge_rate

    @property
    def preset(self) -> str:
        """Name of the merge configuration in use ("none" when the encoder runs unmerged)."""
        return self._preset

    @property
    def merge_config(self):
        """The MergeConfig passed to the encoder (None = unmerged)."""
        return self._merge

    def set_merge_rate(self, rate: float) -> None:
        """The segmentation's scalar merge rate in [0, 0.95]: the encoder stages of the same ladder rung."""
        from segmerge_ros.merging.segformerpp import MAX_MERGE_RATE, rung_for_rate

        rate = float(rate)
        if not 0.0 <= rate <= MAX_MERGE_RATE:
            raise ValueError(f"merge rate {rate} outside [0, {MAX_MERGE_RATE}]")
        self.set_merge_config(rung_for_rate(rate).config, rate)

    def set_preset(self, name: str) -> None:
        """A named Segformer++ preset ("none", "hq", "fast", "2x2"); ValueError for an unknown name."""
        from segmerge_ros.merging.segformerpp import preset

        self.set_merge_config(preset(name), 0.0 if name == "none" else float("nan"))

    def set_merge_config(self, config, rate: float = float("nan")) -> None:
        """Use exactly this MergeConfig, e.g. the segmentation engine's current ``engine.merge_config``.

        Only its per-stage encoder settings apply: ``head_stride`` and ``input_scale`` concern the segmentation
        head and input, and pose crops are always ``input_size``.
        """
        config = encoder_settings(config)  # e.g. None for the ladder's "head2" rung: nothing for the encoder to merge
        self._merge = config
        self._merge_rate = float(rate)
        self._preset = "none" if config is None else config.name

    # -- people
    def person_boxes(self, image_shape: tuple[int, ...], class_map: np.ndarray | None,
                     person_ids: Sequence[int]) -> np.ndarray:
        h, w = image_shape[:2]
        if self.mode == "full_frame":
            return np.array([[0.0, 0.0, float(w), float(h)]], dtype=np.float32)
        if class_map is None:
            raise ValueError("pose mode 'segmentation' needs the class map")
        if class_map.shape[:2] != (h, w):
            raise ValueError(f"class map {class_map.shape[:2]} does not match the image {(h, w)}")
        boxes, _ = person_boxes_from_segmentation(class_map, person_ids, self.min_person_area, self.max_persons)
        return boxes

    def preprocess(self, crops: np.ndarray):
        from segmerge_ros.inference.engine import normalise

        return normalise(crops, self._mean, self._std, self.device)

    def forward(self, pixels) -> np.ndarray:
        """Heatmaps (N, K, h, w) of normalised crops, with the flip test when enabled: crops and their mirror
        images in one batch, the mirrored heatmaps flipped back, left/right swapped, shifted one heatmap pixel
        right (mmpose's ``shift_heatmap``), and averaged."""
        if not self.flip_test:
            return self._run(pixels).cpu().numpy()
        n = pixels.shape[0]
        out = self._run(self._torch.cat([pixels, pixels.flip(-1)]))
        plain, flipped = out[:n], out[n:].flip(-1)
        if flipped.shape[1] == len(COCO_FLIP_INDICES):
            flipped = flipped[:, list(COCO_FLIP_INDICES)]
        flipped = self._torch.cat([flipped[..., :1], flipped[..., :-1]], dim=-1)
        return ((plain + flipped) * 0.5).cpu().numpy()

    def _run(self, pixels):
        """Heatmaps (float32) of a batch of normalised crops through the backend, with the current merge setting."""
        from segmerge_ros.merging.segformerpp import NONE

        config = NONE if self._merge is None else self._merge
        if self.backend == "eager":
            return self._backend.run(pixels, config)
        return self._torch.cat([self._backend.run(pixels[i : i + 1], config) for i in range(pixels.shape[0])])

    def limit_compiled(self, limit: int, count: bool = True) -> None:
        """Keep at most ``limit`` compiled encoder settings, the most recently used (0: all; ``count=False``: only
        drop idle ones); see ``PreparedBackend.limit_compiled``."""
        self._backend.limit_compiled(limit, count)

    @property
    def compiled_rungs(self) -> int:
        return self._backend.compiled_count

    @property
    def recompiles(self) -> int:
        return self._backend.recompiles

    def warm(self, configs) -> None:
        """Prepare the compiled graphs of the encoder settings in ``configs`` (MergeConfigs; only their stages
        matter to pose) at batch 1, so that no rate change stalls a frame. Eager needs nothing. The current setting
        goes last: under ``limit_compiled`` the last prepared stay compiled."""
        from segmerge_ros.merging.segformerpp import NONE

        if self.backend == "eager":
            return
        current = NONE if self._merge is None else self._merge  # what _run passes
        distinct = dict.fromkeys(encoder_settings(c) or NONE for c in configs)
        distinct = [c for c in distinct if c != current] + [current] * (current in distinct)
        self._backend.warm(list(distinct), input_shape=(1, 3, self.input_size[1], self.input_size[0]))

    def estimate(self, rgb: np.ndarray, class_map: np.ndarray | None = None,
                 person_ids: Sequence[int] = ()) -> PoseResult:
        """Keypoints of up to ``max_persons`` people (largest first) in an RGB uint8 frame."""
        t0 = time.perf_counter()
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"pose needs an HxWx3 uint8 RGB frame, got {rgb.dtype} {rgb.shape}")
        boxes = self.person_boxes(rgb.shape, class_map, person_ids)
        return self.estimate_boxes(rgb, boxes, 1.0 if self.mode == "full_frame" else self.padding, t0)

    def estimate_boxes(self, rgb: np.ndarray, boxes: np.ndarray, padding: float | None = None,
                       started: float | None = None) -> PoseResult:
        """Keypoints of the people in given xyxy ``boxes`` (N, 4) of an RGB uint8 frame (e.g. ground-truth boxes
        in an evaluation); ``padding`` defaults to the estimator's."""
        t0 = time.perf_counter() if started is None else started
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        if len(boxes) == 0:
            return PoseResult.empty(self.model.num_keypoints, (time.perf_counter() - t0) * 1e3,
                                    self.keypoint_threshold)
        center, scale = box_to_center_scale(boxes, self.input_size, self.padding if padding is None else padding)
        crops = crop_people(np.ascontiguousarray(rgb), center, scale, self.input_size)
        with self._torch.inference_mode():
            heatmaps = self.forward(self.preprocess(crops))
        coords, scores = decode_heatmaps(heatmaps, self.decode, self.blur_kernel)
        stride = self.input_size[0] / heatmaps.shape[-1]
        keypoints = heatmap_to_image(coords, center, scale, self.input_size, stride).astype(np.float32)
        return PoseResult(keypoints, scores, boxes.astype(np.float32), (time.perf_counter() - t0) * 1e3,
                          self.keypoint_threshold)


# --------------------------------------------------------------------------------------------------- drawing
SIDE_COLORS = np.array([[255, 255, 255], [255, 160, 0], [0, 170, 255]], dtype=np.uint8)  # centre, left, right (RGB)


def limb_sides(skeleton: Sequence[tuple[int, int]] = COCO_SKELETON,
               sides: Sequence[int] = COCO_KEYPOINT_SIDES) -> np.ndarray:
    """Side of each limb: left (1) / right (2) when both ends are on that side, else centre (0)."""
    return np.array([sides[a] if sides[a] == sides[b] else 0 for a, b in skeleton], dtype=np.int64)


def draw_skeletons(rgb: np.ndarray, keypoints: np.ndarray, scores: np.ndarray, threshold: float = 0.3,
                   skeleton: Sequence[tuple[int, int]] = COCO_SKELETON, thickness: int | None = None,
                   radius: int | None = None, inplace: bool = False) -> np.ndarray:
    """Draw joints and limbs (left orange, right blue, centre white) whose scores reach ``threshold``."""
    out = rgb if inplace else rgb.copy()
    h, w = out.shape[:2]
    thickness = thickness or max(1, round(max(h, w) / 320))
    radius = radius or thickness + 1
    limb_side = limb_sides(skeleton)
    pts = np.round(np.asarray(keypoints, dtype=np.float64) * 16).astype(np.int64)  # 4 fractional bits
    for person, person_scores in zip(pts, np.asarray(scores)):
        ok = person_scores >= threshold
        for (a, b), side in zip(skeleton, limb_side):
            if ok[a] and ok[b]:
                cv2.line(out, tuple(map(int, person[a])), tuple(map(int, person[b])),
                         tuple(int(c) for c in SIDE_COLORS[side]), thickness, cv2.LINE_AA, shift=4)
        for j in np.flatnonzero(ok):
            cv2.circle(out, tuple(map(int, person[j])), radius * 16,
                       tuple(int(c) for c in SIDE_COLORS[COCO_KEYPOINT_SIDES[j]]), -1, cv2.LINE_AA, shift=4)
    return out
