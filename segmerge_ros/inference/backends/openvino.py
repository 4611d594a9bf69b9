"""The OpenVINO backend: one compiled model per (input shape, rung, precision), for CPUs (and Intel GPUs and NPUs).

Each rung (merging included: the matching's sort, gathers and scatter-mean export with static shapes) is converted
from PyTorch once with ``openvino.convert_model``, saved as OpenVINO IR (``.xml`` + ``.bin``) in the engine cache,
keyed by model, weights hash, input shape, rung, precision, OpenVINO version and device, and compiled for the device
with an explicit inference precision (``f32``, or ``bf16`` where the CPU has native bf16; one IR file serves both).
Conversion takes seconds per rung; ``warm()`` (and ``segmerge-build-engines --backend openvino``) does it before the first frame, so a rate
change never stalls one. A rung that fails to export runs eagerly with a warning; the other rungs stay in OpenVINO.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from segmerge_ros.merging.segformerpp import MergeConfig
from segmerge_ros.inference.backends.base import PreparedBackend, RungModule, drop_sizes
from segmerge_ros.inference.backends.cache import EngineCache, EngineIO, default_cache_dir, engine_key_fields, weights_hash

LOG = logging.getLogger(__name__)
EXPORTER = "onnx-opset18, else traced"  # in the cache key: IR made another way is rebuilt
IR_SUFFIX, WEIGHTS_SUFFIX = ".xml", ".bin"
# Our precision names -> OpenVINO's INFERENCE_PRECISION_HINT. OpenVINO's CPU default is bf16 where the CPU has it:
# fp32 must be asked for explicitly to stay equal to eager.
INFERENCE_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}

_core = None
_core_lock = threading.Lock()


def import_openvino():
    """The ``openvino`` module, or None when it is not installed (or its native libraries fail to load)."""
    try:
        import openvino
    except Exception:
        return None
    return openvino


def openvino_core():
    """One ``openvino.Core`` per process (it enumerates devices and loads plugins once)."""
    global _core
    with _core_lock:
        if _core is None:
            _core = import_openvino().Core()
        return _core


def openvino_missing(device: str = "CPU") -> list[str]:
    """What running on OpenVINO ``device`` lacks here, in words; empty when it can run."""
    if import_openvino() is None:
        return ["openvino (pip install openvino)"]
    available = openvino_core().available_devices
    family = device.split(".")[0].split(":")[0].upper()
    if family not in ("AUTO", "HETERO", "MULTI") and device.upper() not in available and family not in available:
        return [f"the OpenVINO device {device!r} (this machine has {', '.join(available) or 'none'})"]
    return []


def openvino_environment(device: str = "CPU") -> dict[str, str]:
    """The software and hardware a compiled OpenVINO model is tied to (a cache entry never survives a change)."""
    openvino = import_openvino()
    try:
        full_name = str(openvino_core().get_property(device, "FULL_DEVICE_NAME"))
    except Exception:  # AUTO and friends have no single device name
        full_name = device
    return {"openvino": openvino.__version__, "torch": torch.__version__, "ov_device": device, "device_name": full_name,
            "exporter": EXPORTER}


def _export(module: torch.nn.Module, example: torch.Tensor, path: Path) -> dict[str, str]:
    """Convert ``module`` for ``example``'s static shape and save it as IR at ``path`` (weights beside it).

    Through ONNX first: on the trained B0 at 576x768 (2 threads) OpenVINO runs the model converted from ONNX twice as
    fast as the one its PyTorch front end makes from the traced module (fp32 134 against 270 ms, bf16 68 against
    143), with the same outputs. ONNX has no scatter-mean, so rungs with token merging take the traced path."""
    openvino = import_openvino()
    # Export traces with ordinary tensors: leave the engine's inference mode (a rung prepared on demand is prepared
    # inside it) and trace without autograd instead.
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings: shapes are static per rung by design
        example = torch.zeros(example.shape, dtype=torch.float32)
        converted = None
        onnx_path_used = False
        config = getattr(module, "config", None)
        # Token matching is known not to export (and the exporter would print its whole graph on the way out).
        if config is None or not config.matches_tokens:
            try:
                with tempfile.TemporaryDirectory() as folder:
                    onnx_path = Path(folder) / "rung.onnx"
                    torch.onnx.export(module, (example,), str(onnx_path), opset_version=18, dynamo=False)
                    converted = openvino.convert_model(str(onnx_path))
                    onnx_path_used = True
            except Exception as error:  # an operator ONNX lacks, or no onnx package: trace instead
                # worth a warning: the traced conversion ran about twice as slow (see above) and is cached as is
                LOG.warning("ONNX export of %s failed (%s: %s); converting the traced module instead, which OpenVINO "
                            "ran about 2x slower here (fp32 270 against 134 ms, B0 at 576x768)",
                            getattr(config, "name", type(module).__name__), type(error).__name__, error)
        if converted is None:
            # Tracing first without the trace check (a second full run) converts in about half the time of
            # handing the module to convert_model.
            traced = torch.jit.trace(module, example, check_trace=False)
            converted = openvino.convert_model(traced, example_input=example)
    # Weights stay fp32 in the file: the precision is chosen when compiling.
    openvino.save_model(converted, str(path), compress_to_fp16=False)
    return {"exporter": "onnx-opset18" if onnx_path_used else "traced"}


class OpenVINOBackend(PreparedBackend):
    """One compiled OpenVINO model per (input shape, rung); ``self.precision`` is its inference precision."""

    kind = "openvino"
    fallback_per_rung = True  # an operator OpenVINO cannot convert breaks one rung's graph, not the others
    reloads_quickly = True  # a dropped rung compiles again from its cached IR in 0.3-0.5 s (B0 at 576x768)

    def __init__(
        self,
        *args,
        cache_dir: str | Path | None = None,
        model_name: str = "segformer",
        openvino_device: str = "CPU",
        engine_io: EngineIO | None = None,
        environment: Mapping[str, str] | None = None,
        cache_max_mb: float | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.openvino_device = openvino_device
        self.cache = EngineCache(
            cache_dir or default_cache_dir(), log=self.log, suffix=IR_SUFFIX, companions=(WEIGHTS_SUFFIX,),
            max_mb=cache_max_mb,
        )
        self.model_name = model_name
        self.engine_io = engine_io or EngineIO(build=lambda module, example, dtype, path: _export(module, example, path),
                                               load=self._compile)
        self.environment = dict(environment) if environment is not None else openvino_environment(openvino_device)
        self._weights = weights_hash(self.model.state_dict())
        self.engines: dict[str, tuple[Path, str]] = {}  # rung name -> (IR file, "built" | "reused")
        # OpenVINO keeps its own pool, fixed per compiled model: one set of compiled rungs per thread count
        self.threads = torch.get_num_threads()
        self._by_threads: dict[int, dict] = {}

    @property
    def runs_on_cpu_threads(self) -> bool:  # type: ignore[override]
        return self.openvino_device == "CPU"

    def set_threads(self, threads: int) -> None:
        """torch's pool (pre- and post-processing) and OpenVINO's: the rungs compiled for ``threads`` threads are
        used from the next frame; one not yet compiled for that count is compiled from the cached IR when a frame
        first needs it (that frame stalls, and the thread governor does not time it)."""
        super().set_threads(threads)
        if self.openvino_device != "CPU" or threads == self.threads:
            return
        with self._lock:
            self._by_threads[self.threads] = self._prepared
            self.threads = threads
            self._prepared = self._by_threads.pop(threads, OrderedDict())  # the other counts' sets stay in _by_threads

    def free_other_thread_counts(self) -> int:
        """Drop the rungs compiled for thread counts other than the current one (a whole ladder each: hundreds of
        MB); a later switch compiles them again from the cached IR as frames need them. Returns how many went."""
        with self._lock:
            gone = sum(len(prepared) for prepared in self._by_threads.values())
            self._by_threads.clear()
            return gone

    def _all_prepared(self) -> list:
        return [graph for prepared in (self._prepared, *self._by_threads.values()) for graph in prepared.values()]

    def forget(self, sizes: set[tuple[int, int]]) -> int:
        """Also the rungs compiled for the other thread counts (the thread governor's)."""
        with self._lock:
            return drop_sizes(self._prepared, sizes) + sum(drop_sizes(p, sizes) for p in self._by_threads.values())

    def key_fields(self, shape: tuple[int, ...], config: MergeConfig) -> dict[str, str]:
        # The IR holds fp32 weights whatever the inference precision (applied when compiling), so one entry serves
        # every precision: its key says "ir" there. Compiled models are cached by OpenVINO itself (CACHE_DIR below),
        # keyed by the IR, the device and the precision hint.
        return engine_key_fields(self.model_name, self._weights, shape, config, "ir", self.environment)

    def _compile(self, path: Path) -> Callable[[np.ndarray], np.ndarray]:
        core = openvino_core()
        properties = {"INFERENCE_PRECISION_HINT": INFERENCE_PRECISION[self.precision], "PERFORMANCE_HINT": "LATENCY"}
        if self.openvino_device == "CPU":
            # the thread governor's count (torch's when the backend was made); unpinned, so that on a CPU shared
            # with navigation and SLAM a thread can move off a busy core (measured: docs/benchmarks.md, section 13)
            properties["INFERENCE_NUM_THREADS"] = self.threads
            properties["ENABLE_CPU_PINNING"] = False
        if self.openvino_device.split(".")[0] in ("GPU", "NPU"):  # compiling for these takes long; the CPU is quick
            properties["CACHE_DIR"] = str(self.cache.cache_dir / "openvino_compiled")
        compiled = core.compile_model(core.read_model(str(path)), self.openvino_device, properties)
        request = compiled.create_infer_request()
        lock = threading.Lock()  # one infer request per rung: serialise callers (the engine has one worker)

        def infer(pixels: np.ndarray) -> np.ndarray:
            with lock:
                return np.array(request.infer([pixels])[0], copy=True)

        return infer

    def _build(self, shape, config):
        fields = self.key_fields(shape, config)
        module = RungModule(self.model, config).eval()
        example = torch.zeros(shape)

        def build(path: Path):
            self.log.info("converting rung %r at %s to OpenVINO (%s)", config.name, shape, self.precision)
            return self.engine_io.build(module, example, self.dtype, path)

        engine, path, status = self.cache.load_or_build(fields, build, self.engine_io.load)
        self.engines[config.name] = (path, status)
        if status == "reused" and self.cache.built_with(path).get("exporter") == "traced" and not config.matches_tokens:
            self.log.warning("rung %r reuses an IR converted from the traced module (its ONNX export failed when it "
                             "was built): about 2x slower than one from ONNX; %s", config.name, path.name)
        return engine

    def _invoke(self, prepared, pixels):
        array = pixels.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(prepared(array))
