"""What every backend shares: the Backend interface, eager PyTorch, prepared (compiled) rungs, precisions.


Every rung of the merge-rate ladder has static shapes for a given input size (merge counts depend only on the grid,
never on the image; see ``merging/segformerpp.py``), so the compiled backends prepare one graph per
(input shape, rung) ahead of time: ``warm()`` compiles or loads them all, and a rate switch during operation only
picks another prepared graph instead of stalling a frame on compilation.

    backend = make_backend("openvino", model, precision="bf16", input_size=(512, 1024),
                           ladder_configs=[rung.config for rung in LADDER])
    backend.warm()                       # every rung at (1, 3, 512, 1024)
    logits = backend.run(pixels, config)
    backend.name                         # the backend actually in use ("eager" after a fallback)

One backend computes in one precision; the engine holds one per precision its ladder uses (``inference/ladder.py``).
Whatever cannot work here (TensorRT without torch_tensorrt or CUDA, inductor without a C++ compiler, OpenVINO not
installed, bf16 on a CPU without bf16 instructions, a failed compilation or export) falls back with one warning
naming what is missing: a CPU-only machine never needs CUDA.

TensorRT engines and OpenVINO models are cached on disk (``cache.EngineCache``), keyed by everything they
depend on; the backends themselves live in ``tensorrt.py`` and ``openvino.py``, picked by name in
``registry.py`` (the one place that knows them all).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from segmerge_ros.merging.segformerpp import MergeConfig
from segmerge_ros.inference.backends.cache import pixel_shape
from segmerge_ros.inference.memory import return_freed_memory


LOG = logging.getLogger(__name__)

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# "auto": fp32 at merge rate 0, bf16 for every faster rung where the hardware has it and a real frame agrees
# (inference/ladder.py); a policy over PRECISIONS, not a dtype.
PRECISION_CHOICES = ("fp32", "bf16", "fp16", "auto")


# Under limit_compiled, a compiled graph no frame ran for this long is dropped too (like a frame size unseen for a
# minute: inference/engine.py STALE_SIZE_S); checked at most every IDLE_CHECK_S.
COMPILED_IDLE_S = 60.0
IDLE_CHECK_S = 5.0


class BackendUnavailable(RuntimeError):
    """A backend cannot run here; the message names what is missing."""


# --- shapes and configurations -----------------------------------------------------------------------------------


class RungModule(nn.Module):
    """The model with one merge configuration baked in: a plain ``pixels -> logits`` module to compile or export."""

    def __init__(self, model: nn.Module, config: MergeConfig):
        super().__init__()
        self.model = model
        self.config = config

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixels, self.config)


# --- precision ---------------------------------------------------------------------------------------------------


def resolve_precision(precision: str, device: torch.device, log: logging.Logger = LOG) -> torch.dtype:
    """The compute dtype for ``precision`` on ``device``: fp16 only on CUDA, bf16 on CUDA where supported and on
    CPUs with bf16 instructions (``cpu_bf16_support``); otherwise fp32 with one warning."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    if dtype == torch.float32:
        return dtype
    if device.type == "cpu" and dtype == torch.bfloat16:
        missing = cpu_bf16_support()
        if missing:
            log.warning("precision bf16 on this CPU: %s; running in fp32", missing)
            return torch.float32
        return dtype
    if device.type != "cuda":
        log.warning("precision %s needs CUDA; running in fp32 on %s", precision, device)
        return torch.float32
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        log.warning("this GPU does not support bf16; running in fp32")
        return torch.float32
    return dtype


CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 dot products (x86)


@lru_cache(maxsize=1)
def cpu_bf16_support() -> str:
    """Empty when this CPU computes bf16 natively (AVX512-BF16 or AMX in /proc/cpuinfo's flags); otherwise why not.

    Without native instructions bf16 is emulated and slower than fp32, so it is never worth choosing there. oneDNN's
    own probe (``torch.ops.mkldnn._is_mkldnn_bf16_supported``) is not asked: it says yes on AVX-512 CPUs that only
    emulate bf16. Where /proc/cpuinfo is missing (not Linux x86) bf16 is refused.
    ``SEGMERGE_CPU_BF16=off`` makes this CPU answer as one without (to test an AVX2-only robot's behaviour here)."""
    if os.environ.get("SEGMERGE_CPU_BF16", "").lower() == "off":
        return "native bf16 turned off by SEGMERGE_CPU_BF16=off"
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    if flags & set(CPU_BF16_FLAGS):
        return ""
    return f"no native bf16 instructions (none of {', '.join(CPU_BF16_FLAGS)} in /proc/cpuinfo)"


