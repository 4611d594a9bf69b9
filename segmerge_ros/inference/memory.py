"""Keep the per-frame working memory between frames instead of handing it back to the OS after every frame.

glibc's malloc returns large freed blocks to the kernel (``munmap`` above its mmap threshold, heap trimming above its
trim threshold), so every frame faults the same pages in again: measured on the 2-core development VM, 9,000 minor
page faults per frame at the top rung (45 -> 35 ms with them gone) and 19,000-27,000 unmerged (175 -> 130 ms),
eager at 576x768. Raising both thresholds keeps the memory mapped; the process stays at its peak working set, which
it reached at every frame anyway.

The settings are process-wide and taken once. A user who set ``MALLOC_MMAP_THRESHOLD_`` or
``MALLOC_TRIM_THRESHOLD_`` (glibc's own environment variables) keeps those, and ``SEGMERGE_MALLOC=default`` leaves
glibc's adaptive defaults as they are (``bench/bench_memory.py`` compares the two); other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading

LOG = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): blocks above it are always mapped anew
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 2**31 - 1  # mallopt takes an int: about 2 GiB, "never" for a frame's working set
USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
OPT_OUT = "SEGMERGE_MALLOC"  # "default": leave glibc's own (adaptive) thresholds

_lock = threading.Lock()
_outcome: str | None = None


def keep_freed_memory() -> str:
    """Apply the thresholds once per process; returns what happened (also logged once at debug level)."""
    global _outcome
    with _lock:
        if _outcome is None:
            _outcome = _apply()
            LOG.debug("malloc: %s", _outcome)
        return _outcome


def _apply() -> str:
    if not sys.platform.startswith("linux"):
        return f"left as it is on {sys.platform}"
    if os.environ.get(OPT_OUT) == "default":
        return f"left as it is ({OPT_OUT}=default)"
    chosen = [name for name in USER_VARIABLES if os.environ.get(name)]
    if chosen:
        return f"left to the environment ({', '.join(chosen)})"
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return "left as it is (no C library handle)"
    # musl's mallopt accepts the parameters and ignores them: only glibc has these thresholds
    if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")):
        return "left as it is (not glibc)"
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    if mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) != 1 or mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) != 1:
        LOG.warning("malloc: glibc refused the mmap/trim thresholds: frames keep paying page faults")
        return "refused by glibc"
    return f"keeping freed memory (mmap threshold {MMAP_THRESHOLD_BYTES >> 20} MiB, no trimming)"


def return_freed_memory() -> bool:
    """Hand the heap's free pages back to the kernel now (glibc's ``malloc_trim``), after something large was freed
    on purpose (compiled rungs dropped): with the thresholds above glibc never does it by itself. A one-off: the next
    frame faults its working set in again. Returns False where there is no glibc."""
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True
