"""The arg-max of bilinearly upsampled logits, computed exactly without upsampling every class.

At camera resolution the K-channel upsample costs more than a merged network (19 classes x 576 x 768 floats), so
on the CPU ``upsampled_argmax`` works per *cell*, the rectangle of output pixels between four neighbouring logit
pixels, in one compiled pass (numba):
- bilinear interpolation inside a cell is a convex combination of its corners, so a class that one of the corner
  winners beats at all four corners (by more than the interpolation's rounding) cannot win anywhere in the cell;
- inside a region (one class wins every corner, by more than that) the cell's pixels take it without arithmetic;
- elsewhere (boundaries: about a third of the cells at the top rung) only the classes not ruled out, two or three
  as a rule, are interpolated at the cell's pixels, in F.interpolate's order of operations, so that every
  comparison is the one F.interpolate's values would give.
The result equals ``F.interpolate(logits, size, mode="bilinear", align_corners=False).argmax`` (ties go to the lower
class id, as there), bit for bit against torch's x86-64 CPU kernel for contiguous (NCHW) tensors, whose fused
multiply-adds the pass repeats. Torch's channels-last kernel, and a torch built otherwise (another compiler or CPU),
round differently: there a pixel whose two best classes are within one float32 rounding of each other can go the
other way. Tensors on an accelerator take that reference directly (the accelerator has
the bandwidth), and so does the CPU when numba is missing (several times slower: one warning says so).
"""

from __future__ import annotations

import logging
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

try:
    from llvmlite import ir
    from numba import njit, types
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover - numba is a declared dependency; see upsampled_argmax
    njit = None

LOG = logging.getLogger(__name__)
# Bounds the float32 rounding of one interpolated value (three roundings of products and sums of values up to the
# largest |logit|: a few 1e-7 of it), with a wide margin: what it rules out cannot win anywhere.
_ROUNDING = 1e-4
_warned_without_numba = False


@lru_cache(maxsize=32)
def _axis(source: int, target: int) -> tuple[np.ndarray, ...]:
    """One axis's taps as F.interpolate's bilinear mode with align_corners=False computes them (source coordinate
    clamped at 0, the last index repeated at the edge): per output index the weight of the second tap and one minus
    it (float32, as there); per source index ``start``/``end``, its cell's run of output indices (``first`` never
    decreases, so each run is consecutive; empty where downsampling skips a source index)."""
    position = ((torch.arange(target, dtype=torch.float32) + 0.5) * (source / target) - 0.5).clamp(min=0)
    first = position.floor().long().clamp(max=source - 1)
    weight = (position - first).numpy()
    first = first.numpy()
    start = np.searchsorted(first, np.arange(source), side="left")
    end = np.searchsorted(first, np.arange(source), side="right")
    for array in (weight, start, end):
        array.setflags(write=False)  # shared through the cache
    return weight, np.float32(1.0) - weight, start, end


if njit is not None:
    @intrinsic
    def _fma(typing_context, a, b, c):
        """float32 a * b + c with one rounding (LLVM's fma: the FMA instruction where the CPU has one)."""
        def codegen(context, builder, signature, args):
            single = ir.FloatType()
            fma = builder.module.declare_intrinsic("llvm.fma.f32", fnty=ir.FunctionType(single, [single] * 3))
            return builder.call(fma, args)
        return types.float32(types.float32, types.float32, types.float32), codegen


