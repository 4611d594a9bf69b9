"""The segmentation engine: one RGB frame in, a class map and a confidence map at the frame's resolution out.

Pre-processing: optional resize to the network's input size, ImageNet normalisation. Post-processing: the class map
is the arg-max of the head's logits upsampled bilinearly to the frame's resolution (``upsample="logits"``, the
default): boundaries follow the logits' smooth transitions instead of 4x4 blocks (computed exactly, interpolating
only the classes that can win, only at boundary cells: ``upsampled_argmax``). ``upsample="labels"`` takes the
arg-max at the logits' resolution and upsamples labels (nearest): cheaper still, but blocky edges.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import cv2
import numpy as np
import torch

from segmerge_ros.merging.segformerpp import MAX_MERGE_RATE, NONE, MergeConfig, preset, scaled_size
from segmerge_ros.models.vit.methods import build_vit_model, is_vit_model_name, load_vit_model, parse_vit_name
from segmerge_ros.inference.backends.base import PRECISIONS, autocast, make_backend, split_device
from segmerge_ros.inference.memory import keep_freed_memory
from segmerge_ros.inference.postprocess.upsample import upsampled_argmax, warm_upsampled_argmax
from segmerge_ros.inference.ladder import Step, build_ladder, merge_rungs, precision_plan, step_for_rate, with_precision
from segmerge_ros.models.segformer.checkpoints import load_segformer
from segmerge_ros.models.mask2former.deformable_attention import KNOB_SETTINGS, coarse_layers_for_rate
from segmerge_ros.models.imagenet import IMAGENET_MEAN, IMAGENET_STD
from segmerge_ros.models.labels import LabelSet, label_set
from segmerge_ros.models.mask2former.model import Mask2Former, mask2former_config
from segmerge_ros.models.mask2former.checkpoints import is_mask2former_name, load_mask2former
from segmerge_ros.models.segformer.model import SegFormer, mit_config
from segmerge_ros.inference.postprocess.mask2former import (DETECTIONS_PER_IMAGE, InstanceMap, PanopticSegmentation, instance_id_map,
                               instance_segmentation, panoptic_segmentation, semantic_maps, semantic_scores,
                               thing_classes)

LOG = logging.getLogger(__name__)

_PIXEL_MEAN = torch.tensor(IMAGENET_MEAN) * 255.0  # float32, as the normalisation has always computed them
_PIXEL_STD = torch.tensor(IMAGENET_STD) * 255.0
# precision auto keeps the half precision when its arg-max agrees with fp32 on at least this share of a real frame
AUTO_MIN_AGREEMENT = 0.995


@dataclass
class SegmentationResult:
    class_map: np.ndarray  # (H, W) uint8 class ids at the input resolution
    confidence: np.ndarray | None  # (H, W) uint8, max softmax probability * 255; None when not asked for
    inference_ms: float  # pre-processing + model + post-processing
    merge_rate: float
    merge_name: str
    instances: InstanceMap | None = None  # Mask2Former: the instance id map (mono16) and each id's class and score
    panoptic: PanopticSegmentation | None = None  # Mask2Former with panoptic=True: segment map and segments


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
    return normalise(rgb[None], _PIXEL_MEAN, _PIXEL_STD, device)


def normalise(images: np.ndarray, mean: torch.Tensor, std: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 ``(x - mean) / std`` per channel (mean, std: 3 float32 values)."""
    if device.type != "cpu":  # a quarter of the bytes over the bus: normalise there
        pixels = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float()
        return (pixels - mean.to(device).view(1, 3, 1, 1)) / std.to(device).view(1, 3, 1, 1)
    # numpy, one channel plane at a time: torch's element-wise ops on a frame stall on their thread pool when the
    # robot's other processes hold the cores (measured: 15-45 ms instead of 1.5 on a busy 2-core machine).
    pixels = np.empty((images.shape[0], 3, *images.shape[1:3]), np.float32)
    for channel, (m, s) in enumerate(zip(mean.numpy(), std.numpy())):
        np.subtract(images[..., channel], m, out=pixels[:, channel])
        np.divide(pixels[:, channel], s, out=pixels[:, channel])
    return torch.from_numpy(pixels)


