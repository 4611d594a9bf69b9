"""Picks a backend by name: the one place that knows them all (eager, compile, OpenVINO, TensorRT)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from segmerge_ros.merging.segformerpp import MergeConfig

from segmerge_ros.inference.backends.auto import AUTO, CPU_CANDIDATES, CUDA_PREFERENCE
from segmerge_ros.inference.backends.base import Backend, BackendUnavailable, EagerBackend, resolve_precision
from segmerge_ros.inference.backends.compile import CompileBackend, _find_cxx
from segmerge_ros.inference.backends.openvino import OpenVINOBackend, openvino_missing
from segmerge_ros.inference.backends.tensorrt import TensorRTBackend, import_torch_tensorrt


LOG = logging.getLogger(__name__)

BACKEND_NAMES = ("eager", "compile", "openvino", "tensorrt")
BACKEND_CHOICES = BACKEND_NAMES + (AUTO,)  # "auto": measured per CPU and size (backends/auto.py)


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
        if import_torch_tensorrt() is None:
            missing.append(
                "torch_tensorrt (pip install torch-tensorrt matching this torch and CUDA; on Jetson, NVIDIA's "
                "JetPack wheel)"
            )
        return missing
    if name == "openvino":
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


def auto_candidates(device: torch.device | str = "cpu", openvino_device: str = "CPU") -> list[str]:
    """What ``backend: auto`` chooses from on ``device``: on CUDA the first of ``CUDA_PREFERENCE`` that can run (no
    timing needed), on a CPU every backend of ``CPU_CANDIDATES`` that can run (eager first, the reference)."""
    device = torch.device(device)
    if device.type == "cuda":
        return [next(name for name in CUDA_PREFERENCE if not missing_requirements(name, device))]
    return [name for name in CPU_CANDIDATES if not missing_requirements(name, device, openvino_device=openvino_device)]


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
    cache_max_mb: float | None = None,
) -> Backend:
    """The backend ``name`` for ``model`` (already on ``device``, in eval mode), or eager with one warning when it
    is unknown or cannot run here (``strict=True`` raises ``BackendUnavailable`` instead, for build-only tools).

    ``input_size`` (H, W) and ``ladder_configs`` are ``warm()``'s defaults; ``cache_dir`` holds TensorRT engines
    and OpenVINO models (default ``cache.default_cache_dir()``) or, for ``compile``, inductor's on-disk
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
        return TensorRTBackend(model, device, dtype, cache_dir=cache_dir, model_name=model_name,
                               cache_max_mb=cache_max_mb, **common)
    if name == "openvino":
        return OpenVINOBackend(
            model, device, dtype, cache_dir=cache_dir, model_name=model_name, openvino_device=openvino_device,
            cache_max_mb=cache_max_mb, **common
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
