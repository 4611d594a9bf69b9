"""The merge-rate ladder: monotone cost, rate 0 exact, every rung runs at robot sizes and keeps static shapes."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from segmerge_ros.merging.segformerpp import BACKEND_LADDERS, LADDER, MAX_MERGE_RATE, NONE, rung_for_rate
from segmerge_ros.models.segformer.model import SegFormer, mit_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SegFormer(mit_config("b0")).eval().fold_head()


def flops(model, pixels, config) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(pixels, config)
    return counter.get_total_flops()


LADDERS = {"default": LADDER, **BACKEND_LADDERS}


@pytest.mark.parametrize(("name", "size"), [("default", (480, 640)), ("default", (512, 1024))]
                         + [(name, (480, 640)) for name in sorted(BACKEND_LADDERS)])
def test_ladder_cost_falls_monotonically(model, size, name):
    pixels = torch.randn(1, 3, *size)
    costs = [flops(model, pixels, rung.config) for rung in LADDERS[name]]
    assert all(later < earlier for earlier, later in zip(costs, costs[1:])), costs
    assert costs[-1] < costs[0] / 2.5


@pytest.mark.parametrize("name", sorted(LADDERS))
def test_every_ladder_starts_exact_and_rises(name):
    rates = [rung.rate for rung in LADDERS[name]]
    assert LADDERS[name][0].config is NONE and rates[0] == 0.0
    assert rates == sorted(set(rates)) and rates[-1] <= MAX_MERGE_RATE


def test_rates_map_onto_rungs_in_order():
    rates = [rung.rate for rung in LADDER]
    assert rates[0] == 0.0 and rates == sorted(rates) and rates[-1] <= MAX_MERGE_RATE
    assert rung_for_rate(0.0).config is NONE
    assert rung_for_rate(MAX_MERGE_RATE) is LADDER[-1]
    for lower, upper in zip(LADDER, LADDER[1:]):
        assert rung_for_rate((lower.rate + upper.rate) / 2) is lower
        assert rung_for_rate(upper.rate) is upper
    with pytest.raises(ValueError):
        rung_for_rate(0.96)


def test_every_rung_runs_with_static_shapes_on_a_camera_frame(model):
    pixels = torch.randn(1, 3, 480, 640)
    shapes = set()
    with torch.no_grad():
        plain = model(pixels, NONE)
        for rung in LADDER[1:]:
            first, second = model(pixels, rung.config), model(torch.randn_like(pixels), rung.config)
            assert first.shape == second.shape  # token counts depend on the size and rung, never the content
            assert torch.isfinite(first).all()
            shapes.add(tuple(first.shape))
    assert (1, 19, 60, 80) in shapes and plain.shape == (1, 19, 120, 160)
