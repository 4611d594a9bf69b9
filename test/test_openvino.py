"""The OpenVINO backend (inference/backends/openvino.py): every rung exports and equals eager, bf16 agrees, the model
cache rebuilds what is stale or corrupt, and everything that cannot run falls back with a warning.

Real frames and the trained SegFormer-B0 at a small network size (conversion time grows with the graph, not with
the pixels); one model cache per module, so the node test reuses the models the equality test converted.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import time

import cv2
import numpy as np
import pytest
import torch

from conftest import ros_domain_id
from segmerge_ros.merging.segformerpp import LADDER, NONE, ladder_for_backend
from segmerge_ros.inference.backends import openvino as openvino_backend
from segmerge_ros.inference.backends import base as base_backend
from segmerge_ros.inference.backends.base import EagerBackend, cpu_bf16_support
from segmerge_ros.inference.backends.registry import make_backend
from segmerge_ros.inference.engine import SegmentationEngine, network_config
from segmerge_ros.inference.backends.cache import EngineIO
from segmerge_ros.inference.backends.openvino import OpenVINOBackend, openvino_environment

SIZE = (144, 192)  # the network input: HxW
needs_bf16 = pytest.mark.skipif(bool(cpu_bf16_support()), reason=f"this CPU: {cpu_bf16_support()}")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("openvino_cache")


@pytest.fixture(scope="module")
def frame(student_dir) -> np.ndarray:
    path = sorted((student_dir / "heldout" / "images").iterdir())[0]
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def eager(student_dir) -> SegmentationEngine:
    return SegmentationEngine(weights=str(student_dir), input_size=SIZE)


def test_every_rung_exports_and_equals_eager_in_fp32_on_a_real_frame(student_dir, cache, frame, eager, capfd):
    engine = SegmentationEngine(weights=str(student_dir), input_size=SIZE, backend="openvino", cache_dir=str(cache))
    assert engine.backend == "openvino" and engine.eager_fallbacks == ""
    rungs = {rung.config for rung in LADDER + ladder_for_backend("openvino")}
    for config in sorted(rungs, key=lambda c: c.name):
        ours, reference = engine.logits(frame, config), eager.logits(frame, config)
        assert ours.shape == reference.shape, config.name
        assert (ours - reference).abs().max().item() <= 1e-4, config.name
    assert engine.eager_fallbacks == ""  # none of them fell back to eager
    built = {step for step, _, _ in engine.prepared_files()}
    assert {rung.name for rung in rungs} <= built
    assert any(rung.matches_tokens for rung in rungs)  # merged rungs were among them, and exported quietly:
    printed = capfd.readouterr()
    assert "Torch IR graph" not in printed.out + printed.err  # (torch's ONNX exporter prints it when it fails)


def test_an_engine_under_a_compiled_rung_limit_keeps_its_current_step_and_recompiles_others_on_demand(
        student_dir, cache, frame, eager):
    """The steps warmed last stay compiled (the current one among them); a rate change to a dropped step compiles it
    again and agrees with eager as a compiled step does."""
    engine = SegmentationEngine(weights=str(student_dir), input_size=SIZE, backend="openvino", precision="fp32",
                                cache_dir=str(cache), warm=False)
    top = engine.ladder[-1].rate
    engine.set_merge_rate(top)
    engine.limit_compiled(2)
    engine.warm()
    assert engine.compiled_rungs == 2 and engine.recompiles == 0
    assert network_config(engine.ladder[-1].config) in {c for _, c in engine._backends["fp32"].prepared}
    small = cv2.resize(frame, SIZE[::-1])
    engine.infer(small)
    assert engine.recompiles == 0  # the current step was kept
    for rate in (0.0, top):
        engine.set_merge_rate(rate)
        eager.set_merge_config(engine.merge_config)  # OpenVINO's ladder has steps of its own
        ours, reference = engine.infer(small).class_map, eager.infer(small).class_map
        assert (ours == reference).mean() >= 0.999, rate  # fp32 OpenVINO: logits within 1e-4 (test above)
    assert engine.recompiles == 1 and engine.compiled_rungs == 2  # rate 0 compiled again; the top step still there
    backend = engine._backends["fp32"]  # a step no frame ran for a minute goes at the next frame
    for key in backend.prepared:
        if key[1] != network_config(engine.merge_config):
            backend._last_used[key] -= base_backend.COMPILED_IDLE_S
    backend._next_idle_check = 0.0
    engine.infer(small)
    assert engine.compiled_rungs == 1 and engine.recompiles == 1
    eager.set_merge_rate(0.0)  # the module's engine, as the other tests expect it


@needs_bf16
def test_bf16_agrees_with_fp32_on_a_real_frame(student_dir, cache, frame, eager):
    engine = SegmentationEngine(weights=str(student_dir), input_size=SIZE, backend="openvino", precision="bf16",
                                cache_dir=str(cache))
    assert engine.precision == "bf16" and [step.precision for step in engine.ladder] == ["bf16"] * len(engine.ladder)
    fast, exact = engine.infer(frame), eager.infer(frame)
    agreement = (fast.class_map == exact.class_map).mean()
    assert agreement >= 0.99
    assert not np.array_equal(engine.logits(frame), eager.logits(frame))  # computed in bf16, not fp32


@needs_bf16
def test_auto_precision_keeps_bf16_where_a_real_frame_agrees_and_refuses_it_where_not(student_dir, frame):
    engine = SegmentationEngine(weights=str(student_dir), input_size=SIZE, precision="auto")
    assert [step.precision for step in engine.ladder[:2]] == ["fp32", "bf16"]
    assert engine.ladder[0].config == NONE == engine.ladder[1].config and engine.ladder_rates[1] < LADDER[1].rate
    agreement = engine.calibrate_precision(frame)
    assert agreement >= 0.995 and engine.precision_plan == "auto"
    engine.set_merge_rate(0.0)
    assert engine.infer(frame).merge_name == "none"  # rate 0 stays the exact fp32 model
    engine.set_merge_rate(0.9)
    assert engine.infer(frame).merge_name.endswith("@bf16")

    strict = SegmentationEngine(weights=str(student_dir), input_size=SIZE, precision="auto")
    strict.set_merge_rate(0.9)
    assert strict.calibrate_precision(frame, threshold=1.01) == pytest.approx(agreement)
    assert strict.precision_plan == "fp32" and {step.precision for step in strict.ladder} == {"fp32"}
    assert strict.ladder_rates == engine.ladder_rates  # the rates the budget controller knows stay valid
    assert not strict.infer(frame).merge_name.endswith("@bf16")


def test_auto_precision_without_native_bf16_is_fp32(monkeypatch, caplog):
    from segmerge_ros.inference import ladder

    monkeypatch.setattr(ladder, "cpu_bf16_support", lambda: "no native bf16 instructions")
    with caplog.at_level(logging.INFO):
        engine = SegmentationEngine(input_size=(64, 96), precision="auto")
    assert engine.precision_plan == "fp32" and {step.precision for step in engine.ladder} == {"fp32"}
    assert any("no native bf16" in record.getMessage() for record in caplog.records)


def test_auto_precision_decides_on_the_first_real_frame_not_the_black_warm_up(monkeypatch, frame, caplog):
    """The node's start-up infers a black frame, on which every precision agrees: it must not use up the check."""
    from segmerge_ros.inference import ladder
    from segmerge_ros.inference.backends import base
    from segmerge_ros.ros.startup import build_engine

    monkeypatch.setattr(ladder, "cpu_bf16_support", lambda: "")  # as on a CPU with native bf16
    monkeypatch.setattr(base, "cpu_bf16_support", lambda: "")
    params = {"model": "segformer-b0", "weights": "random", "device": "cpu", "backend": "eager",
              "input_size": "{}x{}".format(*SIZE), "precision": "auto", "engine_cache_dir": "",
              "instances.score_threshold": 0.5, "instances.max_instances": 100, "panoptic.enable": False,
              "engine_cache_max_mb": 4096.0, "engine_max_compiled_rungs": 3}
    with caplog.at_level(logging.INFO):
        engine = build_engine(params.__getitem__, lambda message: None)
        assert engine.precision_plan == "auto"
        assert not any("agrees with fp32" in r.getMessage() for r in caplog.records)  # not decided on black
        engine.infer(cv2.resize(frame, SIZE[::-1]))
    assert any("agrees with fp32" in r.getMessage() for r in caplog.records)  # decided on the real frame


