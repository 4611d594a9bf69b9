"""Segformer++ token merging inside SegFormer's efficient attention (training-free).

Per stage, two independent places (Kienzle et al., 2024):
- KV path: after the spatial-reduction conv + LayerNorm, the key/value tokens are merged. Attention's output length
  follows the queries, so nothing is unmerged.
- Q path: the normed block input is merged before attention as queries (keys and values still come from the full
  grid), and the attention output is unmerged right after it.
Or ``q_pool``: queries average-pooled with a stride and unmerged by nearest upsampling (the paper's ``2x2`` preset).

The merge amount ``r`` is a fraction of all tokens at that place, capped at the number of sources, so shapes depend
only on the input resolution and the configuration, never on the image content.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from segmerge_ros.merging.bipartite import MergeFn, bipartite_soft_matching_2d

MAX_MERGE_RATE = 0.95


@dataclass(frozen=True)
class StageMerge:
    """Merge settings of one SegFormer stage (the same for every block of the stage)."""

    q_rate: float = 0.0  # fraction of query tokens merged
    q_cell: tuple[int, int] = (2, 2)  # (sy, sx) cell holding one destination
    kv_rate: float = 0.0  # fraction of key/value tokens merged
    kv_cell: tuple[int, int] = (2, 2)
    q_pool: tuple[int, int] = (1, 1)  # average-pool the queries with this stride instead of matching them
    matching: str = "global"  # "global" (Segformer++) or "local" (own cell only, O(N))
    # Mix-FFN on merged tokens: its two per-token linears see merged tokens, the 3x3 depthwise conv the full grid
    # (unmerge before it, merge again after it). Measured slower than unmerged on CPU (docs/benchmarks.md), so no
    # ladder rung uses it; kept switchable for GPUs, where gathers are cheap relative to the matrix products.
    ffn_rate: float = 0.0
    ffn_cell: tuple[int, int] = (2, 2)

    def __post_init__(self) -> None:
        for name in ("q_rate", "kv_rate", "ffn_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        if self.matching not in ("global", "local"):
            raise ValueError(f"matching must be 'global' or 'local', got {self.matching!r}")

    @property
    def merges_queries(self) -> bool:
        return self.q_rate > 0 or self.q_pool != (1, 1)

    @property
    def is_identity(self) -> bool:
        return not self.merges_queries and self.kv_rate == 0 and self.ffn_rate == 0


@dataclass(frozen=True)
class MergeConfig:
    """Merge settings for the four stages of a MiT encoder."""

    stages: tuple[StageMerge, StageMerge, StageMerge, StageMerge] = field(
        default_factory=lambda: (StageMerge(),) * 4
    )
    name: str = "custom"
    # Run the head's per-pixel layers on 2x2-merged pixels (1/8 of the input instead of 1/4): the head's sum,
    # ReLU and classifier touch a quarter of the pixels; the logits come out at 1/8.
    head_stride: int = 1
    # Run the whole network on the input scaled by this factor (the paper's "downsample" baseline): the coarsest
    # and strongest knob, used only at the top of the ladder.
    input_scale: float = 1.0

    def __post_init__(self) -> None:
        if len(self.stages) != 4:
            raise ValueError(f"a MergeConfig needs 4 stages, got {len(self.stages)}")
        if self.head_stride not in (1, 2):
            raise ValueError(f"head_stride must be 1 or 2, got {self.head_stride}")
        if not 0.25 <= self.input_scale <= 1.0:
            raise ValueError(f"input_scale must lie in [0.25, 1], got {self.input_scale}")

    @property
    def is_identity(self) -> bool:
        return self.head_stride == 1 and self.input_scale == 1.0 and all(s.is_identity for s in self.stages)

    @property
    def matches_tokens(self) -> bool:
        """Whether some stage merges tokens by bipartite matching (top-k, gathers and a scatter-mean), as opposed to
        only pooling, a strided head or a scaled input."""
        return any(s.q_rate > 0 or s.kv_rate > 0 or s.ffn_rate > 0 for s in self.stages)


NONE = MergeConfig(name="none")
PRESETS: dict[str, MergeConfig] = {
    "none": NONE,
    # The paper's presets (per stage 1-4).
    "hq": MergeConfig(
        (StageMerge(kv_rate=0.6, kv_cell=(2, 2)),) * 2 + (StageMerge(q_rate=0.8, q_cell=(4, 4)),) * 2, name="hq"
    ),
    "fast": MergeConfig(
        (StageMerge(kv_rate=0.9, kv_cell=(4, 4)),) * 2 + (StageMerge(q_rate=0.9, q_cell=(4, 4)),) * 2, name="fast"
    ),
    "2x2": MergeConfig((StageMerge(q_pool=(2, 2)),) * 4, name="2x2"),
}


def preset(name: str) -> MergeConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown merge preset {name!r}; choose one of {sorted(PRESETS)}") from None


def config_for_rate(rate: float, matching: str = "global") -> MergeConfig:
    """Map the node's scalar merge rate in [0, 0.95] onto per-stage settings.

    Stages 1-2 merge a fraction ``rate`` of their key/value tokens (2x2 cells up to 0.7, 4x4 cells above, where 2x2
    cells run out of sources); stages 3-4 merge a fraction ``min(4/3 * rate, 0.9375)`` of their queries on 4x4
    cells, rising linearly from 0 to 0.8 while ``rate`` goes to 0.6, then to 0.9 at rate 0.9 (0.917 at 0.95). The
    paper's presets lie on this line: rate 0.6 is ``hq`` and rate 0.9 is ``fast``. Rate 0 is the unmerged model.
    """
    if not 0.0 <= rate <= MAX_MERGE_RATE:
        raise ValueError(f"merge rate must lie in [0, {MAX_MERGE_RATE}], got {rate}")
    if rate == 0.0:
        return NONE
    kv = StageMerge(kv_rate=min(rate, 0.9375), kv_cell=(2, 2) if rate <= 0.7 else (4, 4), matching=matching)
    q_rate = rate * 4.0 / 3.0 if rate <= 0.6 else 0.8 + (rate - 0.6) / 3.0
    q = StageMerge(q_rate=round(q_rate, 6), q_cell=(4, 4), matching=matching)
    return MergeConfig((kv, kv, q, q), name=f"rate={rate:g}")


@dataclass(frozen=True)
class Rung:
    """One step of the merge-rate ladder: merge rates from ``rate`` up to the next rung's select ``config``."""

    rate: float
    config: MergeConfig