def precision_name(dtype: torch.dtype) -> str:
    return next(name for name, value in PRECISIONS.items() if value == dtype)


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for fp16/bf16 (CUDA, or bf16 on a CPU that has it); fp32 runs as is."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# --- backends ----------------------------------------------------------------------------------------------------


class Backend:
    """``run(pixels, config) -> logits`` (float32) for any merge configuration; ``warm`` prepares rungs ahead."""

    name = "eager"

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        dtype: torch.dtype,
        input_size: tuple[int, int] | None = None,
        ladder_configs: Sequence[MergeConfig] = (),
        log: logging.Logger = LOG,
    ):
        self.model = model
        self.device = device
        self.dtype = dtype
        self.input_size = input_size
        self.ladder_configs = tuple(ladder_configs)
        self.log = log

    @property
    def precision(self) -> str:
        return precision_name(self.dtype)

    def run(self, pixels: torch.Tensor, config: MergeConfig) -> torch.Tensor:
        raise NotImplementedError

    @property
    def runs_on_cpu_threads(self) -> bool:
        """Whether the network's time depends on the CPU thread count (what the thread governor acts on)."""
        return self.device.type == "cpu"

    def set_threads(self, threads: int) -> None:
        """Run the next frames on ``threads`` CPU threads: torch's intra-op pool, and a backend's own pool where it
        has one. Called between frames, on the thread that runs the model (torch's count is per process)."""
        torch.set_num_threads(threads)

    def forget(self, sizes: set[tuple[int, int]]) -> int:
        """Drop what was prepared for network inputs of these (H, W) sizes; returns how many graphs went. Eager
        prepares nothing."""
        return 0

    def free_other_thread_counts(self) -> int:
        """Drop graphs prepared for thread counts other than the current one (OpenVINO keeps one set per count)."""
        return 0

    def limit_compiled(self, limit: int, count: bool = True) -> None:
        """Keep at most ``limit`` compiled graphs, the most recently used (0: no bound; ``count=False``: only drop
        idle ones). Eager compiles nothing."""

    @property
    def compiled_count(self) -> int:
        """Compiled graphs held now (every input shape and thread count)."""
        return 0

    def drop_idle(self, now: float | None = None) -> int:
        """Drop compiled graphs no frame ran for a while (under ``limit_compiled``); returns how many went."""
        return 0

    @property
    def recompiles(self) -> int:
        """Graphs compiled again after ``limit_compiled`` dropped them (each stalled a frame)."""
        return 0

    def warm(
        self, configs: Iterable[MergeConfig] | None = None, input_shape: Sequence[int] | None = None
    ) -> int:
        """Run every configuration once at ``input_shape`` (defaults: the ladder and input size given at
        construction) so that no later frame pays for compilation, engine loading or kernel autotuning.
        Returns the number of configurations prepared."""
        configs = self.ladder_configs if configs is None else tuple(configs)
        if input_shape is None:
            if self.input_size is None:
                raise ValueError("warm() needs an input shape: none was given and the backend has no input_size")
            input_shape = self.input_size
        with torch.inference_mode():  # like the engine's frames: compiled graphs guard on the tensor's kind
            example = torch.zeros(pixel_shape(input_shape), device=self.device)
        start = time.perf_counter()
        for config in configs:
            for _ in range(self._warm_calls):
                self._warm_one(example, config)
        if configs:
            self.log.info(
                "backend %s: %d rungs ready at %s in %.1f s",
                self.name, len(configs), "x".join(map(str, example.shape[-2:])), time.perf_counter() - start,
            )
        return len(configs)

    _warm_calls = 1

    def _warm_one(self, example: torch.Tensor, config: MergeConfig) -> None:
        self.run(example, config)


class EagerBackend(Backend):
    """The model as is; fp16/bf16 through autocast on CUDA."""

    name = "eager"

    def run(self, pixels: torch.Tensor, config: MergeConfig) -> torch.Tensor:
        with torch.inference_mode(), autocast(self.device, self.dtype):
            return self.model(pixels, config).float()


