"""BudgetController against a simulated plant: latency = f(rate) * speed + noise."""

from __future__ import annotations

import random

import pytest

from segmerge_ros.runtime.budget import BudgetController, BudgetMode, LatencyModel, isotonic_non_increasing

SETTLE_FRAMES = 30
TOLERANCE = 0.15


class Plant:
    """A segmentation model whose latency falls with merging: 100 ms unmerged, about 41 ms at 0.95."""

    def __init__(self, seed: int = 0, noise: float = 0.05, speed: float = 1.0):
        self.rng = random.Random(seed)
        self.noise = noise
        self.speed = speed

    def true_latency(self, rate: float) -> float:
        return self.speed * (40.0 + 60.0 * (1.0 - rate) ** 2)

    def measure(self, rate: float) -> float:
        return self.true_latency(rate) * max(0.5, self.rng.gauss(1.0, self.noise))


def run(controller: BudgetController, plant: Plant, frames: int, start_rate: float = 0.0) -> list[float]:
    """Close the loop for ``frames`` frames; returns the rate each frame ran at."""
    rate = start_rate
    rates = []
    for _ in range(frames):
        rates.append(rate)
        next_rate = controller.update(plant.measure(rate), rate_used=rate)
        if next_rate is not None:
            rate = next_rate
    return rates


def direction_changes(rates: list[float]) -> int:
    steps = [b - a for a, b in zip(rates, rates[1:]) if abs(b - a) > 1e-9]
    return sum(1 for a, b in zip(steps, steps[1:]) if (a > 0) != (b > 0))


