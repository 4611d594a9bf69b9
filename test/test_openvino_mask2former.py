"""Mask2Former on OpenVINO (issue 23): every knob setting exports through the engine cache and equals eager, a setting
that fails to export runs eagerly while the others stay compiled, the class and mask logits travel packed.

A tiny random Swin Mask2Former (2 encoder layers: knob settings k = 0 and 1) in the hub layout, written by
transformers' ``save_pretrained``: conversion time grows with the graph, so the stock models' full ladders are left to
``segmerge-bench --backend openvino`` (docs/benchmarks.md 16). A real frame (vtest.avi); random weights check the
plumbing and the equality, not what the knob costs a trained model.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from mask2former_fixtures import hf_mask2former, write_hub_folder
from segmerge_ros.inference.backends import openvino as openvino_backend
from segmerge_ros.inference.engine import SegmentationEngine
from segmerge_ros.inference.families.mask2former import knob_config, pack, unpack
from segmerge_ros.inference.sources import iter_frames

MODEL = "mask2former-swin-t"
SIZE = (64, 96)  # the network input, HxW
SETTINGS = 2  # the tiny model's encoder layers: knob settings k = 0, 1


@pytest.fixture(scope="module")
def frame(shared_data) -> np.ndarray:
    return next(iter_frames(shared_data / "opencv_samples" / "vtest.avi", max_frames=1))


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    pytest.importorskip("transformers", reason="transformers is a test dependency: run `make setup`")
    return str(write_hub_folder(tmp_path_factory.mktemp("m2f_hub"), hf_mask2former("swin")))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, weights) -> SegmentationEngine:
    return SegmentationEngine(MODEL, weights, backend="openvino", precision="fp32", input_size=SIZE,
                              cache_dir=str(tmp_path_factory.mktemp("openvino_m2f_compiled")))


def test_pack_and_unpack_round_trip_and_a_wrong_size_is_named():
    class_logits, mask_logits = torch.randn(1, 5, 4), torch.randn(1, 5, 17, 25)  # a 65x97 input: 1/4 rounded up
    restored = unpack(pack(class_logits, mask_logits), num_classes=3, input_size=(65, 97))
    assert torch.equal(restored[0], class_logits) and torch.equal(restored[1], mask_logits)
    with pytest.raises(ValueError, match="does not hold 3 \\+ 1 class logits and 16x24 mask logits"):
        unpack(pack(class_logits, mask_logits), num_classes=3, input_size=(64, 96))


def test_a_knob_setting_that_fails_to_export_runs_eagerly_and_the_others_stay(tmp_path, weights, monkeypatch, frame,
                                                                              caplog):
    failing = knob_config(SETTINGS - 1)
    export = openvino_backend._export

    def broken_for_one_setting(module, example, path):
        if module.config == failing:
            raise RuntimeError("unsupported operator (test)")
        return export(module, example, path)

    monkeypatch.setattr(openvino_backend, "_export", broken_for_one_setting)
    with caplog.at_level(logging.WARNING):
        # a cache of its own: every setting is converted here (none read from another test's cache)
        engine = SegmentationEngine(MODEL, weights, backend="openvino", precision="fp32", input_size=SIZE,
                                    cache_dir=str(tmp_path))
    assert engine.backend == "openvino"
    assert engine.eager_fallbacks == f"fp32: {failing.name} runs eagerly"
    assert any("unsupported operator" in r.getMessage() and "runs eagerly" in r.getMessage() for r in caplog.records)
    engine.set_merge_rate(engine.ladder_rates[-1])
    assert engine.infer(frame).merge_name == failing.name  # answered eagerly, the frame is not lost
    assert [name for name, _, _ in engine.prepared_files()] == [knob_config(k).name for k in range(SETTINGS - 1)]


def test_every_knob_setting_runs_compiled_and_equals_eager_in_fp32(compiled, weights, frame):
    eager = SegmentationEngine(MODEL, weights, backend="eager", precision="fp32", input_size=SIZE)
    assert compiled.backend == "openvino" and compiled.eager_fallbacks == ""
    # every knob setting was converted and compiled at start (warm), none on a frame
    assert sorted(name for name, _, _ in compiled.prepared_files()) == sorted(
        knob_config(layers).name for layers in range(SETTINGS))
    assert compiled.ladder_rates == eager.ladder_rates == [0.0, 0.15]
    for rate in compiled.ladder_rates:
        compiled.set_merge_rate(rate)
        eager.set_merge_rate(rate)
        pixels = eager._network_input(frame, eager.merge_config)
        ours = compiled.family.forward(pixels, compiled.merge_config, "fp32", rate, compiled._backends["fp32"])
        reference = eager.family.forward(pixels, eager.merge_config, "fp32", rate, eager._backends["fp32"])
        for got, want in zip(ours, reference):
            assert torch.allclose(got, want, rtol=0, atol=1e-4 * want.abs().max().item()), compiled.merge_config.name
        result, expected = compiled.infer(frame), eager.infer(frame)
        assert result.merge_name == expected.merge_name == compiled.merge_config.name
        assert np.mean(result.class_map == expected.class_map) >= 0.999
        assert result.instances is not None  # instances and panoptic come from the compiled logits alike
