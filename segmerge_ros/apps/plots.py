"""Plots of measured results (matplotlib, Agg backend: files only, no display needed).

- :func:`plot_tradeoff`: speed-up against agreement for ``segmerge-bench`` rows (its ``--json`` schema): one colour
  per kind of row (presets, ladder rungs, attention-only rates), one marker per backend/precision (rows named
  ``<row>@<backend>[-<precision>]``), and each backend's ladder drawn as a line from the unmerged model upwards.
- :func:`plot_bag_timeline`: per-frame processing time and merge rate over a bag (``segmerge-bag --plot``), with the
  budget target when there was one: budget mode at work.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping, NamedTuple, Sequence

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display on robots, CI or this machine

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
KIND_COLOURS = {
    "unmerged": "black",
    "transformers": "0.55",
    "ladder": "tab:blue",
    "attention": "tab:orange",
    "preset": "tab:green",
}
KIND_LABELS = {
    "unmerged": "unmerged (reference)",
    "transformers": "transformers",
    "ladder": "merge_rate ladder",
    "attention": "attention-only rates",
    "preset": "presets",
}
REQUIRED_ROW_KEYS = ("name", "speedup_vs_unmerged", "agreement_vs_unmerged")
_RATE = re.compile(r"^rate=([0-9.]+)$")
_ATTENTION = re.compile(r"^attn=([0-9.]+)/(\w+)$")


class BenchPoint(NamedTuple):
    label: str       # what the point is called on the plot
    kind: str        # a key of KIND_COLOURS
    series: str      # ladder/attention rows of one backend and matching form one line
    rate: float      # position along its line (nan for presets)
    backend: str     # backend/precision the row ran with
    agreement: float
    speedup: float


def classify_row(row: Mapping, default_backend: str = "eager-fp32") -> BenchPoint:
    """One bench row as a plot point; ``<name>@<backend>-<precision>`` rows carry their backend and precision, plain
    rows ran on ``default_backend`` (segmerge-bench leaves eager fp32 rows unsuffixed)."""
    missing = [key for key in REQUIRED_ROW_KEYS if row.get(key) is None]
    if missing:
        raise ValueError(f"bench row {row.get('name', row)!r} lacks {', '.join(missing)}")
    name, _, backend = str(row["name"]).partition("@")
    backend = backend or default_backend
    agreement, speedup = float(row["agreement_vs_unmerged"]), float(row["speedup_vs_unmerged"])
    if name == "unmerged":
        return BenchPoint("unmerged", "unmerged", f"ladder {backend}", 0.0, backend, agreement, speedup)
    if name == "hf-transformers":
        return BenchPoint("transformers", "transformers", "", math.nan, backend, agreement, speedup)
    if match := _RATE.match(name):
        return BenchPoint(match.group(1), "ladder", f"ladder {backend}", float(match.group(1)), backend, agreement,
                          speedup)
    if match := _ATTENTION.match(name):
        series = f"attention {match.group(2)} {backend}"
        return BenchPoint(f"attn {match.group(1)}", "attention", series, float(match.group(1)), backend, agreement,
                          speedup)
    return BenchPoint(name, "preset", "", math.nan, backend, agreement, speedup)


def plot_tradeoff(rows: Sequence[Mapping], path: str | Path, title: str | None = None,
                  default_backend: str = "eager-fp32") -> Path:
    """Speed-up (y) against agreement with the unmerged model (x) for every bench row; writes ``path`` (PNG).

    Each backend's ladder (unmerged, then the ``rate=`` rows by rate) and each attention-only sweep is a line;
    presets are single points. Returns the path written.
    """
    points = [classify_row(row, default_backend) for row in rows]
    if not points:
        raise ValueError("no bench rows to plot")
    backends = list(dict.fromkeys(p.backend for p in points))
    marker_of = {backend: MARKERS[i % len(MARKERS)] for i, backend in enumerate(backends)}

    figure, axes = plt.subplots(figsize=(8.0, 5.5), dpi=120)
    lines: dict[str, list[BenchPoint]] = defaultdict(list)
    for point in points:
        if point.series and point.kind in ("unmerged", "ladder", "attention"):
            lines[point.series].append(point)
    for series, members in lines.items():
        if series.startswith("attention"):
            # Attention sweeps start from their own backend's unmerged point too.
            backend = members[0].backend
            members = [p for p in points if p.kind == "unmerged" and p.backend == backend] + members
        if len(members) < 2:
            continue
        members = sorted(members, key=lambda p: p.rate)
        kind = "attention" if series.startswith("attention") else "ladder"
        axes.plot([p.agreement for p in members], [p.speedup for p in members], "-", color=KIND_COLOURS[kind],
                  alpha=0.6, linewidth=1.5, zorder=1)
    for point in points:
        axes.scatter(point.agreement, point.speedup, marker=marker_of[point.backend], s=48,
                     color=KIND_COLOURS[point.kind], edgecolors="white", linewidths=0.6, zorder=3)
        below = point.kind == "attention"  # its line runs close under the ladder's: labels below, not on top
        axes.annotate(point.label, (point.agreement, point.speedup), xytext=(4, -10 if below else 3),
                      textcoords="offset points",
                      fontsize=7, color=KIND_COLOURS[point.kind], zorder=4)
    axes.axhline(1.0, color="0.8", linewidth=0.8, zorder=0)
    axes.set_xlabel("agreement with the unmerged model (share of pixels with the same class)")
    axes.set_ylabel("speed-up vs unmerged (x)")
    axes.set_title(title or "Speed / agreement trade-off")
    axes.grid(True, alpha=0.25)
    axes.invert_xaxis()  # better agreement on the left, so "up and left" is the good corner
    kinds = list(dict.fromkeys(p.kind for p in points))
    handles = [Line2D([], [], color=KIND_COLOURS[k], marker="o", linestyle="-" if k in ("ladder", "attention")
                      else "", label=KIND_LABELS[k]) for k in kinds]
    if len(backends) > 1:
        handles += [Line2D([], [], color="0.3", marker=marker_of[b], linestyle="", label=b) for b in backends]
    axes.legend(handles=handles, fontsize=8, loc="best")
    return _save(figure, path)


class TimelinePoint(NamedTuple):
    time_s: float         # the frame's log time, seconds from the start of the bag
    processing_ms: float  # decode + inference (+ pose) + messages, what budget mode controls
    merge_rate: float     # the rate the frame ran with


def plot_bag_timeline(series: Mapping[str, Iterable[TimelinePoint]], path: str | Path,
                      target_ms: float | None = None, title: str | None = None) -> Path:
    """Per-frame processing time (top) and merge rate (bottom) over a bag, one line per camera topic.

    ``target_ms``: the budget's per-frame target, drawn as a dashed line. Returns the path written.
    """
    series = {topic: sorted(points) for topic, points in series.items()}
    series = {topic: points for topic, points in series.items() if points}
    if not series:
        raise ValueError("no processed frames to plot")
    figure, (time_axes, rate_axes) = plt.subplots(2, 1, sharex=True, figsize=(9.0, 5.5), dpi=120,
                                                  gridspec_kw={"height_ratios": (3, 2)})
    for topic, points in series.items():
        times = [p.time_s for p in points]
        (line,) = time_axes.plot(times, [p.processing_ms for p in points], ".-", markersize=3, linewidth=0.8,
                                 label=topic)
        rate_axes.step(times, [p.merge_rate for p in points], where="post", color=line.get_color(), linewidth=1.2,
                       label=topic)
    if target_ms is not None:
        time_axes.axhline(target_ms, color="tab:red", linestyle="--", linewidth=1.5,
                          label=f"budget {target_ms:g} ms")
    time_axes.set_ylabel("processing per frame (ms)")
    time_axes.set_ylim(bottom=0)
    time_axes.grid(True, alpha=0.25)
    time_axes.legend(fontsize=8, loc="upper right")
    time_axes.set_title(title or "Processing time and merge rate over the bag")
    rate_axes.set_ylabel("merge rate")
    rate_axes.set_xlabel("bag time (s)")
    rate_axes.set_ylim(-0.03, 1.0)
    rate_axes.grid(True, alpha=0.25)
    return _save(figure, path)


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
