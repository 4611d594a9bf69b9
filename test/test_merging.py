"""2D bipartite soft matching against tomesd's reference, and the Segformer++ rate mapping."""

from __future__ import annotations

import pytest
import torch

from segmerge_ros.merging.bipartite import bipartite_soft_matching_2d, max_merge
from segmerge_ros.merging.segformerpp import MAX_MERGE_RATE, PRESETS, StageMerge, config_for_rate, preset

tomesd_merge = pytest.importorskip("tomesd.merge", reason="tomesd 0.1.3 is a test dependency: run `make setup`")

CASES = [(16, 24, 2, 2, 0.6), (17, 23, 2, 2, 0.5), (15, 30, 4, 4, 0.9), (9, 13, 4, 4, 0.95), (8, 8, 2, 2, 0.9)]


def sorted_rows(x: torch.Tensor) -> torch.Tensor:
    """Tokens as a multiset: the merged order is an implementation detail, the set of tokens is not."""
    keys = x[..., 0] * 1e3 + x[..., 1]
    return x.gather(1, keys.argsort(dim=1).unsqueeze(-1).expand_as(x))


@pytest.mark.parametrize("h,w,sx,sy,fraction", CASES)
def test_same_result_as_tomesd(h, w, sx, sy, fraction):
    torch.manual_seed(h * w)
    metric = torch.randn(2, h * w, 32)
    values = torch.randn(2, h * w, 8)
    r = int(h * w * fraction)
    ref_merge, ref_unmerge = tomesd_merge.bipartite_soft_matching_random2d(metric, w=w, h=h, sx=sx, sy=sy, r=r, no_rand=True)
    merge, unmerge = bipartite_soft_matching_2d(metric, h, w, sx, sy, r)
    ours, reference = merge(values), ref_merge(values)
    assert ours.shape == reference.shape == (2, h * w - min(r, max_merge(h, w, sx, sy)), 8)
    torch.testing.assert_close(sorted_rows(ours), sorted_rows(reference), rtol=0, atol=1e-6)
    # Any per-token function of the merged tokens unmerges to the same full grid.
    torch.testing.assert_close(unmerge(torch.tanh(ours)), ref_unmerge(torch.tanh(reference)), rtol=0, atol=1e-6)


def test_zero_merge_is_identity_and_local_matching_respects_cells():
    metric = torch.randn(1, 64, 16)
    merge, unmerge = bipartite_soft_matching_2d(metric, 8, 8, 2, 2, 0)
    assert merge(metric) is metric and unmerge(metric) is metric
    # Local matching: a source only ever joins the destination of its own 2x2 cell.
    positions = torch.arange(64, dtype=torch.float32).view(1, 64, 1)
    merge, unmerge = bipartite_soft_matching_2d(metric, 8, 8, 2, 2, 48, matching="local")
    restored = unmerge(merge(positions)).view(8, 8)
    cell_means = positions.view(4, 2, 4, 2).mean(dim=(1, 3))  # all sources merged: every cell is its own mean
    assert torch.allclose(restored, cell_means.repeat_interleave(2, 0).repeat_interleave(2, 1))


@pytest.mark.parametrize("r", [6, 12])
def test_merge_averages_and_unmerge_copies_back(r):
    """Whatever each source matched: every position gets back the mean of its group (a destination and the sources
    merged into it), a kept source its own value, and each group holds exactly one destination."""
    torch.manual_seed(r)
    metric = torch.randn(1, 16, 4)
    merge, unmerge = bipartite_soft_matching_2d(metric, 4, 4, 2, 2, r)
    ones = torch.ones(1, 16, 3)
    assert torch.equal(merge(ones), torch.ones(1, 16 - r, 3))
    values = torch.randn(1, 16, 3, dtype=torch.float64)  # continuous: two groups never share a value
    restored = unmerge(merge(values))[0]
    assert restored.shape == (16, 3)
    destinations = {0, 2, 8, 10}  # the top-left token of each 2x2 cell
    groups: dict[tuple, list[int]] = {}
    for position in range(16):
        groups.setdefault(tuple(restored[position].tolist()), []).append(position)
    merged_sources = 0
    for members in groups.values():
        expected = values[0, members].mean(dim=0)
        torch.testing.assert_close(restored[members[0]], expected, rtol=0, atol=1e-12)
        in_group = destinations.intersection(members)
        assert len(in_group) == 1 or (len(members) == 1 and not in_group), members
        merged_sources += len(members) - 1
    assert merged_sources == r


def test_rate_mapping_hits_the_paper_presets_and_is_validated():
    assert config_for_rate(0.0).is_identity
    assert config_for_rate(0.6).stages == PRESETS["hq"].stages
    assert config_for_rate(0.9).stages == PRESETS["fast"].stages
    previous = [0.0] * 4
    for rate in torch.linspace(0, MAX_MERGE_RATE, 20).tolist():
        stages = config_for_rate(rate).stages
        amounts = [s.kv_rate + s.q_rate for s in stages]
        assert all(a >= p for a, p in zip(amounts, previous))
        previous = amounts
    for bad in (-0.1, 0.96, 2.0):
        with pytest.raises(ValueError, match="merge rate"):
            config_for_rate(bad)
    with pytest.raises(ValueError, match="unknown merge preset"):
        preset("HQ-typo")
    with pytest.raises(ValueError):
        StageMerge(q_rate=1.5)


def test_matches_tokens_tells_bipartite_merging_from_pooling_and_scaling():
    from segmerge_ros.merging.segformerpp import NONE, preset

    assert preset("hq").matches_tokens and preset("fast").matches_tokens
    assert not NONE.matches_tokens and not preset("2x2").matches_tokens  # pooling only
