"""Swin Transformer backbone for Mask2Former, with Hugging Face ``SwinBackbone`` parameter names.

Our own implementation of the shifted-window transformer as Mask2Former uses it: four stages at strides 4/8/16/32,
each stage's output taken *before* its patch merging and passed through a per-stage LayerNorm
(``hidden_states_norms.stage{1..4}``). State-dict keys equal those of transformers' ``SwinBackbone`` so hub
checkpoints load strictly under ``pixel_level_module.encoder.*``.

Windowing follows the backbone path of transformers (and the original Swin detection code): every block partitions
into ``window_size`` windows whatever the feature size (maps are zero-padded on the bottom/right to a multiple of the
window after the first LayerNorm, then cropped back), and odd blocks shift by ``window_size // 2`` with the -100
attention mask between the shifted regions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SHIFTED_REGION_PENALTY = -100.0  # the additive mask value of the original Swin code (not -inf: rows never empty)


@dataclass(frozen=True)
class SwinConfig:
    """Shape of a Swin backbone (field names as transformers' ``SwinConfig``)."""

    embed_dim: int = 96
    depths: tuple[int, int, int, int] = (2, 2, 6, 2)
    num_heads: tuple[int, int, int, int] = (3, 6, 12, 24)
    window_size: int = 7
    patch_size: int = 4
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-5  # the blocks' LayerNorms; the others use PyTorch's default 1e-5 as transformers

    def __post_init__(self):
        if len(self.depths) != 4 or len(self.num_heads) != 4:
            raise ValueError(f"a Swin backbone for Mask2Former has 4 stages; got depths {self.depths}, "
                             f"num_heads {self.num_heads}")
        if self.patch_size != 4:
            raise ValueError(f"Mask2Former needs stride-4 patches (features at 1/4..1/32); got patch_size "
                             f"{self.patch_size}")

    @property
    def channels(self) -> tuple[int, int, int, int]:
        """Channels of the four output maps (strides 4, 8, 16, 32)."""
        return tuple(self.embed_dim * 2**i for i in range(4))


# The published Mask2Former Swin backbones (window 12 for the ImageNet-22k 384 px B and L).
SWIN_CONFIGS: dict[str, SwinConfig] = {
    "swin-t": SwinConfig(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "swin-s": SwinConfig(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "swin-b": SwinConfig(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12),
    "swin-l": SwinConfig(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12),
}


def pad_bottom_right(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad a (B, H, W, C) map so H and W are multiples of ``multiple``."""
    height, width = x.shape[1], x.shape[2]
    return F.pad(x, (0, 0, 0, (-width) % multiple, 0, (-height) % multiple))


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of ``window`` -> (B, nW, window*window, C), windows in row-major order."""
    batch, height, width, channels = x.shape
    x = x.view(batch, height // window, window, width // window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(batch, -1, window * window, channels)


def window_merge(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """Inverse of ``window_partition``: (B, nW, window*window, C) -> (B, H, W, C)."""
    batch, channels = windows.shape[0], windows.shape[-1]
    x = windows.view(batch, height // window, width // window, window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(batch, height, width, channels)


def shifted_window_mask(height: int, width: int, window: int, shift: int, device: torch.device) -> torch.Tensor:
    """(nW, N, N) additive mask of a shifted-window block on a padded (height, width) map.

    The rolled map has three bands per axis (the part that did not wrap, the last window before the wrapped
    strip, the wrapped strip); tokens of one window attend only to tokens of the same band pair.
    """
    def bands(size: int) -> torch.Tensor:
        index = torch.arange(size, device=device)
        return (index >= size - window).long() + (index >= size - shift).long()

    regions = (bands(height)[:, None] * 3 + bands(width)[None, :]).to(torch.float32)
    region_windows = window_partition(regions[None, :, :, None], window)[0, :, :, 0]  # (nW, N)
    different = region_windows[:, None, :] != region_windows[:, :, None]
    return torch.zeros(different.shape, device=device).masked_fill(different, SHIFTED_REGION_PENALTY)


def relative_position_index(window: int) -> torch.Tensor:
    """(N, N) index into the (2w-1)^2 bias table for every pair of positions in a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return relative[:, :, 0] * (2 * window - 1) + relative[:, :, 1]


class WindowSelfAttention(nn.Module):
    """Multi-head attention inside each window with a learned relative-position bias (transformers: ``self``)."""

    def __init__(self, dim: int, num_heads: int, window: int, qkv_bias: bool):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Swin stage width {dim} is not divisible by its {num_heads} heads")
        self.num_heads = num_heads
        self.window = window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        # Persistent because transformers' checkpoints carry it (its values are fixed by the window size).
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.query = nn.Linear(dim, dim, bias=qkv_bias)
        self.key = nn.Linear(dim, dim, bias=qkv_bias)
        self.value = nn.Linear(dim, dim, bias=qkv_bias)

    def forward(self, windows: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """windows (B, nW, N, C); mask (nW, N, N) additive or None -> (B, nW, N, C)."""
        batch, num_windows, tokens, dim = windows.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, num_windows, tokens, self.num_heads, dim // self.num_heads).transpose(2, 3)

        tokens_per_window = self.window * self.window
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(tokens_per_window, tokens_per_window, self.num_heads).permute(2, 0, 1)  # (heads, N, N)
        if mask is not None:
            bias = bias[None] + mask[:, None]  # (nW, heads, N, N)
        out = F.scaled_dot_product_attention(
            heads(self.query(windows)), heads(self.key(windows)), heads(self.value(windows)),
            attn_mask=bias.to(windows.dtype))
        return out.transpose(2, 3).reshape(batch, num_windows, tokens, dim)


class Dense(nn.Module):
    """A Linear under transformers' ``.dense`` name."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.dense = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x)


class WindowAttention(nn.Module):
    """Window self-attention and its output projection (transformers: ``attention.self`` / ``attention.output``)."""

    def __init__(self, dim: int, num_heads: int, window: int, qkv_bias: bool):
        super().__init__()
        self.self = WindowSelfAttention(dim, num_heads, window, qkv_bias)
        self.output = Dense(dim, dim)

    def forward(self, windows: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(windows, mask))


class SwinBlock(nn.Module):
    """Pre-norm (shifted) window attention and MLP, each with a residual."""

    def __init__(self, config: SwinConfig, dim: int, num_heads: int, shift: int):
        super().__init__()
        self.window = config.window_size
        self.shift = shift
        self.layernorm_before = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attention = WindowAttention(dim, num_heads, config.window_size, config.qkv_bias)
        self.layernorm_after = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.intermediate = Dense(dim, int(config.mlp_ratio * dim))
        self.output = Dense(int(config.mlp_ratio * dim), dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch, _, dim = x.shape
        window, shift = self.window, self.shift
        grid = pad_bottom_right(self.layernorm_before(x).view(batch, height, width, dim), window)
        padded_h, padded_w = grid.shape[1], grid.shape[2]
        mask = None
        if shift > 0:
            grid = torch.roll(grid, shifts=(-shift, -shift), dims=(1, 2))
            mask = shifted_window_mask(padded_h, padded_w, window, shift, x.device)
        attended = window_merge(self.attention(window_partition(grid, window), mask), window, padded_h, padded_w)
        if shift > 0:
            attended = torch.roll(attended, shifts=(shift, shift), dims=(1, 2))
        x = x + attended[:, :height, :width, :].reshape(batch, height * width, dim)
        return x + self.output(F.gelu(self.intermediate(self.layernorm_after(x))))


class PatchMerging(nn.Module):
    """2x2 neighbourhoods concatenated (zero-padded to even sizes), LayerNorm, linear 4C -> 2C."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch, _, dim = x.shape
        grid = pad_bottom_right(x.view(batch, height, width, dim), 2)
        # The original channel order: (even row, even col), (odd, even), (even, odd), (odd, odd).
        merged = torch.cat([grid[:, 0::2, 0::2], grid[:, 1::2, 0::2], grid[:, 0::2, 1::2], grid[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(merged.reshape(batch, -1, 4 * dim)))


class SwinStage(nn.Module):
    def __init__(self, config: SwinConfig, index: int):
        super().__init__()
        dim = config.channels[index]
        self.blocks = nn.ModuleList(
            SwinBlock(config, dim, config.num_heads[index], shift=0 if i % 2 == 0 else config.window_size // 2)
            for i in range(config.depths[index])
        )
        self.downsample = PatchMerging(dim) if index < 3 else None


class SwinStages(nn.Module):
    """transformers' ``encoder``: the list of stages under ``layers``."""

    def __init__(self, config: SwinConfig):
        super().__init__()
        self.layers = nn.ModuleList(SwinStage(config, i) for i in range(4))


class PatchEmbeddings(nn.Module):
    def __init__(self, config: SwinConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.projection = nn.Conv2d(3, config.embed_dim, config.patch_size, config.patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        height, width = pixels.shape[-2:]
        pixels = F.pad(pixels, (0, (-width) % self.patch_size, 0, (-height) % self.patch_size))
        return self.projection(pixels)


class SwinEmbeddings(nn.Module):
    def __init__(self, config: SwinConfig):
        super().__init__()
        self.patch_embeddings = PatchEmbeddings(config)
        self.norm = nn.LayerNorm(config.embed_dim)


class SwinBackbone(nn.Module):
    """``forward(pixels) -> [1/4, 1/8, 1/16, 1/32]`` NCHW maps with ``config.channels`` channels."""

    def __init__(self, config: SwinConfig):
        super().__init__()
        self.config = config
        self.embeddings = SwinEmbeddings(config)
        self.encoder = SwinStages(config)
        self.hidden_states_norms = nn.ModuleDict(
            {f"stage{i + 1}": nn.LayerNorm(channels) for i, channels in enumerate(config.channels)})

    @property
    def channels(self) -> tuple[int, int, int, int]:
        return self.config.channels

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        patches = self.embeddings.patch_embeddings(pixels)
        height, width = patches.shape[-2:]
        x = self.embeddings.norm(patches.flatten(2).transpose(1, 2))
        features = []
        for stage, norm in zip(self.encoder.layers, self.hidden_states_norms.values()):
            for block in stage.blocks:
                x = block(x, height, width)
            features.append(norm(x).transpose(1, 2).reshape(x.shape[0], -1, height, width))
            if stage.downsample is not None:
                x = stage.downsample(x, height, width)
                height, width = (height + 1) // 2, (width + 1) // 2
        return features
