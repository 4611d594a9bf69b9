"""A frame's way into and out of every family's network: normalisation to the network input, logits to maps.

Pre-processing: optional resize to the network's input size, ImageNet normalisation. Post-processing: the class map
is the arg-max of the head's logits upsampled bilinearly to the frame's resolution (``upsample="logits"``, the
default): boundaries follow the logits' smooth transitions instead of 4x4 blocks (computed exactly, interpolating
only the classes that can win, only at boundary cells: ``upsampled_argmax``). ``upsample="labels"`` takes the
arg-max at the logits' resolution and upsamples labels (nearest): cheaper still, but blocky edges.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

import cv2
import numpy as np
import torch

from segmerge_ros.merging.segformerpp import MergeConfig
from segmerge_ros.models.imagenet import IMAGENET_MEAN, IMAGENET_STD
from segmerge_ros.inference.postprocess.upsample import upsampled_argmax

_PIXEL_MEAN = torch.tensor(IMAGENET_MEAN) * 255.0  # float32, as the normalisation has always computed them
_PIXEL_STD = torch.tensor(IMAGENET_STD) * 255.0


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


@lru_cache(maxsize=64)
def network_config(config: MergeConfig) -> MergeConfig:
    """``config`` as the network sees it once the engine has scaled the frame itself: ``input_scale`` 1."""
    return config if config.input_scale == 1.0 else replace(config, input_scale=1.0)
