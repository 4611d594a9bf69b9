"""inference/memory.py: after keep_freed_memory() a frame's large temporaries no longer fault their pages in again."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = r"""
import json, resource, sys
import numpy as np
from segmerge_ros.inference.memory import keep_freed_memory
outcome = keep_freed_memory() if sys.argv[1] == "keep" else "not called"
def frame():
    # a frame's temporaries, 64 MiB together, freed at its end: more than glibc's default trim threshold
    blocks = [np.empty(8 << 20, np.uint8) for _ in range(8)]
    for block in blocks:
        block.fill(1)  # touch every page
    return sum(int(block[::4096].sum()) for block in blocks)
frame()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    frame()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"outcome": outcome, "faults_per_frame": faults / 10}))
"""


def probe(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120,
                          env={**clean, **env}, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the thresholds are glibc's")
def test_keeping_freed_memory_stops_the_page_faults_of_every_frame():
    default = probe("default")
    kept = probe("keep")
    assert default["faults_per_frame"] > 1000  # 64 MiB = 16,384 pages, handed back and faulted in again
    assert kept["outcome"].startswith("keeping freed memory")
    assert kept["faults_per_frame"] < 10


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the thresholds are glibc's")
def test_the_users_malloc_environment_wins():
    result = probe("keep", MALLOC_TRIM_THRESHOLD_="131072")
    assert result["outcome"] == "left to the environment (MALLOC_TRIM_THRESHOLD_)"
    assert result["faults_per_frame"] > 1000  # trimmed after every frame, as the user asked


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the thresholds are glibc's")
def test_segmerge_malloc_default_leaves_glibc_as_it_is():
    result = probe("keep", SEGMERGE_MALLOC="default")
    assert result["outcome"] == "left as it is (SEGMERGE_MALLOC=default)"
    assert result["faults_per_frame"] > 1000


def test_bench_memory_compares_both_settings_in_fresh_processes(shared_data, capsys):
    from segmerge_ros.bench import bench_memory

    video = str(shared_data / "opencv_samples" / "vtest.avi")
    assert bench_memory.main(["--size", "64x96", "--rounds", "1", "--frames", "6", "--rates", "0",
                              "--source", video]) == 0
    out = capsys.readouterr().out
    assert "(malloc: keeping freed memory" in out and "(malloc: left as it is (SEGMERGE_MALLOC=default))" in out
    summary = [line.split()[1] for line in out.splitlines() if line.startswith("0 ")]
    assert summary == ["kept", "glibc"]


PROCESS_SETTINGS = r"""
import sys
from segmerge_ros.inference import memory, threads
if sys.argv[1] == "node":
    import segmerge_ros.ros  # the node's package: its __init__ takes the process-wide settings
from segmerge_ros.inference.engine import SegmentationEngine
from segmerge_ros.inference.pose import PoseEstimator
SegmentationEngine(input_size=(64, 64), warm=False)
PoseEstimator(input_size=(64, 64))
print(repr(memory._outcome), repr(threads._outcome))
"""


def test_only_the_node_and_tools_change_process_wide_settings_not_the_library():
    """issue 20: the engine's constructor used to change glibc's malloc settings for whatever process embedded it."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GOMP_", "OMP_", "KMP_"))}
    library = subprocess.run([sys.executable, "-c", PROCESS_SETTINGS, "library"], capture_output=True, text=True,
                             timeout=120, env=clean, check=True).stdout.split()
    assert library == ["None", "None"]
    node = subprocess.run([sys.executable, "-c", PROCESS_SETTINGS, "node"], capture_output=True, text=True,
                          timeout=120, env=clean, check=True).stdout
    assert "keeping freed memory" in node and "GOMP_SPINCOUNT=10000" in node


TRIM_PROBE = r"""
import json
import numpy as np
from segmerge_ros.inference.memory import keep_freed_memory, return_freed_memory
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
keep_freed_memory()
# 300 blocks of 1 MiB (below the mmap threshold: heap memory), touched, then freed: the heap keeps them
blocks = [np.ones(1 << 20, np.uint8) for _ in range(300)]
touched = rss_mb()
del blocks
freed = rss_mb()
returned = return_freed_memory()
print(json.dumps({"touched": touched, "freed": freed, "trimmed": rss_mb(), "returned": returned}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_return_freed_memory_gives_the_kept_heap_back_to_the_kernel():
    """Compiled rungs dropped on purpose must lower the RSS although keep_freed_memory() stops glibc's trimming."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", TRIM_PROBE], capture_output=True, text=True, timeout=120, env=clean,
                          check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["returned"] is True
    assert result["freed"] > result["touched"] - 50, result  # without the trim the heap stays resident
    assert result["trimmed"] < result["freed"] - 200, result
