"""Threads on a shared CPU: OpenMP pools that spin only briefly, and the thread count as an actuator.

A robot's CPU is shared with navigation, SLAM and drivers. Two things cost this node far more than its fair share
there (docs/benchmarks.md, section 13):

1. OpenMP's worker threads spin while they wait for a partner at the end of every parallel region. When the partner
   has been descheduled by a busy neighbour, the spinning burns the core the partner needs: measured 8-9x slower
   with two busy processes on two cores. ``prepare_thread_pools()`` bounds the spin (``GOMP_SPINCOUNT=10000``, then
   sleep) before torch loads: libgomp reads it exactly once, when the library is loaded, so it must run before
   ``import torch``. Not ``OMP_WAIT_POLICY=PASSIVE`` (sleep at once): a merged model runs many short parallel
   regions, and waking a sleeping pool for each cost 45 % at the top rung on a calm CPU, where a bounded spin costs
   nothing measurable and is as fair under load (docs/benchmarks.md, section 13e). The ROS-facing packages (``ros``, ``apps``, ``bench``) call it from their ``__init__``, which Python runs
   before any of their modules imports torch. A user's own ``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT`` or
   ``KMP_BLOCKTIME`` wins; ``SEGMERGE_THREADS=default`` leaves the libraries' defaults. numba's arg-max is serial
   (no pool); OpenVINO's threads are set per compiled model (``INFERENCE_NUM_THREADS``).
2. How many threads pay depends on how busy the CPU is, which changes at run time. ``ThreadGovernor`` watches the
   CPU time other processes take (``CpuLoad``, from /proc) and the network time of each frame; when the load
   changes it tries each thread count on a few frames at the same rung and keeps the fastest (with a margin, so it
   does not flap), and tries again when the load changes back. The thread count is changed between frames only,
   on the thread that runs the model, never per frame.

Nothing here imports torch: ``prepare_thread_pools`` must run before it loads.
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

LOG = logging.getLogger(__name__)

WAIT_POLICY = {"GOMP_SPINCOUNT": "10000"}  # libgomp's default is 300000 (30x longer) when the cores are not oversubscribed
USER_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
OPT_OUT = "SEGMERGE_THREADS"  # "default": leave OpenMP's own wait policy (spinning)

_lock = threading.Lock()
_outcome: str | None = None


def prepare_thread_pools() -> str:
    """Set OpenMP's wait policy for this process (and its children) once, before torch loads; returns what happened."""
    global _outcome
    with _lock:
        if _outcome is None:
            _outcome = _prepare()
            LOG.debug("thread pools: %s", _outcome)
        return _outcome


def thread_pool_policy() -> str:
    """What ``prepare_thread_pools`` did in this process (for diagnostics and benchmark tables)."""
    return _outcome or "not prepared (OpenMP defaults: worker threads spin while they wait)"


def _prepare() -> str:
    if os.environ.get(OPT_OUT) == "default":
        return f"OpenMP defaults ({OPT_OUT}=default)"
    chosen = [f"{name}={os.environ[name]}" for name in USER_VARIABLES if os.environ.get(name)]
    if chosen:
        return f"left to the environment ({', '.join(chosen)})"
    os.environ.update(WAIT_POLICY)  # children (the demo's node and camera) inherit it
    if "torch" in sys.modules:
        # libgomp has read its settings already: this process keeps spinning; say so rather than pretend.
        LOG.warning("GOMP_SPINCOUNT set after torch was loaded: it applies to child processes only; start the "
                    "process through segmerge_ros's entry points (or export GOMP_SPINCOUNT=10000) for a fair "
                    "share of a busy CPU")
        return "too late for this process (torch loaded first); children spin briefly, then sleep"
    return "OpenMP threads spin briefly, then sleep while waiting (GOMP_SPINCOUNT=10000)"


