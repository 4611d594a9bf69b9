"""Thread pools on a shared CPU (inference/threads.py): the wait policy before torch loads, the CPU-load probe and
the thread governor's choices."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from segmerge_ros.inference.threads import CpuLoad, ThreadGovernor

PROBE = (
    "import json, os, segmerge_ros.ros, torch\n"
    "from segmerge_ros.inference.threads import thread_pool_policy\n"
    "print(json.dumps({'policy': os.environ.get('OMP_WAIT_POLICY'), 'spin': os.environ.get('GOMP_SPINCOUNT'),"
    " 'said': thread_pool_policy(),"
    " 'info': torch.__config__.parallel_info()}))\n"
)


def run_probe(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME",
                                                               "SEGMERGE_THREADS")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_the_node_layer_bounds_openmps_spin_before_torch_loads():
    seen = run_probe()
    assert seen["spin"] == "10000" and seen["policy"] is None  # a bounded spin, not PASSIVE (45 % slower calm)
    assert "spin briefly" in seen["said"] and "too late" not in seen["said"]


def test_the_users_wait_policy_wins_and_the_opt_out_leaves_the_defaults():
    active = run_probe(OMP_WAIT_POLICY="ACTIVE")
    assert active["policy"] == "ACTIVE" and active["spin"] is None
    spin = run_probe(GOMP_SPINCOUNT="20000")
    assert spin["spin"] == "20000" and "GOMP_SPINCOUNT=20000" in spin["said"]
    default = run_probe(SEGMERGE_THREADS="default")
    assert default["policy"] is None and default["spin"] is None and "defaults" in default["said"]


def test_cpu_load_counts_other_processes_not_our_own(tmp_path):
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    ticks = os.sysconf("SC_CLK_TCK")

    def write(busy_all: int, ours: int) -> None:
        # cpu user nice system idle iowait irq softirq steal
        (proc / "stat").write_text(f"cpu  {busy_all} 0 0 1000000 0 0 0 0 0 0\n")
        fields = ["S"] + ["0"] * 10 + [str(ours), "0"] + ["0"] * 30
        (proc / "self" / "stat").write_text(f"123 (python3 -m x) {' '.join(fields)}\n")

    load = CpuLoad(str(proc))
    write(0, 0)
    assert load.sample(now=10.0) is None  # no interval yet
    write(3 * ticks, ticks)  # 3 core-seconds busy in 1 s, 1 of them ours
    assert load.sample(now=11.0) == pytest.approx(2.0)
    write(3 * ticks + ticks // 2, 2 * ticks)  # 0.5 core-s busy, all of it ours (+ rounding)
    assert load.sample(now=12.0) == pytest.approx(0.0, abs=0.05)


class FakeLoad:
    def __init__(self) -> None:
        self.cores = 0.0

    def sample(self, now: float) -> float:
        return self.cores


def drive(governor: ThreadGovernor, cost_ms, frames: int, start: float, rung="top") -> float:
    """Run ``frames`` frames 0.1 s apart whose network time is ``cost_ms(threads)``; returns the time after them."""
    now = start
    for _ in range(frames):
        governor.observe(cost_ms(governor.threads), rung, now=now)
        now += 0.1
    return now


def test_governor_drops_to_one_thread_when_the_cpu_gets_busy_and_returns_when_it_calms():
    applied: list[int] = []
    load = FakeLoad()
    governor = ThreadGovernor(2, applied.append, load, min_interval_s=1.0)
    calm = {2: 40.0, 1: 70.0}
    busy = {2: 300.0, 1: 90.0}
    now = drive(governor, calm.get, 40, 0.0)
    assert governor.threads == 2 and applied == []  # calm all along: no probe, no change
    load.cores = 2.0
    now = drive(governor, busy.get, 60, now)
    assert governor.threads == 1 and applied[-1] == 1
    assert governor.state.probe_ms == {2: 300.0, 1: 90.0}
    load.cores = 0.0
    drive(governor, calm.get, 60, now)
    assert governor.threads == 2 and applied[-1] == 2


def test_governor_keeps_the_current_count_within_its_margin():
    applied: list[int] = []
    load = FakeLoad()
    governor = ThreadGovernor(2, applied.append, load, min_interval_s=1.0, margin=0.1)
    now = drive(governor, {2: 50.0, 1: 50.0}.get, 20, 0.0)
    load.cores = 1.0
    drive(governor, {2: 100.0, 1: 95.0}.get, 60, now)  # 1 thread is 5 % faster: inside the margin
    assert governor.threads == 2 and governor.state.probe_ms == {2: 100.0, 1: 95.0}


def test_governor_restarts_a_probe_when_the_rung_changes():
    applied: list[int] = []
    load = FakeLoad()
    governor = ThreadGovernor(2, applied.append, load, min_interval_s=1.0, probe_frames=3)
    now = drive(governor, {2: 50.0, 1: 60.0}.get, 20, 0.0)
    load.cores = 2.0
    now = drive(governor, {2: 300.0, 1: 90.0}.get, 4, now, rung="top")
    assert governor.state.phase == "probing" and governor.probing  # (what budget mode holds its rate for)
    # the rung changes mid-probe: the times of different rungs must not be compared
    now = drive(governor, {2: 30.0, 1: 9.0}.get, 2, now, rung="unmerged")
    assert governor.state.phase == "probing"
    drive(governor, {2: 30.0, 1: 9.0}.get, 60, now, rung="unmerged")
    assert governor.threads == 1 and governor.state.probe_ms == {2: 30.0, 1: 9.0}


def test_disabled_governor_never_changes_threads():
    applied: list[int] = []
    load = FakeLoad()
    governor = ThreadGovernor(2, applied.append, load, enabled=False)
    load.cores = 2.0
    drive(governor, {2: 300.0, 1: 90.0}.get, 60, 0.0)
    assert applied == [] and governor.threads == 2 and not governor.probing


def test_governor_probes_when_the_network_time_drifts_although_the_load_probe_sees_nothing():
    applied: list[int] = []
    governor = ThreadGovernor(2, applied.append, FakeLoad(), min_interval_s=1.0, recheck_s=20.0)  # load stays 0
    now = drive(governor, {2: 40.0, 1: 70.0}.get, 30, 0.0)
    assert applied == []
    now = drive(governor, {2: 160.0, 1: 90.0}.get, 60, now)  # 4x slower at 2 threads: a busy CPU
    assert governor.threads == 1 and applied == [1]
    assert governor.state.probe_ms == {2: 160.0, 1: 90.0}
    # calm again: at 1 thread that is only 90 -> 70 ms, inside the drift band; the recheck finds 2 threads again
    now = drive(governor, {2: 40.0, 1: 70.0}.get, 30, now)
    assert governor.threads == 1  # not before recheck_s
    drive(governor, {2: 40.0, 1: 70.0}.get, 200, now)
    assert governor.threads == 2 and applied[-1] == 2
    assert governor.state.probe_ms == {1: 70.0, 2: 40.0}


def test_governor_at_the_most_threads_does_not_recheck_on_a_steady_cpu():
    applied: list[int] = []
    governor = ThreadGovernor(2, applied.append, FakeLoad(), min_interval_s=1.0, recheck_s=1.0)
    drive(governor, {2: 40.0, 1: 70.0}.get, 200, 0.0)
    assert applied == [] and governor.state.phase == "steady"


def test_governor_does_not_time_the_first_frame_after_a_switch():
    """That frame pays for the switch (a pool starting, OpenVINO compiling the rung for the new count)."""
    applied: list[int] = []
    load = FakeLoad()
    governor = ThreadGovernor(2, applied.append, load, min_interval_s=1.0, probe_frames=2)  # a median of 2
    switched = {"pending": False}

    def set_threads(n: int) -> None:
        applied.append(n)
        switched["pending"] = True

    governor._set_threads = set_threads

    def cost(threads: int) -> float:
        if switched["pending"]:
            switched["pending"] = False
            return 5000.0  # a compile on the first frame at the new count
        return {2: 300.0, 1: 90.0}[threads]

    now = drive(governor, {2: 40.0, 1: 70.0}.get, 20, 0.0)
    load.cores = 2.0
    drive(governor, cost, 60, now)
    assert governor.threads == 1 and governor.state.probe_ms == {2: 300.0, 1: 90.0}


def test_the_governor_says_how_long_its_last_choice_has_held():
    """The node frees the other thread counts' compiled rungs once a choice has held (STEADY_THREADS_S)."""
    load = FakeLoad()
    governor = ThreadGovernor(2, lambda threads: None, load, min_interval_s=1.0)
    now = drive(governor, {2: 40.0, 1: 70.0}.get, 40, 100.0)
    assert governor.choices == 0  # calm all along: nothing to choose
    load.cores = 2.0
    now = drive(governor, {2: 300.0, 1: 90.0}.get, 60, now)
    assert governor.choices >= 1 and governor.threads == 1
    assert governor.steady_for(now + 30.0) >= 30.0
    load.cores = 0.0
    governor.observe(90.0, "top", now=now + 31.0)  # the load moved: a probe starts
    governor.observe(90.0, "top", now=now + 31.6)
    assert governor.state.phase == "probing" and governor.steady_for(now + 32.0) == 0.0
