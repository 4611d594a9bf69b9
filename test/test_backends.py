"""Inference backends (inference/backends/base.py): exactness, per-rung preparation, fallbacks and the engine cache.

CPU tests stay cheap: torch.compile runs B0 through ``aot_eager`` (dynamo's tracing and AOT autograd, the paths
that can break, without inductor's C++ code generation, which alone takes over a minute for B0 on a 2-core CPU);
inductor itself is checked on a tiny module. TensorRT's cache and rebuild logic runs with a fake engine builder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from segmerge_ros.merging.segformerpp import LADDER, NONE, MergeConfig
from segmerge_ros.models.segformer.model import SegFormer, mit_config
from segmerge_ros.inference.backends import base as backend_base
from segmerge_ros.inference.backends import registry
from segmerge_ros.inference.backends import tensorrt as tensorrt_backend
from segmerge_ros.inference.backends.base import BackendUnavailable, EagerBackend
from segmerge_ros.inference.backends.compile import CompileBackend
from segmerge_ros.inference.backends.registry import available_backends, build_engines, make_backend
from segmerge_ros.inference.backends.cache import EngineCache, EngineIO, engine_cache_key, engine_key_fields, weights_hash
from segmerge_ros.inference.backends.tensorrt import TensorRTBackend
from segmerge_ros.inference.engine import to_tensor

SIZE = (64, 96)
MERGED = LADDER[3].config  # head2+hq: the head on merged pixels and Segformer++ merging in every stage
FALLBACK = "falling back to eager"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@pytest.fixture(scope="module")
def b0() -> SegFormer:
    torch.manual_seed(0)
    return SegFormer(mit_config("segformer-b0")).eval().fold_head()


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(1, 3, *SIZE, generator=torch.Generator().manual_seed(1))


def reference(model: nn.Module, pixels: torch.Tensor, config: MergeConfig) -> torch.Tensor:
    with torch.inference_mode():
        return model(pixels, config)


def fallback_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and FALLBACK in r.getMessage()]


class CountingModel(nn.Module):
    """Counts the calls per merge configuration; its output depends on the configuration (distinct graphs)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.calls: dict[str, int] = {}

    def forward(self, pixels: torch.Tensor, merge: MergeConfig) -> torch.Tensor:
        self.calls[merge.name] = self.calls.get(merge.name, 0) + 1
        return self.conv(pixels) * merge.input_scale + merge.head_stride