def test_without_input_size_nothing_is_compiled_for_a_dummy_size(student_dir, tmp_path, frame):
    from segmerge_ros.ros.startup import build_engine

    params = {"model": "segformer-b0", "weights": str(student_dir), "device": "cpu", "backend": "openvino",
              "input_size": "", "precision": "fp32", "engine_cache_dir": str(tmp_path),
              "instances.score_threshold": 0.5, "instances.max_instances": 100, "panoptic.enable": False,
              "engine_cache_max_mb": 4096.0, "engine_max_compiled_rungs": 3}
    engine = build_engine(params.__getitem__, lambda message: None)
    assert engine.backend == "openvino" and engine.prepared_files() == []  # used to compile every rung at 240x320
    small = cv2.resize(frame, SIZE[::-1])
    engine.infer(small)
    assert engine.prepared_files() and not list(tmp_path.glob("*x240x320*"))


def test_auto_precision_frees_the_refused_precisions_rungs(monkeypatch, frame):
    from segmerge_ros.inference import ladder
    from segmerge_ros.inference.backends import base

    monkeypatch.setattr(ladder, "cpu_bf16_support", lambda: "")  # as on a CPU with native bf16
    monkeypatch.setattr(base, "cpu_bf16_support", lambda: "")
    engine = SegmentationEngine(input_size=SIZE, precision="auto")
    assert set(engine._backends) == {"fp32", "bf16"}
    engine.calibrate_precision(cv2.resize(frame, SIZE[::-1]), threshold=1.01)  # refused
    assert set(engine._backends) == {"fp32"} and engine.precision_plan == "fp32"
    engine.set_merge_rate(0.9)
    assert engine.infer(cv2.resize(frame, SIZE[::-1])).merge_name.endswith("@bf16") is False


