"""The segmentation engine: one RGB frame in, a class map and a confidence map at the frame's resolution out.

Pre-processing: optional resize to the network's input size, ImageNet normalisation. Post-processing: the class map
is the arg-max of the head's logits upsampled bilinearly to the frame's resolution (``upsample="logits"``, the
default): boundaries follow the logits' smooth transitions instead of 4x4 blocks (computed exactly, interpolating
all classes only at boundary cells: ``upsampled_argmax``). ``upsample="labels"`` takes the arg-max at the logits'
resolution and upsamples labels (nearest): cheaper still, but blocky edges.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, replace

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..merging.segformerpp import LADDER, MAX_MERGE_RATE, NONE, MergeConfig, preset, rung_for_rate
from ..merging.vit_methods import build_vit_model, is_vit_model_name, load_vit_model, parse_vit_name
from .backends import make_backend
from ..models.checkpoints import load_segformer
from ..models.labels import LabelSet, label_set
from ..models.segformer import SegFormer, mit_config

LOG = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class SegmentationResult:
    class_map: np.ndarray  # (H, W) uint8 class ids at the input resolution
    confidence: np.ndarray  # (H, W) uint8, max softmax probability * 255
    inference_ms: float  # pre-processing + model + post-processing
    merge_rate: float
    merge_name: str


def parse_size(text: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """"512x1024" (height x width) -> (512, 1024); "" or None -> None (the frame's own size)."""
    if text is None or text == "":
        return None
    if isinstance(text, (tuple, list)):
        height, width = (int(v) for v in text)
    else:
        parts = str(text).lower().replace(",", "x").split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"size must look like HEIGHTxWIDTH (e.g. 512x1024), got {text!r}")
        height, width = (int(p) for p in parts)
    if height < 32 or width < 32:
        raise ValueError(f"size {height}x{width} is too small (at least 32x32)")
    return height, width


def to_tensor(rgb: np.ndarray, size: tuple[int, int] | None, device: torch.device) -> torch.Tensor:
    """HxWx3 uint8 RGB -> (1, 3, h, w) normalised float tensor, resized to ``size`` when given."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got shape {rgb.shape} dtype {rgb.dtype}")
    if size is not None and rgb.shape[:2] != size:
        rgb = cv2.resize(rgb, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    pixels = torch.from_numpy(np.ascontiguousarray(rgb)).to(device).permute(2, 0, 1).float().unsqueeze(0)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255.0
    return (pixels - mean) / std


def _bilinear_taps(source: int, target: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per output index: the two source indices and the weight of the second, as F.interpolate's bilinear mode
    with align_corners=False computes them (source coordinate clamped at 0, the last index repeated at the edge)."""
    position = ((torch.arange(target, device=device, dtype=torch.float32) + 0.5) * (source / target) - 0.5).clamp(min=0)
    first = position.floor().long().clamp(max=source - 1)
    second = (first + 1).clamp(max=source - 1)
    return first, second, position - first