class CpuLoad:
    """CPU time other processes take, in cores, from /proc (Linux): what the node sees of its neighbours.

    ``sample()`` returns the mean over the time since the previous sample (None on the first call, or where /proc
    is missing)."""

    def __init__(self, proc: str = "/proc") -> None:
        self._proc = proc
        self._ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._last: tuple[float, float, float] | None = None  # (wall s, busy ticks of all CPUs, our ticks)
        self.cores = os.cpu_count() or 1

    def _read(self) -> tuple[float, float] | None:
        try:
            with open(f"{self._proc}/stat", encoding="ascii") as stat:
                fields = stat.readline().split()[1:]
            with open(f"{self._proc}/self/stat", encoding="ascii") as own:
                # fields after the command name (which may contain spaces): utime and stime are 14th and 15th
                rest = own.read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        values = [float(v) for v in fields]
        idle = values[3] + (values[4] if len(values) > 4 else 0.0)  # idle + iowait
        busy = sum(values[:8]) - idle  # user nice system idle iowait irq softirq steal (guest is inside user)
        return busy, float(rest[11]) + float(rest[12])

    def sample(self, now: float | None = None) -> float | None:
        now = time.monotonic() if now is None else now
        read = self._read()
        if read is None:
            return None
        busy, ours = read
        last, self._last = self._last, (now, busy, ours)
        if last is None or now <= last[0]:
            return None
        others = (busy - last[1]) - (ours - last[2])
        return max(0.0, others / self._ticks / (now - last[0]))


@dataclass
class GovernorState:
    """What the governor is doing, for diagnostics."""

    threads: int
    others_cores: float | None = None
    phase: str = "steady"  # steady | probing
    last_choice: str = ""
    probe_ms: dict[int, float] = field(default_factory=dict)


