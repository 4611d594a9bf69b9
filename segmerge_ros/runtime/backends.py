"""Inference backends behind the engine: eager PyTorch, ``torch.compile`` and TensorRT (through torch-tensorrt).

Every rung of the merge-rate ladder has static shapes for a given input size (merge counts depend only on the grid,
never on the image; see ``merging/segformerpp.py``), so the compiled backends prepare one graph per
(input shape, rung) ahead of time: ``warm()`` compiles or loads them all, and a rate switch during operation only
picks another prepared graph instead of stalling a frame on compilation.

    backend = make_backend("compile", model, device="cuda", precision="fp16", input_size=(512, 1024),
                           ladder_configs=[rung.config for rung in LADDER])
    backend.warm()                       # every rung at (1, 3, 512, 1024)
    logits = backend.run(pixels, config)
    backend.name                         # the backend actually in use ("eager" after a fallback)

Whatever cannot work here (TensorRT without torch_tensorrt or CUDA, inductor without a C++ compiler, a failed
compilation) falls back to eager with one warning naming what is missing: a CPU-only machine never needs CUDA.

TensorRT engines are cached on disk (``EngineCache``). An entry's file name says what was asked for (model, input
shape, rung, precision); a JSON sidecar records everything the engine depends on (weights hash, the rung's exact
configuration, TensorRT, torch-tensorrt, torch and CUDA versions, GPU, L4T release). When any of these differ
from the running system (after a JetPack upgrade, on another GPU, with retrained weights) the entry is rebuilt in
place with a log line, so stale engines never load and never pile up.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..merging.segformerpp import MergeConfig

LOG = logging.getLogger(__name__)

BACKEND_NAMES = ("eager", "compile", "tensorrt")
PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ENGINE_SUFFIX = ".ep"  # torch-tensorrt's ExportedProgram format
TEGRA_RELEASE = Path("/etc/nv_tegra_release")  # the L4T (JetPack) release on Jetson boards


class BackendUnavailable(RuntimeError):
    """A backend cannot run here; the message names what is missing."""


# --- shapes and configurations -----------------------------------------------------------------------------------


def pixel_shape(input_shape: Sequence[int]) -> tuple[int, int, int, int]:
    """(H, W) or (N, 3, H, W) -> (N, 3, H, W): the network input the engine feeds."""
    shape = tuple(int(v) for v in input_shape)
    if len(shape) == 2:
        return (1, 3) + shape
    if len(shape) == 4 and shape[1] == 3:
        return shape  # type: ignore[return-value]
    raise ValueError(f"input shape must be (H, W) or (N, 3, H, W), got {input_shape}")


def config_fingerprint(config: MergeConfig) -> str:
    """A short digest of a merge configuration's exact settings (a rung renamed or retuned gets a new one)."""
    return hashlib.sha256(repr(config).encode()).hexdigest()[:16]


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
    """The compute dtype for ``precision`` on ``device``: half precisions only on CUDA (and bf16 where supported)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    if dtype == torch.float32:
        return dtype
    if device.type != "cuda":
        log.warning("precision %s needs CUDA; running in fp32 on %s", precision, device)
        return torch.float32
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        log.warning("this GPU does not support bf16; running in fp32")
        return torch.float32
    return dtype


def precision_name(dtype: torch.dtype) -> str:
    return next(name for name, value in PRECISIONS.items() if value == dtype)


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision on CUDA for fp16/bf16; fp32 runs as is (CPU never gets here with a half dtype)."""
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


def _import_torch_tensorrt():
    """torch_tensorrt, or None. Imported only here and inside the TensorRT helpers: it is an optional extra."""
    try:
        import torch_tensorrt
    except Exception:  # ImportError, or a broken install whose native libraries fail to load
        return None
    return torch_tensorrt


def missing_requirements(name: str, device: torch.device | str = "cpu", compile_backend: str = "inductor") -> list[str]:
    """What backend ``name`` lacks on ``device`` here, in words; empty when it can run."""
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
        if _import_torch_tensorrt() is None:
            missing.append(
                "torch_tensorrt (pip install torch-tensorrt matching this torch and CUDA; on Jetson, NVIDIA's "
                "JetPack wheel)"
            )
        return missing
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

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
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
            self._fall_back(f"{self.kind} failed for rung {config.name!r} at {shape}: {type(error).__name__}: {error}")
            return self._fallback.run(example, config)
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