def test_bf16_needs_the_cpu_flags_not_onednns_word(monkeypatch):
    """oneDNN's probe says yes on AVX-512 CPUs that only emulate bf16 (slower than fp32)."""
    from segmerge_ros.inference.backends import base

    class FakeCpuinfo:
        def __init__(self, path):
            pass

        def read_text(self):
            return "flags : fpu avx2 fma avx512f avx512bw avx512vl\n"

    monkeypatch.setattr(base, "Path", FakeCpuinfo)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    monkeypatch.delenv("SEGMERGE_CPU_BF16", raising=False)
    assert "no native bf16" in base.cpu_bf16_support.__wrapped__()
    FakeCpuinfo.read_text = lambda self: "flags : fpu avx2 avx512f avx512_bf16\n"
    assert base.cpu_bf16_support.__wrapped__() == ""


def test_a_failed_onnx_export_warns_that_the_traced_model_is_slower(monkeypatch, tmp_path, caplog):
    def broken_export(*args, **kwargs):
        raise RuntimeError("an operator ONNX lacks")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    module = torch.nn.Conv2d(3, 4, 3).eval()
    with caplog.at_level(logging.WARNING):
        openvino_backend._export(module, torch.zeros(1, 3, 16, 16), tmp_path / "rung.xml")
    assert (tmp_path / "rung.xml").is_file()  # converted all the same, from the traced module
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("ONNX export" in m and "traced" in m and "2x slower" in m for m in warned), warned


# --- the model cache ---------------------------------------------------------------------------------------------