class ThreadGovernor:
    """Chooses the thread count that minimises the network's time as the CPU's load changes.

    ``observe(network_ms, rung)`` after every frame, on the thread that runs the model; it calls ``set_threads(n)``
    between frames when it tries or keeps another count. A probe runs ``probe_frames`` frames at each candidate (the
    current count first) at one rung (a rung change restarts it) and keeps the fastest median unless the current one
    is within ``margin`` of it. A probe starts when the other processes' load has moved by ``load_step`` cores since
    the last choice (sampled every ``sample_s``), or when the rung's network time has drifted by more than ``drift``
    (a share, smoothed) from what it took at the last choice, and at most every ``min_interval_s``. Below the most
    threads it also probes every ``recheck_s``: at one thread a calmer CPU barely changes the network's time, so
    neither trigger might see it when the load probe cannot (other processes capped, or in a container)."""

    def __init__(self, max_threads: int, set_threads: Callable[[int], None], load: CpuLoad | None = None, *,
                 probe_frames: int = 4, margin: float = 0.08, load_step: float = 0.5, sample_s: float = 0.5,
                 min_interval_s: float = 3.0, drift: float = 0.35, recheck_s: float = 30.0,
                 enabled: bool = True) -> None:
        if max_threads < 1:
            raise ValueError(f"max_threads must be >= 1, got {max_threads}")
        self.candidates = sorted({max_threads, 1} | ({max_threads // 2} if max_threads > 3 else set()), reverse=True)
        self._set_threads = set_threads
        self._load = load if load is not None else CpuLoad()
        self.probe_frames, self.margin, self.load_step = probe_frames, margin, load_step
        self.sample_s, self.min_interval_s, self.enabled = sample_s, min_interval_s, enabled
        self.drift, self.recheck_s = drift, recheck_s
        self._reference: dict[object, float] = {}  # rung -> its network ms at the current count, when chosen
        self._first_times: dict[object, list[float]] = {}
        self._drift = 1.0  # smoothed ratio of network time to the rung's reference
        self.state = GovernorState(threads=max_threads)
        self._smoothed: float | None = None
        self._load_at_choice: float | None = None
        self._last_sample = -1e9
        self._last_choice_t = -1e9
        self._now = 0.0
        self._probe: list[int] = []  # candidates still to try
        self._probe_rung: object = None
        self._samples: dict[int, list[float]] = {}
        self._settling = False  # the next frame is the first after a switch: not timed
        self._started = time.monotonic()
        self.choices = 0  # probes completed (each ends in a choice)

    @property
    def threads(self) -> int:
        return self.state.threads

    def steady_for(self, now: float | None = None) -> float:
        """Seconds since the last choice while no probe runs (0 while probing; since start before any choice)."""
        if self.state.phase != "steady":
            return 0.0
        now = time.monotonic() if now is None else now
        return now - (self._last_choice_t if self._last_choice_t > -1e8 else self._started)

    @property
    def probing(self) -> bool:
        """Whether the next frames run at thread counts being tried (what they take says little about the rung)."""
        return self.enabled and self.state.phase == "probing"

    def observe(self, network_ms: float, rung: object, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._now = now
        self._update_load(now)
        if not self.enabled or len(self.candidates) == 1:
            return
        if self.state.phase == "probing":
            self._continue_probe(network_ms, rung)
            return
        drifted = self._track_drift(network_ms, rung)
        recheck = self.state.threads < self.candidates[0] and now - self._last_choice_t >= self.recheck_s
        if (self._load_moved() or drifted or recheck) and now - self._last_choice_t >= self.min_interval_s:
            self._start_probe(rung)

    def _track_drift(self, network_ms: float, rung: object) -> bool:
        """Whether this rung's network time has moved away from what it took when the count was last chosen (a
        busier or calmer CPU that the load probe may not see: other processes' time is capped by what they get)."""
        reference = self._reference.get(rung)
        if reference is None:
            first = self._first_times.setdefault(rung, [])
            first.append(network_ms)
            if len(first) >= self.probe_frames:
                self._reference[rung] = statistics.median(first)
                self._drift = 1.0
            return False
        self._drift = 0.7 * self._drift + 0.3 * network_ms / reference
        return self._drift > 1.0 + self.drift or self._drift < 1.0 / (1.0 + self.drift)

    def _update_load(self, now: float) -> None:
        if now - self._last_sample < self.sample_s:
            return
        self._last_sample = now
        others = self._load.sample(now)
        if others is None:
            return
        # smooth over about 2 s so one compile or log burst does not start a probe
        self._smoothed = others if self._smoothed is None else 0.6 * self._smoothed + 0.4 * others
        self.state.others_cores = round(self._smoothed, 2)
        if self._load_at_choice is None:
            self._load_at_choice = self._smoothed

    def _load_moved(self) -> bool:
        return (self._smoothed is not None and self._load_at_choice is not None
                and abs(self._smoothed - self._load_at_choice) >= self.load_step)

    def _start_probe(self, rung: object) -> None:
        current = self.state.threads
        self._probe = [current] + [n for n in self.candidates if n != current]
        self._probe_rung = rung
        self._samples = {}
        self._settling = False
        self.state.phase = "probing"

    def _continue_probe(self, network_ms: float, rung: object) -> None:
        if rung != self._probe_rung:  # another rung: its times do not compare; start again at this one
            self._start_probe(rung)
            return
        trying = self._probe[0]
        if trying != self.state.threads:
            return  # the frame ran before the switch took effect
        if self._settling:
            self._settling = False  # the first frame after a switch pays for it (pool start, OpenVINO compile)
            return
        samples = self._samples.setdefault(trying, [])
        samples.append(network_ms)
        if len(samples) < self.probe_frames:
            return
        self._probe.pop(0)
        if self._probe:
            self._apply(self._probe[0])
            return
        self._choose()

    def _choose(self) -> None:
        medians = {n: statistics.median(v) for n, v in self._samples.items()}
        first = next(iter(self._samples))  # the count in use when the probe started
        best = min(medians, key=medians.get)
        if medians[first] <= medians[best] * (1.0 + self.margin):
            best = first
        self._apply(best)
        self.choices += 1
        self.state.phase = "steady"
        self.state.probe_ms = {n: round(ms, 1) for n, ms in medians.items()}
        self.state.last_choice = (f"{best} thread(s) at {self.state.others_cores} other cores busy: "
                                  + ", ".join(f"{n}: {ms:.1f} ms" for n, ms in sorted(medians.items())))
        self._load_at_choice = self._smoothed
        self._last_choice_t = self._now
        # what each rung takes at the chosen count: only the probed rung is known; the others are learnt afresh
        self._reference = {self._probe_rung: statistics.median(self._samples[best])}
        self._first_times = {}
        self._drift = 1.0
        LOG.info("threads: %s", self.state.last_choice)

    def _apply(self, threads: int) -> None:
        if threads != self.state.threads:
            self._set_threads(threads)
            self.state.threads = threads
            self._settling = True
