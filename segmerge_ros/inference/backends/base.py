"""Inference backends behind the engine: eager PyTorch, ``torch.compile``, OpenVINO and TensorRT.

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

TensorRT engines and OpenVINO models are cached on disk (``engine_cache.EngineCache``), keyed by everything they
depend on; the backends themselves live in ``tensorrt_backend.py`` and ``openvino_backend.py``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from segmerge_ros.merging.segformerpp import MergeConfig
from segmerge_ros.inference.backends.cache import pixel_shape

LOG = logging.getLogger(__name__)

BACKEND_NAMES = ("eager", "compile", "openvino", "tensorrt")
PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# "auto": fp32 at merge rate 0, bf16 for every faster rung where the hardware has it and a real frame agrees
# (inference/ladder.py); a policy over PRECISIONS, not a dtype.
PRECISION_CHOICES = ("fp32", "bf16", "fp16", "auto")


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
    """Empty when this CPU computes bf16 natively (AVX512-BF16 or AMX on x86, or oneDNN says so); otherwise why not.

    Without native instructions bf16 is emulated and slower than fp32, so it is never worth choosing there."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    if flags & set(CPU_BF16_FLAGS):
        return ""
    try:
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return ""
    except (AttributeError, RuntimeError):
        pass
    return f"no native bf16 instructions (none of {', '.join(CPU_BF16_FLAGS)})"


def precision_name(dtype: torch.dtype) -> str:
    return next(name for name, value in PRECISIONS.items() if value == dtype)


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for fp16/bf16 (CUDA, or bf16 on a CPU that has it); fp32 runs as is."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# --- availability ------------------------------------------------------------------------------------------------


def _find_cxx() -> str | None:
    """A C++ compiler for inductor's CPU code generation ($CXX first, as inductor does)."""
    for candidate in (os.environ.get("CXX"), "g++", "clang++", "c++"):
        if candidate and shutil.which(candidate):
            return candidate
    return None