class PreparedBackend(Backend):
    """Shared logic of the compiled backends: one prepared callable per (input shape, configuration), prepared on
    ``warm`` or, failing that, on the first frame that needs it; any failure to prepare switches the whole backend
    to eager with one warning."""

    kind = "prepared"
    # True: a rung that fails to prepare runs eagerly and the other rungs stay compiled (export failures are
    # per graph); False: the first failure sends every rung to eager (a broken toolchain fails them all alike).
    fallback_per_rung = False
    # True: a dropped graph comes back quickly from the engine cache, so limit_compiled may drop graphs (OpenVINO:
    # 0.3-0.5 s from IR, measured). torch.compile would recompile for many seconds; TensorRT is not measured here.
    reloads_quickly = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.eager_rungs: list[str] = []  # rungs that failed to prepare and run eagerly (fallback_per_rung)
        # (shape, config) -> graph, least recently used first (limit_compiled drops from the front)
        self._prepared: OrderedDict[tuple[tuple[int, ...], MergeConfig], Callable[[torch.Tensor], torch.Tensor]] = \
            OrderedDict()
        self._compiled_limit = 0  # compiled graphs kept (limit_compiled); 0: every rung stays compiled
        self._count_bound = True  # False: under a limit, only idle graphs go
        self._dropped: set[tuple[tuple[int, ...], MergeConfig]] = set()  # keys the limit dropped (to count recompiles)
        self._recompiles = 0
        self._last_used: dict[tuple[tuple[int, ...], MergeConfig], float] = {}  # key -> time.monotonic() of its last run
        self._next_idle_check = 0.0
        self._fallback: EagerBackend | None = None
        self._lock = threading.Lock()  # the engine may be called from several threads

    @property
    def name(self) -> str:  # type: ignore[override]
        return self._fallback.name if self._fallback is not None else self.kind

    @property
    def prepared(self) -> list[tuple[tuple[int, ...], MergeConfig]]:
        return list(self._prepared)

    def run(self, pixels: torch.Tensor, config: MergeConfig) -> torch.Tensor:
        return self._run(pixels, config, warming=False)

    def _warm_one(self, example: torch.Tensor, config: MergeConfig) -> None:
        self._run(example, config, warming=True)

    def forget(self, sizes: set[tuple[int, int]]) -> int:
        with self._lock:
            return drop_sizes(self._prepared, sizes)

    def limit_compiled(self, limit: int, count: bool = True) -> None:
        """Keep at most ``limit`` compiled graphs, the most recently used (0: all). Each compiled OpenVINO rung holds
        its own buffers (75-100 MB for B0 at 576x768, measured), so a ladder per camera size costs hundreds of MB;
        a dropped rung is compiled again from the engine cache when a frame needs it (about 0.3-0.5 s for B0 at
        576x768: that frame stalls, and ``recompiles`` counts it). The bound is per backend (one precision), over
        every input shape: the rungs with a scaled input have shapes of their own. Under a limit, graphs no frame
        ran for ``COMPILED_IDLE_S`` go as well; ``count=False`` keeps only that idle rule (budget mode: the controller
        moves between rungs and would compile them again and again). Only backends that reload quickly
        (``reloads_quickly``: OpenVINO) drop anything."""
        if limit < 0:
            raise ValueError(f"the compiled-graph limit must be >= 0 (0: no limit), got {limit}")
        if not self.reloads_quickly:
            return  # recompiling would stall for longer than the memory is worth: every graph stays
        with self._lock:
            self._compiled_limit, self._count_bound = int(limit), bool(count)
            dropped = self._drop_least_used()
        if dropped:
            return_freed_memory()

    @property
    def compiled_count(self) -> int:
        return sum(not isinstance(graph, _EagerRung) for graph in self._all_prepared())

    @property
    def recompiles(self) -> int:
        return self._recompiles

    def _all_prepared(self) -> list:
        """Every graph held (OpenVINO adds the sets of other thread counts)."""
        return list(self._prepared.values())

    def _drop_least_used(self, keep=None) -> int:
        """Drop the least recently used compiled graphs beyond the limit (never ``keep``); under the lock. Rungs that
        run eagerly cost no compiled memory and stay."""
        if not self._compiled_limit or not self._count_bound:
            return 0
        compiled = [key for key, graph in self._prepared.items() if not isinstance(graph, _EagerRung)]
        excess = [key for key in compiled if key != keep][:max(0, len(compiled) - self._compiled_limit)]
        for key in excess:
            del self._prepared[key]
            self._dropped.add(key)
        if excess:
            self.log.debug("backend %s: dropped %d compiled rung(s) (limit %d)", self.kind, len(excess),
                           self._compiled_limit)
        return len(excess)

    def drop_idle(self, now: float | None = None) -> int:
        """Under a limit (``limit_compiled``), drop the compiled graphs no frame has run for ``COMPILED_IDLE_S``:
        warmed rungs a fixed merge rate never uses, a precision only the start-up check used, a camera size that went
        away. Checks at most every ``IDLE_CHECK_S``; the engine calls it every frame for each of its backends (one it
        does not run never gets a ``run``). Returns how many went."""
        now = time.monotonic() if now is None else now
        if not self._compiled_limit or now < self._next_idle_check:
            return 0
        with self._lock:
            self._next_idle_check = now + IDLE_CHECK_S
            idle = [key for key, graph in self._prepared.items() if not isinstance(graph, _EagerRung)
                    and now - self._last_used.get(key, now) >= COMPILED_IDLE_S]
            for key in idle:
                del self._prepared[key]
                self._dropped.add(key)
        if idle:
            self.log.debug("backend %s: dropped %d compiled rung(s) idle for %.0f s", self.kind, len(idle),
                           COMPILED_IDLE_S)
            return_freed_memory()
        return len(idle)

    def _run(self, pixels: torch.Tensor, config: MergeConfig, warming: bool) -> torch.Tensor:
        if self._fallback is not None:
            return self._fallback.run(pixels, config)
        # Compiled graphs are specialised to their input's strides, and the engine's frames come channels-last
        # from HWC images: one layout for every caller, or the first real frame of every rung would recompile.
        pixels = pixels.contiguous()
        key = (tuple(pixels.shape), config)
        with self._lock:
            prepared = self._prepared.get(key)
            if prepared is not None:
                self._prepared.move_to_end(key)  # most recently used last: limit_compiled drops from the front
                self._last_used[key] = time.monotonic()
        self.drop_idle()
        if isinstance(prepared, _EagerRung):
            return prepared.run(pixels)
        if prepared is not None:
            return self._invoke(prepared, pixels)
        with self._lock:
            if key in self._prepared or self._fallback is not None:  # another thread prepared it meanwhile
                prepared_here = None
            else:
                if key in self._dropped:
                    self._dropped.discard(key)
                    self._recompiles += 1
                    self.log.info("backend %s: compiling rung %r at %s again (dropped by the limit of %d compiled "
                                  "rungs; this frame stalls)", self.kind, config.name, tuple(pixels.shape),
                                  self._compiled_limit)
                elif not warming:
                    self.log.info(
                        "backend %s: rung %r at %s was not warmed; preparing it now (this frame stalls)",
                        self.kind, config.name, tuple(pixels.shape),
                    )
                prepared_here = self._prepare_key(key, pixels), self._drop_least_used(keep=key)
        if prepared_here is None:
            return self._run(pixels, config, warming)
        output, dropped = prepared_here
        if dropped:
            return_freed_memory()  # outside the lock: trimming the heap takes a few ms
        return output

    def _prepare_key(self, key, example: torch.Tensor) -> torch.Tensor:
        """Build the callable for ``key`` and run it once on ``example`` (compilation happens on that first call);
        on failure fall back to eager and answer ``example`` with it."""
        shape, config = key
        try:
            prepared = self._build(shape, config)
            output = self._invoke(prepared, example)
        except Exception as error:  # no compiler, unsupported operator, out of memory, ...: never crash the node
            reason = f"{self.kind} failed for rung {config.name!r} at {shape}: {type(error).__name__}: {error}"
            if not self.fallback_per_rung:
                self._fall_back(reason)
                return self._fallback.run(example, config)
            self.log.warning("%s; this rung runs eagerly", reason)
            eager = EagerBackend(self.model, self.device, self.dtype, self.input_size, self.ladder_configs, self.log)
            self._prepared[key] = _EagerRung(eager, config)
            self.eager_rungs.append(config.name)
            return eager.run(example, config)
        self._prepared[key] = prepared
        self._last_used[key] = time.monotonic()
        return output

    def _fall_back(self, reason: str) -> None:
        self.log.warning("%s; falling back to eager for every rung", reason)
        self._prepared.clear()
        self._fallback = EagerBackend(
            self.model, self.device, self.dtype, self.input_size, self.ladder_configs, self.log
        )

    def _build(self, shape: tuple[int, ...], config: MergeConfig) -> Callable[[torch.Tensor], torch.Tensor]:
        raise NotImplementedError

    def _invoke(self, prepared: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def drop_sizes(prepared: dict, sizes: set[tuple[int, int]]) -> int:
    """Remove the entries of ``prepared`` ((shape, config) -> graph) whose input is one of ``sizes`` (H, W)."""
    gone = [key for key in prepared if tuple(key[0][-2:]) in sizes]
    for key in gone:
        del prepared[key]
    return len(gone)


class _EagerRung:
    """A rung that could not be prepared, answered eagerly (``PreparedBackend.fallback_per_rung``)."""

    def __init__(self, eager: "EagerBackend", config: MergeConfig):
        self.eager, self.config = eager, config

    def run(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.eager.run(pixels, self.config)