def _rung(rate: float, name: str, base: MergeConfig, head_stride: int = 2, input_scale: float = 1.0) -> Rung:
    return Rung(rate, replace(base, name=name, head_stride=head_stride, input_scale=input_scale))


# The ladder behind the node's scalar merge_rate, ordered by latency measured with segmerge-bench (SegFormer-B0,
# 2-core CPU, 512x1024 and 1024x2048; docs/benchmarks.md) and by FLOPs (test_ladder.py). Cheapest quality first:
# the head on 2x2-merged pixels costs ~1.5 % agreement and saves a quarter of the time; then Segformer++ attention
# merging (hq, fast); the top rungs also scale the input, the only knob with real authority at 640x480.
# Intermediate attention rates (0.3, 0.75 on top of head2) were measured and dropped: at 576x768 and below they
# were no faster than the rung beneath them, and a rung must be faster than the one before it.
# Scaled rungs use ``hq``, not ``fast``: ``fast``'s 90 % key/value merge on 4x4 cells leaves too few key/value
# tokens once the input shrinks (agreement 0.79 against hq's 0.93 at scale 0.875 on the trained B0).
LADDER: tuple[Rung, ...] = (
    Rung(0.0, NONE),
    _rung(0.15, "head2", NONE),
    _rung(0.3, "head2+hq", PRESETS["hq"]),
    _rung(0.45, "head2+fast", PRESETS["fast"]),
    _rung(0.6, "head2+hq+scale0.875", PRESETS["hq"], input_scale=0.875),
    _rung(0.75, "head2+hq+scale0.75", PRESETS["hq"], input_scale=0.75),
    _rung(0.9, "head2+hq+scale0.625", PRESETS["hq"], input_scale=0.625),
)

# Backends whose own measurements call for another ladder (docs/benchmarks.md, sections 10 and 10c); the others use
# LADDER. OpenVINO runs the matching's sorts, gathers and scatters slowly: on the trained B0 at 576x768 hq made it
# slower (bf16: 403 ms against 376 unmerged, 1 thread), so its ladder merges no tokens by matching. Query pooling
# (2x2) pays there instead: head2+2x2 beats head2+scale0.875 in speed and agreement (bf16, 576x768: 32.9 ms / 0.957
# against 33.7 / 0.924; 512x1024: 36.8 / 0.958 against 38.8 / 0.933), and at each input scale the pooled rung is
# 4-24 % faster for at most 1.1 points of agreement (at scale 0.625, 512x1024: faster and better).
OPENVINO_LADDER: tuple[Rung, ...] = (
    Rung(0.0, NONE),
    _rung(0.15, "head2", NONE),
    _rung(0.3, "head2+2x2", PRESETS["2x2"]),
    _rung(0.6, "head2+2x2+scale0.875", PRESETS["2x2"], input_scale=0.875),
    _rung(0.75, "head2+2x2+scale0.75", PRESETS["2x2"], input_scale=0.75),
    _rung(0.9, "head2+2x2+scale0.625", PRESETS["2x2"], input_scale=0.625),
)
BACKEND_LADDERS: dict[str, tuple[Rung, ...]] = {"openvino": OPENVINO_LADDER}


