"""backend auto (issue 20): the backend measured fastest on this CPU at the frame's size, remembered per CPU and size."""

from __future__ import annotations

import json
import logging

import numpy as np

from segmerge_ros.inference import engine as engine_module
from segmerge_ros.inference.backends.auto import CHOICES_FILE, choose_backend, cpu_identity, geometric_mean
from segmerge_ros.inference.backends.registry import auto_candidates
from segmerge_ros.inference.engine import SegmentationEngine
from segmerge_ros.inference.ladder import build_ladder

KEY = {"cpu": "test CPU", "model": "segformer-b0", "size": "64x96"}


def timer(figures: dict[str, list[float]]):
    calls = []

    def measure(name: str) -> list[float]:
        calls.append(name)
        if isinstance(figures[name], Exception):
            raise figures[name]
        return figures[name]

    return measure, calls


def test_the_faster_backend_is_chosen_and_remembered_for_the_same_key(tmp_path):
    measure, calls = timer({"eager": [100.0, 50.0], "openvino": [80.0, 20.0]})
    choice = choose_backend(["eager", "openvino"], measure, KEY, tmp_path)
    assert choice.name == "openvino" and not choice.remembered and calls == ["eager", "openvino"]
    assert "openvino measured fastest" in choice.reason and "80.0 / 20.0" in choice.reason
    again = choose_backend(["eager", "openvino"], measure, KEY, tmp_path)
    assert again.name == "openvino" and again.remembered and calls == ["eager", "openvino"]  # not timed again
    other_size = choose_backend(["eager", "openvino"], measure, {**KEY, "size": "128x160"}, tmp_path)
    assert not other_size.remembered and calls[2:] == ["eager", "openvino"]
    record = next(iter(json.loads((tmp_path / CHOICES_FILE).read_text()).values()))
    assert record["name"] == "openvino" and record["timings_ms"]["eager"] == [100.0, 50.0]


def test_eager_is_kept_unless_another_backend_saves_the_margin(tmp_path):
    # openvino 3 % faster over the two steps: not worth a ladder's compile time and memory
    measure, _ = timer({"eager": [100.0, 50.0], "openvino": [99.0, 47.0]})
    assert choose_backend(["eager", "openvino"], measure, KEY, tmp_path).name == "eager"
    # faster at the top rung, slower unmerged (an AVX2 CPU's OpenVINO fp32): the geometric mean decides
    measure, _ = timer({"eager": [100.0, 50.0], "openvino": [110.0, 25.0]})
    choice = choose_backend(["eager", "openvino"], measure, {**KEY, "size": "1x1"}, tmp_path)
    assert choice.name == "openvino"
    assert geometric_mean([110.0, 25.0]) < 0.95 * geometric_mean([100.0, 50.0])


def test_a_candidate_that_fails_is_left_out_and_the_choice_not_remembered(tmp_path, caplog):
    measure, calls = timer({"eager": [100.0, 50.0], "openvino": RuntimeError("export failed")})
    with caplog.at_level(logging.WARNING):
        choice = choose_backend(["eager", "openvino"], measure, KEY, tmp_path)
    assert choice.name == "eager" and "openvino failed to run" in choice.reason
    assert any("export failed" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / CHOICES_FILE).exists()  # tried again at the next start


def test_when_the_reference_cannot_be_timed_eager_runs_and_nothing_is_remembered(tmp_path):
    measure, _ = timer({"eager": ValueError("frame too small"), "openvino": [10.0, 5.0]})
    choice = choose_backend(["eager", "openvino"], measure, KEY, tmp_path)
    assert choice.name == "eager" and "timing failed" in choice.reason and not (tmp_path / CHOICES_FILE).exists()


def test_cpu_identity_names_the_model_and_a_digest_of_the_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Robot CPU 9000\nflags\t\t: fpu avx2 fma\n")
    other = tmp_path / "cpuinfo2"
    other.write_text("processor\t: 0\nmodel name\t: Robot CPU 9000\nflags\t\t: fpu avx2 fma avx512_bf16\n")
    assert cpu_identity(str(info)).startswith("Robot CPU 9000 | flags ")
    assert cpu_identity(str(info)) != cpu_identity(str(other))  # same name, other instructions: timed again