class TinySegmenter(torch.nn.Module):
    """Converts in a fraction of a second: the cache's logic does not need SegFormer's graph."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, pixels, config=NONE):
        logits = self.conv(pixels)
        return torch.nn.functional.avg_pool2d(logits, config.head_stride) if config.head_stride > 1 else logits


@pytest.fixture(scope="module")
def tiny() -> TinySegmenter:
    return TinySegmenter().eval()


def test_cache_reuses_rebuilds_stale_entries_and_corrupt_files(tiny, tmp_path, caplog):
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = tiny(pixels, NONE)

    def backend(**kwargs) -> OpenVINOBackend:
        made = OpenVINOBackend(tiny, torch.device("cpu"), torch.float32, cache_dir=tmp_path, **kwargs)
        assert torch.allclose(made.run(pixels, NONE), reference, atol=1e-4)
        return made

    first = backend()
    path, status = first.engines["none"]
    assert status == "built" and path.is_file() and path.with_suffix(".bin").is_file()
    assert backend().engines["none"] == (path, "reused")

    upgraded = {**openvino_environment("CPU"), "openvino": "2099.1.0"}  # a key field changes: a new entry beside
    with caplog.at_level(logging.WARNING):
        upgraded_path, status = backend(environment=upgraded).engines["none"]
    assert status == "built" and upgraded_path != path and path.is_file() and upgraded_path.is_file()
    assert any("stale" in r.getMessage() and "2099.1.0" in r.getMessage() for r in caplog.records)
    assert backend().engines["none"] == (path, "reused")  # the old version's entry still serves it

    caplog.clear()
    upgraded_path.write_text("<not an OpenVINO model")  # corrupt: rebuilt with a log line, not a crash
    with caplog.at_level(logging.WARNING):
        assert backend(environment=upgraded).engines["none"] == (upgraded_path, "built")
    assert any("cannot load cached engine" in r.getMessage() for r in caplog.records)


def test_a_rung_that_fails_to_export_runs_eagerly_and_the_others_stay(tiny, tmp_path, caplog):
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    merged = network_config(LADDER[2].config)

    def build(module, example, dtype, path):
        if module.config == merged:
            raise RuntimeError("unsupported operator (test)")
        openvino_backend._export(module, example, path)

    made = OpenVINOBackend(tiny, torch.device("cpu"), torch.float32, cache_dir=tmp_path,
                           engine_io=EngineIO(build=build, load=lambda path: made._compile(path)))
    with caplog.at_level(logging.WARNING):
        for config in (NONE, merged):
            with torch.inference_mode():
                assert torch.allclose(made.run(pixels, config), tiny(pixels, config), atol=1e-4)
    assert made.name == "openvino" and made.eager_rungs == [merged.name] and "none" in made.engines
    assert any("unsupported operator" in r.getMessage() and "runs eagerly" in r.getMessage() for r in caplog.records)


def test_limit_compiled_keeps_the_most_recently_used_rungs_and_recompiles_the_others(tiny, tmp_path, caplog):
    """issue 20 (memory): each compiled rung holds its own buffers; a bound keeps those in use and compiles a dropped
    one again from the cache, with the same output, counted and logged."""
    configs = [NONE, *(network_config(step.config) for step in LADDER[1:3])]
    assert len({c.name for c in configs}) == 3
    compiles = []

    def load(path):
        compiles.append(path)
        return made._compile(path)

    made = OpenVINOBackend(tiny, torch.device("cpu"), torch.float32, cache_dir=tmp_path,
                           engine_io=EngineIO(build=lambda m, e, d, p: openvino_backend._export(m, e, p), load=load))
    big, small = (torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(2)) for size in ((64, 64), (32, 48)))
    with torch.inference_mode():
        references = {(pixels.shape, c): tiny(pixels, c) for pixels in (big, small) for c in configs}

    def run(pixels, config):
        assert torch.allclose(made.run(pixels, config), references[(pixels.shape, config)], atol=1e-4)

    for config in configs:
        run(big, config)
    run(big, configs[0])  # the most recently used is now the first rung; the second is the least
    assert made.compiled_count == 3 and made.recompiles == 0
    made.limit_compiled(2)
    assert made.compiled_count == 2
    assert {c.name for _, c in made.prepared} == {configs[0].name, configs[2].name}
    with caplog.at_level(logging.INFO):
        run(big, configs[1])  # dropped: compiled again from the cached IR, and the least recently used goes
    assert made.recompiles == 1 and made.compiled_count == 2 and len(compiles) == 4
    assert {c.name for _, c in made.prepared} == {configs[0].name, configs[1].name}
    assert any("compiling rung" in r.getMessage() and "again" in r.getMessage() for r in caplog.records)
    run(small, configs[0])  # another input shape counts against the same bound
    assert made.compiled_count == 2 and made.recompiles == 1
    assert {(shape[-1], c.name) for shape, c in made.prepared} == {(48, configs[0].name), (64, configs[1].name)}
    made.limit_compiled(0)  # no bound: what is compiled again stays
    run(big, configs[2])
    run(big, configs[0])
    assert made.compiled_count == 4 and made.recompiles == 3 and len(compiles) == 7
    made.limit_compiled(1, count=False)  # budget mode's: no count bound, only the idle rule
    assert made.compiled_count == 4
    made.limit_compiled(8)  # under any limit, a rung no frame ran for a minute goes (e.g. warmed but never used)
    idle_key = next(key for key in made.prepared if key[1] == configs[2])
    made._last_used[idle_key] -= base_backend.COMPILED_IDLE_S
    assert made.drop_idle(time.monotonic() + base_backend.IDLE_CHECK_S) == 1
    assert made.compiled_count == 3 and idle_key not in made.prepared
    run(big, configs[2])  # it comes back when a frame needs it
    assert made.recompiles == 4 and made.compiled_count == 4
    with pytest.raises(ValueError, match=">= 0"):
        made.limit_compiled(-1)


def test_missing_openvino_falls_back_to_eager_with_a_warning(tiny, monkeypatch, caplog):
    monkeypatch.setattr(openvino_backend, "import_openvino", lambda: None)
    with caplog.at_level(logging.WARNING):
        backend = make_backend("openvino", tiny, "cpu")
    assert isinstance(backend, EagerBackend)
    assert any("openvino" in r.getMessage() and "falling back to eager" in r.getMessage() for r in caplog.records)


def test_an_openvino_device_that_is_not_there_falls_back(tiny, caplog):
    with caplog.at_level(logging.WARNING):
        backend = make_backend("openvino", tiny, "cpu", openvino_device="NPU.7")
    assert isinstance(backend, EagerBackend)
    assert any("NPU.7" in r.getMessage() for r in caplog.records)


# --- the node ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def running_node(params: dict, camera: str, domain_name: str, stderr_path):
    """The node started with ``params`` and a client on a domain of its own: (client, camera publisher, process),
    once the node's latched labels say its engine is built; SIGINT and shutdown on exit."""
    import rclpy
    from rclpy.context import Context
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    from segmerge_ros.apps.client import SegmergeClient, node_command, ros_env, stop_process

    domain = ros_domain_id(domain_name)
    namespace = camera.rsplit("/", 1)[0]
    context = Context()
    rclpy.init(context=context, domain_id=domain)
    client = SegmergeClient(context, name=f"test_{namespace.strip('/')}_client")
    with open(stderr_path, "w") as stderr:
        process = subprocess.Popen(node_command(params), env=ros_env(domain), stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        client.wait_ready(180.0, process)
        # The parameter services exist before the engine is built; the latched labels come once it is ready.
        assert client.latched_string(f"{namespace}/segmentation/labels", timeout_s=300) is not None
        publisher = client.node.create_publisher(Image, camera, QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT))
        client.spin_until(lambda: publisher.get_subscription_count() > 0, 20)
        yield client, publisher, process
    finally:
        stop_process(process, signal.SIGINT)
        client.close()
        rclpy.try_shutdown(context=context)