def ladder_for_backend(backend: str) -> tuple[Rung, ...]:
    return BACKEND_LADDERS.get(backend, LADDER)


# Measured variants that no rung uses (segmerge-bench --presets accepts these names too).
EXPERIMENTS: dict[str, MergeConfig] = {
    "ffn0.5-local": MergeConfig((StageMerge(ffn_rate=0.5, matching="local"),) * 2 + (StageMerge(),) * 2, name="ffn0.5-local"),
    "ffn0.5-global": MergeConfig((StageMerge(ffn_rate=0.5),) * 2 + (StageMerge(),) * 2, name="ffn0.5-global"),
    "q12-0.5-local": MergeConfig(
        (StageMerge(q_rate=0.5, q_cell=(2, 2), matching="local"),) * 2 + (StageMerge(),) * 2, name="q12-0.5-local"
    ),
    "attn0.9-local": config_for_rate(0.9, matching="local"),
    # Input scaling without token merging (the head on 2x2 cells): the candidates of backends whose measured
    # merging does not pay (OpenVINO runs the matching's sorts and gathers comparatively slowly).
    **{f"head2+scale{scale:g}": _rung(0.0, f"head2+scale{scale:g}", NONE, input_scale=scale).config
       for scale in (0.875, 0.75, 0.625, 0.5)},
    # Query pooling (2x2, no matching: exports to ONNX) with the strided head, alone and on a scaled input.
    "head2+2x2": _rung(0.0, "head2+2x2", PRESETS["2x2"]).config,
    **{f"head2+2x2+scale{scale:g}": _rung(0.0, f"head2+2x2+scale{scale:g}", PRESETS["2x2"], input_scale=scale).config
       for scale in (0.875, 0.75, 0.625)},
}


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """The network input size for an ``input_scale`` rung (never below 32 pixels a side)."""
    if scale == 1.0:
        return int(height), int(width)
    return max(32, round(int(height) * scale)), max(32, round(int(width) * scale))


def rung_for_rate(rate: float, ladder: tuple[Rung, ...] = LADDER) -> Rung:
    """The highest rung whose rate is at most ``rate`` (rate in [0, 0.95])."""
    if not 0.0 <= rate <= MAX_MERGE_RATE:
        raise ValueError(f"merge rate must lie in [0, {MAX_MERGE_RATE}], got {rate}")
    return [rung for rung in ladder if rung.rate <= rate + 1e-9][-1]


def merge_count(rate: float, num_tokens: int) -> int:
    return int(num_tokens * rate)


def kv_merge(tokens: torch.Tensor, h: int, w: int, stage: StageMerge) -> torch.Tensor:
    """Merge the key/value tokens (B, h*w, C) of one attention; returns fewer tokens, or the input unchanged."""
    r = merge_count(stage.kv_rate, h * w)
    if r <= 0:
        return tokens
    sy, sx = stage.kv_cell
    merge, _ = bipartite_soft_matching_2d(tokens, h, w, sx, sy, r, stage.matching)
    return merge(tokens)


def query_merge(tokens: torch.Tensor, h: int, w: int, stage: StageMerge) -> tuple[torch.Tensor, MergeFn]:
    """Reduce the queries (B, h*w, C); returns (queries, unmerge) where unmerge restores (B, h*w, C')."""
    if stage.q_pool != (1, 1):
        return _pool_queries(tokens, h, w, stage.q_pool)
    r = merge_count(stage.q_rate, h * w)
    if r <= 0:
        return tokens, lambda x: x
    sy, sx = stage.q_cell
    merge, unmerge = bipartite_soft_matching_2d(tokens, h, w, sx, sy, r, stage.matching)
    return merge(tokens), unmerge


def ffn_merge(tokens: torch.Tensor, h: int, w: int, stage: StageMerge) -> tuple[MergeFn, MergeFn] | None:
    """Merge/unmerge closures for the Mix-FFN's per-token linears, or None when the stage does not merge there."""
    r = merge_count(stage.ffn_rate, h * w)
    if r <= 0:
        return None
    sy, sx = stage.ffn_cell
    return bipartite_soft_matching_2d(tokens, h, w, sx, sy, r, stage.matching)


def _pool_queries(tokens: torch.Tensor, h: int, w: int, stride: tuple[int, int]) -> tuple[torch.Tensor, MergeFn]:
    batch, _, channels = tokens.shape
    grid = tokens.transpose(1, 2).reshape(batch, channels, h, w)
    pooled = F.avg_pool2d(grid, kernel_size=stride, stride=stride, ceil_mode=True)
    ph, pw = pooled.shape[-2:]

    def unpool(x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        up = F.interpolate(x.transpose(1, 2).reshape(batch, c, ph, pw), size=(h, w), mode="nearest")
        return up.flatten(2).transpose(1, 2)

    return pooled.flatten(2).transpose(1, 2), unpool
