"""Multi-scale deformable attention and the Mask2Former pixel-decoder encoder, in plain PyTorch.

Semantics are those of Deformable DETR as Mask2Former and Hugging Face ``transformers`` use them (the project's
note ``shared/docs/proscale.md`` section 5): per head and level, each query samples ``n_points`` locations of that
level's value map with bilinear interpolation (``grid_sample``, ``align_corners=False``, zeros outside the map),
weighted by one softmax over levels x points. Submodule names mirror Hugging Face's
(``self_attn.{sampling_offsets,attention_weights,value_proj,output_proj}``, ``self_attn_layer_norm``, ``fc1``,
``fc2``, ``final_layer_norm``), so hub checkpoints load with renames of the outer prefix only.

Token order everywhere: the flattened levels concatenated coarse to fine (level 0 = res5 at 1/32, then res4, res3),
each level row-major.

The coarse-layer knob (``DeformableEncoder.forward(..., coarse_layers=k)``), a training-free approximation of
PRO-SCALE for stock checkpoints: the first ``k`` layers run on the res5 and res4 tokens only (queries and values),
with their deformable-attention weights sliced to those two levels (the rows of ``sampling_offsets`` are laid out
heads x levels x points x 2 and those of ``attention_weights`` heads x levels x points; keeping the first two
levels' rows makes the softmax a re-normalised softmax over the kept levels). The res3 tokens are carried unchanged
(their input projection) and join from layer ``k`` on. ``k = 0`` is the stock encoder bit for bit.

Why res5+res4 and not PRO-SCALE's res5-alone first stage: res3 holds 16 of every 21 tokens, so leaving it out of a
layer already saves ~77 % of that layer; leaving res4 out as well saves only ~4/21 more, while a layer trained on
all three levels would keep 1/3 instead of 2/3 of its sampling points and the coarsest tokens would lose every finer
context. The trained PRO-SCALE model learned its 1-level layers; a stock checkpoint did not.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segmerge_ros.merging.segformerpp import MAX_MERGE_RATE

SpatialShapes = Sequence[tuple[int, int]]

# The levels a coarse layer of the knob runs on: res5 and res4 (see the module docstring for why).
COARSE_LEVELS = 2

# The knob's settings as (merge rate from which it applies, number of coarse layers), like the SegFormer ladder's
# rungs: the highest setting whose rate is at most the requested rate applies. Each coarse layer saves ~3/4 of one
# layer's compute. At most 5 of the 6 stock layers: the last layer always sees every scale, so the res3 tokens,
# which feed the mask features, pass at least one trained full-scale layer.
KNOB_SETTINGS: tuple[tuple[float, int], ...] = ((0.0, 0), (0.15, 1), (0.3, 2), (0.45, 3), (0.6, 4), (0.75, 5))


def coarse_layers_for_rate(rate: float, full_scale_layers: int = 6) -> int:
    """The knob setting for a merge rate in [0, 0.95]: 0 at rate 0, never more than ``full_scale_layers - 1``.

    ``full_scale_layers`` is the number of layers trained on all three levels: 6 for the stock encoder, p3 for a
    PRO-SCALE schedule (its coarse layers then extend stage 2 into stage 3).
    """
    if not 0.0 <= rate <= MAX_MERGE_RATE:
        raise ValueError(f"merge rate must lie in [0, {MAX_MERGE_RATE}], got {rate}")
    if full_scale_layers < 1:
        raise ValueError(f"need at least one full-scale layer, got {full_scale_layers}")
    setting = [layers for start, layers in KNOB_SETTINGS if start <= rate + 1e-9][-1]
    return min(setting, full_scale_layers - 1)


def knob_levels(num_layers: int, coarse_layers: int, n_levels: int = 3) -> list[int]:
    """The number of levels each of ``num_layers`` full-scale layers runs on with ``coarse_layers`` coarse ones."""
    if not 0 <= coarse_layers <= num_layers:
        raise ValueError(f"coarse_layers must lie in 0..{num_layers}, got {coarse_layers}")
    coarse = min(COARSE_LEVELS, n_levels)
    return [coarse] * coarse_layers + [n_levels] * (num_layers - coarse_layers)


def multi_scale_deformable_attention(
    value: torch.Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Bilinear multi-scale sampling and weighting.

    value (B, S, M, D) with S = sum of H*W over the levels; sampling_locations (B, Lq, M, L, K, 2) as (x, y) in
    [0, 1] of each level (1/W of a pixel apart; a pixel's centre is (j + 0.5) / W); attention_weights
    (B, Lq, M, L, K). Returns (B, Lq, M*D), channel = head * D + d. Taps outside a level read 0.
    """
    batch, tokens, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes]
    if len(sizes) != levels or sum(sizes) != tokens:
        raise ValueError(
            f"spatial shapes {list(spatial_shapes)} ({sum(sizes)} tokens, {len(sizes)} levels) do not fit values "
            f"of {tokens} tokens sampled on {levels} levels"
        )
    # grid_sample's frame: -1 and 1 are the outer edges of the border pixels (align_corners=False).
    grids = 2 * sampling_locations - 1
    # (B*M, 1, Lq, L, K): each level's taps weighted and summed as they are sampled; stacking the levels' samples
    # first made OpenVINO copy them through a reference Concat (about an eighth of its time, docs/benchmarks.md 16)
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels, points)
    output = None
    for level, (level_value, (height, width)) in enumerate(zip(value.split(sizes, dim=1), spatial_shapes)):
        # contiguous: torch 2.13's CPU grid_sample returns NaN for some strided bf16 inputs
        maps = level_value.permute(0, 2, 3, 1).reshape(batch * heads, head_dim, int(height), int(width)).contiguous()
        level_grid = grids[:, :, :, level].transpose(1, 2).reshape(batch * heads, queries, points, 2).contiguous()
        sampled = F.grid_sample(maps, level_grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        weighted = (sampled * weights[..., level, :]).sum(-1)  # (B*M, D, Lq)
        output = weighted if output is None else output + weighted
    output = output.view(batch, heads * head_dim, queries)
    return output.transpose(1, 2).contiguous()


def level_sliced_linear(linear: nn.Linear, heads: int, levels: int, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``linear`` restricted to the first ``keep`` of its ``levels`` levels.

    The output rows are laid out heads x levels x (points [x 2]); the rows of the kept levels are taken per head,
    in the same order, so the result is the projection of a layer built with ``n_levels=keep``.
    """
    if not 1 <= keep <= levels:
        raise ValueError(f"can keep 1..{levels} levels, not {keep}")
    rows_per_level = linear.out_features // (heads * levels)
    weight = linear.weight.view(heads, levels, rows_per_level, -1)[:, :keep].reshape(-1, linear.in_features)
    bias = linear.bias.view(heads, levels, rows_per_level)[:, :keep].reshape(-1)
    return weight, bias


class MultiScaleDeformableAttention(nn.Module):
    """Deformable self-attention over the tokens of all levels (the encoder's use: values = the queries' tokens).

    Run on fewer levels than it was built for (``len(spatial_shapes) < n_levels``), it uses its weights of the
    first levels (``level_sliced_linear``): the coarse layers of the knob.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 3, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: SpatialShapes,
    ) -> torch.Tensor:
        """hidden_states, position_embeddings (B, S, C); reference_points (B or 1, S, 2) as (x, y) in [0, 1],
        the same point on every level (the encoder's case); spatial_shapes the (H, W) of the first
        ``len(spatial_shapes)`` levels, whose tokens make up the S."""
        batch, tokens, _ = hidden_states.shape
        levels = len(spatial_shapes)
        if levels > self.n_levels:
            raise ValueError(f"attention built for {self.n_levels} levels cannot run on {levels}")
        queries = hidden_states + position_embeddings
        value = self.value_proj(hidden_states).view(batch, tokens, self.n_heads, self.d_model // self.n_heads)

        def per_level(linear: nn.Linear) -> torch.Tensor:
            if levels == self.n_levels:
                return linear(queries)
            return F.linear(queries, *level_sliced_linear(linear, self.n_heads, self.n_levels, levels))

        offsets = per_level(self.sampling_offsets).view(batch, tokens, self.n_heads, levels, self.n_points, 2)
        logits = per_level(self.attention_weights).view(batch, tokens, self.n_heads, levels * self.n_points)
        weights = F.softmax(logits, -1).view(batch, tokens, self.n_heads, levels, self.n_points)
        # Offsets are in pixels of their level: divide by (W, H) to reach the normalised frame.
        normaliser = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=torch.long, device=queries.device)
        locations = reference_points[:, :, None, None, None, :] + offsets / normaliser[None, None, None, :, None, :]
        output = multi_scale_deformable_attention(value, spatial_shapes, locations, weights)
        return self.output_proj(output)


class DeformableEncoderLayer(nn.Module):
    """Post-norm encoder layer: x = LN1(x + MSDA(x)); x = LN2(x + fc2(relu(fc1(x))))."""

    def __init__(
        self,
        d_model: int = 256,
        n_levels: int = 3,
        n_heads: int = 8,
        n_points: int = 4,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
        layer_norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.n_levels = n_levels
        self.dropout = dropout
        self.self_attn = MultiScaleDeformableAttention(d_model, n_levels, n_heads, n_points)
        self.self_attn_layer_norm = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.final_layer_norm = nn.LayerNorm(d_model, eps=layer_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: SpatialShapes,
    ) -> torch.Tensor:
        attended = self.self_attn(hidden_states, position_embeddings, reference_points, spatial_shapes)
        hidden_states = self.self_attn_layer_norm(hidden_states + F.dropout(attended, self.dropout, self.training))
        hidden = F.dropout(F.relu(self.fc1(hidden_states)), self.dropout, self.training)
        hidden = F.dropout(self.fc2(hidden), self.dropout, self.training)
        return self.final_layer_norm(hidden_states + hidden)


def sine_position_embedding(
    height: int,
    width: int,
    num_pos_feats: int = 128,
    temperature: float = 10000,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Normalised 2-D sine position embedding (DETR / Mask2Former), (1, 2*num_pos_feats, H, W): [pos_y, pos_x],
    each sin on even and cos on odd feature indices, interleaved; coordinates run 1..H (1..W) scaled to 2*pi."""
    ones = torch.ones(1, height, width, device=device, dtype=dtype)
    y_embed = ones.cumsum(1)
    x_embed = ones.cumsum(2)
    eps, scale = 1e-6, 2 * math.pi
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.int64, device=device).to(dtype)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)

    def interleave(angles: torch.Tensor) -> torch.Tensor:
        return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=4).flatten(3)

    pos_x = interleave(x_embed[..., None] / dim_t)
    pos_y = interleave(y_embed[..., None] / dim_t)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def encoder_reference_points(
    spatial_shapes: SpatialShapes, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(1, S, 2): every token's pixel centre ((j + 0.5) / W, (i + 0.5) / H) in its own level (no padding, so the
    valid ratio is 1 and the same point serves every level)."""
    points = []
    for height, width in spatial_shapes:
        ref_y, ref_x = torch.meshgrid(
            torch.linspace(0.5, height - 0.5, height, dtype=dtype, device=device),
            torch.linspace(0.5, width - 0.5, width, dtype=dtype, device=device),
            indexing="ij",
        )
        points.append(torch.stack((ref_x.reshape(-1) / width, ref_y.reshape(-1) / height), -1))
    return torch.cat(points, 0)[None]


def run_progressive(
    layers: Sequence[DeformableEncoderLayer],
    active_levels: Sequence[int],
    tokens: torch.Tensor,
    pos: torch.Tensor,
    spatial_shapes: SpatialShapes,
    admit: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    residual: bool = False,
) -> torch.Tensor:
    """Run ``layers[i]`` on the tokens of the first ``active_levels[i]`` levels (non-decreasing).

    A level's tokens enter (through ``admit(level, level_tokens)`` when given: PRO-SCALE's gate) before the first
    layer that includes it, and are carried unchanged until then; the levels no layer includes are admitted at the
    end. With ``residual``
    the tokens that entered the current stage are added back after each layer that does not cover all levels.
    When every layer covers every level and nothing is admitted, this is the plain loop over the layers.
    """
    if len(active_levels) != len(layers):
        raise ValueError(f"{len(layers)} layers but {len(active_levels)} level counts")
    if any(b < a for a, b in zip(active_levels, active_levels[1:])) or any(
        not 1 <= n <= len(spatial_shapes) for n in active_levels
    ):
        raise ValueError(f"level counts {list(active_levels)} must rise within 1..{len(spatial_shapes)}")
    total = len(spatial_shapes)
    bounds = [0]
    for height, width in spatial_shapes:
        bounds.append(bounds[-1] + int(height) * int(width))
    if bounds[-1] != tokens.shape[1]:
        raise ValueError(f"spatial shapes {list(spatial_shapes)} give {bounds[-1]} tokens, got {tokens.shape[1]}")
    reference_points = encoder_reference_points(spatial_shapes, tokens.device, tokens.dtype)

    def enter(hidden: torch.Tensor | None, entered: int, levels: int) -> torch.Tensor:
        """``hidden`` (the first ``entered`` levels) followed by the admitted tokens of the levels up to ``levels``."""
        if hidden is None and levels == total and admit is None:
            return tokens  # the stock path: the input tensor itself, no split or concatenation
        arriving = [tokens[:, bounds[lv]:bounds[lv + 1]] for lv in range(entered, levels)]
        if admit is not None:
            arriving = [admit(lv, part) for lv, part in zip(range(entered, levels), arriving)]
        return torch.cat(([] if hidden is None else [hidden]) + arriving, 1)

    hidden, entered, stage_input = None, 0, None
    for layer, levels in zip(layers, active_levels):
        if levels > entered:
            hidden = stage_input = enter(hidden, entered, levels)
            entered = levels
        end = bounds[levels]
        hidden = layer(hidden, pos[:, :end], reference_points[:, :end], spatial_shapes[:levels])
        if residual and levels < total:
            hidden = hidden + stage_input
    # Levels no layer ran on are appended as they entered (gated where ``admit`` gates them), as the released code
    # concatenates every stage's input whether or not the stage has layers.
    return enter(hidden, entered, total) if entered < total else hidden


class DeformableEncoder(nn.Module):
    """The stock Mask2Former pixel-decoder encoder: ``num_layers`` deformable layers over all levels.

    ``forward(tokens, pos, spatial_shapes, coarse_layers=0)``: tokens and pos (B, S, C), the flattened input
    projections (coarse to fine) and sine PE + level embedding; spatial_shapes [(H, W)] in the same order.
    ``coarse_layers = k`` runs the first k layers on res5 + res4 only (the knob; module docstring).
    """

    def __init__(
        self,
        num_layers: int = 6,
        d_model: int = 256,
        n_levels: int = 3,
        n_heads: int = 8,
        n_points: int = 4,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
        layer_norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.n_levels = n_levels
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(d_model, n_levels, n_heads, n_points, ffn_dim, dropout, layer_norm_eps)
            for _ in range(num_layers)
        )

    @property
    def full_scale_layers(self) -> int:
        """Layers trained on every level: what ``coarse_layers_for_rate`` needs for this encoder."""
        return len(self.layers)

    def forward(
        self, tokens: torch.Tensor, pos: torch.Tensor, spatial_shapes: SpatialShapes, coarse_layers: int = 0
    ) -> torch.Tensor:
        if len(spatial_shapes) != self.n_levels:
            raise ValueError(f"encoder built for {self.n_levels} levels got {len(spatial_shapes)} spatial shapes")
        levels = knob_levels(len(self.layers), coarse_layers, self.n_levels)
        return run_progressive(self.layers, levels, tokens, pos, spatial_shapes)