def test_node_runs_on_openvino_over_rclpy(student_dir, cache, frame, tmp_path):
    from std_msgs.msg import Header

    from segmerge_ros.ros.conversions import rgb8_image

    camera = "/ov_cam/image"
    params = {"image_topics": [camera], "weights": str(student_dir), "input_size": f"{SIZE[0]}x{SIZE[1]}",
              "backend": "openvino", "precision": "fp32", "engine_cache_dir": str(cache), "merge_rate": 0.9,
              "engine_max_compiled_rungs": 2}
    stderr_path = tmp_path / "stderr"
    with running_node(params, camera, __name__, stderr_path) as (client, publisher, _):
        masks = client.subscribe_images("/ov_cam/segmentation/mask")
        small = cv2.resize(frame, (SIZE[1], SIZE[0]))

        def send_until(done) -> bool:
            for _ in range(40):
                if done():
                    return True
                publisher.publish(rgb8_image(small, Header(stamp=client.node.get_clock().now().to_msg(), frame_id="ov")))
                client.spin_for(1.0)
            return False

        assert send_until(lambda: masks), "no mask from the node on openvino"
        assert (masks[0].msg.height, masks[0].msg.width) == SIZE and masks[0].msg.header.frame_id == "ov"
        assert client.spin_until(lambda: client.latest(camera) is not None, 10)
        window = client.latest(camera)
        assert window.number("merge_rate") == pytest.approx(0.9)
        # the compiled-rung bound (issue 20, memory): the warmed ladder kept 2, the current step among them
        assert window.number("compiled_rungs") == 2 and window.number("rung_recompiles") == 0
        client.set_parameters({"engine_max_compiled_rungs": 1})  # live
        client.set_parameters({"merge_rate": 0.0})  # a step the bound dropped: compiled again
        assert send_until(lambda: client.latest(camera).number("rung_recompiles") >= 1
                          and client.latest(camera).number("merge_rate") == 0.0)
        assert client.latest(camera).number("compiled_rungs") == 1
        # budget mode lifts the count bound (its controller moves between rungs): calibration's rungs stay compiled
        client.set_parameters({"budget.mode": "latency", "budget.target_latency_ms": 1.0})
        assert send_until(lambda: client.latest(camera).number("compiled_rungs") >= 3)
    log = stderr_path.read_text()
    assert "backend openvino" in log and "falling back" not in log and "Traceback" not in log, log[-3000:]


