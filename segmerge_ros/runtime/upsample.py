"""The arg-max of bilinearly upsampled logits, computed exactly without upsampling every class.

At camera resolution the K-channel upsample costs more than a merged network (19 classes x 576 x 768 floats), so
``upsampled_argmax`` works per *cell*: the square between four neighbouring logit pixels. Bilinear interpolation
inside a cell is a convex combination of its corners, so a class that some corner winner beats at all four corners
cannot win anywhere in the cell:
- inside regions one class wins at every corner: the cell's pixels take it (one uint8 nearest-style fill);
- on a boundary between two regions the two corner winners are, almost everywhere, the only classes not ruled out:
  the sign of their interpolated margin decides, computed per boundary cell as a small block of pixels (a cell is
  about scale x scale pixels), never over the whole frame; near ties again in F.interpolate's own order of
  operations;
- cells where more classes remain interpolate just those classes at their pixels.
The result equals ``F.interpolate(logits, size, mode="bilinear", align_corners=False).argmax`` (ties go to the lower
class id, as there).
"""

from __future__ import annotations

from functools import lru_cache

import torch


def _bilinear_taps(source: int, target: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per output index: the two source indices and the weight of the second, as F.interpolate's bilinear mode
    with align_corners=False computes them (source coordinate clamped at 0, the last index repeated at the edge)."""
    position = ((torch.arange(target, device=device, dtype=torch.float32) + 0.5) * (source / target) - 0.5).clamp(min=0)
    first = position.floor().long().clamp(max=source - 1)
    second = (first + 1).clamp(max=source - 1)
    return first, second, position - first


@lru_cache(maxsize=32)
def _axis(source: int, target: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """One axis's taps, and its output indices grouped by cell: ``(first, second, weight, group_cell,
    group_index, group_weight)``. Group g holds up to M consecutive output indices of cell ``group_cell[g]``
    (``group_index`` (G, M), padded with ``target``, a scratch index; ``group_weight`` (G, M), padded with 0).
    A cell's indices are consecutive because ``first`` never decreases; long runs (the clamped edge bands) are
    split, so M stays about the scale factor."""
    first, second, weight = _bilinear_taps(source, target, device)
    per_cell = torch.bincount(first, minlength=source)
    width = max(1, min(int(per_cell.max()), int(-(-target // source)) + 1))
    cell_start = torch.cumsum(per_cell, 0) - per_cell
    offset = torch.arange(target, device=device) - cell_start[first]  # index within its cell's run
    group_key = first * target + offset // width  # (cell, chunk): sorted like the output indices
    keys, group = torch.unique_consecutive(group_key, return_inverse=True)
    slot = offset % width
    group_index = torch.full((len(keys), width), target, dtype=torch.long, device=device)
    group_weight = torch.zeros((len(keys), width), dtype=weight.dtype, device=device)
    group_index[group, slot] = torch.arange(target, device=device)
    group_weight[group, slot] = weight
    return first, second, weight, keys // target, group_index, group_weight


def upsampled_argmax(logits: torch.Tensor, labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Arg-max of the bilinearly upsampled (K, h, w) ``logits`` at ``size`` (H, W), as uint8 class ids (int32 beyond
    256 classes); ``labels`` is the arg-max at (h, w). See the module's docstring for how."""
    num_classes, height, width = logits.shape
    out_height, out_width = size
    device = logits.device
    y0, y1, wy, group_row, row_index, row_weight = _axis(height, out_height, device)
    x0, x1, wx, group_col, col_index, col_weight = _axis(width, out_width, device)
    small = torch.uint8 if num_classes <= 256 else torch.int32
    flat_logits, span = logits.contiguous().reshape(-1), height * width
    # Cell (r, c) spans logit pixels r..r1 x c..c1 (clamped at the last row/column, as the taps are).
    r1 = (torch.arange(height, device=device) + 1).clamp(max=height - 1)
    c1 = (torch.arange(width, device=device) + 1).clamp(max=width - 1)
    corner_rows = torch.stack([torch.arange(height, device=device), r1]).view(2, 1, height, 1)
    corner_cols = torch.stack([torch.arange(width, device=device), c1]).view(1, 2, 1, width)
    corner_pixels = (corner_rows * width + corner_cols).reshape(4, height, width)  # flat index of each cell corner
    corner_labels = labels.reshape(-1)[corner_pixels]  # (4 corners, h, w)
    first = corner_labels[0]
    boundary = (corner_labels[1] != first) | (corner_labels[2] != first) | (corner_labels[3] != first)

    # Every pixel as if its cell were inside a region; one scratch row and column (index H, W) take the padding of
    # the boundary blocks below.
    canvas = torch.empty((out_height + 1, out_width + 1), dtype=small, device=device)
    out = canvas[:out_height, :out_width]
    out.copy_(first.to(small).index_select(1, x0).index_select(0, y0))
    cell_r, cell_c = torch.nonzero(boundary, as_tuple=True)
    if not cell_r.numel():
        return out.contiguous()

    # The classes not ruled out in each boundary cell: its corner winners, and classes that neither its lowest- nor
    # its highest-id corner winner beats at all four corners (testing every winner would rule out a few more
    # classes for twice the work); listed first in ``candidates`` (R, cells), in class-id order, padded with
    # ruled-out classes (harmless). Reductions run along the last, contiguous axis: (cells, ..., 4 corners).
    corner_logits = flat_logits[torch.arange(num_classes, device=device).view(1, -1, 1) * span
                                + corner_pixels[:, cell_r, cell_c].t().unsqueeze(1)]  # (cells, K, 4 corners)
    winners = corner_labels[:, cell_r, cell_c].t()  # (cells, 4 corners)
    extremes = torch.stack([winners.amin(dim=1), winners.amax(dim=1)], dim=1)  # (cells, 2)
    extreme_values = corner_logits.gather(1, extremes.unsqueeze(2).expand(-1, -1, 4))  # (cells, 2, 4 corners)
    slack = 1e-4 * (1.0 + extreme_values.abs().flatten(1).amax(dim=1))  # absorbs the interpolation's rounding
    margin = (corner_logits.unsqueeze(2) - extreme_values.unsqueeze(1)).amax(dim=3)  # (cells, K, 2)
    possible = margin.amin(dim=2) >= -slack.unsqueeze(1)  # (cells, K)
    possible.scatter_(1, winners, True)
    count = possible.sum(dim=1)
    # A stable sort along each cell's classes keeps them in class-id order.
    candidates = torch.argsort((~possible).to(torch.uint8), dim=1, stable=True)[:, :int(count.max())].t()

    # Boundary cells as blocks of pixels: every (row group, column group) pair whose cell is a boundary cell.
    cell_id = torch.full((height, width), -1, dtype=torch.long, device=device)
    cell_id[cell_r, cell_c] = torch.arange(len(cell_r), device=device)
    block_row, block_col = torch.nonzero(boundary[group_row][:, group_col], as_tuple=True)
    block_cell = cell_id[group_row[block_row], group_col[block_col]]
    tolerance = 1e-4 * (1.0 + float(flat_logits.abs().max()))

    def interpolate(classes: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Each class's logit at pixels (rows, cols), in F.interpolate's order of operations (exact comparisons)."""
        ry0, ry1, cx0, cx1 = y0[rows] * width, y1[rows] * width, x0[cols], x1[cols]
        rwy, cwx, base = wy[rows], wx[cols], classes * span
        p00, p01, p10, p11 = ry0 + cx0, ry0 + cx1, ry1 + cx0, ry1 + cx1  # per pixel, shared by every class
        top = flat_logits[base + p00] * (1 - cwx) + flat_logits[base + p01] * cwx
        bottom = flat_logits[base + p10] * (1 - cwx) + flat_logits[base + p11] * cwx
        return top * (1 - rwy) + bottom * rwy

    def decide(blocks: torch.Tensor, classes: torch.Tensor) -> None:
        """Write the arg-max among ``classes`` (R, blocks) into the pixels of ``blocks`` (indices into the block
        list): interpolated in blocks with lerp (fast); where the best two are within rounding of each other, again
        exactly in F.interpolate's order of operations (ties to the lower class id)."""
        cells = block_cell[blocks]
        corners = corner_pixels[:, cell_r[cells], cell_c[cells]]  # (4, blocks)
        values = flat_logits[classes.unsqueeze(1) * span + corners]  # (R, 4 corners, blocks)
        if len(classes) == 2:  # the margin of the two: one interpolation instead of two
            values = (values[1] - values[0]).unsqueeze(0)
        bx, by = col_weight[block_col[blocks]], row_weight[block_row[blocks]]  # (blocks, Mx), (blocks, My)
        top = torch.lerp(values[:, 0, :, None], values[:, 1, :, None], bx)
        bottom = torch.lerp(values[:, 2, :, None], values[:, 3, :, None], bx)
        inside = torch.addcmul(top.unsqueeze(2), (bottom - top).unsqueeze(2), by.unsqueeze(2))  # (R, b, My, Mx)
        if len(classes) == 2:
            decided = torch.where(inside[0] > 0, classes[1].view(-1, 1, 1), classes[0].view(-1, 1, 1))
            near_tie = inside[0].abs() <= tolerance
        else:
            best, index = inside.max(dim=0)
            decided = classes.t().gather(1, index.flatten(1)).view_as(index)
            near_tie = (inside >= (best - tolerance).unsqueeze(0)).sum(dim=0) > 1
        decided = decided.to(small)
        rows, cols = row_index[block_row[blocks]], col_index[block_col[blocks]]  # (blocks, My), (blocks, Mx)
        tie_b, tie_i, tie_j = torch.nonzero(near_tie, as_tuple=True)
        tie_rows, tie_cols = rows[tie_b, tie_i], cols[tie_b, tie_j]
        real = (tie_rows < out_height) & (tie_cols < out_width)  # not the padding
        if bool(real.any()):
            tie_b, tie_i, tie_j = tie_b[real], tie_i[real], tie_j[real]
            values = interpolate(classes[:, tie_b], tie_rows[real], tie_cols[real])
            best = values.max(dim=0, keepdim=True).values
            decided[tie_b, tie_i, tie_j] = torch.where(values == best, classes[:, tie_b], num_classes).amin(dim=0).to(small)
        flat = rows.unsqueeze(2) * (out_width + 1) + cols.unsqueeze(1)
        canvas.view(-1)[flat.reshape(-1)] = decided.reshape(-1)

    # Two possible classes (most boundary cells): the sign of their margin decides; three (most of the rest), and
    # more: the best among them. Grouped so that each group interpolates only as many classes as its cells need.
    block_count = count[block_cell]
    for group in (block_count == 2, block_count == 3, block_count > 3):
        blocks = group.nonzero().squeeze(1)
        if blocks.numel():
            decide(blocks, candidates[:int(block_count[blocks].max()), block_cell[blocks]])
    return out.contiguous()
