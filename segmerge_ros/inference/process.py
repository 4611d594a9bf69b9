"""Process-wide settings for the node and the tools, taken once per process before the models load.

The library itself (engine, pose, backends) changes nothing process-wide: a program that embeds it keeps its own
settings. The node, the applications and the benchmarks call ``prepare_process()`` from their packages'
``__init__`` (Python runs it before any of their modules imports torch):

- OpenMP's wait policy: spin briefly, then sleep (``threads.prepare_thread_pools``; must precede ``import torch``);
- glibc's malloc thresholds: keep a frame's freed memory mapped (``memory.keep_freed_memory``; no page faults per
  frame).

Each honours the user's own environment variables and has its opt-out (see those modules).
"""

from __future__ import annotations

from segmerge_ros.inference.memory import keep_freed_memory
from segmerge_ros.inference.threads import prepare_thread_pools


def prepare_process() -> dict[str, str]:
    """Apply both settings (once per process); returns what each did, for logs and benchmark tables."""
    return {"thread_pools": prepare_thread_pools(), "malloc": keep_freed_memory()}
