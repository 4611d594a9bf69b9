"""The segmentation engine with a Mask2Former: semantic maps and instances from one forward pass, merge_rate on the
encoder knob, the knob's settings as the budget controller's levels, checkpoints checked against the model name."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from mask2former_fixtures import hf_mask2former, write_hub_folder
from segmerge_ros.models.checkpoint_errors import CheckpointError
from segmerge_ros.inference.engine import SegmentationEngine
from segmerge_ros.inference.postprocess.mask2former import (instance_id_map, instance_segmentation, semantic_maps,
                                                   panoptic_segmentation, semantic_scores, thing_classes)


@pytest.fixture(scope="module")
def frame() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (72, 100, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory):
    model = hf_mask2former("swin", class_names=("person", "car", "road"))
    with torch.no_grad():
        model.class_predictor.bias[0] += 8.0  # confident person queries: instances above the threshold
    return write_hub_folder(tmp_path_factory.mktemp("m2f_engine_hub"), model)


def test_result_holds_the_semantic_maps_and_instances_of_one_forward(hub_folder, frame):
    engine = SegmentationEngine("mask2former-swin-t", weights=str(hub_folder), input_size=(64, 96),
                                instance_score_threshold=0.3, panoptic=True)
    assert engine.family.name == "mask2former" and not engine.randomly_initialised
    assert engine.labels.classes == ("person", "car", "road") and engine.labels.person_ids == (0,)
    result = engine.infer(frame)
    # The same post-processing applied to the model's own output on the engine's input.
    pixels = engine._network_input(frame, engine.merge_config)
    with torch.no_grad():
        output = engine.model(pixels)
    class_map, confidence = semantic_maps(output.class_logits, output.mask_logits, frame.shape[:2])
    np.testing.assert_array_equal(result.class_map, class_map)
    np.testing.assert_array_equal(result.confidence, confidence)
    expected = instance_id_map(instance_segmentation(output.class_logits, output.mask_logits, frame.shape[:2],
                                                     score_threshold=0.3))
    np.testing.assert_array_equal(result.instances.id_map, expected.id_map)
    assert result.instances.info == expected.info and len(expected.info) > 0
    assert result.instances.id_map.shape == frame.shape[:2] and result.instances.id_map.dtype == np.uint16
    # Panoptic: this label set's thing/stuff split is unknown, so every class is a thing.
    panoptic = panoptic_segmentation(output.class_logits, output.mask_logits, frame.shape[:2], thing_ids=range(3))
    np.testing.assert_array_equal(result.panoptic.segment_map, panoptic.segment_map)
    assert result.panoptic.segments == panoptic.segments
    assert engine.infer(frame).panoptic is not None
    engine.family.panoptic = False  # switched between frames
    assert engine.infer(frame).panoptic is None


def test_merge_rate_drives_the_knob_and_ladder_rates_are_its_settings(frame):
    engine = SegmentationEngine("mask2former-mit-b0", input_size=(64, 96))  # random, 6 encoder layers
    assert engine.labels.name == "cityscapes" and engine.family.thing_ids == thing_classes(engine.labels)
    assert engine.ladder_rates == [0.0, 0.15, 0.3, 0.45, 0.6, 0.75]
    seen = {}
    for rate in (0.0, 0.2, 0.75, 0.95):
        engine.set_merge_rate(rate)
        result = engine.infer(frame)
        seen[rate] = result.merge_name
        assert result.merge_rate == rate
    assert seen == {0.0: "mask2former coarse_layers=0", 0.2: "mask2former coarse_layers=1",
                    0.75: "mask2former coarse_layers=5", 0.95: "mask2former coarse_layers=5"}
    # The knob reaches the model: rate 0 is the stock forward, a coarse setting changes the masks.
    pixels = engine._network_input(frame, engine.merge_config)
    with torch.no_grad():
        stock, coarse = engine.model(pixels), engine.model(pixels, coarse_layers=5)
    engine.set_merge_rate(0.0)
    torch.testing.assert_close(engine.logits(frame), _scores(stock), atol=0, rtol=0)
    engine.set_merge_rate(0.75)
    torch.testing.assert_close(engine.logits(frame), _scores(coarse), atol=0, rtol=0)
    assert not torch.equal(_scores(stock), _scores(coarse))


def _scores(output) -> torch.Tensor:
    return semantic_scores(output.class_logits, output.mask_logits)


def test_proscale_knob_settings_stop_below_its_full_scale_layers():
    engine = SegmentationEngine("mask2former-mit-b0-proscale", input_size=(64, 96))  # schedule (3, 3, 3)
    assert engine.ladder_rates == [0.0, 0.15, 0.3]
    engine.set_merge_rate(0.9)
    assert engine.merge_config.name == "mask2former coarse_layers=2"


def test_backends_not_measured_for_mask2former_run_eagerly_and_auto_never_picks_them(monkeypatch, caplog):
    from segmerge_ros.inference import engine as engine_module

    with caplog.at_level("WARNING"):
        engine = SegmentationEngine("mask2former-mit-b0", backend="compile", input_size=(64, 96))
    assert engine.backend == "eager"
    assert "does not serve mask2former models (compiled backends: openvino); running mask2former eagerly" in caplog.text
    # on CUDA, auto takes the first of TensorRT / compile without timing: neither is measured for Mask2Former
    monkeypatch.setattr(engine_module, "auto_candidates", lambda *args: ["tensorrt"])
    engine = SegmentationEngine("mask2former-mit-b0", backend="auto", input_size=(64, 96))
    assert engine.backend == "eager" and engine.backend_choice.name == "eager"


def test_presets_are_refused():
    engine = SegmentationEngine("mask2former-mit-b0", input_size=(64, 96))
    with pytest.raises(ValueError, match="merge preset"):
        engine.set_preset("hq")


def test_checkpoint_of_another_backbone_than_the_name_says(hub_folder):
    with pytest.raises(CheckpointError, match="model mask2former-r50 has a resnet backbone .* holds a swin backbone"):
        SegmentationEngine("mask2former-r50", weights=str(hub_folder))
    with pytest.raises(CheckpointError, match="proscale encoder"):
        SegmentationEngine("mask2former-swin-t-proscale", weights=str(hub_folder))


def test_instances_are_skipped_when_not_wanted_and_the_threshold_is_live(hub_folder, frame):
    engine = SegmentationEngine("mask2former-swin-t", weights=str(hub_folder), panoptic=True,
                                instance_score_threshold=0.0)
    full = engine.infer(frame)
    assert full.instances is not None and full.panoptic is not None and len(full.instances.info) > 0
    lean = engine.infer(frame, instances=False)
    assert lean.instances is None and lean.panoptic is None
    np.testing.assert_array_equal(lean.class_map, full.class_map)  # the semantic maps are the same
    engine.set_instance_score_threshold(1.0)  # no instance scores above 1
    assert len(engine.infer(frame).instances.info) == 0
    engine.set_instance_score_threshold(0.0)
    assert len(engine.infer(frame).instances.info) == len(full.instances.info)
    with pytest.raises(ValueError):
        engine.set_instance_score_threshold(1.5)
