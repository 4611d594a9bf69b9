"""PRO-SCALE: Mask2Former's pixel-decoder encoder with progressive token length, and the FLOP counts.

Re-implemented from the project's note ``shared/docs/proscale.md`` (sections 1-4); the official code is under a
non-commercial licence and none of it is copied here.

``ProScaleEncoder(schedule=(p1, p2, p3))`` runs three stages: p1 layers on the res5 tokens alone (layers built with
1 level), p2 on res5 + res4 (2 levels), p3 on all three (3 levels), every layer with its own weights (the released
(3, 3, 3) has 9). Tokens of a scale not yet processed are carried as their input projection. Before it enters, a
scale's tokens are gated by the token re-calibration (TRC, ``token_excite``), one module shared by res5 and res4,
computed from the res3 input tokens; res3 enters ungated. The light pixel embedding (``light_pixel_embedding``)
replaces the FPN output conv ``layer_1``.

The knob on a PRO-SCALE encoder, ``coarse_layers = k`` (0..p3): stage 2 extends into stage 3, the first k of its
3-level layers run on res5 + res4 with their weights sliced to those levels, as the stock encoder's knob does
(``deformable_attention``); ``coarse_layers_for_rate(rate, full_scale_layers=p3)`` maps a merge rate onto it.

Parameter names (inside the pixel decoder's ``encoder``): ``layers.{0..p1+p2+p3-1}.*`` with the layer names of
``DeformableEncoderLayer``, ``token_excite.ops.{weight,bias}`` (Linear 256 -> 1). A detectron2 PRO-SCALE checkpoint's
``sem_seg_head.pixel_decoder.transformer.encoder.token_excite.ops.*`` maps onto it by the same prefix rename as its
layers (``...transformer.encoder.`` -> ``pixel_level_module.decoder.encoder.``).

FLOPs: ``*_macs`` count multiply-accumulates of the projections (linear layers and convolutions) from shapes alone,
the convention of the note's per-token formula and of fvcore's matmul/conv counts; the bilinear sampling and the
weighted sum of the deformable attention are counted apart (``sampling_macs_per_token``), norms and activations not at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segmerge_ros.models.mask2former.deformable_attention import DeformableEncoderLayer, SpatialShapes, knob_levels, run_progressive

NUM_LEVELS = 3  # res5, res4, res3: the released code assumes exactly these three
RES3 = 2  # index of the finest level, the TRC's guide


class TokenRecalibration(nn.Module):
    """TRC, linear variant: gate a coarse scale's tokens with sigmoid(T * ops(res3 tokens resized to that scale)).

    The released weights were trained with a raw memory reinterpretation: the res3 tokens (B, L3, C) are viewed as
    (B, C, H3, W3) without a transpose, resized bilinearly (align_corners=False) to (h, w), and viewed back as
    (B, h*w, C), again without a transpose. Reproduced exactly: a transposing reading would not fit the weights.
    """

    def __init__(self, d_model: int = 256, temperature: float = 0.1):
        super().__init__()
        self.temperature = temperature
        self.ops = nn.Linear(d_model, 1)

    def gate(self, size: tuple[int, int], guide: torch.Tensor, guide_size: tuple[int, int]) -> torch.Tensor:
        """(B, h*w, 1) gate for a scale of ``size`` from the res3 tokens ``guide`` (B, H3*W3, C)."""
        batch, tokens, channels = guide.shape
        if tokens != guide_size[0] * guide_size[1]:
            raise ValueError(f"res3 guide of {tokens} tokens does not fit its size {tuple(guide_size)}")
        maps = guide.reshape(batch, channels, *guide_size)  # memory reinterpretation, not a transpose
        resized = F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)
        return torch.sigmoid(self.temperature * self.ops(resized.reshape(batch, size[0] * size[1], channels)))

    def forward(self, tokens: torch.Tensor, size: tuple[int, int], guide: torch.Tensor,
                guide_size: tuple[int, int]) -> torch.Tensor:
        return tokens * self.gate(size, guide, guide_size)


def light_pixel_embedding(channels: int = 256, groups: int = 32) -> nn.Sequential:
    """LPE, PRO-SCALE's replacement of the FPN output conv: 3x3 max-pool (stride 1) -> GroupNorm -> ReLU.
    Laid out like the conv it replaces (index 1 is the norm), so ``layer_1.1.*`` keys load."""
    return nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), nn.GroupNorm(groups, channels), nn.ReLU())


def schedule_levels(schedule: Sequence[int], coarse_layers: int = 0) -> list[int]:
    """The number of levels each layer of a PRO-SCALE schedule runs on; ``coarse_layers`` of its stage-3 layers run
    on res5 + res4 (the knob)."""
    if len(schedule) != NUM_LEVELS or min(schedule) < 0 or sum(schedule) == 0:
        raise ValueError(f"schedule must be 3 layer counts >= 0 (not all 0), got {tuple(schedule)}")
    p1, p2, p3 = schedule
    return [1] * p1 + [2] * p2 + knob_levels(p3, coarse_layers, NUM_LEVELS)


class ProScaleEncoder(nn.Module):
    """The PRO-SCALE encoder (module docstring). ``forward(tokens, pos, spatial_shapes, coarse_layers=0)`` as the
    stock ``DeformableEncoder``.

    ``residual`` (the released configs: off) adds a stage's input back after each layer of stages 1 and 2. Which
    tensor the released code adds was read from the note only ("the gated stage inputs"): here the tensor the stage
    started from (stage 1: the gated res5 tokens; stage 2: the stage-1 output with the gated res4 tokens).
    ``token_recalibration=False`` leaves the gate out (the released code's ``None`` option).
    """

    def __init__(
        self,
        schedule: Sequence[int] = (3, 3, 3),
        trc_temperature: float = 0.1,
        residual: bool = False,
        token_recalibration: bool = True,
        d_model: int = 256,
        n_heads: int = 8,
        n_points: int = 4,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
        layer_norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.schedule = tuple(int(p) for p in schedule)
        self.residual = residual
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(d_model, levels, n_heads, n_points, ffn_dim, dropout, layer_norm_eps)
            for levels in schedule_levels(self.schedule)
        )
        self.token_excite = TokenRecalibration(d_model, trc_temperature) if token_recalibration else None

    @property
    def full_scale_layers(self) -> int:
        """Layers trained on every level (p3): the knob's range, for ``coarse_layers_for_rate``."""
        return self.schedule[2]

    def forward(
        self, tokens: torch.Tensor, pos: torch.Tensor, spatial_shapes: SpatialShapes, coarse_layers: int = 0
    ) -> torch.Tensor:
        if len(spatial_shapes) != NUM_LEVELS:
            raise ValueError(f"PRO-SCALE runs on exactly {NUM_LEVELS} levels, got {len(spatial_shapes)}")
        admit = None
        if self.token_excite is not None:
            guide_size = tuple(int(s) for s in spatial_shapes[RES3])
            guide = tokens[:, tokens.shape[1] - guide_size[0] * guide_size[1]:]

            def admit(level: int, level_tokens: torch.Tensor) -> torch.Tensor:
                if level == RES3:
                    return level_tokens
                return self.token_excite(level_tokens, tuple(spatial_shapes[level]), guide, guide_size)

        levels = schedule_levels(self.schedule, coarse_layers)
        return run_progressive(self.layers, levels, tokens, pos, spatial_shapes, admit, self.residual)


# ---- FLOPs (multiply-accumulates, from shapes) ----

ENCODER_STRIDES = (32, 16, 8)  # res5, res4, res3
MASK_STRIDE = 4  # res2, the mask features


def feature_size(image_size: tuple[int, int], stride: int) -> tuple[int, int]:
    """A backbone level's (H, W) for an input size: ceil(size / stride), what strided convolutions give."""
    return -(-int(image_size[0]) // stride), -(-int(image_size[1]) // stride)


def encoder_shapes(image_size: tuple[int, int]) -> list[tuple[int, int]]:
    return [feature_size(image_size, stride) for stride in ENCODER_STRIDES]


@dataclass(frozen=True)
class EncoderShape:
    """Widths of the deformable encoder (the stock values of every released Mask2Former)."""

    d_model: int = 256
    n_heads: int = 8
    n_points: int = 4
    ffn_dim: int = 1024


def layer_macs_per_token(levels: int, shape: EncoderShape = EncoderShape()) -> int:
    """One encoder layer, per query token (its values are the same tokens): value and output projections
    (d x d each), sampling offsets (d x heads*levels*points*2) and attention logits (d x heads*levels*points), and
    the FFN (d x ffn twice)."""
    d = shape.d_model
    projections = 2 * d * d
    offsets_and_logits = d * shape.n_heads * levels * shape.n_points * 3
    ffn = 2 * d * shape.ffn_dim
    return projections + offsets_and_logits + ffn


def sampling_macs_per_token(levels: int, shape: EncoderShape = EncoderShape()) -> int:
    """The attention's own arithmetic per query: 4 bilinear taps and one weighting per channel of a head, per head,
    level and point (not in the projection count)."""
    return 5 * shape.d_model * levels * shape.n_points


def encoder_macs(spatial_shapes: SpatialShapes, active_levels: Sequence[int], shape: EncoderShape = EncoderShape(),
                 sampling: bool = False) -> int:
    """An encoder whose layer i runs on the tokens of the first ``active_levels[i]`` levels."""
    counts = [int(h) * int(w) for h, w in spatial_shapes]
    total = 0
    for levels in active_levels:
        per_token = layer_macs_per_token(levels, shape) + (sampling_macs_per_token(levels, shape) if sampling else 0)
        total += sum(counts[:levels]) * per_token
    return total


def recalibration_macs(spatial_shapes: SpatialShapes, d_model: int = 256) -> int:
    """The TRC's Linear(d, 1) over the res5 and res4 tokens it gates."""
    return sum(int(h) * int(w) for h, w in spatial_shapes[:RES3]) * d_model


def stock_encoder_levels(num_layers: int = 6, coarse_layers: int = 0) -> list[int]:
    return knob_levels(num_layers, coarse_layers, NUM_LEVELS)


def pixel_decoder_macs(
    image_size: tuple[int, int],
    backbone_channels: Sequence[int],
    active_levels: Sequence[int],
    light_pixel_embedding: bool,
    shape: EncoderShape = EncoderShape(),
    mask_dim: int = 256,
) -> dict[str, int]:
    """The pixel decoder by part: input projections (1x1 convs of res5/res4/res3), the encoder, the res2 lateral
    (``adapter_1``), the output layer (3x3 conv, or nothing to multiply for the LPE) and the mask projection.
    ``backbone_channels`` are those of res2..res5."""
    if len(backbone_channels) != 4:
        raise ValueError(f"need the channels of res2..res5, got {tuple(backbone_channels)}")
    d = shape.d_model
    shapes = encoder_shapes(image_size)
    fine = feature_size(image_size, MASK_STRIDE)
    fine_pixels = fine[0] * fine[1]
    projections = sum(h * w * c * d for (h, w), c in zip(shapes, backbone_channels[:0:-1]))
    return {
        "input_projections": projections,
        "encoder": encoder_macs(shapes, active_levels, shape),
        "adapter": fine_pixels * backbone_channels[0] * d,
        "output_layer": 0 if light_pixel_embedding else fine_pixels * 9 * d * d,
        "mask_projection": fine_pixels * d * mask_dim,
    }
