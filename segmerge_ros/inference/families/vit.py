"""Plain-ViT families (``<segmenter|algm|clustvit|dovit>-vit-<t|s|b|l>[-linear|-mask]``, ``models/vit/methods.py``).

``merge_rate`` maps onto each method's own control, held by the model as state and changed on the inferring thread
between frames; the control is continuous (no ladder levels) and presets are SegFormer's only. ALGM, ClustViT and
DoViT have content-dependent token counts: no static graph to compile, so they run eagerly.
"""

from __future__ import annotations

import math

import torch

from segmerge_ros.merging.segformerpp import MergeConfig
from segmerge_ros.models.labels import label_set
from segmerge_ros.models.vit.methods import build_vit_model, is_vit_model_name, load_vit_model, parse_vit_name
from segmerge_ros.inference.backends.base import PRECISIONS, Backend, autocast
from segmerge_ros.inference.families.base import ModelFamily, OutputOptions


class ViTFamily(ModelFamily):
    """Segmenter, ALGM, ClustViT or DoViT; ``name`` is the method."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._rate_applied: float | None = None  # the rate the model holds (set by the inferring thread only)

    @classmethod
    def claims(cls, model_name: str) -> bool:
        return is_vit_model_name(model_name)

    @classmethod
    def load(cls, model_name: str, weights: str | None, *, num_classes: int, device: torch.device,
             options: OutputOptions) -> ViTFamily:
        method = parse_vit_name(model_name)[0]
        if weights:
            model = load_vit_model(weights, family=method)
        else:
            torch.manual_seed(0)
            model = build_vit_model(model_name, num_classes=num_classes).eval()
        return cls(method, model, label_set(model.config.labels), device)

    def forward(self, pixels: torch.Tensor, merge: MergeConfig, precision: str, rate: float,
                backend: Backend) -> torch.Tensor:
        rate = 0.0 if math.isnan(rate) else rate
        if rate != self._rate_applied:
            self.model.set_merge_rate(rate)
            self._rate_applied = rate
        with autocast(self.device, PRECISIONS[precision]):
            return self.model.segment(pixels).float()