@pytest.mark.parametrize("target_ms", [50.0, 60.0, 75.0, 90.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_settles_within_tolerance_in_under_30_frames_without_oscillating(target_ms, seed):
    plant = Plant(seed=seed)
    controller = BudgetController("latency", target_latency_ms=target_ms, min_rate=0.0, max_rate=0.9)
    rates = run(controller, plant, 150)
    settled = rates[SETTLE_FRAMES:]
    for frame, rate in enumerate(settled, start=SETTLE_FRAMES):
        error = abs(plant.true_latency(rate) - target_ms) / target_ms
        assert error <= TOLERANCE, f"frame {frame}: rate {rate:.3f} gives {plant.true_latency(rate):.1f} ms"
    latencies = [plant.true_latency(r) for r in settled]
    assert max(latencies) - min(latencies) <= 2 * TOLERANCE * target_ms, "latency keeps wandering after settling"
    assert direction_changes(settled) <= 4, f"oscillates: {settled}"


def test_noisier_plant_still_settles_and_holds():
    plant = Plant(seed=7, noise=0.10)
    controller = BudgetController("latency", target_latency_ms=65.0)
    rates = run(controller, plant, 200)
    settled = rates[SETTLE_FRAMES:]
    assert all(abs(plant.true_latency(r) - 65.0) / 65.0 <= TOLERANCE for r in settled)
    changes = sum(1 for a, b in zip(settled, settled[1:]) if a != b)
    assert changes <= 0.15 * len(settled), f"{changes} rate changes in {len(settled)} frames: deadband not holding"


def test_very_noisy_timing_widens_the_deadband_instead_of_chasing_noise():
    """Two busy cores: per-frame latency scatters by 30 %; the rate must stay put and the mean stay on target."""
    plant = Plant(seed=11, noise=0.30)
    controller = BudgetController("latency", target_latency_ms=60.0)
    rates = run(controller, plant, 150)
    settled = rates[SETTLE_FRAMES:]
    mean_latency = sum(plant.true_latency(r) for r in settled) / len(settled)
    assert abs(mean_latency - 60.0) / 60.0 <= TOLERANCE
    assert sum(1 for a, b in zip(settled, settled[1:]) if a != b) <= 8
    assert controller.deadband > controller.tuning.deadband


def test_follows_a_slowdown_of_the_machine():
    plant = Plant(seed=3)
    controller = BudgetController("latency", target_latency_ms=70.0)
    run(controller, plant, 60)
    plant.speed = 1.25  # e.g. another process takes a core
    rates = run(controller, plant, 120, start_rate=controller.rate)
    assert all(abs(plant.true_latency(r) - 70.0) / 70.0 <= TOLERANCE for r in rates[SETTLE_FRAMES:])


def test_fps_mode_targets_the_frame_period():
    plant = Plant(seed=4)
    controller = BudgetController("fps", target_fps=16.0)
    assert controller.target_ms == pytest.approx(62.5)
    rates = run(controller, plant, 100)
    assert all(abs(plant.true_latency(r) - 62.5) / 62.5 <= TOLERANCE for r in rates[SETTLE_FRAMES:])


def test_unreachable_targets_clamp_to_the_limits():
    fast = BudgetController("latency", target_latency_ms=500.0, min_rate=0.1, max_rate=0.8)
    assert run(fast, Plant(), 40)[-1] == pytest.approx(0.1)   # already fast enough: least merging allowed
    tight = BudgetController("latency", target_latency_ms=10.0, min_rate=0.1, max_rate=0.8)
    rates = run(tight, Plant(), 40)
    assert rates[-1] == pytest.approx(0.8)
    assert all(0.1 <= r <= 0.8 for r in rates[1:])


@pytest.mark.parametrize("merging_cost", [0.0, 10.0], ids=["flat", "merging-costs-time"])
def test_merging_that_does_not_pay_is_not_used_for_an_unreachable_target(merging_cost):
    """On a CPU where merging saves nothing (or costs time), a too-tight target must not push the rate to max."""
    plant = Plant(seed=6)
    plant.true_latency = lambda rate: 80.0 + merging_cost * rate
    controller = BudgetController("latency", target_latency_ms=40.0, min_rate=0.0, max_rate=0.9)
    rates = run(controller, plant, 60)
    assert all(r == 0.0 for r in rates[SETTLE_FRAMES:]), rates


LADDER_MS = {0.0: 100.0, 0.1: 95.0, 0.2: 86.0, 0.35: 76.0, 0.5: 68.0, 0.6: 62.0, 0.7: 52.0, 0.8: 45.0, 0.9: 38.0}


@pytest.mark.parametrize("target_ms", [76.0, 70.0, 57.0, 50.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_discrete_levels_settle_on_the_least_merging_level_that_meets_the_target(target_ms, seed):
    """An engine with a ladder of configurations: latency is a step function of the rate."""
    plant = Plant(seed=seed)
    plant.true_latency = lambda rate: LADDER_MS[max(level for level in LADDER_MS if level <= rate + 1e-9)]
    controller = BudgetController("latency", target_latency_ms=target_ms, levels=list(LADDER_MS))
    rates = run(controller, plant, 120)
    settled = rates[SETTLE_FRAMES:]
    assert all(r in LADDER_MS for r in rates[1:]), "rates between levels run the lower level: never choose them"
    assert all(abs(plant.true_latency(r) - target_ms) / target_ms <= TOLERANCE for r in settled), settled
    assert sum(1 for a, b in zip(settled, settled[1:]) if a != b) <= 3, settled


def test_new_target_reuses_calibration():
    plant = Plant(seed=5)
    controller = BudgetController("latency", target_latency_ms=90.0)
    run(controller, plant, 40)
    assert controller.calibrated
    controller.set_target(target_latency_ms=50.0)
    rates = run(controller, plant, 40, start_rate=controller.rate)
    assert controller.calibrated
    assert all(abs(plant.true_latency(r) - 50.0) / 50.0 <= TOLERANCE for r in rates[10:])


def test_off_mode_returns_none_and_reset_recalibrates():
    controller = BudgetController("off")
    assert controller.update(80.0, rate_used=0.3) is None
    controller.set_target("latency", target_latency_ms=60.0)
    run(controller, Plant(), 30)
    assert controller.calibrated
    controller.reset()
    assert not controller.calibrated and controller.rate is None


def test_rejects_bad_settings():
    with pytest.raises(ValueError):
        BudgetController("turbo")
    with pytest.raises(ValueError):
        BudgetController("latency", min_rate=0.6, max_rate=0.2)
    with pytest.raises(ValueError):
        BudgetController("latency", max_rate=0.99)
    with pytest.raises(ValueError):
        BudgetController("latency", target_latency_ms=0.0)
    assert BudgetMode.parse(" FPS ") is BudgetMode.FPS


def test_model_is_monotone_despite_noisy_points():
    assert isotonic_non_increasing([10, 12, 8, 9, 3]) == pytest.approx([11, 11, 8.5, 8.5, 3])
    model = LatencyModel([0.0, 0.45, 0.9], [100.0, 104.0, 40.0])
    assert model.predict(0.0) >= model.predict(0.3) >= model.predict(0.9)
    assert model.smallest_rate_for(200.0, 0.0, 0.9) == 0.0
    assert model.smallest_rate_for(1.0, 0.0, 0.9) == 0.9
    assert model.smallest_rate_for(1.0, 0.0, 0.9, tolerance=2.0) == 0.0  # 102 ms vs 40: within 200 %
    rate = model.smallest_rate_for(70.0, 0.0, 0.9)
    assert model.predict(rate) == pytest.approx(70.0)
