"""Per-image token grouping shared by ALGM, ClustViT and DoViT: variable token counts in a padded batch.

A reduced batch is ``x (B, T, D)`` with token sizes ``size (B, T)``: the number of patches each token stands for,
0 for padding. Every image keeps its own count; the batch is padded to the largest. ``token_of_patch (B, N)`` says
which token each original patch lives in, so outputs can be copied back to the full grid with one gather.

Everything here is gathers, cumulative sums and ``scatter_add``: no Python loop over tokens or images.
"""

from __future__ import annotations

import torch


def compact_groups(representative: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Number groups densely per image.

    ``representative (B, T)``: for each token the index of the token that represents its group (a representative
    points at itself). Returns ``group (B, T)`` in ``[0, count)`` (groups numbered in the order of their
    representatives) and ``count (B,)``.
    """
    positions = torch.arange(representative.shape[1], device=representative.device)
    is_rep = representative == positions
    rank = is_rep.long().cumsum(1) - 1
    return rank.gather(1, representative), is_rep.sum(1)


def merge_groups(
    x: torch.Tensor, size: torch.Tensor, group: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted mean of the tokens of each group: ``(B, num_groups, D)`` and the summed sizes.

    Padding tokens (size 0) contribute nothing wherever they point. Groups with no size stay zero with size 0
    (padding). A group of one token of size 1 reproduces that token exactly (``0 + x*1 / 1``).
    """
    batch, _, dim = x.shape
    weights = size.to(x.dtype)
    index = group[..., None].expand(-1, -1, dim)
    summed = x.new_zeros(batch, num_groups, dim).scatter_add(1, index, x * weights[..., None])
    new_size = size.new_zeros(batch, num_groups).scatter_add(1, group, size)
    merged = summed / new_size.clamp_min(1e-12).to(x.dtype)[..., None]
    return merged, new_size


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x (B, T, D)`` picked at ``index (B, M)`` -> ``(B, M, D)``."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def compact_selected(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the kept tokens of each image first (in order), padded to the batch maximum.

    ``keep (B, T)`` bool. Returns ``index (B, K)`` and ``valid (B, K)``; padded slots point at non-kept tokens
    (or repeat the last index when every token is kept) and are ``valid == False``.
    """
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices
    count = int(keep.sum(1).max())
    index = order[:, :count]
    return index, keep.gather(1, index)