def test_the_engine_times_on_the_first_frame_and_installs_the_chosen_ladder(tmp_path, caplog):
    rgb = np.random.default_rng(3).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    with caplog.at_level(logging.INFO):
        engine = SegmentationEngine(backend="auto", precision="fp32", cache_dir=str(tmp_path))
        assert engine.backend_pending and engine.backend == "eager"  # no size yet: nothing timed, nothing compiled
        engine.infer(np.zeros((64, 96, 3), np.uint8), calibrate=False)  # a warm-up frame decides nothing
        assert engine.backend_pending
        engine.set_merge_rate(0.9)
        result = engine.infer(rgb)
    choice = engine.backend_choice
    assert not engine.backend_pending and choice is not None and not choice.remembered
    assert choice.name in auto_candidates("cpu") and engine.backend == choice.name
    assert set(choice.timings_ms) == set(auto_candidates("cpu"))
    assert [step.config for step in engine.ladder] == [
        step.config for step in build_ladder(engine.family.rungs(choice.name), "fp32")]
    assert result.merge_rate == 0.9 and result.merge_name == engine.ladder[-1].name  # the setting carried over
    assert any("backend auto at 64x96" in r.getMessage() for r in caplog.records)
    second = SegmentationEngine(backend="auto", precision="fp32", cache_dir=str(tmp_path))
    second.infer(rgb)
    assert second.backend_choice.remembered and second.backend == choice.name


def test_rate_zero_under_auto_agrees_with_the_eager_model(tmp_path, student_dir, shared_data):
    import cv2

    frame = cv2.cvtColor(cv2.imread(str(next((shared_data / "segformer_b0_vtest_student" / "heldout" / "images")
                                             .glob("*.png")))), cv2.COLOR_BGR2RGB)
    frame = cv2.resize(frame, (192, 144))
    eager = SegmentationEngine(weights=str(student_dir), precision="fp32")
    auto = SegmentationEngine(weights=str(student_dir), backend="auto", precision="auto", cache_dir=str(tmp_path))
    exact, chosen = eager.infer(frame), auto.infer(frame)
    assert chosen.merge_name == "none" and auto.precision == "fp32"
    if auto.backend == "eager":
        assert np.array_equal(exact.class_map, chosen.class_map)  # the model itself
    else:  # a compiled fp32 graph: the same model up to float rounding
        assert (exact.class_map == chosen.class_map).mean() >= 0.999


def test_with_one_candidate_nothing_is_timed(monkeypatch, tmp_path):
    monkeypatch.setattr(engine_module, "auto_candidates", lambda device, openvino_device: ["eager"])
    engine = SegmentationEngine(backend="auto", precision="fp32", cache_dir=str(tmp_path))
    assert engine.backend == "eager" and not engine.backend_pending
    assert engine.backend_choice.name == "eager" and "only candidate" in engine.backend_choice.reason
    engine.infer(np.zeros((64, 96, 3), np.uint8))
    assert not (tmp_path / CHOICES_FILE).exists()


def test_models_that_only_run_eagerly_are_not_timed(tmp_path):
    engine = SegmentationEngine("segmenter-vit-t", backend="auto", cache_dir=str(tmp_path), input_size=(64, 64))
    assert engine.backend == "eager" and engine.backend_choice.name == "eager" and not engine.backend_pending
    assert "run eagerly" in engine.backend_choice.reason


def test_pose_with_backend_auto_runs_the_backend_it_measured_fastest(tmp_path):
    from segmerge_ros.inference.pose import PoseEstimator

    pose = PoseEstimator(backend="auto", precision="fp32", cache_dir=str(tmp_path), input_size=(96, 128),
                         mode="full_frame")
    assert pose.backend_choice is not None and pose.backend == pose.backend_choice.name
    assert set(pose.backend_choice.timings_ms) == set(auto_candidates("cpu"))
    rgb = np.random.default_rng(1).integers(0, 255, (128, 96, 3), dtype=np.uint8)
    assert len(pose.estimate(rgb).keypoints) == 1  # one full-frame person, through the chosen backend
    assert PoseEstimator(backend="auto", precision="fp32", cache_dir=str(tmp_path),
                         input_size=(96, 128)).backend_choice.remembered


def test_a_candidate_that_silently_falls_back_to_eager_is_not_timed_as_itself(monkeypatch, tmp_path):
    """A compiled backend that cannot prepare a rung answers eagerly without raising: its figures are eager's and
    must not make it the choice, nor be remembered."""
    real = engine_module.make_backend

    def failing_openvino(name, *args, **kwargs):
        return real("eager", *args, **kwargs) if name == "openvino" else real(name, *args, **kwargs)

    monkeypatch.setattr(engine_module, "auto_candidates", lambda device, openvino_device: ["eager", "openvino"])
    monkeypatch.setattr(engine_module, "make_backend", failing_openvino)
    engine = SegmentationEngine(backend="auto", precision="fp32", cache_dir=str(tmp_path))
    engine.infer(np.zeros((64, 96, 3), np.uint8))
    choice = engine.backend_choice
    assert choice.name == "eager" and "openvino failed to run" in choice.reason and "openvino" not in choice.timings_ms
    assert not (tmp_path / CHOICES_FILE).exists()
