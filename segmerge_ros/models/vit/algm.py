"""ALGM (Norouzi et al., CVPR 2024): adaptive local-then-global token merging for Segmenter. Parameter-free.

Our own implementation of the method as described in ``docs/methods.md`` (no code from the official repository):

1. Local merge (CLAP) after the attention of ``local_block``: every non-overlapping 2x2 window of the patch grid is
   scored by the mean pairwise cosine similarity of its four tokens; windows scoring at or above
   ``local_threshold`` become one token. Rows/columns that do not fill a window (odd grid sides) stay as they are, so
   any grid works, square or not (a 640x480 frame gives 30x40).
2. Global merge (GBM) after the attention of ``global_block``: bipartite matching (alternate tokens as sources and
   destinations, cosine similarity); every source whose best match scores at or above
   ``mean + std / global_block`` of that image's best-match scores is merged into its destination. Here that
   adaptive threshold is floored by ``global_floor`` (default: the local threshold) so that one knob switches the
   whole method off and ``set_merge_rate`` is monotone; ``global_floor=None`` gives the paper's unfloored rule.
3. Merged tokens are size-weighted means; attention is proportional (``+log(size)`` on the keys). The decoder runs
   on the merged tokens and its per-token class scores are copied back to every patch of each token.

Unlike the official code: device-agnostic torch (CPU and GPU), any grid shape, no N x N source matrix (a
``token_of_patch`` index instead), and each image of a batch keeps its own decisions and token count (the batch is
padded with size-0 tokens that attention never sees), not the batch minimum.

Token counts depend on the content: shapes are dynamic, run it eagerly (no tracing/static-shape backends).
"""

from __future__ import annotations

import torch

from segmerge_ros.merging.token_groups import compact_groups, gather_tokens, merge_groups
from segmerge_ros.models.vit.segmenter import SegmenterViT, ViTConfig, check_merge_rate, key_bias_from_sizes, tokens_to_grid

# Paper thresholds per backbone size (Cityscapes ViT-S: 0.955).
PAPER_THRESHOLDS = {"tiny": 0.90, "small": 0.88, "base": 0.94, "large": 0.95}
OFF = float("inf")


def threshold_for_rate(rate: float) -> float:
    """``set_merge_rate`` mapping: 0 -> off (inf); otherwise ``1 - 0.25 * rate`` (0.4 -> 0.90, 0.48 -> 0.88,
    0.95 -> 0.7625). Higher rates accept less similar windows/pairs, so more tokens merge."""
    rate = check_merge_rate(rate)
    return OFF if rate == 0.0 else 1.0 - 0.25 * rate


