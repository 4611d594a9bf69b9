"""Chooses the next frame's merge rate so that per-frame latency meets a target (pure Python, no ROS).

How it works:

1. Calibration (warm-up): run a few merge rates spread over [min_rate, max_rate], a few frames each, and keep the
   median latency per rate.
2. Model: fit a non-increasing piecewise-linear latency(rate) through those medians (isotonic regression, because more
   merging never costs more in expectation; measurement noise must not make the curve bend back).
3. Choice: the smallest rate whose predicted latency meets the target (least merging = best quality). Targets
   below what max_rate reaches give max_rate; targets above latency(min_rate) give min_rate.
4. Feedback: the machine's speed drifts (other processes, thermal limits, a different image size), so the model is
   scaled by an EMA of measured/predicted latency, and the rate is re-chosen from the scaled model.
5. No oscillation: the rate is held while the smoothed latency is within a deadband of the target (widened when the
   machine's timing is noisy), for at least ``min_dwell`` frames after a move; steps are capped, and changes
   smaller than ``min_step`` are ignored.
6. Recovery: a calibration taken during a load burst can make the curve look flat ("merging does not pay") or put
   the fast rates out of reach. While the target is missed at the chosen rate and the model offers nothing better,
   the controller re-probes the neighbouring faster rung for a few frames. Faster than the model predicted (beyond
   the timing noise): the model is wrong, so it re-calibrates. As predicted: the point is learned and the wait
   before the next probe doubles, so a machine where merging really does not pay spends few frames merged.
   Switching budget mode on again re-calibrates too. The same holds the other way: a calibration under load makes
   the rungs with less merging look too slow once the CPU calms, so while the latency stays well under the target
   (by more than ``underrun``, a rung or two) and the model offers nothing better, the controller probes the
   neighbouring rung with less merging (measured
   2026-12-07: without this, budget mode stayed at 0.64x its target after a load burst; docs/benchmarks.md §13).

"fps" mode is latency mode with a target of 1000/fps ms: with one worker, the frame period is the processing time.
With several cameras the worker's frame rate is shared: :func:`fps_demand` adds up what each camera needs, from
its own frame rate measured over several seconds (:class:`ArrivalRate`), so a camera slower than 1 Hz does not
flip the per-frame target every second.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Sequence


class BudgetMode(str, Enum):
    OFF = "off"
    LATENCY = "latency"
    FPS = "fps"

    @classmethod
    def parse(cls, value: "str | BudgetMode") -> "BudgetMode":
        try:
            return cls(str(value.value if isinstance(value, BudgetMode) else value).strip().lower())
        except ValueError:
            raise ValueError(f"unknown budget mode {value!r}; use one of {', '.join(m.value for m in cls)}") from None


@dataclass(frozen=True)
class BudgetTuning:
    """Controller constants; the defaults settle in about 15 frames on a plant with 5-10 % latency noise."""

    calibration_points: int = 3     # rates tried during warm-up, spread evenly over [min_rate, max_rate]
    frames_per_point: int = 3       # frames per calibration rate; the median rejects one outlier
    ema_alpha: float = 0.1          # weight of the newest measured/predicted ratio
    deadband: float = 0.06          # relative latency error tolerated before the rate moves
    max_deadband: float = 0.12      # cap when noise widens it: the mean must still land within +-15 %
    max_step: float = 0.2           # largest rate change per frame
    min_step: float = 0.01          # smaller changes are not worth a parameter event
    min_dwell: int = 3              # frames at a rate before the controller may leave it again
    point_spacing: float = 0.05     # learned points replace model points closer than this
    worthwhile_saving: float = 0.1  # merging that saves less over the whole range is not used at all
    probe_step: float = 0.15        # the neighbouring rate probed without discrete levels
    reprobe_frames: int = 30        # frames before a rate's measurement is old enough to probe it again
    max_reprobe_frames: int = 960   # cap of that wait, which doubles after each probe that found no gain
    underrun: float = 0.25          # this far under the target with nothing better on offer, the model is suspect


def isotonic_non_increasing(values: list[float]) -> list[float]:
    """Least-squares non-increasing fit of ``values`` (pool-adjacent-violators)."""
    blocks: list[list[float]] = []  # [mean, weight]
    for value in values:
        blocks.append([value, 1.0])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            mean2, w2 = blocks.pop()
            mean1, w1 = blocks.pop()
            blocks.append([(mean1 * w1 + mean2 * w2) / (w1 + w2), w1 + w2])
    fitted: list[float] = []
    for mean, weight in blocks:
        fitted.extend([mean] * int(weight))
    return fitted


class LatencyModel:
    """A non-increasing piecewise-linear latency(rate), constant beyond its end points."""

    def __init__(self, rates: list[float], latencies_ms: list[float]):
        if not rates or len(rates) != len(latencies_ms):
            raise ValueError("need one latency per rate, at least one point")
        order = sorted(range(len(rates)), key=lambda i: rates[i])
        self.rates = [float(rates[i]) for i in order]
        self.latencies_ms = isotonic_non_increasing([float(latencies_ms[i]) for i in order])

    def predict(self, rate: float) -> float:
        rates, lat = self.rates, self.latencies_ms
        if rate <= rates[0]:
            return lat[0]
        if rate >= rates[-1]:
            return lat[-1]
        i = bisect.bisect_right(rates, rate) - 1
        t = (rate - rates[i]) / (rates[i + 1] - rates[i])
        return lat[i] + t * (lat[i + 1] - lat[i])

    def smallest_rate_for(self, target_ms: float, min_rate: float, max_rate: float, tolerance: float = 0.0) -> float:
        """The least merging predicted to meet ``target_ms``; for an unreachable target, the fastest rate.

        Exception: when merging saves less than ``tolerance`` (a fraction) over the whole range, as on CPUs where it
        does not pay, an unreachable target keeps min_rate: maximal merging would cost quality and buy nothing.
        """
        fastest = self.predict(max_rate)
        if self.predict(min_rate) <= max(target_ms, fastest * (1.0 + tolerance)):
            return min_rate
        target_ms = max(target_ms, fastest)
        # Walk the segments inside [min_rate, max_rate]; the first one that reaches the target holds the answer.
        knots = [min_rate] + [r for r in self.rates if min_rate < r < max_rate] + [max_rate]
        for lo, hi in zip(knots, knots[1:]):
            lat_lo, lat_hi = self.predict(lo), self.predict(hi)
            if lat_hi <= target_ms < lat_lo:
                return hi if lat_hi == target_ms else lo + (hi - lo) * (lat_lo - target_ms) / (lat_lo - lat_hi)
        return max_rate


class BudgetController:
    """Feedback controller from measured per-frame latency to the next frame's merge rate.

    Call :meth:`update` once per processed frame with that frame's latency (and the rate it actually ran at); use
    the returned rate for the next frame. In mode "off" it returns None and keeps no state.
    """

    def __init__(self, mode: str | BudgetMode = BudgetMode.OFF, target_latency_ms: float = 100.0,
                 target_fps: float = 10.0, min_rate: float = 0.0, max_rate: float = 0.9,
                 tuning: BudgetTuning | None = None, levels: Sequence[float] | None = None):
        """``levels``: the rates at which the engine's configuration changes, when it has discrete steps (a rate
        between two levels runs the lower level's configuration). Chosen rates are then rounded up to a level, so
        the prediction is met rather than straddled; without levels every rate is its own configuration."""
        self.tuning = tuning or BudgetTuning()
        self.levels = sorted(float(level) for level in levels) if levels else None
        self.mode = BudgetMode.OFF
        self.target_latency_ms = 100.0
        self.target_fps = 10.0
        self.min_rate, self.max_rate = 0.0, 0.9
        self.set_limits(min_rate, max_rate)
        self.set_target(mode, target_latency_ms=target_latency_ms, target_fps=target_fps)
        self.reset()

    # -- configuration -------------------------------------------------------------------------------------------
    def set_target(self, mode: str | BudgetMode | None = None, target_latency_ms: float | None = None,
                   target_fps: float | None = None) -> None:
        """Change mode and/or targets. A calibrated model is kept while budget mode stays on, so a new target takes
        effect at once; switching it on from off re-calibrates."""
        if target_latency_ms is not None:
            if not target_latency_ms > 0:
                raise ValueError(f"target latency must be > 0 ms, got {target_latency_ms}")
            self.target_latency_ms = float(target_latency_ms)
        if target_fps is not None:
            if not target_fps > 0:
                raise ValueError(f"target fps must be > 0, got {target_fps}")
            self.target_fps = float(target_fps)
        if mode is not None:
            mode = BudgetMode.parse(mode)
            switched_on = self.mode is BudgetMode.OFF and mode is not BudgetMode.OFF
            self.mode = mode
            if switched_on and hasattr(self, "_model"):
                self.reset()  # the machine and the scene may have changed while budget mode was off
    def set_levels(self, levels: Sequence[float] | None) -> None:
        """The engine's ladder changed (backend auto chose another backend): new levels, and a calibration on them."""
        levels = sorted(float(level) for level in levels) if levels else None
        if levels != self.levels:
            self.levels = levels
            self.reset()

    def set_limits(self, min_rate: float, max_rate: float) -> None:
        if not 0.0 <= min_rate <= max_rate <= 0.95:
            raise ValueError(f"need 0 <= min_rate <= max_rate <= 0.95, got min {min_rate}, max {max_rate}")
        changed = (min_rate, max_rate) != (self.min_rate, self.max_rate)
        self.min_rate, self.max_rate = float(min_rate), float(max_rate)
        if changed and hasattr(self, "_model"):
            self.reset()  # the calibration points no longer span the allowed range

    def reset(self) -> None:
        """Forget the calibration and the feedback state (e.g. after a model or input-size change)."""
        n = self.tuning.calibration_points
        if self.max_rate - self.min_rate < 1e-6 or n < 2:
            self._schedule = [self.min_rate]
        else:
            spread = [self.min_rate + (self.max_rate - self.min_rate) * i / (n - 1) for i in range(n)]
            self._schedule = sorted({self._snap(rate) for rate in spread})
        self._samples: dict[float, list[float]] = {}
        self._model: LatencyModel | None = None
        self._scale = 1.0
        self._feedback_frames = 0
        self._frames_at_rate = 0
        self._noise_var = 0.0
        self._rate: float | None = None
        self.frames_seen = 0
        self._measured_at: dict[float, int] = {}  # rate -> frame of its newest measurement in the model
        self._probe: float | None = None  # the rate being probed, with its frames so far
        self._probe_samples: list[float] = []
        self._reprobe_frames = self.tuning.reprobe_frames
        self.probes = 0  # probes started (diagnostics, tests)

    # -- state ---------------------------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self.mode is not BudgetMode.OFF

    @property
    def target_ms(self) -> float | None:
        if self.mode is BudgetMode.LATENCY:
            return self.target_latency_ms
        if self.mode is BudgetMode.FPS:
            return 1000.0 / self.target_fps
        return None

    @property
    def calibrated(self) -> bool:
        return self._model is not None

    @property
    def model(self) -> LatencyModel | None:
        return self._model

    @property
    def probing(self) -> bool:
        return self._probe is not None

    @property
    def rate(self) -> float | None:
        """The rate last handed out (None before the first update)."""
        return self._rate

    def predicted_latency_ms(self, rate: float) -> float | None:
        return None if self._model is None else self._scale * self._model.predict(rate)

    # -- the loop ------------------------------------------------------------------------------------------------
    def update(self, latency_ms: float, rate_used: float | None = None) -> float | None:
        """Record one frame's latency (measured at ``rate_used``, default: the last rate returned) and return the
        merge rate for the next frame, or None in mode "off"."""
        if not self.active:
            return None
        self.frames_seen += 1
        rate_used = self._rate if rate_used is None else float(rate_used)
        if self._model is None:
            return self._calibrate(latency_ms, rate_used)
        return self._correct(latency_ms, rate_used)

    def _calibrate(self, latency_ms: float, rate_used: float | None) -> float:
        if rate_used is not None:
            point = next((r for r in self._schedule if abs(r - rate_used) < 5e-4), None)  # callers may round
            if point is not None and len(self._samples.get(point, [])) < self.tuning.frames_per_point:
                self._samples.setdefault(point, []).append(float(latency_ms))
        pending = [r for r in self._schedule if len(self._samples.get(r, [])) < self.tuning.frames_per_point]
        if pending:
            self._rate = pending[0]
            return self._rate
        rates = list(self._samples)
        self._model = LatencyModel(rates, [statistics.median(self._samples[r]) for r in rates])
        self._measured_at = {self._key(r): self.frames_seen for r in rates}
        # Seed the noise estimate with the calibration's spread around each point's median; the median absolute
        # deviation, because one slow first frame at a new rate must not pass for noise.
        deviations = [abs(x / statistics.median(v) - 1.0) for v in self._samples.values() for x in v]
        self._noise_var = (1.4826 * statistics.median(deviations)) ** 2
        self._scale = 1.0
        self._feedback_frames = 0
        self._frames_at_rate = 0
        self._rate = self._choose(self.target_ms)
        return self._rate

    def _correct(self, latency_ms: float, rate_used: float | None) -> float:
        tuning = self.tuning
        current = self._rate if self._rate is not None else self.min_rate
        if self._probe is not None:
            return self._continue_probe(latency_ms, rate_used)
        if rate_used is not None and abs(rate_used - current) > 5e-4:
            # Someone else set the rate (budget mode was off for a while): continue from what actually runs.
            current, self._frames_at_rate = min(max(rate_used, self.min_rate), self.max_rate), 0
        if rate_used is not None:
            predicted = self._model.predict(rate_used)
            if predicted > 0:
                # One slow outlier frame (a GC pause, another process) must not swing the rate: clip the ratio.
                ratio = min(max(float(latency_ms) / predicted, self._scale / 1.5), self._scale * 1.5)
                # Averaging starts with large weights (a plain mean of the first frames after calibration) and
                # settles to the EMA, so the first correction is quick and later ones smooth.
                self._feedback_frames += 1
                alpha = max(tuning.ema_alpha, 1.0 / (self._feedback_frames + 1))
                deviation = ratio / self._scale - 1.0
                self._noise_var = (1 - tuning.ema_alpha) * self._noise_var + tuning.ema_alpha * deviation ** 2
                self._scale = (1 - alpha) * self._scale + alpha * ratio
        self._frames_at_rate += 1
        target = self.target_ms
        expected = self._scale * self._model.predict(current)
        if abs(expected - target) <= self.deadband * target or self._frames_at_rate < tuning.min_dwell:
            return self._hold(current)
        # Leaving this rate: first teach the model what it measured here, so that its shape becomes right where
        # the controller works (the calibration's few noisy points can be off, even flat, between them).
        self._learn_point(current, expected)
        self._measured_at[self._key(current)] = self.frames_seen
        wanted = self._choose(target / self._scale)
        step = max(-tuning.max_step, min(tuning.max_step, wanted - current))
        new_rate = self._snap(current + step)
        if abs(new_rate - current) < tuning.min_step:
            # missed (or well under), and the model offers nothing better: measure the neighbouring rung
            probe = None
            if expected > (1.0 + self.deadband) * target:
                probe = self._probe_candidate(current, faster=True)
            elif expected < (1.0 - max(self.deadband, tuning.underrun)) * target:
                # more than a rung or two under: normal between two rungs, not this far
                probe = self._probe_candidate(current, faster=False)
            if probe is not None:
                return self._start_probe(probe)
            return self._hold(current)
        self._frames_at_rate = 0
        self._rate = new_rate
        return self._rate

    # -- re-probing ----------------------------------------------------------------------------------------------
    @staticmethod
    def _key(rate: float) -> float:
        return round(rate, 4)

    def _probe_candidate(self, current: float, faster: bool) -> float | None:
        """The neighbouring rung (the next faster one above ``current``, or the next with less merging below it)
        when its measurement is missing or old enough, else None."""
        if faster:
            if current >= self._top() - 1e-9:
                return None
            if self.levels is not None:
                above = [level for level in self.levels if current + 1e-9 < level <= self.max_rate + 1e-9]
                neighbour = above[0] if above else self._top()
            else:
                neighbour = min(current + self.tuning.probe_step, self.max_rate)
        else:
            if current <= self.min_rate + 1e-9:
                return None
            if self.levels is not None:
                below = [level for level in self.levels if self.min_rate - 1e-9 <= level < current - 1e-9]
                neighbour = below[-1] if below else self.min_rate
            else:
                neighbour = max(current - self.tuning.probe_step, self.min_rate)
        measured = self._measured_at.get(self._key(neighbour))
        if measured is not None and self.frames_seen - measured < self._reprobe_frames:
            return None
        return neighbour

    def _start_probe(self, rate: float) -> float:
        self._probe, self._probe_samples = rate, []
        self.probes += 1
        self._rate = rate
        return rate

    def _continue_probe(self, latency_ms: float, rate_used: float | None) -> float:
        probe = self._probe
        if rate_used is None or abs(rate_used - probe) < 5e-4:
            self._probe_samples.append(float(latency_ms))
        if len(self._probe_samples) < self.tuning.frames_per_point:
            return probe
        measured = statistics.median(self._probe_samples)
        predicted = self._scale * self._model.predict(probe)
        self._probe, self._probe_samples = None, []
        # The median of a few frames scatters by about sd / sqrt(frames): call it a surprise beyond 2.5 of those.
        noise = 2.5 * math.sqrt(self._noise_var / self.tuning.frames_per_point)
        if measured < (1.0 - max(self.deadband, noise)) * predicted:
            # Faster than the model said: its points were measured under other conditions (a load burst during
            # calibration); measure them all again rather than patch one.
            probes = self.probes
            self.reset()
            self.probes = probes
            self._rate = self._schedule[0]
            return self._rate
        self._learn_point(probe, measured)
        self._measured_at[self._key(probe)] = self.frames_seen
        self._reprobe_frames = min(2 * self._reprobe_frames, self.tuning.max_reprobe_frames)
        self._frames_at_rate = 0
        self._rate = self._choose(self.target_ms / self._scale)
        return self._rate

    @property
    def deadband(self) -> float:
        """The relative error tolerated before moving: the tuning's deadband, widened on a noisy machine to 2.5
        standard deviations of the smoothed latency (up to ``max_deadband``), so noise alone does not move the
        rate."""
        alpha = self.tuning.ema_alpha
        smoothed_sd = math.sqrt(self._noise_var * alpha / (2.0 - alpha))
        return min(max(self.tuning.deadband, 2.5 * smoothed_sd), self.tuning.max_deadband)

    def _choose(self, target_ms: float) -> float:
        return self._snap(self._model.smallest_rate_for(target_ms, self.min_rate, self.max_rate,
                                                        self.tuning.worthwhile_saving))

    def _top(self) -> float:
        """The most merging the controller may choose: max_rate, or with levels the highest level up to it (a step
        left out of the levels, e.g. one no faster than a step with less merging, is never chosen)."""
        if self.levels is None:
            return self.max_rate
        below = [level for level in self.levels if level <= self.max_rate + 1e-9]
        return below[-1] if below else self.max_rate

    def _snap(self, rate: float) -> float:
        """With discrete levels, the least merging level at or above ``rate`` (so a prediction between two levels
        is met, not straddled); min_rate and the top (``_top``) are always allowed."""
        if self.levels is None or rate <= self.min_rate + 1e-9:
            return min(max(rate, self.min_rate), self.max_rate)
        top = self._top()
        if rate >= top - 1e-9:
            return top
        return next((level for level in self.levels if rate - 1e-9 <= level <= top), top)

    def _hold(self, rate: float) -> float:
        self._rate = min(max(rate, self.min_rate), self.max_rate)
        return self._rate

    def _learn_point(self, rate: float, latency_ms: float) -> None:
        """Put the measured (rate, latency) into the model, replacing points too close to it to disagree with."""
        rates = [r for r in self._model.rates if abs(r - rate) >= self.tuning.point_spacing]
        latencies = [self._scale * self._model.predict(r) for r in rates]
        self._model = LatencyModel(rates + [rate], latencies + [latency_ms])
        # The model is now in today's units; keep whatever part of the measurement isotonic smoothing left out.
        self._scale = latency_ms / self._model.predict(rate)


