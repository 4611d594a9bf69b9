"""Segmentation teachers for distillation: checkpoints the project loads, each as ``rgb (H, W, 3) uint8 -> class
map (H, W) uint8`` (a ``Teacher``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from segmerge_ros.models.imagenet import IMAGENET_MEAN, IMAGENET_STD
from segmerge_ros.models.vit.methods import load_vit_model
from segmerge_ros.training.segmentation_data import Teacher, to_tensor_batch


class SegFormerTeacher:
    """A SegFormer checkpoint the project loads (hub layout or mmseg ``.pth``) as ``rgb -> class map``."""

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        from segmerge_ros.models.segformer.checkpoints import load_segformer

        loaded = load_segformer(path)
        self.model = loaded.model.to(device).eval()
        self.labels = loaded.labels
        self.num_classes = loaded.labels.num_classes
        self.device = device

    @torch.no_grad()
    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        pixels = to_tensor_batch([rgb], IMAGENET_MEAN, IMAGENET_STD).to(self.device)
        logits = F.interpolate(self.model(pixels), size=rgb.shape[:2], mode="bilinear", align_corners=False)
        return logits.argmax(1)[0].to(torch.uint8).cpu().numpy()


class ViTTeacher:
    """A ViT-family checkpoint written by this tool as ``rgb -> class map``."""

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        self.model = load_vit_model(path).to(device).eval()
        self.num_classes = self.model.config.num_classes
        self.device = device

    @torch.no_grad()
    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        config = self.model.config
        pixels = to_tensor_batch([rgb], config.image_mean, config.image_std).to(self.device)
        return self.model.segment(pixels).argmax(1)[0].to(torch.uint8).cpu().numpy()


def load_teacher(spec: str, device: str = "cpu") -> Teacher:
    """``segformer:PATH`` or ``vit:PATH``."""
    kind, _, path = spec.partition(":")
    if kind == "segformer":
        return SegFormerTeacher(path, device)
    if kind == "vit":
        return ViTTeacher(path, device)
    raise ValueError(f"unknown teacher {spec!r}; use segformer:PATH or vit:PATH")
