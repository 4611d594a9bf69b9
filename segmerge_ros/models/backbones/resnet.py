"""ResNet (bottleneck) backbone for Mask2Former, with Hugging Face ``ResNetBackbone`` parameter names.

Our own implementation: a 7x7/2 stem conv + BatchNorm + ReLU and a 3x3/2 max-pool, then four stages of bottleneck
blocks (1x1 reduce, 3x3, 1x1 expand, each conv without bias and followed by BatchNorm; a projection shortcut where
the shape changes). The stride of a stage's first block sits in the 3x3 conv by default
(``downsample_in_bottleneck=False``), which is detectron2's ``STRIDE_IN_1X1: False`` of the published Mask2Former
R50 weights. Outputs: the four stage maps at strides 4/8/16/32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ResNetConfig:
    """Shape of a bottleneck ResNet (field names as transformers' ``ResNetConfig``)."""

    embedding_size: int = 64
    hidden_sizes: tuple[int, int, int, int] = (256, 512, 1024, 2048)
    depths: tuple[int, int, int, int] = (3, 4, 6, 3)
    downsample_in_bottleneck: bool = False  # True: the stride sits in the first 1x1 conv (detectron2 STRIDE_IN_1X1)

    def __post_init__(self):
        if len(self.hidden_sizes) != 4 or len(self.depths) != 4:
            raise ValueError(f"a ResNet backbone for Mask2Former has 4 stages; got hidden_sizes "
                             f"{self.hidden_sizes}, depths {self.depths}")

    @property
    def channels(self) -> tuple[int, int, int, int]:
        """Channels of the four output maps (strides 4, 8, 16, 32)."""
        return tuple(self.hidden_sizes)


RESNET_CONFIGS: dict[str, ResNetConfig] = {
    "r50": ResNetConfig(depths=(3, 4, 6, 3)),
    "r101": ResNetConfig(depths=(3, 4, 23, 3)),
}


class ConvNorm(nn.Module):
    """Conv (no bias, 'same' padding) + BatchNorm, optionally ReLU (transformers: ``convolution``/``normalization``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, relu: bool = True):
        super().__init__()
        self.convolution = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False)
        self.normalization = nn.BatchNorm2d(out_channels)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalization(self.convolution(x))
        return torch.relu(x) if self.relu else x


class Bottleneck(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, stride_in_1x1: bool):
        super().__init__()
        reduced = out_channels // 4
        self.shortcut = (ConvNorm(in_channels, out_channels, 1, stride, relu=False)
                         if in_channels != out_channels or stride != 1 else nn.Identity())
        self.layer = nn.Sequential(
            ConvNorm(in_channels, reduced, 1, stride if stride_in_1x1 else 1),
            ConvNorm(reduced, reduced, 3, 1 if stride_in_1x1 else stride),
            ConvNorm(reduced, out_channels, 1, relu=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.layer(x) + self.shortcut(x))


class ResNetStage(nn.Module):
    def __init__(self, config: ResNetConfig, index: int):
        super().__init__()
        in_channels = config.embedding_size if index == 0 else config.hidden_sizes[index - 1]
        out_channels = config.hidden_sizes[index]
        stride = 1 if index == 0 else 2  # the stem's max-pool already gives stride 4
        self.layers = nn.Sequential(
            Bottleneck(in_channels, out_channels, stride, config.downsample_in_bottleneck),
            *(Bottleneck(out_channels, out_channels, 1, config.downsample_in_bottleneck)
              for _ in range(config.depths[index] - 1)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ResNetEmbeddings(nn.Module):
    def __init__(self, config: ResNetConfig):
        super().__init__()
        self.embedder = ConvNorm(3, config.embedding_size, 7, 2)
        self.pooler = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.pooler(self.embedder(pixels))


class ResNetStages(nn.Module):
    def __init__(self, config: ResNetConfig):
        super().__init__()
        self.stages = nn.ModuleList(ResNetStage(config, i) for i in range(4))


class ResNetBackbone(nn.Module):
    """``forward(pixels) -> [1/4, 1/8, 1/16, 1/32]`` NCHW maps with ``config.channels`` channels."""

    def __init__(self, config: ResNetConfig):
        super().__init__()
        self.config = config
        self.embedder = ResNetEmbeddings(config)
        self.encoder = ResNetStages(config)

    @property
    def channels(self) -> tuple[int, int, int, int]:
        return self.config.channels

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        x, features = self.embedder(pixels), []
        for stage in self.encoder.stages:
            x = stage(x)
            features.append(x)
        return features