def _cell_argmax_kernel(logits, row_weight, row_rest, row_start, row_end, col_weight, col_rest, col_start, col_end,
                        out):
    """The compiled pass (see the module's docstring); writes ``out`` (H, W)."""
    classes, height, width = logits.shape
    # Per logit pixel: the winner, its value, the runner-up's and the lowest (branch-free: vectorises).
    labels = np.zeros((height, width), np.int32)
    best = logits[0].copy()
    second = np.full((height, width), -np.inf, np.float32)
    lowest = logits[0].copy()
    for k in range(1, classes):  # class-major: each plane is contiguous
        for i in range(height):
            for j in range(width):
                value, top = logits[k, i, j], best[i, j]
                second[i, j] = max(second[i, j], min(top, value))
                labels[i, j] = k if value > top else labels[i, j]
                best[i, j] = max(top, value)
                lowest[i, j] = min(lowest[i, j], value)
    slack = _ROUNDING * (1.0 + max(abs(best.max()), abs(lowest.min())))
    # Cells inside a region: one class wins all four corners by more than the rounding.
    inside = np.zeros((height, width), np.bool_)
    for i in range(height):
        i1 = min(i + 1, height - 1)
        for j in range(width):
            j1 = min(j + 1, width - 1)
            a = labels[i, j]
            inside[i, j] = (labels[i, j1] == a and labels[i1, j] == a and labels[i1, j1] == a
                            and min(best[i, j] - second[i, j], best[i, j1] - second[i, j1],
                                    best[i1, j] - second[i1, j], best[i1, j1] - second[i1, j1]) > slack)
    for i in range(height):
        for y in range(row_start[i], row_end[i]):
            for j in range(width):
                if inside[i, j]:
                    a = labels[i, j]
                    for x in range(col_start[j], col_end[j]):
                        out[y, x] = a
    candidates = np.empty(classes, np.int64)
    winners = np.empty(4, np.int64)
    widest = 1
    for j in range(width):
        widest = max(widest, col_end[j] - col_start[j])
    upper = np.empty((classes, widest), np.float32)  # per candidate and column of a cell: the upper row's value
    lower = np.empty((classes, widest), np.float32)
    for i in range(height):
        y_start, y_end = row_start[i], row_end[i]
        if y_start == y_end:
            continue
        i1 = min(i + 1, height - 1)
        for j in range(width):
            x_start, x_end = col_start[j], col_end[j]
            if x_start == x_end or inside[i, j]:
                continue
            j1 = min(j + 1, width - 1)
            winners[0], winners[1], winners[2], winners[3] = labels[i, j], labels[i, j1], labels[i1, j], labels[i1, j1]
            count = 0
            for c in range(classes):  # in class-id order, so that ties below go to the lower id
                possible = True
                for n in range(4):
                    d = winners[n]
                    if d != c and (logits[d, i, j] - logits[c, i, j] > slack
                                   and logits[d, i, j1] - logits[c, i, j1] > slack
                                   and logits[d, i1, j] - logits[c, i1, j] > slack
                                   and logits[d, i1, j1] - logits[c, i1, j1] > slack):
                        possible = False
                        break
                if possible:
                    candidates[count] = c
                    count += 1
            # F.interpolate's own arithmetic (torch's CPU kernel as built for x86-64): along x on both rows, then
            # along y, each a fused multiply-add onto the rounded second product. The x step is the same on every
            # row of the cell: once per candidate and column.
            for n in range(count):
                c = candidates[n]
                for x in range(x_start, x_end):
                    fx, gx = col_weight[x], col_rest[x]
                    upper[n, x - x_start] = _fma(logits[c, i, j], gx, logits[c, i, j1] * fx)
                    lower[n, x - x_start] = _fma(logits[c, i1, j], gx, logits[c, i1, j1] * fx)
            for y in range(y_start, y_end):
                fy, gy = row_weight[y], row_rest[y]
                for x in range(x_end - x_start):
                    winner = candidates[0]
                    top_value = _fma(upper[0, x], gy, lower[0, x] * fy)
                    for n in range(1, count):
                        value = _fma(upper[n, x], gy, lower[n, x] * fy)
                        if value > top_value:  # strictly: ties stay with the lower class id
                            top_value = value
                            winner = candidates[n]
                    out[y, x_start + x] = winner


_cell_argmax = njit(cache=True, nogil=True)(_cell_argmax_kernel) if njit is not None else None


def upsampled_argmax(logits: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Arg-max of the bilinearly upsampled (K, h, w) ``logits`` at ``size`` (H, W): uint8 class ids (uint16 beyond
    256 classes) on the CPU. See the module's docstring for how."""
    num_classes, height, width = logits.shape
    dtype = np.uint8 if num_classes <= 256 else np.uint16
    if logits.device.type != "cpu" or _cell_argmax is None:
        if logits.device.type == "cpu":
            _warn_without_numba()
        upsampled = F.interpolate(logits[None].float(), size=size, mode="bilinear", align_corners=False)
        return upsampled.argmax(dim=1)[0].cpu().numpy().astype(dtype)
    rows, cols = _axis(height, size[0]), _axis(width, size[1])
    out = np.empty(size, dtype)
    _cell_argmax(logits.detach().float().contiguous().numpy(), *rows, *cols, out)
    return out


def _warn_without_numba() -> None:
    global _warned_without_numba
    if not _warned_without_numba:
        _warned_without_numba = True
        LOG.warning("numba is not installed: the class map's arg-max upsamples every class (several times slower at "
                    "camera resolution); pip install numba")


def warm_upsampled_argmax() -> None:
    """Compile (or load from numba's cache) the kernel ahead of the first frame: a few seconds the first time."""
    upsampled_argmax(torch.zeros(2, 2, 2), (4, 4))