def logits_to_maps(logits: torch.Tensor, size: tuple[int, int], upsample: str = "logits", confidence: bool = True
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """(1, K, h, w) logits -> (class map uint8, confidence uint8 or None without ``confidence``) at ``size``.

    The confidence (max softmax probability) is computed at the logits' own resolution, quantised to uint8 there
    and upsampled as one uint8 channel (OpenCV, bilinear with the same pixel-centre convention; within 1.5 levels of
    upsampling the float map): a smooth map needs neither K channels nor float pixels at camera resolution.
    """
    logits = logits.float()
    if upsample == "logits":
        class_map = upsampled_argmax(logits[0], size)
        interpolation = cv2.INTER_LINEAR
    elif upsample == "labels":
        small = logits[0].argmax(dim=0).to(torch.uint8).cpu().numpy()
        class_map = cv2.resize(small, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
        interpolation = cv2.INTER_NEAREST
    else:
        raise ValueError(f"upsample must be 'logits' or 'labels', got {upsample!r}")
    if not confidence:
        return class_map, None
    # max softmax probability = 1 / sum(exp(l - l_max)): no full softmax tensor needed.
    best = logits.max(dim=1).values
    probability = (1.0 / torch.exp(logits - best.unsqueeze(1)).sum(dim=1))[0].cpu().numpy()
    small = cv2.convertScaleAbs(probability, alpha=255.0)  # rounds and saturates to uint8
    return class_map, cv2.resize(small, (size[1], size[0]), interpolation=interpolation)


class SegmentationEngine:
    """Frame in, result out; the merge configuration can change between any two calls (thread-safe).

    ``model`` names a SegFormer size (``segformer-b0`` .. ``b5``: Segformer++ merging, the merge-rate ladder) or a
    plain-ViT family (``<segmenter|algm|clustvit|dovit>-vit-<t|s|b|l>[-linear|-mask]``: ``merge_rate`` maps onto
    the method's own control, see ``models/vit/methods.py``; presets are SegFormer's only) or a Mask2Former
    (``mask2former-<backbone>[-proscale]``, ``models/mask2former/model.py``: ``merge_rate`` maps onto the pixel-decoder
    encoder's coarse-layer knob, ``coarse_layers_for_rate``; the result also holds instances, thresholded at
    ``instance_score_threshold``, at most ``max_instances``, and with ``panoptic=True`` detectron2's panoptic
    segmentation, stuff and things as ``mask2former_post.thing_classes`` knows them, every class a thing
    otherwise; eager only).

    ``precision``: fp32, bf16, fp16, or auto (fp32 at merge rate 0, the half precision from the first faster step
    on, kept only if it agrees with fp32 on the first real frame: ``inference/ladder.py``). With ``backend="openvino"``
    ``device`` may name an OpenVINO device (CPU, GPU, NPU, AUTO).
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
        warm: bool = True,
        instance_score_threshold: float = 0.5,
        max_instances: int = DETECTIONS_PER_IMAGE,
        panoptic: bool = False,
    ):
        device, openvino_device = split_device(device, backend)
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
        elif is_mask2former_name(model):
            self.family = "mask2former"
            if weights:
                loaded = load_mask2former(weights, expect=model)
                self.model, self.labels = loaded.model, loaded.labels
            else:
                torch.manual_seed(0)
                self.model = Mask2Former(mask2former_config(model, num_classes=num_classes)).eval()
                self.labels = label_set(num_classes)
            self.instance_score_threshold = float(instance_score_threshold)
            self.max_instances = int(max_instances)
            self.thing_ids = thing_classes(self.labels)
            self.panoptic = bool(panoptic)
        elif weights:
            loaded = load_segformer(weights, size=model)
            self.model = loaded.model
            self.labels = loaded.labels
        else:
            torch.manual_seed(0)
            self.model = SegFormer(mit_config(model, num_classes=num_classes)).eval().fold_head()
            self.labels = label_set(num_classes)
        self.model.to(self.device)
        keep_freed_memory()  # no page faults per frame: inference/memory.py
        if self.device.type == "cpu":
            warm_upsampled_argmax()  # compiled (or loaded from numba's cache) now, not on the first frame
        self._lock = threading.Lock()
        self._vit_rate_applied: float | None = None
        if not self.is_segformer and backend != "eager":
            # ALGM, ClustViT and DoViT have content-dependent token counts: no static graph to compile; Mask2Former
            # has no compiled path yet.
            LOG.warning("backend %r serves SegFormer models only; running %s eagerly", backend, self.family)
            backend = "eager"
        plan, half = precision_plan(precision, self.device, openvino_device if backend == "openvino" else None)
        self.precision_plan = plan
        self.ladder: tuple[Step, ...] = build_ladder(merge_rungs(backend), plan, half)
        self._calibration_pending = plan == "auto"
        self._backends = {
            name: make_backend(backend, self.model, self.device, precision=name, input_size=self.input_size,
                               ladder_configs=[network_config(step.config) for step in self.ladder if step.precision == name],
                               cache_dir=cache_dir, model_name=model, log=LOG, openvino_device=openvino_device)
            for name in dict.fromkeys(step.precision for step in self.ladder)
        }
        self.backend = self._backends[self.ladder[0].precision].name  # the backend in use (eager after a fallback)
        self._step = self.ladder[0]
        self._merge: MergeConfig = NONE
        self._merge_rate = 0.0
        self.set_preset(preset)
        self._warmed_sizes: set[tuple[int, int]] = set()
        self._warm_on_new_sizes = self.backend != "eager" and warm and self.input_size is None
        if self.backend != "eager" and warm:
            if self.input_size is None:
                LOG.warning("backend %s without a fixed input_size: the first frame of each new size prepares "
                            "every rung for it (and stalls); set input_size to prepare them at start", self.backend)
            else:
                self.warm()

    @property
    def is_segformer(self) -> bool:
        return self.family == "segformer"

    @property
    def merge_rate(self) -> float:
        return self._merge_rate

    @property
    def ladder_rates(self) -> list[float]:
        """The merge rates at which the configuration changes (SegFormer's steps, Mask2Former's knob settings; ViT
        methods are continuous)."""
        if self.family == "mask2former":
            return [rate for rate, layers in KNOB_SETTINGS if layers < self._full_scale_layers]
        return [step.rate for step in self.ladder] if self.is_segformer else []

    @property
    def _full_scale_layers(self) -> int:
        """Mask2Former: the encoder layers on all three levels, which the knob may run on the coarse ones."""
        return self.model.pixel_level_module.decoder.encoder.full_scale_layers

    def coarse_layers(self, rate: float) -> int:
        """Mask2Former's knob setting for a merge rate."""
        return coarse_layers_for_rate(rate if math.isfinite(rate) else 0.0, self._full_scale_layers)

    @property
    def merge_config(self) -> MergeConfig:
        return self._merge

    @property
    def precision(self) -> str:
        """The precision the next frame is computed in."""
        return self._step.precision

    def warm(self, rates: Iterable[float] | None = None, size: tuple[int, int] | None = None) -> list[Step]:
        """Prepare every step (or those ``rates`` select) and the current preset at ``input_size`` (or the frame
        ``size`` when there is none), so that no rate change stalls a frame; returns the steps prepared."""
        size = self.input_size or size
        if size is None:
            raise ValueError("warm() needs the engine's input_size or a frame size")
        self._warmed_sizes.add(tuple(size))
        steps = list(self.ladder) if rates is None else [step_for_rate(rate, self.ladder) for rate in rates]
        if rates is None and self._step not in self.ladder:  # a preset in use
            steps.append(self._step)
        if self._calibration_pending:  # auto compares these two on the first frame
            steps += self.ladder[:2]
        steps = list(dict.fromkeys(steps))
        for config, precision in [(step.config, step.precision) for step in steps]:
            self._backends[precision].warm(
                [network_config(config)], input_shape=scaled_size(*size, config.input_scale)
            )
        return steps

    @property
    def eager_fallbacks(self) -> str:
        """Empty when every backend is the one asked for and every prepared rung is compiled; else what is not."""
        problems = [f"{name}: {backend.name}" for name, backend in self._backends.items() if backend.name != self.backend]
        problems += [f"{name}: {rung} runs eagerly" for name, backend in self._backends.items()
                     for rung in getattr(backend, "eager_rungs", [])]
        return "; ".join(problems)

    def prepared_files(self) -> list[tuple[str, Path, str]]:
        """(step name, cached file, "built" | "reused") of every rung a caching backend prepared."""
        return [(rung if name == "fp32" else f"{rung}@{name}", path, status)
                for name, backend in self._backends.items() for rung, (path, status) in getattr(backend, "engines", {}).items()]

    def set_merge_rate(self, rate: float) -> None:
        """Set the scalar merge rate in [0, 0.95] (a step of ``ladder``); applied from the next ``infer``."""
        rate = float(rate)
        if not 0.0 <= rate <= MAX_MERGE_RATE:
            raise ValueError(f"merge_rate must lie in [0, {MAX_MERGE_RATE}], got {rate}")
        step = step_for_rate(rate, self.ladder)
        if self.family == "mask2former":
            step = Step(rate, replace(NONE, name=f"mask2former coarse_layers={self.coarse_layers(rate)}"),
                        step.precision)
        elif not self.is_segformer:
            step = Step(rate, replace(NONE, name=f"{self.family} rate={rate:g}"), step.precision)
        with self._lock:
            self._step, self._merge, self._merge_rate = step, step.config, rate

    def set_preset(self, name: str) -> None:
        """Use a named Segformer++ preset ("none", "hq", "fast", "2x2") instead of the scalar rate; presets run in
        the precision of the ladder's merged steps."""
        config = preset(name)
        if not self.is_segformer and name != "none":
            raise ValueError(f"preset {name!r} is a SegFormer merge preset; {self.family} models take merge_rate")
        step = self.ladder[0] if name == "none" else Step(float("nan"), config, self.ladder[-1].precision)
        with self._lock:
            self._step, self._merge = step, config
            self._merge_rate = 0.0 if name == "none" else float("nan")

    def set_merge_config(self, config: MergeConfig, rate: float = float("nan")) -> None:
        precision = step_for_rate(rate, self.ladder).precision if math.isfinite(rate) else self.ladder[-1].precision
        with self._lock:
            self._step, self._merge, self._merge_rate = Step(rate, config, precision), config, rate

    def calibrate_precision(self, rgb: np.ndarray, threshold: float = AUTO_MIN_AGREEMENT) -> float:
        """``precision: auto``: compare the half-precision unmerged model with fp32 on a real frame; keep the half
        steps when the arg-max agrees on at least ``threshold`` of the pixels, else compute every step in fp32.
        Runs by itself on the first ``infer``; returns the agreement (NaN when there is nothing to decide)."""
        self._calibration_pending = False
        half = next((step.precision for step in self.ladder if step.precision != "fp32"), None)
        if half is None:
            return float("nan")
        pixels = self._network_input(rgb, NONE)

        def labels(precision: str) -> torch.Tensor:
            if self.is_segformer:
                return self._backends[precision].run(pixels, NONE).argmax(dim=1)
            return self._run(pixels, NONE, precision, 0.0).argmax(dim=1)

        with torch.inference_mode():
            exact, fast = labels("fp32"), labels(half)
        agreement = (exact == fast).float().mean().item()
        if agreement >= threshold:
            LOG.info("precision auto: %s agrees with fp32 on %.2f %% of this frame's pixels; merge rates above 0 "
                     "run in %s", half, 100 * agreement, half)
            return agreement
        LOG.warning("precision auto: %s agrees with fp32 on only %.2f %% of this frame's pixels (< %.1f %%); every "
                    "merge rate runs in fp32", half, 100 * agreement, 100 * threshold)
        with self._lock:
            self.ladder = with_precision(self.ladder, "fp32")
            self.precision_plan = "fp32"
            self._step = Step(self._step.rate, self._step.config, "fp32")
        if self.backend != "eager" and self.input_size is not None:
            self.warm()  # the fp32 backend had only rate 0 prepared
        return agreement

    def _network_input(self, rgb: np.ndarray, merge: MergeConfig) -> torch.Tensor:
        """The normalised network input: the frame resized once, on uint8, straight to ``input_size`` scaled by the
        rung's ``input_scale`` (scaling inside the network would first normalise every camera pixel)."""
        height, width = self.input_size or rgb.shape[:2]
        return to_tensor(rgb, scaled_size(height, width, merge.input_scale), self.device)

    def _run(self, pixels: torch.Tensor, merge: MergeConfig, precision: str, rate: float) -> torch.Tensor:
        """The class scores (1, K, h, w) at the network's resolution (Mask2Former: its semantic scores)."""
        if self.is_segformer:
            return self._backends[precision].run(pixels, network_config(merge))
        if self.family == "mask2former":
            return semantic_scores(*self._run_mask2former(pixels, precision, rate))
        # ViT methods hold their control as state: change it here, on the inferring thread, between frames.
        rate = 0.0 if math.isnan(rate) else rate
        if rate != self._vit_rate_applied:
            self.model.set_merge_rate(rate)
            self._vit_rate_applied = rate
        with autocast(self.device, PRECISIONS[precision]):
            return self.model.segment(pixels).float()

    def _run_mask2former(self, pixels: torch.Tensor, precision: str, rate: float
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask2Former's class logits (1, Q, K+1) and mask logits (1, Q, h/4, w/4) with the knob of ``rate``."""
        with autocast(self.device, PRECISIONS[precision]):
            output = self.model(pixels, coarse_layers=self.coarse_layers(rate))
        return output.class_logits.float(), output.mask_logits.float()

    def _current(self) -> tuple[Step, MergeConfig, float]:
        with self._lock:
            return self._step, self._merge, self._merge_rate

    @torch.inference_mode()
    def logits(self, rgb: np.ndarray, merge: MergeConfig | None = None) -> torch.Tensor:
        """The raw logits for ``rgb`` at the network's input size (1/4 of it for SegFormer, less on merged rungs)."""
        step, current, rate = self._current()
        merge = merge if merge is not None else current
        return self._run(self._network_input(rgb, merge), merge, step.precision, rate)

    @torch.inference_mode()
    def infer(self, rgb: np.ndarray, confidence: bool = True) -> SegmentationResult:
        """Segment one HxWx3 uint8 RGB frame; ``confidence=False`` skips the confidence map (the node computes it
        only while someone subscribes to it)."""
        if self._warm_on_new_sizes and rgb.shape[:2] not in self._warmed_sizes:
            LOG.info("backend %s: preparing every rung for %dx%d frames", self.backend, *rgb.shape[:2])
            self.warm(size=rgb.shape[:2])
        if self._calibration_pending:
            self.calibrate_precision(rgb)
        start = time.perf_counter()
        step, merge, rate = self._current()
        pixels = self._network_input(rgb, merge)
        if self.family == "mask2former":
            class_logits, mask_logits = self._run_mask2former(pixels, step.precision, rate)
            with one_torch_thread():
                class_map, confidence_map, instances, panoptic = self._mask2former_outputs(
                    class_logits, mask_logits, rgb.shape[:2])
            return SegmentationResult(class_map, confidence_map if confidence else None,
                                      (time.perf_counter() - start) * 1e3, rate, step.name, instances, panoptic)
        logits = self._run(pixels, merge, step.precision, rate)
        with one_torch_thread():
            class_map, confidence_map = logits_to_maps(logits, rgb.shape[:2], self.upsample, confidence)
        return SegmentationResult(class_map, confidence_map, (time.perf_counter() - start) * 1e3, rate, step.name)

    def _mask2former_outputs(self, class_logits: torch.Tensor, mask_logits: torch.Tensor, size: tuple[int, int]
                             ) -> tuple[np.ndarray, np.ndarray, InstanceMap, PanopticSegmentation | None]:
        """Class map and confidence, instances and (with ``panoptic``) the panoptic segmentation at ``size``."""
        class_map, confidence = semantic_maps(class_logits, mask_logits, size)
        instances = instance_id_map(instance_segmentation(class_logits, mask_logits, size, top_k=self.max_instances,
                                                          score_threshold=self.instance_score_threshold,
                                                          thing_ids=self.thing_ids))
        panoptic = None
        if self.panoptic:
            things = range(self.labels.num_classes) if self.thing_ids is None else self.thing_ids
            panoptic = panoptic_segmentation(class_logits, mask_logits, size, thing_ids=things)
        return class_map, confidence, instances, panoptic


@contextmanager
def one_torch_thread():
    """Post-processing's tensors are small: on one thread it costs little more than on two when the CPU is idle, while
    on a busy robot CPU a second thread's pool waits for a core at every operation (measured on the 2-core machine
    under load: 8-13 ms on one thread, 79-163 ms on two, and the threads' spinning slowed OpenVINO's network too)."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@lru_cache(maxsize=64)
def network_config(config: MergeConfig) -> MergeConfig:
    """``config`` as the network sees it once the engine has scaled the frame itself: ``input_scale`` 1."""
    return config if config.input_scale == 1.0 else replace(config, input_scale=1.0)


def _pick_device(device: str) -> torch.device:
    if device.startswith("cuda") and not torch.cuda.is_available():
        LOG.warning("device %r requested but CUDA is not available; using the CPU", device)
        return torch.device("cpu")
    return torch.device(device)