class ScalingModel(nn.Module):
    """A pure stand-in for the model (no side effects for dynamo to guard on); one graph per configuration."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, pixels: torch.Tensor, merge: MergeConfig) -> torch.Tensor:
        return self.conv(pixels) * merge.input_scale + merge.head_stride


def distinct_configs(count: int) -> list[MergeConfig]:
    return [replace(NONE, name=f"scale{i}", input_scale=0.4 + i / 40) for i in range(count)]


# --- eager -------------------------------------------------------------------------------------------------------


def test_eager_is_the_plain_model(b0, pixels):
    backend = make_backend("eager", b0, "cpu", input_size=SIZE)
    assert backend.name == "eager" and "eager" in available_backends()
    for config in (NONE, MERGED):
        assert torch.equal(backend.run(pixels, config), reference(b0, pixels, config))


def test_fp16_on_cpu_runs_fp32_with_a_warning(b0, caplog):
    backend = make_backend("eager", b0, "cpu", precision="fp16")
    assert backend.dtype == torch.float32 and backend.precision == "fp32"
    assert any("fp16" in r.getMessage() and "fp32" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="precision"):
        make_backend("eager", b0, "cpu", precision="int8")


def test_bf16_on_a_cpu_without_native_bf16_runs_fp32_with_a_warning(b0, caplog, monkeypatch):
    monkeypatch.setattr(backend_base, "cpu_bf16_support", lambda: "no native bf16 instructions")
    backend = make_backend("eager", b0, "cpu", precision="bf16")
    assert backend.dtype == torch.float32 and backend.precision == "fp32"
    assert any("bf16" in r.getMessage() and "fp32" in r.getMessage() for r in caplog.records)


def test_segmerge_cpu_bf16_off_makes_this_cpu_answer_as_one_without_bf16():
    probe = ("from segmerge_ros.inference.backends.base import cpu_bf16_support, resolve_precision\n"
             "import torch; print(repr(cpu_bf16_support())); print(resolve_precision('bf16', torch.device('cpu')))")
    env = {k: v for k, v in os.environ.items() if k != "SEGMERGE_CPU_BF16"}
    off = subprocess.run([sys.executable, "-c", probe], env={**env, "SEGMERGE_CPU_BF16": "off"}, capture_output=True,
                         text=True, timeout=120, check=True).stdout.splitlines()
    assert "SEGMERGE_CPU_BF16=off" in off[0] and off[1] == "torch.float32"


def test_bf16_on_a_cpu_with_native_bf16_computes_in_bf16(b0, pixels, monkeypatch):
    monkeypatch.setattr(backend_base, "cpu_bf16_support", lambda: "")
    backend = make_backend("eager", b0, "cpu", precision="bf16")
    assert backend.dtype == torch.bfloat16 and backend.precision == "bf16"
    exact, half = reference(b0, pixels, NONE), backend.run(pixels, NONE)
    assert half.dtype == torch.float32 and half.shape == exact.shape
    difference = (half - exact).abs().max().item()
    assert 1e-4 < difference < 0.5 * exact.abs().max().item()  # computed in bf16 (not fp32), and still close


def test_warm_touches_every_rung_once():
    model = CountingModel().eval()
    configs = distinct_configs(5)
    backend = make_backend("eager", model, "cpu", input_size=(32, 48), ladder_configs=configs)
    assert backend.warm() == len(configs)
    assert model.calls == {config.name: 1 for config in configs}
    backend.warm(configs[:2], (1, 3, 16, 16))  # explicit rungs and shape
    assert model.calls[configs[0].name] == 2 and model.calls[configs[2].name] == 1
    with pytest.raises(ValueError, match="input shape"):
        make_backend("eager", model, "cpu", ladder_configs=configs).warm()


# --- torch.compile -----------------------------------------------------------------------------------------------


def test_compile_matches_eager_on_b0(b0, pixels, caplog):
    """Two rungs through dynamo (aot_eager): exact at rate 0; where torch.compile cannot work here, a loud fallback."""
    caplog.set_level(logging.INFO)
    backend = make_backend(
        "compile", b0, "cpu", input_size=SIZE, ladder_configs=[NONE, MERGED], compile_backend="aot_eager"
    )
    assert backend.warm() == 2
    if registry.missing_requirements("compile", "cpu", "aot_eager"):  # dynamo cannot run on this platform at all
        assert backend.name == "eager" and len(fallback_warnings(caplog)) == 1, "torch.compile failed silently"
    else:  # it can: a fallback would only compare eager with eager, so it fails the test
        assert backend.name == "compile", f"torch.compile fell back: {fallback_warnings(caplog)}"
        assert not fallback_warnings(caplog) and len(backend.prepared) == 2
    caplog.clear()
    plain = backend.run(pixels, NONE)
    assert (plain - reference(b0, pixels, NONE)).abs().max() <= 1e-4
    # Merged rungs sort similarity scores: rounding differences could in principle swap a near-tie, hence 1e-3.
    assert (backend.run(pixels, MERGED) - reference(b0, pixels, MERGED)).abs().max() <= 1e-3
    assert not any("not warmed" in r.getMessage() for r in caplog.records), "a warmed rung compiled again"


def test_inductor_compiles_or_falls_back_loudly(caplog):
    """The real default (inductor, C++ code generation on the CPU) on a tiny module: ~10 s cold on 2 cores."""
    torch.manual_seed(0)
    model = ScalingModel().eval()
    backend = make_backend("compile", model, "cpu", input_size=(8, 8), ladder_configs=[NONE])
    backend.warm()
    example = torch.randn(1, 3, 8, 8)
    if "compile" in available_backends("cpu"):
        assert backend.name == "compile", f"inductor failed here: {fallback_warnings(caplog)}"
    else:
        assert backend.name == "eager" and len(fallback_warnings(caplog)) == 1
    assert (backend.run(example, NONE) - reference(model, example, NONE)).abs().max() <= 1e-5


def test_compile_prepares_every_rung_past_dynamos_recompile_limit():
    """Dynamo keeps 8 compiled variants per code object by default; every rung shares the model's code, so
    without raising the limit the 9th rung would silently run uncompiled."""
    import torch._dynamo.testing

    counter = torch._dynamo.testing.CompileCounter()
    configs = distinct_configs(12)
    backend = make_backend("compile", ScalingModel().eval(), "cpu", input_size=(8, 8), ladder_configs=configs,
                           compile_backend=counter)
    backend.warm()
    assert backend.name == "compile" and counter.frame_count == len(configs)
    # Frames as the engine makes them (channels-last from HWC images, inference tensors) hit the warmed graphs:
    # a rate switch picks a prepared graph, nothing compiles during operation.
    rgb = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    with torch.inference_mode():
        frame = to_tensor(rgb, None, torch.device("cpu"))
        for config in configs:
            backend.run(frame, config)
    assert counter.frame_count == len(configs)


def test_failed_compilation_falls_back_to_eager_with_one_warning(b0, pixels, caplog):
    def broken_compiler(graph_module, example_inputs):
        raise RuntimeError("no C++ compiler in this test")

    backend = make_backend("compile", b0, "cpu", input_size=SIZE, ladder_configs=[NONE, MERGED],
                           compile_backend=broken_compiler)
    backend.warm()
    assert backend.name == "eager"
    warnings = fallback_warnings(caplog)
    assert len(warnings) == 1 and "no C++ compiler in this test" in warnings[0]
    assert torch.equal(backend.run(pixels, NONE), reference(b0, pixels, NONE))


def test_compile_without_a_cxx_compiler_falls_back(monkeypatch, caplog):
    monkeypatch.setattr(registry, "_find_cxx", lambda: None)
    backend = make_backend("compile", ScalingModel().eval(), "cpu")
    assert isinstance(backend, EagerBackend) and backend.name == "eager"
    (warning,) = fallback_warnings(caplog)
    assert "C++ compiler" in warning


def test_unknown_backend_falls_back_unless_strict(caplog):
    model = ScalingModel().eval()
    assert make_backend("onnx", model, "cpu").name == "eager" and len(fallback_warnings(caplog)) == 1
    with pytest.raises(BackendUnavailable, match="onnx"):
        make_backend("onnx", model, "cpu", strict=True)


def test_cuda_graphs_only_with_cuda():
    backend = make_backend("compile", ScalingModel().eval(), "cpu", cuda_graphs=True)
    assert isinstance(backend, CompileBackend) and not backend.cuda_graphs


# --- TensorRT availability ---------------------------------------------------------------------------------------


def test_tensorrt_without_its_requirements_falls_back(monkeypatch, caplog):
    monkeypatch.setattr(tensorrt_backend, "import_torch_tensorrt", lambda: None)
    model = CountingModel().eval()
    backend = make_backend("tensorrt", model, "cpu")
    assert isinstance(backend, EagerBackend)
    (warning,) = fallback_warnings(caplog)
    assert "torch_tensorrt" in warning and "CUDA" in warning
    assert "tensorrt" not in available_backends("cpu")
    with pytest.raises(BackendUnavailable, match="torch_tensorrt"):
        build_engines(model, (32, 32), [NONE], backend="tensorrt", device="cpu")


def test_build_tool_refuses_clearly_without_tensorrt(monkeypatch, capsys):
    from segmerge_ros.apps import build_engines as tool

    monkeypatch.setattr(tensorrt_backend, "import_torch_tensorrt", lambda: None)
    assert tool.main(["--size", "64x96", "--backend", "tensorrt", "--device", "cpu"]) == 2
    assert "torch_tensorrt" in capsys.readouterr().err


# --- the engine cache --------------------------------------------------------------------------------------------

ENVIRONMENT = {"tensorrt": "10.3.0", "torch_tensorrt": "2.5.0", "torch": "2.5.0", "cuda": "12.6",
               "gpu": "Orin", "l4t": "R36.4"}


def key_fields(**changes) -> dict[str, str]:
    fields = engine_key_fields("segformer-b0", "ab" * 32, (512, 1024), MERGED, "fp16", ENVIRONMENT)
    fields.update(changes)
    return fields


def writer(calls: list[Path], payload: bytes = b"engine"):
    def build(path: Path) -> None:
        calls.append(path)
        path.write_bytes(payload)

    return build


def never_called(path: Path) -> None:
    raise AssertionError("the builder ran for a cache hit")


def test_cache_key_changes_with_each_field():
    base = key_fields()
    assert set(base) >= {"model", "weights", "input_shape", "rung", "rung_config", "precision", "tensorrt", "gpu"}
    assert base["input_shape"] == "1x3x512x1024"
    assert engine_cache_key(base) == engine_cache_key(dict(reversed(list(base.items()))))
    keys = {engine_cache_key({**base, name: value + "'"}) for name, value in base.items()}
    assert len(keys) == len(base) and engine_cache_key(base) not in keys
    # The same rung name with other settings (a retuned ladder) is another engine.
    retuned_rung = replace(MERGED, input_scale=0.5)
    retuned = engine_key_fields("segformer-b0", "ab" * 32, (512, 1024), retuned_rung, "fp16", ENVIRONMENT)
    assert retuned["rung"] == base["rung"] and engine_cache_key(retuned) != engine_cache_key(base)


def test_an_engine_built_by_other_model_code_is_stale(tmp_path, monkeypatch, caplog):
    from segmerge_ros.inference.backends import cache as cache_module

    tree = tmp_path / "package"
    (tree / "models" / "segformer").mkdir(parents=True)
    source = tree / "models" / "segformer" / "model.py"
    source.write_text("def forward(x):\n    return x\n")
    before = cache_module.code_fingerprint(tree)
    source.write_text("def forward(x):\n    return 2 * x\n")
    cache_module.code_fingerprint.cache_clear()
    assert cache_module.code_fingerprint(tree) != before  # any change in the model's code
    assert len(cache_module.code_fingerprint()) == 16 and key_fields()["code"] == cache_module.code_fingerprint()

    engines = EngineCache(tmp_path / "engines")
    calls: list[Path] = []
    engines.get_or_build(key_fields(), writer(calls))
    monkeypatch.setattr(cache_module, "code_fingerprint", lambda root=None: "0" * 16)  # an upgrade
    with caplog.at_level(logging.WARNING):
        path, status = engines.get_or_build(key_fields(), writer(calls))
    assert status == "built" and len(calls) == 2
    assert any("stale" in r.getMessage() and "code" in r.getMessage() for r in caplog.records)


def test_weights_hash_is_the_sha256_of_the_weights(tmp_path):
    torch.manual_seed(0)
    first = nn.Linear(4, 3).state_dict()
    torch.manual_seed(0)
    second = nn.Linear(4, 3).state_dict()
    assert weights_hash(first) == weights_hash(second)
    second["bias"][0] += 1e-3
    assert weights_hash(first) != weights_hash(second)
    assert weights_hash({"w": torch.ones(2, dtype=torch.bfloat16)}) != weights_hash({"w": torch.ones(2)})
    file = tmp_path / "model.pth"
    torch.save(first, file)
    assert weights_hash(file) == hashlib.sha256(file.read_bytes()).hexdigest() == weights_hash(str(file))
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "config.json").write_text("{}")
    (hub / "model.safetensors").write_bytes(b"weights")
    digest = weights_hash(hub)
    (hub / "README.md").write_text("not a weight file")
    assert weights_hash(hub) == digest
    (hub / "model.safetensors").write_bytes(b"retrained")
    assert weights_hash(hub) != digest


def test_matching_entry_is_reused_without_building(tmp_path):
    cache = EngineCache(tmp_path)
    calls: list[Path] = []
    fields = key_fields()
    assert cache.lookup(fields) is None
    path, status = cache.get_or_build(fields, writer(calls))
    assert status == "built" and len(calls) == 1 and path.read_bytes() == b"engine"
    assert json.loads(cache.sidecar_for(path).read_text())["fields"] == fields
    assert cache.get_or_build(fields, never_called) == (path, "reused")
    # Another input size is another slot, not a rebuild of this one.
    other, status = cache.get_or_build(key_fields(input_shape="1x3x480x640"), writer(calls))
    assert other != path and status == "built" and cache.lookup(fields) == path


@pytest.mark.parametrize(
    "field,new", [("tensorrt", "10.7.0"), ("gpu", "Thor"), ("l4t", "R38.2"), ("weights", "cd" * 32)]
)
def test_an_entry_for_something_else_is_kept_beside_the_new_one_with_a_log_line(tmp_path, caplog, field, new):
    """The file name holds a digest of the whole key: other weights or another runtime get their own entry (two
    weights used in turn do not rebuild each other's engines), and the log says what differed."""
    cache = EngineCache(tmp_path)
    old = key_fields()
    path = cache.store(old, writer([], b"old engine"))
    calls: list[Path] = []
    with caplog.at_level(logging.WARNING):
        rebuilt, status = cache.get_or_build(key_fields(**{field: new}), writer(calls, b"new engine"))
    assert status == "built" and len(calls) == 1 and rebuilt != path and rebuilt.read_bytes() == b"new engine"
    assert path.read_bytes() == b"old engine" and cache.get_or_build(old, never_called) == (path, "reused")
    assert any("stale" in r.getMessage() and f"{field} {old[field]} -> {new}" in r.getMessage() for r in caplog.records)
    assert json.loads(cache.sidecar_for(rebuilt).read_text())["fields"][field] == new
    assert rebuilt.name.split("_")[:-1] == path.name.split("_")[:-1]  # the same readable prefix, another digest


def test_the_least_recently_used_entries_go_when_the_cache_exceeds_its_bound(tmp_path, caplog):
    cache = EngineCache(tmp_path, max_mb=0.25)  # room for two 100 kB engines
    engine = b"x" * 100_000
    first = cache.store(key_fields(input_shape="1x3x64x64"), writer([], engine))
    second = cache.store(key_fields(input_shape="1x3x96x96"), writer([], engine))
    old = time.time() - 60
    os.utime(cache.sidecar_for(first), (old, old))
    os.utime(cache.sidecar_for(second), (old - 60, old - 60))
    assert cache.lookup(key_fields(input_shape="1x3x96x96")) == second  # a use: now the most recent
    with caplog.at_level(logging.INFO):
        third = cache.store(key_fields(input_shape="1x3x128x128"), writer([], engine))
    assert third.is_file() and second.is_file() and not first.exists() and not cache.sidecar_for(first).exists()
    assert any("least recently used" in r.getMessage() and first.name in r.getMessage() for r in caplog.records)
    assert sum(size for _, size, _ in cache.entries()) <= 0.25e6


def test_two_processes_asking_for_one_entry_build_it_once(tmp_path):
    """The second waits on the entry's lock while the first builds, then reuses what it built."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    marks = tmp_path / "builds"
    marks.mkdir()
    workers = [context.Process(target=_build_slowly, args=(tmp_path / "engines", marks, n)) for n in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [worker.exitcode for worker in workers] == [0, 0]
    assert len(list(marks.iterdir())) == 1  # one builder ran
    cache = EngineCache(tmp_path / "engines")
    assert cache.lookup(key_fields()).read_bytes() == b"engine"


def _build_slowly(folder: Path, marks: Path, number: int) -> None:
    def build(path: Path) -> None:
        (marks / str(number)).touch()
        time.sleep(0.5)
        path.write_bytes(b"engine")

    EngineCache(folder).get_or_build(key_fields(), build)


def test_what_the_builder_reports_is_kept_with_the_entry(tmp_path):
    cache = EngineCache(tmp_path)
    path, _ = cache.get_or_build(key_fields(), lambda path: path.write_bytes(b"ir") and {"exporter": "traced"})
    assert cache.built_with(path) == {"exporter": "traced"}


def test_entry_without_metadata_is_rebuilt(tmp_path, caplog):
    cache = EngineCache(tmp_path)
    fields = key_fields()
    path = cache.store(fields, writer([]))
    cache.sidecar_for(path).write_text("{ truncated")
    assert cache.lookup(fields) is None and "no readable metadata" in caplog.text
    cache.sidecar_for(path).unlink()
    assert cache.lookup(fields) is None


def test_failed_build_leaves_no_entry(tmp_path):
    cache = EngineCache(tmp_path)

    def failing(path: Path) -> None:
        path.write_bytes(b"half an engine")
        raise RuntimeError("builder crashed")

    with pytest.raises(RuntimeError, match="builder crashed"):
        cache.store(key_fields(), failing)
    assert list(tmp_path.iterdir()) == [] and cache.lookup(key_fields()) is None


# --- the TensorRT backend's logic with a fake engine builder ------------------------------------------------------


class FakeEngines:
    """'Engines' are the pickled rung modules: the backend's cache, key and rebuild logic runs for real."""

    def __init__(self):
        self.built: list[str] = []

    def io(self) -> EngineIO:
        def build(module: nn.Module, example: torch.Tensor, dtype: torch.dtype, path: Path) -> None:
            self.built.append(module.config.name)
            torch.save(module, path)

        return EngineIO(build=build, load=lambda path: torch.load(path, weights_only=False))


def fake_tensorrt(model, cache_dir, engines: FakeEngines, environment=ENVIRONMENT) -> TensorRTBackend:
    return TensorRTBackend(model, torch.device("cpu"), torch.float32, SIZE, [NONE, MERGED], cache_dir=cache_dir,
                           model_name="segformer-b0", engine_io=engines.io(), environment=environment)


def test_tensorrt_backend_builds_each_rung_once_and_reuses_the_cache(b0, pixels, tmp_path, caplog):
    engines = FakeEngines()
    backend = fake_tensorrt(b0, tmp_path, engines)
    backend.warm()
    assert backend.name == "tensorrt" and engines.built == ["none", MERGED.name]
    assert {status for _, status in backend.engines.values()} == {"built"}
    assert torch.equal(backend.run(pixels, NONE), reference(b0, pixels, NONE))

    again = FakeEngines()
    reloaded = fake_tensorrt(b0, tmp_path, again)
    reloaded.warm()
    assert again.built == [] and {status for _, status in reloaded.engines.values()} == {"reused"}

    upgraded = FakeEngines()
    fake_tensorrt(b0, tmp_path, upgraded, {**ENVIRONMENT, "tensorrt": "10.7.0"}).warm()
    assert upgraded.built == ["none", MERGED.name]
    assert sum("tensorrt 10.3.0 -> 10.7.0" in r.getMessage() for r in caplog.records) == 2


def test_tensorrt_backend_rebuilds_an_unloadable_engine(b0, tmp_path, caplog):
    fake_tensorrt(b0, tmp_path, FakeEngines()).warm([NONE])
    (engine,) = tmp_path.glob("*.ep")
    engine.write_bytes(b"corrupt")
    engines = FakeEngines()
    backend = fake_tensorrt(b0, tmp_path, engines)
    backend.warm([NONE])
    assert engines.built == ["none"] and backend.name == "tensorrt" and "cannot load cached engine" in caplog.text


# --- CUDA (skipped cleanly without a GPU) ------------------------------------------------------------------------


@needs_cuda
def test_eager_fp16_autocast_on_cuda(b0, pixels):
    model, x = b0.to("cuda"), pixels.to("cuda")
    try:
        backend = make_backend("eager", model, "cuda", precision="fp16")
        assert backend.dtype == torch.float16
        half = backend.run(x, NONE)
        assert half.dtype == torch.float32
        full = reference(model, x, NONE)
        assert (half.argmax(1) == full.argmax(1)).float().mean() > 0.95
    finally:
        b0.to("cpu")


@needs_cuda
def test_compile_with_cuda_graphs_matches_eager_across_rung_switches(b0, pixels):
    model, x = b0.to("cuda"), pixels.to("cuda")
    try:
        backend = make_backend("compile", model, "cuda", input_size=SIZE, ladder_configs=[NONE, MERGED])
        backend.warm()
        assert backend.name == "compile" and backend.cuda_graphs
        plain, merged = backend.run(x, NONE), backend.run(x, MERGED)
        again = backend.run(x, NONE)  # the previous outputs must not be overwritten by later replays
        assert torch.equal(plain, again)
        assert (plain - reference(model, x, NONE)).abs().max() <= 1e-3
        assert (merged - reference(model, x, MERGED)).abs().max() <= 1e-2
    finally:
        b0.to("cpu")


@needs_cuda
def test_tensorrt_engines_build_and_reload(b0, pixels, tmp_path):
    pytest.importorskip("torch_tensorrt")
    model, x = b0.to("cuda"), pixels.to("cuda")
    try:
        backend = build_engines(model, SIZE, [NONE], device="cuda", precision="fp32", cache_dir=tmp_path)
        assert backend.engines["none"][1] == "built"
        assert (backend.run(x, NONE) - reference(model, x, NONE)).abs().max() <= 1e-2  # TF32 kernels allowed
        reloaded = build_engines(model, SIZE, [NONE], device="cuda", precision="fp32", cache_dir=tmp_path)
        assert reloaded.engines["none"][1] == "reused"
    finally:
        b0.to("cpu")