def test_a_node_with_default_backend_and_precision_runs_what_it_measured_fastest(student_dir, frame, tmp_path):
    """backend auto and precision auto are the defaults (issue 20): the node times eager and OpenVINO on the first
    camera frame, runs the faster one, remembers it, and says which and why in its diagnostics."""
    import json

    from std_msgs.msg import Header

    from segmerge_ros.inference.backends.auto import CHOICES_FILE, MARGIN, geometric_mean
    from segmerge_ros.ros.conversions import rgb8_image

    camera = "/auto_cam/image"
    cache = tmp_path / "engines"
    params = {"image_topics": [camera], "weights": str(student_dir), "engine_cache_dir": str(cache)}
    stderr_path = tmp_path / "stderr"
    with running_node(params, camera, "auto_node", stderr_path) as (client, publisher, _):
        small = cv2.resize(frame, (SIZE[1], SIZE[0]))
        masks = client.subscribe_images("/auto_cam/segmentation/mask")

        def decided() -> bool:  # and the frame it decided on published
            latest = client.latest(camera)
            return (latest is not None and latest.values.get("backend_choice", "").startswith(("eager", "openvino"))
                    and bool(masks))

        for _ in range(60):
            if decided():
                break
            publisher.publish(rgb8_image(small, Header(stamp=client.node.get_clock().now().to_msg(), frame_id="a")))
            client.spin_for(1.0)
        assert decided(), client.latest(camera)
        values = client.latest(camera).values
    record = next(iter(json.loads((cache / CHOICES_FILE).read_text()).values()))
    timings = record["timings_ms"]
    assert set(timings) == {"eager", "openvino"} and record["fields"]["size"] == "{}x{}".format(*SIZE)
    faster = geometric_mean(timings["openvino"]) < (1 - MARGIN) * geometric_mean(timings["eager"])
    assert values["backend"] == record["name"] == ("openvino" if faster else "eager"), (values, record)
    assert values["precision_plan"] in ("auto", "fp32") and values["ladder"].startswith("0 none")
    log = stderr_path.read_text()
    assert f"backend auto, on the first frame: {record['name']}" in log and "Traceback" not in log, log[-3000:]


def test_build_engines_fills_the_cache_the_node_reads(tmp_path, capsys):
    from segmerge_ros.apps import build_engines

    argv = ["--backend", "openvino", "--size", "64x96", "--rates", "0,0.15", "--cache-dir", str(tmp_path)]
    assert build_engines.main(argv) == 0
    first = capsys.readouterr().out
    assert first.count(" built ") == 2 and "head2" in first
    # The engine the node builds finds exactly these entries: nothing is converted again.
    engine = SegmentationEngine(input_size=(64, 96), backend="openvino", cache_dir=str(tmp_path), warm=False)
    engine.warm([0.0, 0.15])
    assert [status for _, _, status in engine.prepared_files()] == ["reused", "reused"]