class TensorRTBackend(PreparedBackend):
    """One TensorRT engine per (input shape, rung), built through torch-tensorrt and cached on disk."""

    kind = "tensorrt"

    def __init__(
        self,
        *args,
        cache_dir: str | Path | None = None,
        model_name: str = "segformer",
        engine_io: "EngineIO | None" = None,
        environment: Mapping[str, str] | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.cache = EngineCache(cache_dir or default_cache_dir(), log=self.log)
        self.model_name = model_name
        self.engine_io = engine_io or torch_tensorrt_io()
        self.environment = dict(environment) if environment is not None else tensorrt_environment(self.device)
        # Explicit typing: the engine's graph is in the compute dtype itself (torch-tensorrt respects the model's
        # dtypes in every release, while its precision flags changed meaning across releases).
        typed = self.dtype != torch.float32
        self._typed_model = copy.deepcopy(self.model).to(self.dtype).eval() if typed else self.model
        self._weights = weights_hash(self.model.state_dict())
        self.engines: dict[str, tuple[Path, str]] = {}  # rung name -> (engine file, "built" | "reused")

    def key_fields(self, shape: tuple[int, ...], config: MergeConfig) -> dict[str, str]:
        return engine_key_fields(self.model_name, self._weights, shape, config, self.precision, self.environment)

    def _build(self, shape, config):
        fields = self.key_fields(shape, config)
        module = RungModule(self._typed_model, config)
        example = torch.zeros(shape, device=self.device, dtype=self.dtype)

        def build(path: Path) -> None:
            self.log.info("building TensorRT engine for rung %r at %s (%s); this takes minutes",
                          config.name, shape, self.precision)
            self.engine_io.build(module, example, self.dtype, path)

        path, status = self.cache.get_or_build(fields, build)
        try:
            engine = self.engine_io.load(path)
        except Exception as error:  # a truncated or foreign file: rebuild once rather than give up
            self.log.warning("cannot load cached engine %s (%s); rebuilding", path, error)
            path, status = self.cache.store(fields, build), "built"
            engine = self.engine_io.load(path)
        self.engines[config.name] = (path, status)
        return engine

    def _invoke(self, prepared, pixels):
        with torch.inference_mode():
            return prepared(pixels.to(self.dtype)).float()


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
    strict: bool = False,
) -> Backend:
    """The backend ``name`` for ``model`` (already on ``device``, in eval mode), or eager with one warning when it
    is unknown or cannot run here (``strict=True`` raises ``BackendUnavailable`` instead, for build-only tools).

    ``input_size`` (H, W) and ``ladder_configs`` are ``warm()``'s defaults; ``cache_dir`` holds TensorRT engines
    (default ``default_cache_dir()``) or, for ``compile``, inductor's on-disk cache. ``cuda_graphs`` applies to
    ``compile`` on CUDA only. Nothing is compiled until ``warm()`` or the first ``run()``."""
    device = torch.device(device)
    dtype = resolve_precision(precision, device, log)
    common = dict(input_size=input_size, ladder_configs=ladder_configs, log=log)
    if name not in BACKEND_NAMES:  # the node's parameter promises a fallback for unknown names, not a crash
        if strict:
            raise BackendUnavailable(f"unknown backend {name!r}; choose one of {BACKEND_NAMES}")
        log.warning("unknown backend %r (choose one of %s); falling back to eager", name, ", ".join(BACKEND_NAMES))
        return EagerBackend(model, device, dtype, **common)
    missing = missing_requirements(name, device, compile_backend if isinstance(compile_backend, str) else "custom")
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
        return TensorRTBackend(model, device, dtype, cache_dir=cache_dir, model_name=model_name, **common)
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
) -> Backend:
    """Build-only: prepare (build or reuse) every rung's engine or compiled graph, so that the node's first run on a
    Jetson loads them instead of building. Raises ``BackendUnavailable`` when the backend cannot run here, and
    ``RuntimeError`` when a rung fails to build (never falls back: a build that prepared nothing must say so)."""
    prepared = make_backend(
        backend, model, device, precision, input_size, configs, cache_dir, model_name=model_name, log=log, strict=True
    )
    prepared.warm()
    if prepared.name != backend:
        raise RuntimeError(f"building the {backend} backend failed; see the warning above")
    return prepared