class PoseWork:
    """How many people pose estimates per frame in budget mode, within the user's ``pose.max_persons``.

    When several people are in view pose can take most of a frame, and the merge rate alone cannot bring the frame
    back under the target (measured 2026-12-07: two cameras with pose at rate 0.9 still took 414 and 280 ms against
    250). When the merge rate has settled (unchanged for ``dwell`` frames: at its highest, or where merging does
    not pay) and the frame still misses the target by more than ``miss`` (beyond the budget controller's own
    deadband, so the two do not fight) while pose takes at least ``pose_share`` of
    it, the cap drops to the people that fit (at what one person costs now; at least one). While a person more
    would fit under the target with ``room`` to spare, it rises by one, up to the user's maximum. At most one change
    per ``dwell`` frames. It never writes the user's parameters: ``cap`` is None while it does not limit."""

    def __init__(self, dwell: int = 8, pose_share: float = 0.25, miss: float = 0.15, room: float = 0.1,
                 alpha: float = 0.3):
        self.dwell, self.pose_share, self.miss, self.room, self.alpha = dwell, pose_share, miss, room, alpha
        self.reset()

    def reset(self) -> None:
        self.cap: int | None = None
        self._frames = 0         # since the cap last changed
        self._rate: float | None = None
        self._rate_frames = 0    # since the merge rate last changed
        self._processing: float | None = None
        self._per_person: float | None = None

    def limit(self, user_max: int) -> int:
        """The people to pose on the next frame."""
        return user_max if self.cap is None else min(self.cap, user_max)

    def update(self, processing_ms: float, pose_ms: float, persons: int, target_ms: float | None, rate: float,
               user_max: int) -> int | None:
        """After a frame (``persons`` posed in ``pose_ms`` of its ``processing_ms``; ``rate``: the merge rate budget
        mode chose for the next frame). Returns the new cap (None: the user's maximum); ``target_ms`` None (budget
        mode off) lifts the cap."""
        if target_ms is None:
            self.reset()
            return None
        self._frames += 1
        same_rate = self._rate is not None and (rate == self._rate or (math.isnan(rate) and math.isnan(self._rate)))
        self._rate_frames = self._rate_frames + 1 if same_rate else 0
        self._rate = rate
        smooth = lambda old, new: new if old is None else (1 - self.alpha) * old + self.alpha * new  # noqa: E731
        self._processing = smooth(self._processing, processing_ms)
        if persons > 0 and math.isfinite(pose_ms):
            self._per_person = smooth(self._per_person, pose_ms / persons)
        if self._frames < self.dwell or self._per_person is None:
            return self.cap
        limit = self.limit(user_max)
        over = self._processing - target_ms
        if (self._rate_frames >= self.dwell and over > self.miss * target_ms and persons >= limit > 1
                and persons * self._per_person >= self.pose_share * self._processing):
            fewer = max(1, math.ceil(over / self._per_person))
            self._change(max(1, limit - fewer), user_max)
        elif self.cap is not None and self._processing + self._per_person <= (1 - self.room) * target_ms:
            self._change(limit + 1, user_max)
        return self.cap

    def _change(self, cap: int, user_max: int) -> None:
        self.cap = None if cap >= user_max else cap
        self._frames = 0


