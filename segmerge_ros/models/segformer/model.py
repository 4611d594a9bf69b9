"""SegFormer: the Mix Transformer (MiT-B0..B5) encoder and the all-MLP decode head, with token merging hooks.

Our own implementation, numerically matching Hugging Face ``transformers`` and mmseg. Merging is passed per call
(``model(pixels, merge=config)``), so the merge rate can change between frames without rebuilding anything.

Two head layouts exist in the wild:
- ``mlp`` (the original SegFormer head, Hugging Face layout): per-stage linear projections with no norm or
  activation, concatenation, a 1x1 fuse conv, BatchNorm, ReLU, classifier.
- ``mmseg`` (mmseg / Segformer++ ``.pth``): every per-stage projection is conv + BatchNorm + ReLU.
For inference both are folded (``FoldedHead``): whatever is linear between the stage features and the ReLU moves to
each stage's own resolution, followed by upsample-and-sum. Upsampling is linear and per channel, the fuse conv is
linear and per pixel, so they commute and the folded head is exact up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from segmerge_ros.merging.segformerpp import NONE, MergeConfig, StageMerge, ffn_merge, kv_merge, query_merge, scaled_size


@dataclass(frozen=True)
class MiTConfig:
    """Shape of a MiT encoder (the SegFormer paper's B0..B5) and its decode head."""

    hidden_sizes: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    num_heads: tuple[int, int, int, int] = (1, 2, 5, 8)
    sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)
    patch_sizes: tuple[int, int, int, int] = (7, 3, 3, 3)
    strides: tuple[int, int, int, int] = (4, 2, 2, 2)
    mlp_ratio: int = 4
    decoder_hidden_size: int = 256
    num_classes: int = 19
    head: str = "mlp"  # "mlp" (Hugging Face / original) or "mmseg"
    layer_norm_eps: float = 1e-5  # encoder LayerNorms; Hugging Face uses 1e-5, mmseg 1e-6


MIT_CONFIGS: dict[str, MiTConfig] = {
    "b0": MiTConfig(hidden_sizes=(32, 64, 160, 256), depths=(2, 2, 2, 2), decoder_hidden_size=256),
    "b1": MiTConfig(hidden_sizes=(64, 128, 320, 512), depths=(2, 2, 2, 2), decoder_hidden_size=256),
    "b2": MiTConfig(hidden_sizes=(64, 128, 320, 512), depths=(3, 4, 6, 3), decoder_hidden_size=768),
    "b3": MiTConfig(hidden_sizes=(64, 128, 320, 512), depths=(3, 4, 18, 3), decoder_hidden_size=768),
    "b4": MiTConfig(hidden_sizes=(64, 128, 320, 512), depths=(3, 8, 27, 3), decoder_hidden_size=768),
    "b5": MiTConfig(hidden_sizes=(64, 128, 320, 512), depths=(3, 6, 40, 3), decoder_hidden_size=768),
}


def mit_config(name: str, **overrides) -> MiTConfig:
    """``mit_config("segformer-b2", num_classes=150)``: a named size with overrides."""
    key = name.lower().removeprefix("segformer-").removeprefix("mit-")
    if key not in MIT_CONFIGS:
        raise ValueError(f"unknown SegFormer size {name!r}; choose segformer-b0 .. segformer-b5")
    return replace(MIT_CONFIGS[key], **overrides)


def tokens_to_nchw(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h*w, C) tokens as a (B, C, h, w) channels-last view: convolutions read it without a transpose copy."""
    return tokens.view(tokens.shape[0], h, w, tokens.shape[2]).permute(0, 3, 1, 2)


def nchw_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) back to (B, h*w, C); free for channels-last tensors."""
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])


class PatchEmbed(nn.Module):
    """Overlapping patch embedding: a strided conv, then LayerNorm on the tokens."""

    def __init__(self, in_channels: int, dim: int, patch_size: int, stride: int, eps: float):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(nchw_to_tokens(x)), h, w


