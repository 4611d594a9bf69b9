"""The TensorRT backend: one engine per (input shape, rung, precision), built through torch-tensorrt and cached on disk
(``backends/cache.py``'s ``EngineCache``). The only module that touches torch-tensorrt; it is not runnable without CUDA and
TensorRT, and its cache and rebuild logic is tested with a fake ``EngineIO``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from segmerge_ros.merging.segformerpp import MergeConfig
from segmerge_ros.inference.backends.base import PreparedBackend, RungModule
from segmerge_ros.inference.backends.cache import EngineCache, EngineIO, default_cache_dir, engine_key_fields, weights_hash

ENGINE_SUFFIX = ".ep"  # torch-tensorrt's ExportedProgram format
TEGRA_RELEASE = Path("/etc/nv_tegra_release")  # the L4T (JetPack) release on Jetson boards


def import_torch_tensorrt():
    """torch_tensorrt, or None. Imported only here and inside the TensorRT helpers: it is an optional extra."""
    try:
        import torch_tensorrt
    except Exception:  # ImportError, or a broken install whose native libraries fail to load
        return None
    return torch_tensorrt


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
        cache_max_mb: float | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.cache = EngineCache(cache_dir or default_cache_dir(), log=self.log, suffix=ENGINE_SUFFIX, max_mb=cache_max_mb)
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

        engine, path, status = self.cache.load_or_build(fields, build, self.engine_io.load)
        self.engines[config.name] = (path, status)
        return engine

    def _invoke(self, prepared, pixels):
        with torch.inference_mode():
            return prepared(pixels.to(self.dtype)).float()



def tensorrt_environment(device: torch.device | str = "cuda") -> dict[str, str]:
    """The software and hardware a TensorRT engine is tied to (an engine never survives a change of any)."""
    device = torch.device(device)
    torch_tensorrt = import_torch_tensorrt()
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
