"""The engine's ladder: merge configurations and compute precisions in one order, from exact to fastest.

``merge_rate`` selects the highest step whose rate is at most the value; the budget controller snaps to the steps'
rates. Each step is a merge configuration (``merging/segformerpp.py``) computed in one precision. How the two combine
(measured on the trained B0, docs/benchmarks.md): bf16 on a CPU with native bf16 costs about 0.2 % agreement for
1.4x (eager) to 2x (OpenVINO), while the cheapest merge rung costs 1.5 % for 1.27x, so with ``precision: auto`` the
first step above rate 0 is the unmerged model in bf16, and every merge rung after it runs in bf16 too. Rate 0 is
always the unmerged model in the precision asked for (fp32 for ``auto``: bit for bit the model).

Which merge rungs pay depends on the backend (OpenVINO runs the matching's sorts and gathers comparatively slowly):
``merge_rungs(backend)`` gives each backend its measured ladder.
"""

from __future__ import annotations

from dataclasses import dataclass

import logging

import torch

from segmerge_ros.merging.segformerpp import LADDER, MergeConfig, Rung, ladder_for_backend
from segmerge_ros.inference.backends.base import PRECISION_CHOICES, cpu_bf16_support, precision_name, resolve_precision

LOG = logging.getLogger(__name__)

# The rate of the first half-precision step of an ``auto`` ladder: below every merge rung.
HALF_STEP_RATE = 0.05
PLANS = ("fp32", "bf16", "fp16", "auto")


@dataclass(frozen=True)
class Step:
    """One step of the engine's ladder: rates from ``rate`` up to the next step's run ``config`` in ``precision``."""

    rate: float
    config: MergeConfig
    precision: str = "fp32"

    @property
    def name(self) -> str:
        """The configuration's name, with ``@<precision>`` for anything but fp32 (as segmerge-bench names rows)."""
        return self.config.name if self.precision == "fp32" else f"{self.config.name}@{self.precision}"


def merge_rungs(backend: str) -> tuple[Rung, ...]:
    """The merge rungs measured to pay on ``backend`` (eager's ladder for backends without their own)."""
    return ladder_for_backend(backend)


def build_ladder(rungs: tuple[Rung, ...] = LADDER, plan: str = "fp32", half: str = "bf16") -> tuple[Step, ...]:
    """Steps for a precision ``plan``: one precision for every rung ("fp32", "bf16", "fp16"), or "auto": the first
    rung in fp32, the same rung in ``half`` at ``HALF_STEP_RATE``, every later rung in ``half``."""
    if plan not in PLANS:
        raise ValueError(f"precision must be one of {', '.join(PLANS)}, got {plan!r}")
    if plan != "auto":
        return tuple(Step(rung.rate, rung.config, plan) for rung in rungs)
    first, *rest = rungs
    return (Step(first.rate, first.config, "fp32"), Step(HALF_STEP_RATE, first.config, half)) + tuple(
        Step(rung.rate, rung.config, half) for rung in rest
    )


def step_for_rate(rate: float, ladder: tuple[Step, ...]) -> Step:
    """The highest step whose rate is at most ``rate``."""
    return [step for step in ladder if step.rate <= rate + 1e-9][-1]


def with_precision(ladder: tuple[Step, ...], precision: str) -> tuple[Step, ...]:
    """The same steps (rates and configurations) computed in ``precision``: what ``auto`` falls back to when the
    half precision disagrees with fp32 on a real frame (the rates the budget controller knows stay valid)."""
    return tuple(Step(step.rate, step.config, precision) for step in ladder)


def precision_plan(precision: str, device: torch.device, openvino_device: str | None) -> tuple[str, str]:
    """(plan, half precision) for ``precision`` on this hardware; a precision it lacks becomes fp32 with a warning."""
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"precision must be one of {', '.join(PRECISION_CHOICES)}, got {precision!r}")
    half = "fp16" if device.type == "cuda" or (openvino_device or "CPU").split(".")[0] in ("GPU", "NPU") else "bf16"
    if precision == "auto":
        if half == "bf16" and device.type == "cpu" and cpu_bf16_support():
            LOG.info("precision auto: %s; every merge rate runs in fp32", cpu_bf16_support())
            return "fp32", half
        if half == "fp16" and device.type == "cpu":
            return "fp32", half  # OpenVINO GPU/NPU: their plugins choose f16 themselves; fp32 asked explicitly
        return "auto", half
    if precision == "fp32":
        return "fp32", half
    resolved = precision_name(resolve_precision(precision, device, LOG))  # warns when it falls back
    return resolved, resolved
