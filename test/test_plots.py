"""The plots: bench rows classified by kind and backend, and both figures written as real, non-empty PNGs."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from segmerge_ros.apps.plots import TimelinePoint, classify_row, plot_bag_timeline, plot_tradeoff


def bench_row(name: str, speedup: float, agreement: float) -> dict:
    """A row as segmerge-bench --json writes it (the keys the plot does not use included)."""
    return {"name": name, "config": "", "median_ms": 10.0 / speedup, "speedup_vs_hf": None,
            "speedup_vs_unmerged": speedup, "agreement_vs_unmerged": agreement, "max_abs_logit_diff_vs_hf": None,
            "miou": None}


ROWS = [bench_row("hf-transformers", 0.9, 1.0), bench_row("unmerged", 1.0, 1.0), bench_row("hq", 1.05, 0.95),
        bench_row("rate=0.15", 1.2, 0.98), bench_row("rate=0.45", 1.5, 0.93), bench_row("rate=0.9", 3.1, 0.85),
        bench_row("attn=0.3/global", 1.1, 0.97)]
ROWS += [bench_row(row["name"] + "@compile-fp16", row["speedup_vs_unmerged"] * 1.4, row["agreement_vs_unmerged"])
         for row in ROWS if row["name"] != "hf-transformers"]


def png(path) -> np.ndarray:
    image = cv2.imread(str(path))
    assert image is not None, f"{path} is not an image"
    return image


def test_rows_are_classified_by_kind_rate_and_backend():
    assert classify_row(bench_row("rate=0.45", 1.5, 0.93)).kind == "ladder"
    point = classify_row(bench_row("rate=0.45@tensorrt-fp16", 1.5, 0.93), default_backend="eager-fp32")
    assert (point.kind, point.rate, point.backend, point.series) == ("ladder", 0.45, "tensorrt-fp16",
                                                                     "ladder tensorrt-fp16")
    assert classify_row(bench_row("unmerged", 1, 1), default_backend="compile").series == "ladder compile"
    attention = classify_row(bench_row("attn=0.6/local", 1.1, 0.9))
    assert (attention.kind, attention.rate, attention.series) == ("attention", 0.6, "attention local eager-fp32")
    preset = classify_row(bench_row("fast", 1.2, 0.93))
    assert preset.kind == "preset" and math.isnan(preset.rate)
    assert classify_row(bench_row("hf-transformers", 0.9, 1.0)).kind == "transformers"


def test_tradeoff_plot_is_written_and_not_blank(tmp_path):
    path = plot_tradeoff(ROWS, tmp_path / "deep" / "tradeoff.png", title="test")
    image = png(path)
    assert image.shape[0] >= 400 and image.shape[1] >= 600
    # Marker colours of the ladder (tab:blue) and the presets (tab:green) are drawn.
    for colour_bgr in ((180, 119, 31), (44, 160, 44)):
        assert np.any(np.all(np.abs(image.astype(int) - colour_bgr) < 8, axis=2)), colour_bgr


def test_tradeoff_refuses_rows_without_the_measures(tmp_path):
    with pytest.raises(ValueError, match="lacks speedup_vs_unmerged"):
        plot_tradeoff([{"name": "unmerged", "agreement_vs_unmerged": 1.0}], tmp_path / "x.png")
    with pytest.raises(ValueError, match="no bench rows"):
        plot_tradeoff([], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_bag_timeline_is_written_with_the_budget_line(tmp_path):
    series = {"/cam/image": [TimelinePoint(i * 0.1, 100.0 - 5 * min(i, 6), [0, 0.45, 0.9][min(i // 3, 2)])
                             for i in range(12)],
              "/other/image/compressed": [TimelinePoint(0.05 + i * 0.2, 60.0, 0.15) for i in range(6)]}
    image = png(plot_bag_timeline(series, tmp_path / "timeline.png", target_ms=80.0))
    assert image.shape[0] >= 400
    assert np.any(np.all(np.abs(image.astype(int) - (40, 39, 214)) < 8, axis=2))  # tab:red budget line
    with pytest.raises(ValueError, match="no processed frames"):
        plot_bag_timeline({"/cam/image": []}, tmp_path / "empty.png")
