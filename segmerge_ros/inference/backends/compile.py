"""torch.compile backend: one compiled graph per (input shape, rung), inductor on the CPU or CUDA graphs."""

from __future__ import annotations

import os
import shutil
import warnings
from typing import Callable

import torch

from segmerge_ros.inference.backends.base import PreparedBackend, RungModule, autocast


def _find_cxx() -> str | None:
    """A C++ compiler for inductor's CPU code generation ($CXX first, as inductor does)."""
    for candidate in (os.environ.get("CXX"), "g++", "clang++", "c++"):
        if candidate and shutil.which(candidate):
            return candidate
    return None


class CompileBackend(PreparedBackend):
    """``torch.compile`` with static shapes, one compiled module per (input shape, rung); CUDA graphs per rung
    (``mode="reduce-overhead"``) on CUDA only."""

    kind = "compile"

    def __init__(self, *args, compile_backend: str | Callable = "inductor", cuda_graphs: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.compile_backend = compile_backend
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        # CUDA graph trees record a graph on the second-or-later call: warm until every rung is recorded.
        self._warm_calls = 3 if self.cuda_graphs else 1
        # Dynamo warns that it traces through the lru_cache around bipartite.grid_split; that function is pure (ints
        # and a device in, index tensors out), so tracing through the cache is exact and the warning only alarms.
        warnings.filterwarnings(
            "ignore", message=r"Dynamo detected a call to a `functools.lru_cache`", category=UserWarning
        )

    def _build(self, shape, config):
        _make_room_for_compiled_variants()
        return torch.compile(
            RungModule(self.model, config),
            dynamic=False,  # shapes are static per (input size, rung) by design
            backend=self.compile_backend,
            mode="reduce-overhead" if self.cuda_graphs else None,
        )

    def _invoke(self, prepared, pixels):
        with torch.inference_mode(), autocast(self.device, self.dtype):
            if self.cuda_graphs:
                # Rungs alternate freely: tell the graph trees a new step begins so they never wait on the previous
                # rung's outputs, and copy the output out of the graph's static buffer before the next replay.
                torch.compiler.cudagraph_mark_step_begin()
                return prepared(pixels).float().clone()
            return prepared(pixels).float()


_compiled_variants = 0  # rungs compiled in this process, by every CompileBackend together


def _make_room_for_compiled_variants() -> None:
    """Keep dynamo's recompile limit above the number of rungs compiled in this process.

    Every rung runs the same Python code (RungModule.forward and the model's), and dynamo keeps compiled variants
    per code object, 8 by default; past the limit it runs the frame uncompiled without raising, so later rungs (or
    a second backend in the same process) would silently lose compilation.
    """
    global _compiled_variants
    import torch._dynamo.config as dynamo_config

    _compiled_variants += 1
    for limit in ("recompile_limit", "cache_size_limit"):  # the name changed across torch releases
        try:
            current = getattr(dynamo_config, limit)
        except AttributeError:
            continue
        if current < _compiled_variants + 8:
            setattr(dynamo_config, limit, _compiled_variants + 8)
        break