# --- the engine cache (pure: testable without TensorRT) ----------------------------------------------------------

# What the user asks for: names the cache slot. Everything else in the key must match or the slot is rebuilt.
IDENTITY_FIELDS = ("model", "input_shape", "rung", "precision")


def default_cache_dir() -> Path:
    """$SEGMERGE_ENGINE_CACHE, else $XDG_CACHE_HOME/segmerge_ros/engines (~/.cache/segmerge_ros/engines)."""
    if os.environ.get("SEGMERGE_ENGINE_CACHE"):
        return Path(os.environ["SEGMERGE_ENGINE_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "segmerge_ros" / "engines"


def weights_hash(weights: str | Path | Mapping[str, torch.Tensor]) -> str:
    """sha256 of the weights: a file's bytes, a hub folder's weight and config files, or a state dict's tensors
    (names, dtypes, shapes and bytes, in sorted order: the same weights always give the same hash)."""
    digest = hashlib.sha256()
    if isinstance(weights, Mapping):
        for name in sorted(weights):
            tensor = weights[name].detach().cpu().contiguous()
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()
    path = Path(weights)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file() and _is_weight_file(p))
    if not files:
        raise FileNotFoundError(f"no weight files at {path}")
    for file in files:
        if len(files) > 1:
            digest.update(file.name.encode() + b"\0")
        with file.open("rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _is_weight_file(path: Path) -> bool:
    return path.suffix in (".safetensors", ".bin", ".pth", ".pt") or path.name == "config.json"


def tensorrt_environment(device: torch.device | str = "cuda") -> dict[str, str]:
    """The software and hardware a TensorRT engine is tied to (an engine never survives a change of any)."""
    device = torch.device(device)
    torch_tensorrt = _import_torch_tensorrt()
    try:
        import tensorrt

        tensorrt_version = tensorrt.__version__
    except Exception:
        tensorrt_version = "unknown"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" and torch.cuda.is_available() else "none"
    l4t = TEGRA_RELEASE.read_text().splitlines()[0].strip() if TEGRA_RELEASE.is_file() else "none"
    return {
        "tensorrt": tensorrt_version,
        "torch_tensorrt": getattr(torch_tensorrt, "__version__", "none"),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "gpu": gpu,
        "l4t": l4t,
    }


def engine_key_fields(
    model_name: str,
    weights_digest: str,
    input_shape: Sequence[int],
    config: MergeConfig,
    precision: str,
    environment: Mapping[str, str],
) -> dict[str, str]:
    """Everything one engine depends on, as strings (JSON round-trips them unchanged)."""
    fields = {
        "model": model_name,
        "weights": weights_digest,
        "input_shape": "x".join(str(v) for v in pixel_shape(input_shape)),
        "rung": config.name,
        "rung_config": config_fingerprint(config),
        "precision": precision,
    }
    fields.update({name: str(value) for name, value in environment.items()})
    return fields


def engine_cache_key(fields: Mapping[str, object]) -> str:
    """A digest of every key field: any change in any field gives another key."""
    canonical = json.dumps({name: str(value) for name, value in fields.items()}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


@dataclass
class EngineIO:
    """How engines are built and loaded; the default goes through torch-tensorrt, tests pass fakes."""

    build: Callable[[nn.Module, torch.Tensor, torch.dtype, Path], None]
    load: Callable[[Path], Callable[[torch.Tensor], torch.Tensor]]


class EngineCache:
    """Engines on disk: ``<slot>.ep`` plus ``<slot>.ep.json`` holding the key fields it was built for."""

    def __init__(self, cache_dir: str | Path, log: logging.Logger = LOG):
        self.cache_dir = Path(cache_dir)
        self.log = log

    def path_for(self, fields: Mapping[str, object]) -> Path:
        identity = {name: str(fields.get(name, "")) for name in IDENTITY_FIELDS}
        readable = "_".join(re.sub(r"[^A-Za-z0-9.=+-]+", "-", identity[name]) for name in IDENTITY_FIELDS)
        return self.cache_dir / f"{readable}_{engine_cache_key(identity)[:8]}{ENGINE_SUFFIX}"

    @staticmethod
    def sidecar_for(path: Path) -> Path:
        return path.with_name(path.name + ".json")

    def lookup(self, fields: Mapping[str, object]) -> Path | None:
        """The cached engine for ``fields``, or None when there is none or it was built for something else."""
        path = self.path_for(fields)
        if not path.is_file():
            return None
        try:
            recorded = json.loads(self.sidecar_for(path).read_text())
            recorded_fields = {name: str(value) for name, value in recorded["fields"].items()}
        except (OSError, ValueError, KeyError, AttributeError) as error:
            self.log.warning("cached engine %s has no readable metadata (%s); rebuilding it", path.name, error)
            return None
        wanted = {name: str(value) for name, value in fields.items()}
        if recorded_fields != wanted or recorded.get("key") != engine_cache_key(wanted):
            changes = describe_mismatch(recorded_fields, wanted)
            self.log.warning("cached engine %s is stale (%s); rebuilding it", path.name, changes)
            return None
        return path

    def store(self, fields: Mapping[str, object], builder: Callable[[Path], None]) -> Path:
        """Build with ``builder(path)`` into a temporary file, then move engine and metadata into place."""
        path = self.path_for(fields)
        path.parent.mkdir(parents=True, exist_ok=True)
        sidecar = self.sidecar_for(path)
        sidecar.unlink(missing_ok=True)  # an engine without matching metadata is never trusted, even half-written
        temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp{ENGINE_SUFFIX}")  # keeps the suffix for savers
        try:
            builder(temporary)
            if not temporary.is_file():
                raise RuntimeError(f"the engine builder wrote nothing to {temporary}")
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        wanted = {name: str(value) for name, value in fields.items()}
        record = {"key": engine_cache_key(wanted), "fields": wanted, "built": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        sidecar_temporary = sidecar.with_name(sidecar.name + f".{os.getpid()}.tmp")
        sidecar_temporary.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        os.replace(sidecar_temporary, sidecar)
        return path

    def get_or_build(self, fields: Mapping[str, object], builder: Callable[[Path], None]) -> tuple[Path, str]:
        """(path, "reused") for a matching entry, else build it: (path, "built")."""
        path = self.lookup(fields)
        if path is not None:
            return path, "reused"
        return self.store(fields, builder), "built"


def describe_mismatch(recorded: Mapping[str, str], wanted: Mapping[str, str]) -> str:
    """"tensorrt 10.3.0 -> 10.7.0, gpu Orin -> Thor": the fields that differ, old value first."""
    names = sorted(set(recorded) | set(wanted))
    changes = [
        f"{name} {recorded.get(name, '(none)')} -> {wanted.get(name, '(none)')}"
        for name in names
        if recorded.get(name) != wanted.get(name)
    ]
    return ", ".join(changes) or "key digest differs"


# --- torch-tensorrt (the only code that touches it; not runnable without CUDA and TensorRT) ----------------------


def _trt_build(module: nn.Module, example: torch.Tensor, dtype: torch.dtype, path: Path) -> None:
    """Compile ``module`` for ``example``'s static shape and save it as an ExportedProgram at ``path``.

    The model is already in ``dtype`` (explicit typing); ``enabled_precisions`` additionally lets releases that
    still use TensorRT's weak typing pick half-precision kernels (newer releases ignore it on the dynamo path).
    Operators TensorRT cannot convert (the merging's argsort/scatter) stay in PyTorch inside the same program.
    """
    import torch_tensorrt

    # torch.export traces with ordinary tensors: leave the engine's inference mode (a rung built on demand is
    # built inside it) and trace without autograd instead.
    with torch.inference_mode(False), torch.no_grad():
        example = torch.zeros(example.shape, dtype=example.dtype, device=example.device)
        compiled = torch_tensorrt.compile(module, ir="dynamo", inputs=[example], enabled_precisions={dtype})
        torch_tensorrt.save(compiled, str(path), inputs=[example])


def _trt_load(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    import torch_tensorrt

    loaded = torch_tensorrt.load(str(path))
    return loaded.module() if hasattr(loaded, "module") else loaded  # ExportedProgram -> callable module


def torch_tensorrt_io() -> EngineIO:
    return EngineIO(build=_trt_build, load=_trt_load)