def upsampled_argmax(logits: torch.Tensor, labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Arg-max of the bilinearly upsampled (K, h, w) logits at ``size``, without upsampling all K channels.

    Bilinear interpolation is a convex combination of a cell's four corners, so where one class is the arg-max at
    all four corners it is the arg-max everywhere inside the cell. Only pixels of cells whose corners disagree (the
    class boundaries, typically a few per cent) are interpolated over the K channels. ``labels`` is the arg-max at
    (h, w). Same result as ``F.interpolate(...).argmax`` up to floating-point ties.
    """
    _, height, width = logits.shape
    y0, y1, wy = _bilinear_taps(height, size[0], logits.device)
    x0, x1, wx = _bilinear_taps(width, size[1], logits.device)
    out = labels[y0][:, x0]
    corners_agree = (labels[y0][:, x1] == out) & (labels[y1][:, x0] == out) & (labels[y1][:, x1] == out)
    rows, cols = torch.nonzero(~corners_agree, as_tuple=True)
    if rows.numel():
        ry0, ry1, rwy = y0[rows], y1[rows], wy[rows].unsqueeze(1)
        cx0, cx1, cwx = x0[cols], x1[cols], wx[cols].unsqueeze(1)
        flat = logits.permute(1, 2, 0)  # (h, w, K): one gather per corner
        top = flat[ry0, cx0] * (1 - cwx) + flat[ry0, cx1] * cwx
        bottom = flat[ry1, cx0] * (1 - cwx) + flat[ry1, cx1] * cwx
        out[rows, cols] = (top * (1 - rwy) + bottom * rwy).argmax(dim=1)
    return out


def logits_to_maps(logits: torch.Tensor, size: tuple[int, int], upsample: str = "logits") -> tuple[np.ndarray, np.ndarray]:
    """(1, K, h, w) logits -> (class map uint8, confidence uint8) at ``size``.

    The confidence (max softmax probability) is computed at the logits' own resolution and upsampled as one
    channel: a smooth map does not need K channels upsampled (that cost 20 ms of 45 at 576x768 on 2 cores).
    """
    best, labels = logits.max(dim=1)
    # max softmax probability = 1 / sum(exp(l - l_max)): no full softmax tensor needed.
    confidence = 1.0 / torch.exp(logits - best.unsqueeze(1)).sum(dim=1)
    if upsample == "logits":
        labels = upsampled_argmax(logits[0], labels[0], size).unsqueeze(0)
        confidence = F.interpolate(confidence.unsqueeze(1), size=size, mode="bilinear", align_corners=False)[:, 0]
    elif upsample == "labels":
        stacked = F.interpolate(torch.stack([labels.float(), confidence], dim=1), size=size, mode="nearest")
        labels, confidence = stacked[:, 0].long(), stacked[:, 1]
    else:
        raise ValueError(f"upsample must be 'logits' or 'labels', got {upsample!r}")
    class_map = labels[0].to(torch.uint8).cpu().numpy()
    confidence_u8 = (confidence[0] * 255.0 + 0.5).clamp(0, 255).to(torch.uint8).cpu().numpy()
    return class_map, confidence_u8


class SegmentationEngine:
    """Frame in, result out; the merge configuration can change between any two calls (thread-safe).

    ``model`` names a SegFormer size (``segformer-b0`` .. ``b5``: Segformer++ merging, the merge-rate ladder) or a
    plain-ViT family (``<segmenter|algm|clustvit|dovit>-vit-<t|s|b|l>[-linear|-mask]``: ``merge_rate`` maps onto
    the method's own control, see ``merging/vit_methods.py``; presets are SegFormer's only).
    """

    def __init__(
        self,
        model: str = "segformer-b0",
        weights: str | None = None,
        device: str = "cpu",
        backend: str = "eager",
        input_size: str | tuple[int, int] | None = None,
        preset: str = "none",
        upsample: str = "logits",
        num_classes: int = 19,
        precision: str = "fp32",
        cache_dir: str | None = None,
    ):
        self.device = _pick_device(device)
        self.input_size = parse_size(input_size)
        self.upsample = upsample
        self.randomly_initialised = not weights
        self.family = "segformer"
        if is_vit_model_name(model):
            self.family = parse_vit_name(model)[0]
            if weights:
                self.model = load_vit_model(weights, family=self.family)
            else:
                torch.manual_seed(0)
                self.model = build_vit_model(model, num_classes=num_classes).eval()
            self.labels: LabelSet = label_set(self.model.config.labels)
        elif weights:
            loaded = load_segformer(weights, size=model)
            self.model = loaded.model
            self.labels = loaded.labels
        else:
            torch.manual_seed(0)
            self.model = SegFormer(mit_config(model, num_classes=num_classes)).eval().fold_head()
            self.labels = label_set(num_classes)
        self.model.to(self.device)
        self._lock = threading.Lock()
        self._merge: MergeConfig = NONE
        self._merge_rate = 0.0
        self._vit_rate_applied: float | None = None
        self.set_preset(preset)
        if not self.is_segformer and backend != "eager":
            # ALGM, ClustViT and DoViT have content-dependent token counts: no static graph to compile.
            LOG.warning("backend %r serves SegFormer models only; running %s eagerly", backend, self.family)
            backend = "eager"
        ladder = [rung.config for rung in LADDER]
        self._backend = make_backend(backend, self.model, self.device, precision=precision,
                                     input_size=self.input_size, ladder_configs=ladder, cache_dir=cache_dir,
                                     model_name=model, log=LOG)
        self.backend = self._backend.name  # the backend actually in use (eager after a fallback)
        if self.backend != "eager":
            if self.input_size is None:
                LOG.warning("backend %s without a fixed input_size: each new frame size and rung is prepared on "
                            "first use and stalls that frame", self.backend)
            else:
                self._backend.warm(configs=ladder + [self._merge])  # a rate switch never stalls a frame

    @property
    def is_segformer(self) -> bool:
        return self.family == "segformer"

    @property
    def merge_rate(self) -> float:
        return self._merge_rate

    @property
    def ladder_rates(self) -> list[float]:
        """The merge rates at which the configuration changes (SegFormer's rungs; ViT methods are continuous)."""
        return [rung.rate for rung in LADDER] if self.is_segformer else []

    @property
    def merge_config(self) -> MergeConfig:
        return self._merge

    def set_merge_rate(self, rate: float) -> None:
        """Set the scalar merge rate in [0, 0.95] (a rung of ``LADDER``); applied from the next ``infer``."""
        rate = float(rate)
        if not 0.0 <= rate <= MAX_MERGE_RATE:
            raise ValueError(f"merge_rate must lie in [0, {MAX_MERGE_RATE}], got {rate}")
        rung = rung_for_rate(rate)
        config = rung.config if self.is_segformer else replace(NONE, name=f"{self.family} rate={rate:g}")
        with self._lock:
            self._merge, self._merge_rate = config, rate

    def set_preset(self, name: str) -> None:
        """Use a named Segformer++ preset ("none", "hq", "fast", "2x2") instead of the scalar rate."""
        config = preset(name)
        if not self.is_segformer and name != "none":
            raise ValueError(f"preset {name!r} is a SegFormer merge preset; {self.family} models take merge_rate")
        with self._lock:
            self._merge = config
            self._merge_rate = 0.0 if name == "none" else float("nan")

    def set_merge_config(self, config: MergeConfig, rate: float = float("nan")) -> None:
        with self._lock:
            self._merge, self._merge_rate = config, rate

    def _run(self, pixels: torch.Tensor, merge: MergeConfig, rate: float) -> torch.Tensor:
        if self.is_segformer:
            return self._backend.run(pixels, merge)
        # ViT methods hold their control as state: change it here, on the inferring thread, between frames.
        rate = 0.0 if math.isnan(rate) else rate
        if rate != self._vit_rate_applied:
            self.model.set_merge_rate(rate)
            self._vit_rate_applied = rate
        return self.model.segment(pixels)

    @torch.inference_mode()
    def logits(self, rgb: np.ndarray, merge: MergeConfig | None = None) -> torch.Tensor:
        """The raw logits for ``rgb`` at the network's input size (1/4 of it for SegFormer)."""
        with self._lock:
            current, rate = self._merge, self._merge_rate
        return self._run(to_tensor(rgb, self.input_size, self.device), merge if merge is not None else current, rate)

    @torch.inference_mode()
    def infer(self, rgb: np.ndarray) -> SegmentationResult:
        start = time.perf_counter()
        with self._lock:
            merge, rate = self._merge, self._merge_rate
        logits = self._run(to_tensor(rgb, self.input_size, self.device), merge, rate)
        class_map, confidence = logits_to_maps(logits, rgb.shape[:2], self.upsample)
        return SegmentationResult(class_map, confidence, (time.perf_counter() - start) * 1e3, rate, merge.name)


def _pick_device(device: str) -> torch.device:
    if device.startswith("cuda") and not torch.cuda.is_available():
        LOG.warning("device %r requested but CUDA is not available; using the CPU", device)
        return torch.device("cpu")
    return torch.device(device)