class EfficientAttention(nn.Module):
    """Multi-head attention with spatially reduced keys/values, and Segformer++'s Q and KV merging."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio)
            self.sr_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, h: int, w: int, merge: StageMerge) -> torch.Tensor:
        batch, _, dim = x.shape
        kv, kv_h, kv_w = x, h, w
        if self.sr_ratio > 1:
            reduced = self.sr(tokens_to_nchw(x, h, w))
            kv_h, kv_w = reduced.shape[-2:]
            kv = self.sr_norm(nchw_to_tokens(reduced))
        if merge.kv_rate > 0:
            kv = kv_merge(kv, kv_h, kv_w, merge)
        queries, unmerge = (x, None)
        if merge.merges_queries:
            queries, unmerge = query_merge(x, h, w, merge)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, -1, self.num_heads, dim // self.num_heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q(queries)), heads(self.k(kv)), heads(self.v(kv)))
        out = self.proj(out.transpose(1, 2).reshape(batch, -1, dim))
        # The output projection is per token, so unmerging after it is the same and touches fewer tokens.
        return unmerge(out) if unmerge is not None else out


class MixFFN(nn.Module):
    """Linear, 3x3 depthwise conv (positional information), GELU, linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, h: int, w: int, merge: StageMerge | None = None) -> torch.Tensor:
        closures = ffn_merge(x, h, w, merge) if merge is not None and merge.ffn_rate > 0 else None
        if closures is None:
            x = nchw_to_tokens(self.dwconv(tokens_to_nchw(self.fc1(x), h, w)))
            return self.fc2(F.gelu(x))
        merge_tokens, unmerge = closures
        hidden = unmerge(self.fc1(merge_tokens(x)))  # the depthwise conv needs the full grid
        hidden = F.gelu(nchw_to_tokens(self.dwconv(tokens_to_nchw(hidden, h, w))))
        return unmerge(self.fc2(merge_tokens(hidden)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, sr_ratio: int, mlp_ratio: int, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = EfficientAttention(dim, num_heads, sr_ratio, eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.ffn = MixFFN(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor, h: int, w: int, merge: StageMerge) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), h, w, merge)
        return x + self.ffn(self.norm2(x), h, w, merge)


class Stage(nn.Module):
    def __init__(self, config: MiTConfig, index: int):
        super().__init__()
        in_channels = 3 if index == 0 else config.hidden_sizes[index - 1]
        dim, eps = config.hidden_sizes[index], config.layer_norm_eps
        self.patch_embed = PatchEmbed(in_channels, dim, config.patch_sizes[index], config.strides[index], eps)
        self.blocks = nn.ModuleList(
            Block(dim, config.num_heads[index], config.sr_ratios[index], config.mlp_ratio, eps)
            for _ in range(config.depths[index])
        )
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, merge: StageMerge) -> torch.Tensor:
        tokens, h, w = self.patch_embed(x)
        for block in self.blocks:
            tokens = block(tokens, h, w, merge)
        return tokens_to_nchw(self.norm(tokens), h, w)


class MixTransformer(nn.Module):
    """The MiT encoder: four stages at 1/4, 1/8, 1/16 and 1/32 of the input."""

    def __init__(self, config: MiTConfig):
        super().__init__()
        self.config = config
        self.stages = nn.ModuleList(Stage(config, i) for i in range(4))

    def forward(self, pixels: torch.Tensor, merge: MergeConfig = NONE) -> list[torch.Tensor]:
        features, x = [], pixels
        for stage, stage_merge in zip(self.stages, merge.stages):
            x = stage(x, stage_merge)
            features.append(x)
        return features