def test_pose_runs_through_the_same_backend_and_equals_eager(tmp_path):
    from segmerge_ros.merging.segformerpp import OPENVINO_LADDER
    from segmerge_ros.inference.pose import PoseEstimator

    rgb = np.random.default_rng(5).integers(0, 255, (240, 320, 3), dtype=np.uint8)
    boxes = np.array([[40, 20, 140, 220], [180, 30, 300, 230]], dtype=np.float32)  # two people: batch of two crops
    small = (96, 128)  # (w, h) crop: the graph is what matters here, not the pixels
    eager = PoseEstimator(input_size=small)
    compiled = PoseEstimator(input_size=small, backend="openvino", cache_dir=str(tmp_path))
    assert compiled.backend == "openvino" and compiled.precision == "fp32"
    compiled.warm([rung.config for rung in OPENVINO_LADDER])
    # the unmerged encoder and the 2x2-pooled one, which every pooled rung shares (head and input scale are not pose's)
    assert sorted(compiled._backend.engines) == ["2x2", "none"]
    assert compiled.estimate_boxes(rgb, boxes).keypoints.shape == (2, 17, 2)
    # Heatmaps, not keypoints: a random model's heatmaps are flat, so their maxima move with any rounding.
    from segmerge_ros.inference.pose import box_to_center_scale, crop_people

    center, scale = box_to_center_scale(boxes, small)
    pixels = eager.preprocess(crop_people(rgb, center, scale, small))
    with torch.inference_mode():
        ours, reference = compiled.forward(pixels), eager.forward(pixels)
    assert ours.shape == reference.shape == (2, 17, small[1] // 4, small[0] // 4)
    assert np.abs(ours - reference).max() <= 1e-4


def test_set_threads_compiles_each_rung_once_per_thread_count_with_the_same_output(student_dir, cache, frame):
    engine = SegmentationEngine(weights=str(student_dir), input_size=SIZE, backend="openvino", cache_dir=str(cache))
    backend = engine._backends["fp32"]
    compiled: list[int] = []
    load = backend.engine_io.load

    def counting_load(path):
        compiled.append(backend.threads)  # the thread count this rung is compiled for
        return load(path)

    backend.engine_io = EngineIO(build=backend.engine_io.build, load=counting_load)
    before = torch.get_num_threads()
    reference = engine.infer(frame).class_map
    try:
        assert engine.runs_on_cpu_threads
        engine.set_threads(1)
        assert torch.get_num_threads() == 1 and backend.threads == 1
        assert np.array_equal(engine.infer(frame).class_map, reference)
        assert compiled == [1]  # the rung in use, compiled anew for one thread
        engine.set_threads(before)
        assert np.array_equal(engine.infer(frame).class_map, reference)
        assert compiled == [1]  # back to the count it was warmed at: nothing compiled again
        # the governor's choice has held: the one-thread rungs go, and come back compiled anew if needed
        assert engine.free_other_thread_counts() == 1 and engine.free_other_thread_counts() == 0
        engine.set_threads(1)
        assert np.array_equal(engine.infer(frame).class_map, reference) and compiled == [1, 1]
    finally:
        torch.set_num_threads(before)


def test_rungs_of_a_frame_size_unseen_for_a_while_are_freed_when_another_size_comes(student_dir, cache, frame):
    """issue 20: compiled rungs were kept for every frame size ever seen (OpenVINO: hundreds of MB per size)."""
    from segmerge_ros.inference import engine as engine_module

    # the module's cache: the IR of SIZE was converted by the equality test (freeing is about compiled rungs)
    engine = SegmentationEngine(weights=str(student_dir), backend="openvino", precision="fp32",
                                cache_dir=str(cache))

    def sizes() -> set[tuple[int, int]]:
        return {tuple(shape[-2:]) for shape, _ in engine._backends["fp32"].prepared}

    first, second = cv2.resize(frame, (192, 144)), cv2.resize(frame, (160, 128))
    engine.infer(first)
    compiled_first = sizes()
    assert (144, 192) in compiled_first
    engine.infer(second)  # the first size was seen just now: both stay
    assert compiled_first <= sizes() and (128, 160) in sizes()
    engine._size_last_seen[(144, 192)] -= engine_module.STALE_SIZE_S  # as if no 144x192 frame came for a minute
    engine.infer(cv2.resize(frame, (128, 96)))
    assert not (compiled_first & sizes()) and (128, 160) in sizes() and (96, 128) in sizes()
    assert (144, 192) not in engine._size_last_seen
    result = engine.infer(first)  # it comes back: prepared again
    assert result.class_map.shape == (144, 192) and (144, 192) in sizes()