def window_scores(patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Mean pairwise cosine similarity of each non-overlapping 2x2 window: ``(B, gh//2, gw//2)``.

    ``patches (B, gh*gw, D)`` in raster order. Scores are clamped to [-1, 1] so a threshold above 1 never merges.
    """
    batch, _, dim = patches.shape
    rows, cols = grid[0] // 2, grid[1] // 2
    grid_tokens = patches.reshape(batch, grid[0], grid[1], dim)[:, : rows * 2, : cols * 2]
    windows = grid_tokens.reshape(batch, rows, 2, cols, 2, dim).permute(0, 1, 3, 2, 4, 5)
    windows = windows.reshape(batch, rows, cols, 4, dim)
    unit = torch.nn.functional.normalize(windows, dim=-1)
    similarity = unit @ unit.transpose(-1, -2)
    off_diagonal = similarity.sum((-1, -2)) - similarity.diagonal(dim1=-2, dim2=-1).sum(-1)
    return (off_diagonal / 12.0).clamp(-1.0, 1.0)  # 4x4 matrix: 12 off-diagonal entries = 6 pairs twice


def local_representatives(scores: torch.Tensor, grid: tuple[int, int], threshold: float) -> torch.Tensor:
    """For each patch the patch representing its group: the window's top-left patch where the window merges,
    itself otherwise. ``(B, gh*gw)``."""
    batch = scores.shape[0]
    rows, cols = scores.shape[1:]
    device = scores.device
    own = torch.arange(grid[0] * grid[1], device=device).view(grid)
    covered = own[: rows * 2, : cols * 2]
    top_left = covered[::2, ::2].repeat_interleave(2, 0).repeat_interleave(2, 1)
    merged = (scores >= threshold).repeat_interleave(2, 1).repeat_interleave(2, 2)
    representative = own.expand(batch, -1, -1).clone()
    representative[:, : rows * 2, : cols * 2] = torch.where(merged, top_left, covered)
    return representative.reshape(batch, -1)


def global_representatives(
    x: torch.Tensor, size: torch.Tensor, divisor: float, floor: float | None
) -> torch.Tensor:
    """Adaptive bipartite matching over the tokens after the class token; ``(B, T)`` representatives.

    Sources are the tokens at odd positions, destinations at even positions (>= 2); padding (size 0) is neither.
    Per image: threshold = mean + std / ``divisor`` of the valid sources' best-match scores, at least ``floor``.
    Padding tokens point at the class token (they carry size 0, so they change nothing) and drop out.
    """
    batch, tokens, _ = x.shape
    device = x.device
    positions = torch.arange(tokens, device=device)
    unit = torch.nn.functional.normalize(x, dim=-1)
    sources, destinations = unit[:, 1::2], unit[:, 2::2]
    source_valid, destination_valid = size[:, 1::2] > 0, size[:, 2::2] > 0
    representative = torch.where(size > 0, positions, torch.zeros_like(positions)).clone()
    representative[:, 0] = 0
    if destinations.shape[1] == 0:
        return representative
    similarity = (sources @ destinations.transpose(1, 2)).clamp(-1.0, 1.0)
    similarity = similarity.masked_fill(~destination_valid[:, None, :], float("-inf"))
    best, best_index = similarity.max(-1)
    valid = source_valid & destination_valid.any(1, keepdim=True)
    count = valid.sum(1).clamp_min(1)
    scores = torch.where(valid, best, torch.zeros_like(best))
    mean = scores.sum(1) / count
    variance = torch.where(valid, (best - mean[:, None]) ** 2, torch.zeros_like(best)).sum(1) / count
    threshold = mean + variance.sqrt() / divisor
    if floor is not None:
        threshold = threshold.clamp_min(floor)
    merge = valid & (best >= threshold[:, None])
    destination_positions = positions[2::2][best_index]
    representative[:, 1::2] = torch.where(merge, destination_positions, representative[:, 1::2])
    return representative


class ALGMSegmenter(SegmenterViT):
    """Segmenter with ALGM merging. Same parameters as ``SegmenterViT``: plain checkpoints load unchanged.

    Knobs: ``local_threshold`` (window similarity), ``global_floor`` (lower bound on the adaptive global threshold;
    ``"local"`` = follow the local threshold, None = unfloored as in the paper), ``local_block``/``global_block``
    (0-based block indices), ``proportional_attention``. With ``local_threshold > 1`` and a floor above 1 nothing
    merges and the output equals the plain ViT exactly.

    ``set_merge_rate(rate)``: sets the local threshold to ``threshold_for_rate(rate)`` (0 = off, else
    ``1 - 0.25 rate``) and, with the default ``global_floor="local"``, the global floor with it. Token counts are
    data-dependent (kept inside this module, per image, padded in the batch): eager execution only.
    ``last_token_counts`` holds the per-image token counts (patches only) after each merge of the last forward.
    """

    family = "algm"

    def __init__(
        self,
        config: ViTConfig,
        local_threshold: float | None = None,
        global_floor: float | str | None = "local",
        local_block: int = 1,
        global_block: int | None = None,
        proportional_attention: bool = True,
    ) -> None:
        super().__init__(config)
        if local_threshold is None:
            local_threshold = PAPER_THRESHOLDS.get(config.size_name, 0.9)
        if global_block is None:
            global_block = 7 if config.depth >= 24 else 5
        if not 0 <= local_block < global_block < config.depth:
            raise ValueError(f"need 0 <= local_block < global_block < depth, got {local_block}, {global_block}")
        self.local_threshold = float(local_threshold)
        self.global_floor = global_floor
        self.local_block = local_block
        self.global_block = global_block
        self.proportional_attention = proportional_attention
        self.last_token_counts: dict[str, list[int]] = {}
        # The rate that set_merge_rate maps onto this threshold (0 when off).
        self.merge_rate = min(0.95, max(0.0, (1.0 - self.local_threshold) / 0.25))

    def method_config(self) -> dict:
        return {
            "local_threshold": self.local_threshold if self.local_threshold != OFF else 2.0,
            "global_floor": self.global_floor,
            "local_block": self.local_block,
            "global_block": self.global_block,
            "proportional_attention": self.proportional_attention,
        }

    @property
    def static_shapes(self) -> bool:
        return False

    def set_merge_rate(self, rate: float) -> None:
        """Map ``rate`` in [0, 0.95] onto the similarity thresholds (see ``threshold_for_rate``); 0 = no merging."""
        self.merge_rate = check_merge_rate(rate)
        self.local_threshold = threshold_for_rate(rate)

    def _floor(self) -> float | None:
        return self.local_threshold if self.global_floor == "local" else self.global_floor

    def _merge(self, x, size, token_of_patch, representative):
        """Apply a grouping: merge tokens, update sizes and the patch -> token map."""
        group, count = compact_groups(representative)
        if bool((count == x.shape[1]).all()):
            return x, size, token_of_patch  # nothing merged anywhere: keep the exact tensors
        x, size = merge_groups(x, size, group, int(count.max()))
        return x, size, group.gather(1, token_of_patch)

    def encode(self, images: torch.Tensor):
        """Encoder with merging: final normed tokens ``(B, T, D)``, sizes ``(B, T)``, ``token_of_patch (B, N)``."""
        encoder = self.encoder
        x, grid = encoder.embed(images)
        batch, tokens = x.shape[:2]
        size = torch.ones(batch, tokens, device=x.device, dtype=x.dtype)
        token_of_patch = torch.arange(1, tokens, device=x.device).expand(batch, -1)
        counts: dict[str, list[int]] = {}
        bias = None
        for index, block in enumerate(encoder.blocks):
            x = block.attend(x, bias)
            if index == self.local_block and self.local_threshold <= 1.0:
                scores = window_scores(x[:, 1:], grid)
                patch_rep = local_representatives(scores, grid, self.local_threshold)
                representative = torch.cat([torch.zeros_like(patch_rep[:, :1]), patch_rep + 1], dim=1)
                x, size, token_of_patch = self._merge(x, size, token_of_patch, representative)
                counts["after_local"] = ((size[:, 1:] > 0).sum(1)).tolist()
            elif index == self.global_block and (self._floor() is None or self._floor() <= 1.0):
                representative = global_representatives(x, size, float(self.global_block), self._floor())
                x, size, token_of_patch = self._merge(x, size, token_of_patch, representative)
                counts["after_global"] = ((size[:, 1:] > 0).sum(1)).tolist()
            bias = key_bias_from_sizes(size, self.proportional_attention)
            x = block.feed_forward(x)
        self.last_token_counts = counts
        return encoder.norm(x), size, token_of_patch, grid

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x, size, token_of_patch, grid = self.encode(images)
        patch_size = size[:, 1:]
        scores = self.decoder(x[:, 1:], key_bias_from_sizes(patch_size, self.proportional_attention))
        # Class scores of each merged token copied back to all its patches.
        per_patch = gather_tokens(scores, token_of_patch - 1)
        return tokens_to_grid(per_patch, grid)