class ConvBNReLU(nn.Sequential):
    """mmseg's ConvModule: 1x1 conv without bias, BatchNorm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU()


class DecodeHead(nn.Module):
    """The all-MLP head as trained: project, upsample to 1/4, concatenate, fuse, BN, ReLU, classify.

    ``mlp`` layout concatenates stages 4..1 (Hugging Face order); ``mmseg`` concatenates 1..4.
    """

    def __init__(self, config: MiTConfig):
        super().__init__()
        self.layout = config.head
        width = config.decoder_hidden_size
        if config.head == "mlp":
            self.proj = nn.ModuleList(nn.Conv2d(c, width, 1) for c in config.hidden_sizes)
        elif config.head == "mmseg":
            self.proj = nn.ModuleList(ConvBNReLU(c, width) for c in config.hidden_sizes)
        else:
            raise ValueError(f"unknown head layout {config.head!r}")
        self.fuse = nn.Conv2d(4 * width, width, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.classifier = nn.Conv2d(width, config.num_classes, 1)

    def concat_order(self) -> list[int]:
        return [3, 2, 1, 0] if self.layout == "mlp" else [0, 1, 2, 3]

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[-2:]
        projected = [
            F.interpolate(proj(f), size=size, mode="bilinear", align_corners=False)
            for proj, f in zip(self.proj, features)
        ]
        fused = self.fuse(torch.cat([projected[i] for i in self.concat_order()], dim=1))
        return self.classifier(F.relu(self.bn(fused)))


class FoldedHead(nn.Module):
    """The decode head with its linear part folded per stage: exact, and far cheaper at 1/4 resolution.

    For each stage ``i`` the fuse conv's slice and the BatchNorm scale fold into one per-pixel linear map applied at
    that stage's own resolution (after the stage's own conv+BN+ReLU for the mmseg layout); the maps are upsampled
    and summed in place, with the BatchNorm shift added once, then ReLU and the classifier. Everything runs
    channels-last, so every per-pixel map is one matrix product.
    """

    def __init__(self, head: DecodeHead):
        super().__init__()
        width = head.fuse.out_channels
        bn = head.bn
        scale = bn.weight.detach() / torch.sqrt(bn.running_var.detach() + bn.eps)
        shift = bn.bias.detach() - bn.running_mean.detach() * scale
        fuse = head.fuse.weight.detach().flatten(1)  # (width, 4 * width)
        slot_of_stage = {stage: slot for slot, stage in enumerate(head.concat_order())}
        self.stage_act = nn.ModuleList()
        weights, bias = [], shift.clone()
        for stage, proj in enumerate(head.proj):
            slot = slot_of_stage[stage]
            block = scale[:, None] * fuse[:, slot * width : (slot + 1) * width]  # (width, width)
            if head.layout == "mlp":
                weights.append(block @ proj.weight.detach().flatten(1))
                bias += block @ proj.bias.detach()
                self.stage_act.append(nn.Identity())
            else:
                weights.append(block)
                self.stage_act.append(proj)
        self.stage_weights = [w.contiguous() for w in weights]
        self.bias = bias  # bilinear upsampling keeps constants, so the summed shift can ride on stage 1
        self.classifier_weight = head.classifier.weight.detach().flatten(1)
        self.classifier_bias = head.classifier.bias.detach()

    @staticmethod
    def _per_pixel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """A 1x1 conv as one matrix product on the channels-last view; returns a channels-last NCHW view."""
        return F.linear(x.permute(0, 2, 3, 1), weight, bias).permute(0, 3, 1, 2)

    def forward(self, features: list[torch.Tensor], stride: int = 1) -> torch.Tensor:
        first = self.stage_act[0](features[0])
        if stride > 1:
            # Linear per-pixel map: pooling its input equals pooling its output, at 1/8 the channels' cost.
            first = F.avg_pool2d(first, stride, stride, ceil_mode=True)
        size = first.shape[-2:]
        total = self._per_pixel(first, self.stage_weights[0], self.bias)
        for act, weight, f in zip(self.stage_act[1:], self.stage_weights[1:], features[1:]):
            total.add_(F.interpolate(self._per_pixel(act(f), weight, None), size=size, mode="bilinear", align_corners=False))
        return self._per_pixel(total.relu_(), self.classifier_weight, self.classifier_bias)


class SegFormer(nn.Module):
    """MiT encoder + decode head. ``forward`` returns logits at 1/4 of the input resolution (smaller with a merge
    configuration's ``head_stride=2`` or ``input_scale < 1``: callers upsample to the frame's size)."""

    def __init__(self, config: MiTConfig):
        super().__init__()
        self.config = config
        self.encoder = MixTransformer(config)
        self.head = DecodeHead(config)
        # Derived from ``head``, so kept out of the state dict (checkpoints stay in the trained layout).
        self.__dict__["folded_head"] = None

    def fold_head(self) -> "SegFormer":
        """Build the exact folded head used in eval mode (after loading weights; rebuilt on ``.to()``)."""
        self.__dict__["folded_head"] = FoldedHead(self.head)
        return self

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        if self.folded_head is not None:
            self.fold_head()
        return result

    def forward(self, pixels: torch.Tensor, merge: MergeConfig = NONE) -> torch.Tensor:
        if merge.input_scale != 1.0:  # the engine scales frames itself (on uint8, before normalising): see there
            size = scaled_size(pixels.shape[-2], pixels.shape[-1], merge.input_scale)
            pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False)
        features = self.encoder(pixels, merge)
        if self.folded_head is not None and not self.training:
            return self.folded_head(features, merge.head_stride)
        if merge.head_stride != 1:
            raise ValueError("head_stride > 1 needs the folded head: call fold_head() and use eval mode")
        return self.head(features)