def missing_requirements(
    name: str, device: torch.device | str = "cpu", compile_backend: str = "inductor", openvino_device: str = "CPU"
) -> list[str]:
    """What backend ``name`` lacks on ``device`` (``openvino_device`` for OpenVINO) here, in words; empty when it
    can run."""
    device = torch.device(device)
    if name == "eager":
        return []
    if name == "compile":
        import torch._dynamo as dynamo  # imported on demand: it is heavy and eager never needs it

        if not dynamo.is_dynamo_supported():
            return ["torch.compile support for this Python version/platform"]
        if compile_backend == "inductor" and device.type == "cpu" and _find_cxx() is None:
            return ["a C++ compiler (g++ or clang++) for torch.compile's inductor on the CPU"]
        if compile_backend == "inductor" and device.type == "cuda" and not _has_module("triton"):
            return ["triton (torch.compile's inductor on CUDA)"]
        return []
    if name == "tensorrt":
        missing = []
        if device.type != "cuda" or not torch.cuda.is_available():
            missing.append("CUDA (TensorRT runs on NVIDIA GPUs only; use device 'cuda')")
        from segmerge_ros.inference.backends.tensorrt import import_torch_tensorrt

        if import_torch_tensorrt() is None:
            missing.append(
                "torch_tensorrt (pip install torch-tensorrt matching this torch and CUDA; on Jetson, NVIDIA's "
                "JetPack wheel)"
            )
        return missing
    if name == "openvino":
        from segmerge_ros.inference.backends.openvino import openvino_missing

        return openvino_missing(openvino_device)
    raise ValueError(f"unknown backend {name!r}; choose one of {BACKEND_NAMES}")


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def available_backends(device: torch.device | str | None = None) -> tuple[str, ...]:
    """The backends that can run on ``device`` (default: CUDA when present, else the CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return tuple(name for name in BACKEND_NAMES if not missing_requirements(name, device))


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

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.eager_rungs: list[str] = []  # rungs that failed to prepare and run eagerly (fallback_per_rung)
        self._prepared: dict[tuple[tuple[int, ...], MergeConfig], Callable[[torch.Tensor], torch.Tensor]] = {}
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

    def _run(self, pixels: torch.Tensor, config: MergeConfig, warming: bool) -> torch.Tensor:
        if self._fallback is not None:
            return self._fallback.run(pixels, config)
        # Compiled graphs are specialised to their input's strides, and the engine's frames come channels-last
        # from HWC images: one layout for every caller, or the first real frame of every rung would recompile.
        pixels = pixels.contiguous()
        key = (tuple(pixels.shape), config)
        prepared = self._prepared.get(key)
        if isinstance(prepared, _EagerRung):
            return prepared.run(pixels)
        if prepared is not None:
            return self._invoke(prepared, pixels)
        with self._lock:
            if key not in self._prepared and self._fallback is None:
                if not warming:
                    self.log.info(
                        "backend %s: rung %r at %s was not warmed; preparing it now (this frame stalls)",
                        self.kind, config.name, tuple(pixels.shape),
                    )
                return self._prepare_key(key, pixels)
        return self._run(pixels, config, warming)

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


class _EagerRung:
    """A rung that could not be prepared, answered eagerly (``PreparedBackend.fallback_per_rung``)."""

    def __init__(self, eager: "EagerBackend", config: MergeConfig):
        self.eager, self.config = eager, config

    def run(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.eager.run(pixels, self.config)


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



# --- the factory -------------------------------------------------------------------------------------------------


def make_backend(
    name: str,
    model: nn.Module,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    input_size: tuple[int, int] | None = None,
    ladder_configs: Sequence[MergeConfig] = (),
    cache_dir: str | Path | None = None,
    *,
    model_name: str = "segformer",
    log: logging.Logger = LOG,
    compile_backend: str | Callable = "inductor",
    cuda_graphs: bool = True,
    openvino_device: str = "CPU",
    strict: bool = False,
) -> Backend:
    """The backend ``name`` for ``model`` (already on ``device``, in eval mode), or eager with one warning when it
    is unknown or cannot run here (``strict=True`` raises ``BackendUnavailable`` instead, for build-only tools).

    ``input_size`` (H, W) and ``ladder_configs`` are ``warm()``'s defaults; ``cache_dir`` holds TensorRT engines
    and OpenVINO models (default ``engine_cache.default_cache_dir()``) or, for ``compile``, inductor's on-disk
    cache. ``cuda_graphs`` applies to ``compile`` on CUDA only; ``openvino_device`` is OpenVINO's own device name
    (CPU, GPU, NPU, ...; the torch model stays on the CPU for export). Nothing is compiled until ``warm()`` or the
    first ``run()``."""
    device = torch.device(device)
    dtype = resolve_precision(precision, device, log)
    common = dict(input_size=input_size, ladder_configs=ladder_configs, log=log)
    if name not in BACKEND_NAMES:  # the node's parameter promises a fallback for unknown names, not a crash
        if strict:
            raise BackendUnavailable(f"unknown backend {name!r}; choose one of {BACKEND_NAMES}")
        log.warning("unknown backend %r (choose one of %s); falling back to eager", name, ", ".join(BACKEND_NAMES))
        return EagerBackend(model, device, dtype, **common)
    missing = missing_requirements(
        name, device, compile_backend if isinstance(compile_backend, str) else "custom", openvino_device
    )
    if missing:
        reason = f"backend {name!r} is unavailable here: missing {' and '.join(missing)}"
        if strict:
            raise BackendUnavailable(reason)
        log.warning("%s; falling back to eager", reason)
        return EagerBackend(model, device, dtype, **common)
    if name == "compile":
        if cache_dir is not None:
            # Inductor reads this on every cache access: compiled kernels land beside the TensorRT engines and
            # a later process (the node after segmerge-build-engines) skips code generation.
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(cache_dir) / "inductor")
        return CompileBackend(model, device, dtype, compile_backend=compile_backend, cuda_graphs=cuda_graphs, **common)
    if name == "tensorrt":
        from segmerge_ros.inference.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(model, device, dtype, cache_dir=cache_dir, model_name=model_name, **common)
    if name == "openvino":
        from segmerge_ros.inference.backends.openvino import OpenVINOBackend

        return OpenVINOBackend(
            model, device, dtype, cache_dir=cache_dir, model_name=model_name, openvino_device=openvino_device, **common
        )
    return EagerBackend(model, device, dtype, **common)


def build_engines(
    model: nn.Module,
    input_size: tuple[int, int],
    configs: Sequence[MergeConfig],
    backend: str = "tensorrt",
    device: torch.device | str = "cuda",
    precision: str = "fp16",
    cache_dir: str | Path | None = None,
    model_name: str = "segformer",
    log: logging.Logger = LOG,
    openvino_device: str = "CPU",
) -> Backend:
    """Build-only: prepare (build or reuse) every rung's engine or compiled graph, so that the node's first run on a
    Jetson loads them instead of building. Raises ``BackendUnavailable`` when the backend cannot run here, and
    ``RuntimeError`` when a rung fails to build (never falls back: a build that prepared nothing must say so)."""
    prepared = make_backend(
        backend, model, device, precision, input_size, configs, cache_dir, model_name=model_name, log=log,
        openvino_device=openvino_device, strict=True,
    )
    prepared.warm()
    if prepared.name != backend or prepared.eager_rungs:
        failed = f" (rungs run eagerly: {', '.join(prepared.eager_rungs)})" if prepared.eager_rungs else ""
        raise RuntimeError(f"building the {backend} backend failed{failed}; see the warning above")
    return prepared


def split_device(device: str, backend: str) -> tuple[str, str]:
    """(torch device, OpenVINO device). With the openvino backend, a device that is not torch's names OpenVINO's
    (the model is exported from the CPU); otherwise OpenVINO's is the CPU."""
    if backend != "openvino" or device == "cpu" or device.startswith("cuda"):
        if backend == "openvino" and device.startswith("cuda"):
            LOG.warning("backend openvino runs on OpenVINO devices (CPU, GPU = Intel graphics, NPU); device %r "
                        "ignored, using its CPU", device)
            device = "cpu"
        return device, "CPU"
    return "cpu", device.upper()
