"""``backend: auto``: the backend measured fastest for this model, at this input size, on this CPU; remembered.

Which backend is fastest is a property of the CPU at hand, not of the package: on the 2-core Xeon with native bf16
these docs were measured on, OpenVINO runs the trained B0 1.3x (unmerged) to 2x (top rung) faster than eager; on
an AVX2-only EPYC it was 0.99-1.32x unmerged (issue 20). So ``auto`` times each backend that can run here on the
ladder's two ends (the exact step and the fastest one, each in the precision the ladder computes it in) at the
frame size it will serve, keeps the one with the smaller geometric-mean time (a compiled backend only if it saves
at least ``MARGIN``: it costs compile time and memory), logs the figures, and remembers the choice in the engine
cache (``backend-choices.json``), keyed by the CPU (model name and flags), the model, the size, the precisions,
the thread count and the software versions, so the next start skips the timing. On CUDA there is nothing to time:
TensorRT where installed, else torch.compile, else eager.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

LOG = logging.getLogger(__name__)

AUTO = "auto"
CPU_CANDIDATES = ("eager", "openvino")
CUDA_PREFERENCE = ("tensorrt", "compile", "eager")
MARGIN = 0.05  # a compiled backend must be this much faster (geometric mean) to be worth its compile time
CHOICES_FILE = "backend-choices.json"


@dataclass(frozen=True)
class BackendChoice:
    """What ``auto`` chose, why, and the figures (ms per measured step, per candidate) it chose from."""

    name: str
    reason: str
    timings_ms: Mapping[str, Sequence[float]] = field(default_factory=dict)
    remembered: bool = False


def cpu_identity(cpuinfo: str = "/proc/cpuinfo") -> str:
    """"<model name> | flags <digest> | <cores> cores": what a timing on this CPU says nothing beyond."""
    model, flags = "unknown CPU", ""
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            elif name.strip() in ("flags", "Features") and not flags:
                flags = " ".join(sorted(value.split()))
    except OSError:
        pass
    digest = hashlib.sha256(flags.encode()).hexdigest()[:12]
    return f"{model} | flags {digest} | {os.cpu_count() or 1} cores"


def choice_fields(model_name: str, size: Sequence[int], precision: str, **extra: object) -> dict[str, object]:
    """What a timing depends on (the key of a remembered choice): the CPU, the model, the size, the precision, the
    thread count, torch and the code that defines the network, plus ``extra`` (a backend package's version)."""
    import torch

    from segmerge_ros.inference.backends.cache import code_fingerprint

    return {"cpu": cpu_identity(), "model": model_name, "size": "x".join(map(str, size)), "precision": precision,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "code": code_fingerprint(), **extra}


def geometric_mean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(max(v, 1e-9)) for v in values) / len(values))


def choose_backend(
    candidates: Sequence[str],
    measure: Callable[[str], Sequence[float]],
    key_fields: Mapping[str, object],
    cache_dir: str | Path | None,
    log: logging.Logger = LOG,
    margin: float = MARGIN,
) -> BackendChoice:
    """The fastest of ``candidates`` (``candidates[0]`` is the reference, eager), from ``measure(name)`` -> ms per
    step (the same steps for every candidate), or the choice remembered for ``key_fields`` in ``cache_dir``.

    A candidate whose measurement raises is left out with a warning (and the choice is not remembered, so the next
    start tries again)."""
    candidates = list(dict.fromkeys(candidates))
    if len(candidates) == 1:
        return BackendChoice(candidates[0], f"only {candidates[0]} can run here")
    key = hashlib.sha256(json.dumps({k: str(v) for k, v in key_fields.items()}, sort_keys=True).encode()).hexdigest()
    store = Path(cache_dir) / CHOICES_FILE if cache_dir is not None else None
    remembered = _read(store).get(key) if store is not None else None
    if remembered and remembered.get("name") in candidates:
        return BackendChoice(remembered["name"], f"{remembered['reason']} (measured {remembered['measured']})",
                             remembered.get("timings_ms", {}), remembered=True)
    timings: dict[str, list[float]] = {}
    failed: list[str] = []
    for name in candidates:
        try:
            timings[name] = [float(ms) for ms in measure(name)]
        except Exception as error:  # a backend that cannot export or compile this model: not a candidate
            log.warning("backend auto: %s could not be timed (%s: %s); not chosen", name, type(error).__name__, error)
            failed.append(name)
    reference = candidates[0]
    if reference not in timings:  # e.g. a frame too small for the fastest step: decide nothing from it
        return BackendChoice(reference, f"{reference}: the timing failed ({', '.join(failed)} could not run), "
                                        f"not remembered", timings)
    base = geometric_mean(timings[reference])
    best = min(timings, key=lambda name: geometric_mean(timings[name]))
    if best != reference and geometric_mean(timings[best]) > base * (1.0 - margin):
        best = reference
    figures = "; ".join(f"{name} " + " / ".join(f"{ms:.1f}" for ms in values) + " ms"
                        for name, values in timings.items())
    speedup = base / geometric_mean(timings[best])
    steps = "the exact and the fastest step" if len(timings[reference]) == 2 else f"{len(timings[reference])} step(s)"
    reason = (f"{best} measured fastest ({speedup:.2f}x {reference}, geometric mean over {steps}: {figures})"
              if best != reference else
              f"{reference} kept: no other backend measured at least {100 * margin:.0f} % faster ({figures})")
    if failed:
        reason += f"; {', '.join(failed)} failed to run"
    elif store is not None:
        _remember(store, key, {"name": best, "reason": reason, "timings_ms": timings, "fields":
                               {k: str(v) for k, v in key_fields.items()},
                               "measured": time.strftime("%Y-%m-%d %H:%M")})
    return BackendChoice(best, reason, timings)


def _read(store: Path) -> dict:
    try:
        data = json.loads(store.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        LOG.warning("backend auto: ignoring unreadable %s (%s)", store, error)
        return {}
    return data if isinstance(data, dict) else {}


def _remember(store: Path, key: str, record: dict) -> None:
    """Add ``record`` under ``key``; written to a temporary file and renamed, so a reader never sees half a file."""
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        # the segmentation engine and pose (another thread, or another node) may remember at the same time
        with open(store.with_name(f".{store.name}.lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = _read(store)
            data[key] = record
            handle, temporary = tempfile.mkstemp(prefix=f".{store.name}.", dir=store.parent)
            with os.fdopen(handle, "w") as stream:
                stream.write(json.dumps(data, indent=1, sort_keys=True) + "\n")
            os.replace(temporary, store)
    except OSError as error:  # a read-only cache: the choice is measured again next time, nothing worse
        LOG.warning("backend auto: cannot remember the choice in %s (%s)", store, error)
