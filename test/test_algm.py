"""ALGM: exactness when off, hand-checked window scores and groupings, non-square grids, per-image decisions."""

from __future__ import annotations

import pytest
import torch

from segmerge_ros.models.vit.algm import (
    ALGMSegmenter,
    global_representatives,
    local_representatives,
    threshold_for_rate,
    window_scores,
)
from segmerge_ros.merging.token_groups import compact_groups, merge_groups
from segmerge_ros.models.vit.segmenter import Block, SegmenterViT, ViTConfig, key_bias_from_sizes

pytestmark = pytest.mark.usefixtures("one_thread")



def small_config(decoder: str = "linear") -> ViTConfig:
    return ViTConfig(embed_dim=64, depth=6, num_heads=2, num_classes=5, decoder=decoder, pos_grid=(6, 6))


def images(batch=2, height=96, width=128, seed=0):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def twins(decoder: str, **kwargs) -> tuple[SegmenterViT, ALGMSegmenter]:
    torch.manual_seed(0)
    plain = SegmenterViT(small_config(decoder)).eval()
    algm = ALGMSegmenter(small_config(decoder), **kwargs).eval()
    algm.load_state_dict(plain.state_dict())
    return plain, algm


@pytest.mark.parametrize("decoder", ["linear", "mask"])
def test_exact_plain_output_when_off(decoder):
    plain, algm = twins(decoder, local_threshold=1.01)
    x = images(2, 96, 128)
    with torch.no_grad():
        assert torch.equal(algm(x), plain(x))
        algm.set_merge_rate(0.0)
        assert torch.equal(algm(x), plain(x))


def test_window_scores_by_hand():
    # 2x4 grid = two windows: the left one four equal tokens (score 1), the right one two opposite pairs.
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0])
    grid = torch.stack([a, a, a, b, a, a, b, a]).view(1, 8, 2)  # rows: [a a a b] [a a b a]
    scores = window_scores(grid, (2, 4))
    # right window tokens a, b / b, a: pairs (a,b) -1, (a,b) -1, (a,a) 1, (b,b) 1, (b,a) -1, (b,a) -1 -> -1/3
    assert torch.allclose(scores, torch.tensor([[[1.0, -1.0 / 3.0]]]))


def test_local_groups_on_odd_non_square_grid():
    grid = (3, 5)  # windows cover rows 0-1, cols 0-3; row 2 and col 4 stay single
    scores = torch.tensor([[[0.95, 0.5]]])
    rep = local_representatives(scores, grid, threshold=0.9)
    expected = torch.arange(15).view(3, 5)
    expected[0:2, 0:2] = 0
    assert torch.equal(rep, expected.view(1, -1))
    group, count = compact_groups(rep)
    assert count.tolist() == [12]
    assert group[0, :2].tolist() == [0, 0] and group[0, 5:7].tolist() == [0, 0]


def test_global_threshold_is_per_image():
    torch.manual_seed(0)
    x = torch.randn(2, 33, 16)
    x[1, 1:] = x[1, 1:2] + 0.01 * torch.randn(32, 16)  # image 1: near-duplicates everywhere
    size = torch.ones(2, 33)
    size[0, 30:] = 0  # image 0 is padded: its last tokens must neither merge nor be merged into
    rep = global_representatives(x, size, divisor=5.0, floor=None)
    merged = (rep != torch.arange(33)).sum(1)
    assert merged[0] >= 1 and merged[1] >= 1
    assert torch.equal(rep[0, 30:], torch.zeros(3, dtype=torch.long))  # padding folds into the class token
    assert not torch.isin(rep[0, :30], torch.arange(30, 33)).any()
    no_merge = global_representatives(x, size, divisor=5.0, floor=1.5)
    assert torch.equal(no_merge[1], torch.arange(33))


def test_proportional_attention_matches_duplicated_tokens():
    """Merging exact duplicates with log(size) attention reproduces the unmerged block on every copy."""
    torch.manual_seed(0)
    block = Block(32, 4, 4.0, 1e-6).eval()
    unique = torch.randn(1, 5, 32)
    copies = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4])
    full = unique[:, copies]
    merged, size = merge_groups(full, torch.ones(1, 8), copies[None], 5)
    with torch.no_grad():
        reference = block(full)
        reduced = block(merged, key_bias_from_sizes(size, proportional=True))
    assert torch.allclose(reduced[:, copies], reference, atol=1e-5)


def test_non_square_frame_and_batch_independence():
    _, algm = twins("mask", local_threshold=0.0, global_floor=None)
    x = torch.cat([images(1, 480, 640, seed=1), torch.zeros(1, 3, 480, 640)])  # a flat frame merges far more
    with torch.no_grad():
        batched = algm(x)
        counts = algm.last_token_counts
        single = torch.cat([algm(x[:1]), algm(x[1:])])
    assert batched.shape == (2, 5, 30, 40)
    assert counts["after_local"][0] != counts["after_local"][1]  # each image keeps its own count
    assert all(c < 1200 for c in counts["after_global"])
    assert torch.allclose(batched, single, atol=1e-4)


def test_rate_mapping():
    assert threshold_for_rate(0.0) == float("inf")
    assert threshold_for_rate(0.4) == pytest.approx(0.9)
    assert threshold_for_rate(0.95) < threshold_for_rate(0.5) < 1.0
    _, algm = twins("linear")
    algm.set_merge_rate(0.5)
    assert algm.local_threshold == pytest.approx(0.875) and algm._floor() == pytest.approx(0.875)
    with pytest.raises(ValueError):
        algm.set_merge_rate(1.0)
    assert not algm.static_shapes


def test_more_merging_at_higher_rate():
    _, algm = twins("linear")
    x = images(1, 128, 128)
    totals = []
    for rate in (0.2, 0.95):
        algm.set_merge_rate(rate)
        with torch.no_grad():
            algm(x)
        totals.append(algm.last_token_counts.get("after_global", [64])[0])
    assert totals[1] <= totals[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_runs_on_gpu():
    _, algm = twins("mask", local_threshold=0.5, global_floor=None)
    x = images(2, 96, 160)
    with torch.no_grad():
        cpu = algm(x)
        gpu = algm.cuda()(x.cuda()).cpu()
    assert torch.allclose(cpu, gpu, atol=1e-3)