class ArrivalRate:
    """A camera's frame rate over the last ``window_s`` seconds (a short history, not a 1-s window, so that a camera
    below 1 Hz counts steadily)."""

    def __init__(self, window_s: float = 10.0):
        self.window_s = float(window_s)
        self._times: deque[float] = deque()
        self._first: float | None = None

    def record(self, now: float) -> None:
        if self._first is None:
            self._first = now
        self._times.append(now)
        self._forget(now)

    def rate(self, now: float) -> float:
        """Frames per second over the window (or since the first frame, when that is shorter; at least 1 s)."""
        self._forget(now)
        if self._first is None or not self._times:
            return 0.0
        span = max(min(self.window_s, now - self._first), 1.0)
        return len(self._times) / span

    def _forget(self, now: float) -> None:
        while self._times and self._times[0] < now - self.window_s:
            self._times.popleft()


def fps_demand(camera_rates: Sequence[float], target_fps: float) -> float:
    """The frames per second the worker must process for every camera to reach ``target_fps``: each camera needs
    ``min(its rate, target_fps)`` (no camera gives more frames than it sends). With no camera delivering, one
    camera's worth, so the target stays defined."""
    demand = sum(min(rate, target_fps) for rate in camera_rates if rate > 0)
    return demand if demand > 0 else float(target_fps)
