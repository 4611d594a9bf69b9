"""2D bipartite soft matching: merge/unmerge closures for tokens laid out on an h x w grid.

One destination per ``sy x sx`` cell of the grid (its top-left token), every other token is a source. Each source
finds its most similar destination by cosine similarity; the ``r`` most similar sources are averaged into their
destinations, the rest are kept. ``unmerge`` copies every destination's value back to the sources merged into it.

Token counts depend only on (h, w, sx, sy, r), never on the content, so shapes are static per input size and rate.

Two matching scopes:
- ``global``: every source against every destination (what Segformer++ and tomesd do): O(N^2 C / cell).
- ``local``: every source against the destination of its own cell only: O(N C). Much cheaper at robot resolutions.

Everything is gathers, matrix products and ``scatter_reduce``; there is no Python loop over tokens.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

import torch

MergeFn = Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@lru_cache(maxsize=256)
def grid_split(h: int, w: int, sx: int, sy: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raster-order token positions of the sources and destinations, and each source's own cell.

    Destinations are the top-left token of every full ``sy x sx`` cell. Rows and columns beyond the last full cell
    (a grid not divisible by the cell) hold sources only; for local matching they belong to the nearest cell.
    Returns (src_pos, dst_pos, src_cell): src_cell[i] indexes dst_pos.
    """
    cells_y, cells_x = h // sy, w // sx
    ys = torch.arange(h, device=device).view(h, 1).expand(h, w)
    xs = torch.arange(w, device=device).view(1, w).expand(h, w)
    is_dst = (ys % sy == 0) & (xs % sx == 0) & (ys < cells_y * sy) & (xs < cells_x * sx)
    flat = is_dst.reshape(-1)
    positions = torch.arange(h * w, device=device)
    src_pos, dst_pos = positions[~flat], positions[flat]
    cell_y = (ys // sy).clamp(max=cells_y - 1)
    cell_x = (xs // sx).clamp(max=cells_x - 1)
    src_cell = (cell_y * cells_x + cell_x).reshape(-1)[~flat]
    return src_pos, dst_pos, src_cell


def max_merge(h: int, w: int, sx: int, sy: int) -> int:
    """How many tokens can be merged at most: the number of sources."""
    return h * w - (h // sy) * (w // sx)


def bipartite_soft_matching_2d(
    metric: torch.Tensor, h: int, w: int, sx: int, sy: int, r: int, matching: str = "global"
) -> tuple[MergeFn, MergeFn]:
    """Match ``metric`` (B, h*w, C) and return ``(merge, unmerge)``.

    ``merge`` maps (B, N, C') to (B, N - r, C') as [kept sources, destinations]; ``unmerge`` maps it back to
    (B, N, C'). ``r`` is capped at the number of sources; r <= 0, or a grid smaller than one cell (no destination to
    merge into), returns identities: the unmerged computation, bit for bit.
    """
    batch, num_tokens, _ = metric.shape
    if num_tokens != h * w:
        raise ValueError(f"metric has {num_tokens} tokens, grid is {h}x{w}")
    if r <= 0 or h < sy or w < sx:
        return _identity, _identity
    src_pos, dst_pos, src_cell = grid_split(h, w, sx, sy, metric.device)
    r = min(r, src_pos.numel())
    num_dst = dst_pos.numel()

    with torch.no_grad():
        unit = metric / metric.norm(dim=-1, keepdim=True)
        src, dst = unit[:, src_pos], unit[:, dst_pos]
        if matching == "global":
            best_score, best_dst = (src @ dst.transpose(-1, -2)).max(dim=-1)
        elif matching == "local":
            best_dst = src_cell.expand(batch, -1)
            best_score = (src * dst[:, src_cell]).sum(dim=-1)
        else:
            raise ValueError(f"unknown matching {matching!r}: use 'global' or 'local'")
        order = best_score.argsort(dim=-1, descending=True)
        merged_src, kept_src = order[:, :r], order[:, r:]
        merged_dst = best_dst.gather(1, merged_src)  # (B, r) index into dst
        kept_pos = src_pos[kept_src]  # (B, n_kept) grid positions
        merged_pos = src_pos[merged_src]  # (B, r)
        num_kept = kept_pos.shape[1]
        # Where each grid position finds its value after merging: one gather unmerges.
        slot = torch.empty(batch, num_tokens, dtype=torch.long, device=metric.device)
        # scatter_ rather than index assignment: the same result, and it exports (OpenVINO) for any grid size.
        slot.scatter_(1, dst_pos.expand(batch, -1), torch.arange(num_kept, num_kept + num_dst, device=metric.device).expand(batch, -1))
        slot.scatter_(1, kept_pos, torch.arange(num_kept, device=metric.device).expand(batch, -1))
        slot.scatter_(1, merged_pos, merged_dst + num_kept)

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        channels = x.shape[-1]
        kept = x.gather(1, kept_pos.unsqueeze(-1).expand(-1, -1, channels))
        moved = x.gather(1, merged_pos.unsqueeze(-1).expand(-1, -1, channels))
        merged = x[:, dst_pos].scatter_reduce(1, merged_dst.unsqueeze(-1).expand(-1, -1, channels), moved, reduce=mode)
        return torch.cat([kept, merged], dim=1)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        return x.gather(1, slot.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

    return merge, unmerge
