"""The engine: frame in, class map and confidence at the frame's resolution out."""

from __future__ import annotations

import numpy as np
import pytest

from segmerge_ros.inference.engine import SegmentationEngine, logits_to_maps, parse_size


@pytest.fixture(scope="module")
def engine():
    return SegmentationEngine(model="segformer-b0", input_size="128x160")


def test_outputs_at_input_resolution(engine):
    rgb = np.random.default_rng(0).integers(0, 255, (121, 203, 3), dtype=np.uint8)
    result = engine.infer(rgb)
    assert result.class_map.shape == (121, 203) and result.class_map.dtype == np.uint8
    assert result.confidence.shape == (121, 203) and result.confidence.dtype == np.uint8
    assert result.class_map.max() < 19
    # max softmax probability over 19 classes is at least 1/19
    assert result.confidence.min() >= int(255 / 19)
    assert result.inference_ms > 0
    assert engine.randomly_initialised


def test_merge_rate_validated_and_applied(engine):
    rgb = np.random.default_rng(1).integers(0, 255, (128, 160, 3), dtype=np.uint8)
    engine.set_merge_rate(0.0)
    plain, again = engine.infer(rgb), engine.infer(rgb)
    assert np.array_equal(plain.class_map, again.class_map) and plain.merge_name == "none"
    engine.set_merge_rate(0.9)
    assert engine.merge_rate == 0.9
    merged = engine.infer(rgb)
    # Same output size, different content: the rung really ran (at 0.625 of the input, head on 2x2 cells).
    assert merged.class_map.shape == plain.class_map.shape and merged.merge_name == engine.merge_config.name
    assert (merged.class_map != plain.class_map).mean() > 0.01
    assert tuple(engine.logits(rgb).shape[-2:]) == (-(-80 // 8), -(-100 // 8))  # 128x160 scaled to 80x100, 1/8
    for bad in (-0.01, 0.951, float("nan")):
        with pytest.raises(ValueError, match="merge_rate"):
            engine.set_merge_rate(bad)
    assert engine.merge_rate == 0.9
    engine.set_merge_rate(0.0)


def test_scaled_rungs_resize_the_frame_once_before_the_network(engine):
    """The engine scales the frame itself (uint8, straight to the rung's size) and hands the network an unscaled
    configuration: the same result as the network scaling its normalised input, up to the resampling's rounding."""
    import torch

    from segmerge_ros.merging.segformerpp import rung_for_rate
    from segmerge_ros.inference.engine import network_config, to_tensor

    rgb = np.random.default_rng(3).integers(0, 255, (128, 160, 3), dtype=np.uint8)
    config = rung_for_rate(0.9).config
    assert config.input_scale == 0.625 and network_config(config).input_scale == 1.0
    assert network_config(config).stages == config.stages and network_config(config).head_stride == config.head_stride
    with torch.inference_mode():
        in_network = engine.model(to_tensor(rgb, None, engine.device), config)
    ours = engine.logits(rgb, config)
    assert ours.shape == in_network.shape
    agreement = (ours.argmax(dim=1) == in_network.argmax(dim=1)).float().mean().item()
    assert agreement > 0.9


def test_label_upsampling_agrees_with_logit_upsampling_away_from_edges():
    import torch

    logits = torch.zeros(1, 3, 4, 4)
    logits[0, 1, :, :2] = 5.0
    logits[0, 2, :, 2:] = 5.0
    smooth, _ = logits_to_maps(logits, (16, 16), "logits")
    blocky, confidence = logits_to_maps(logits, (16, 16), "labels")
    assert (smooth[:, :6] == 1).all() and (smooth[:, 10:] == 2).all()
    assert (blocky[:, :8] == 1).all() and (blocky[:, 8:] == 2).all()
    assert confidence.min() > 200


def test_confidence_is_the_upsampled_max_probability_and_is_skipped_when_not_asked_for():
    import cv2
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(5)
    logits = F.interpolate(torch.randn(1, 19, 6, 8, generator=generator) * 3, size=(45, 60), mode="bicubic")
    class_map, confidence = logits_to_maps(logits, (576, 768))
    probability = torch.softmax(logits, dim=1).amax(dim=1)[0].numpy()
    reference = cv2.resize(probability, (768, 576), interpolation=cv2.INTER_LINEAR) * 255.0
    assert confidence.shape == (576, 768) and confidence.dtype == np.uint8
    assert np.abs(confidence.astype(np.float32) - reference).max() <= 1.5  # quantised before upsampling
    assert confidence.std() > 10  # a real map, not a constant
    same_map, skipped = logits_to_maps(logits, (576, 768), confidence=False)
    assert skipped is None and np.array_equal(same_map, class_map)


def test_infer_without_confidence_returns_none_and_the_same_class_map():
    engine = SegmentationEngine(model="segformer-b0", num_classes=19, input_size=(64, 96))
    rgb = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    full, lean = engine.infer(rgb), engine.infer(rgb, confidence=False)
    assert full.confidence is not None and full.confidence.shape == (120, 160)
    assert lean.confidence is None and np.array_equal(lean.class_map, full.class_map)


def test_parse_size():
    assert parse_size("512x1024") == (512, 1024)
    assert parse_size("") is None
    for bad in ("512", "ax b", "8x8"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_bad_frame_is_rejected_clearly(engine):
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        engine.infer(np.zeros((10, 10), np.uint8))


@pytest.mark.parametrize("name", ["segmenter-vit-t-linear", "algm-vit-t-linear", "dovit-vit-t-linear", "clustvit-vit-t-linear"])
def test_vit_families_run_in_the_engine_with_their_own_merge_control(name):
    engine = SegmentationEngine(model=name, input_size="96x128")
    rgb = np.random.default_rng(2).integers(0, 255, (90, 120, 3), dtype=np.uint8)
    plain = engine.infer(rgb)
    assert plain.class_map.shape == (90, 120) and engine.family.name == name.split("-")[0]
    engine.set_merge_rate(0.9)
    merged = engine.infer(rgb)
    assert merged.merge_rate == 0.9 and engine.model.merge_rate == 0.9
    assert merged.class_map.shape == (90, 120)
    with pytest.raises(ValueError, match="SegFormer merge preset"):
        engine.set_preset("hq")


def test_unavailable_backend_falls_back_to_eager_with_a_warning(caplog):
    with caplog.at_level("WARNING"):
        engine = SegmentationEngine(model="segformer-b0", backend="tensorrt", input_size="64x96")
    assert engine.backend == "eager"
    assert any("tensorrt" in record.getMessage() for record in caplog.records)
    rgb = np.zeros((64, 96, 3), np.uint8)
    assert engine.infer(rgb).class_map.shape == (64, 96)


@pytest.mark.parametrize("size,logits_size", [
    ((576, 768), (144, 192)),   # the unmerged rung at 576x768: cells of 4x4 pixels
    ((576, 768), (45, 60)),     # the top rung (head at 1/8 of a 0.625-scaled input): cells of 12.8 pixels
    ((512, 1024), (40, 80)),
    ((301, 407), (144, 192)),   # scale factors that are not integers
    ((97, 130), (144, 192)),    # downsampling
])
def test_boundary_only_upsampling_equals_full_bilinear_argmax(size, logits_size):
    import torch
    import torch.nn.functional as F

    from segmerge_ros.inference.postprocess.upsample import upsampled_argmax

    generator = torch.Generator().manual_seed(size[0] + logits_size[0])
    # Smooth logits with real class regions: random low-resolution fields, upsampled.
    logits = F.interpolate(torch.randn(1, 19, 9, 12, generator=generator), size=logits_size, mode="bicubic")
    reference = F.interpolate(logits, size=size, mode="bilinear", align_corners=False).argmax(dim=1)[0]
    ours = upsampled_argmax(logits[0], size)
    assert ours.shape == size
    assert ours.dtype == np.uint8
    assert np.array_equal(ours, reference.numpy())
    boundary_share = (reference[1:] != reference[:-1]).float().mean().item()
    assert 0.001 < boundary_share < 0.2  # the case has boundaries, and most of the picture is inside regions


def test_upsampled_argmax_breaks_exact_ties_and_many_class_corners_like_interpolate():
    """Where classes tie exactly the lower id wins, as in F.interpolate(...).argmax; where many classes meet in one
    cell (random logits: every cell a boundary), all of them are weighed."""
    import torch
    import torch.nn.functional as F

    from segmerge_ros.inference.postprocess.upsample import upsampled_argmax

    generator = torch.Generator().manual_seed(7)
    noisy = torch.randn(1, 6, 12, 16, generator=generator)
    tied = F.interpolate(torch.randn(1, 4, 3, 4, generator=generator), size=(12, 16), mode="bicubic")
    tied = torch.cat([tied, tied[:, 1:2]], dim=1)  # class 4 equals class 1 everywhere: class 1 must win there
    for logits in (noisy, tied):
        reference = F.interpolate(logits, size=(53, 70), mode="bilinear", align_corners=False).argmax(dim=1)[0]
        ours = upsampled_argmax(logits[0], (53, 70))
        assert np.array_equal(ours, reference.numpy())
    assert not (ours == 4).any() and (ours == 1).any()


def test_upsampled_argmax_past_256_classes_gives_uint16_ids_equal_to_interpolate():
    import torch
    import torch.nn.functional as F

    from segmerge_ros.inference.postprocess.upsample import upsampled_argmax

    generator = torch.Generator().manual_seed(3)
    logits = F.interpolate(torch.randn(1, 300, 5, 6, generator=generator), size=(20, 24), mode="bicubic")
    logits[:, 299, :10] += 5.0  # ids past 255 win somewhere
    reference = F.interpolate(logits, size=(77, 90), mode="bilinear", align_corners=False).argmax(dim=1)[0]
    ours = upsampled_argmax(logits[0], (77, 90))
    assert ours.dtype == np.uint16
    assert np.array_equal(ours, reference.numpy()) and (ours == 299).any()


def test_upsampled_argmax_runs_compiled_on_the_cpu_and_without_numba_warns_and_stays_exact(monkeypatch, caplog):
    import torch
    import torch.nn.functional as F

    from segmerge_ros.inference.postprocess import upsample

    assert upsample._cell_argmax is not None, "numba is a dependency (requirements.txt): the compiled pass must load"
    generator = torch.Generator().manual_seed(11)
    logits = F.interpolate(torch.randn(1, 19, 6, 8, generator=generator), size=(45, 60), mode="bicubic")[0]
    compiled = upsample.upsampled_argmax(logits, (576, 768))
    monkeypatch.setattr(upsample, "_cell_argmax", None)
    monkeypatch.setattr(upsample, "_warned_without_numba", False)
    with caplog.at_level("WARNING", logger=upsample.LOG.name):
        fallback = upsample.upsampled_argmax(logits, (576, 768))
    assert np.array_equal(compiled, fallback)
    assert any("numba is not installed" in record.getMessage() for record in caplog.records)


def tiny_family():
    """A family the engine has never heard of: a 1x1 convolution at 1/4 of the input, two ladder levels, instances."""
    from dataclasses import replace

    import torch

    from segmerge_ros.merging.segformerpp import NONE
    from segmerge_ros.models.labels import label_set
    from segmerge_ros.inference.families.base import ModelFamily
    from segmerge_ros.inference.ladder import Step

    class Tiny(ModelFamily):
        has_instances = True
        INSTANCES = object()

        @classmethod
        def claims(cls, model_name):
            return model_name.startswith("tiny-")

        @classmethod
        def load(cls, model_name, weights, *, num_classes, device, options):
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.AvgPool2d(4), torch.nn.Conv2d(3, num_classes, 1)).eval()
            family = cls(model_name, model, label_set(num_classes), device)
            family.options, family.seen = options, []
            return family

        def ladder_rates(self, ladder):
            return [0.0, 0.5]

        def merge_step(self, rate, step):
            return Step(rate, replace(NONE, name=f"tiny level={int(rate >= 0.5)}"), step.precision)

        def forward(self, pixels, merge, precision, rate, backend):
            self.seen.append((precision, rate, tuple(pixels.shape)))
            return self.model(pixels)

        def outputs(self, raw, size, upsample, confidence):
            return super().outputs(raw, size, upsample, confidence)._replace(instances=self.INSTANCES)

    return Tiny


def test_a_family_the_engine_does_not_know_runs_through_it(monkeypatch, caplog):
    """The engine asks its family object for everything model-specific: a new family needs no engine change."""
    from segmerge_ros.inference.families import registry

    monkeypatch.setattr(registry, "FAMILIES", list(registry.FAMILIES))
    tiny = registry.register_family(tiny_family())
    assert registry.family_for("tiny-net") is tiny and registry.family_for("segformer-b0") is not tiny
    with caplog.at_level("WARNING"):
        engine = SegmentationEngine("tiny-net", backend="compile", input_size=(64, 96), num_classes=5, max_instances=7)
    assert isinstance(engine.family, tiny) and engine.family.name == "tiny-net" and engine.model is engine.family.model
    assert engine.backend == "eager" and "running tiny-net eagerly" in caplog.text  # not compilable
    assert engine.family.options.max_instances == 7 and engine.labels.num_classes == 5
    assert engine.ladder_rates == [0.0, 0.5]
    rgb = np.random.default_rng(4).integers(0, 255, (48, 80, 3), dtype=np.uint8)
    engine.set_merge_rate(0.6)
    result = engine.infer(rgb)
    assert result.merge_name == "tiny level=1" and result.merge_rate == 0.6 and engine.family.seen == [("fp32", 0.6, (1, 3, 64, 96))]
    assert result.class_map.shape == (48, 80) and result.class_map.max() < 5 and result.confidence.shape == (48, 80)
    assert result.instances is tiny.INSTANCES and result.panoptic is None
    assert tuple(engine.logits(rgb).shape) == (1, 5, 16, 24)
    with pytest.raises(ValueError, match="SegFormer merge preset; tiny-net models take merge_rate"):
        engine.set_preset("hq")


def test_family_for_picks_each_family_from_the_model_name():
    from segmerge_ros.inference.families.mask2former import Mask2FormerFamily
    from segmerge_ros.inference.families.registry import family_for
    from segmerge_ros.inference.families.segformer import SegFormerFamily
    from segmerge_ros.inference.families.vit import ViTFamily

    assert family_for("segformer-b2") is SegFormerFamily and SegFormerFamily.merge_configs and SegFormerFamily.compiled_backends
    assert family_for("algm-vit-s-linear") is ViTFamily and family_for("vit-t") is ViTFamily
    assert family_for("mask2former-swin-t-proscale") is Mask2FormerFamily and Mask2FormerFamily.has_instances
    assert not ViTFamily.has_instances and not ViTFamily.compiled_backends and not Mask2FormerFamily.merge_configs


def test_the_engine_imports_no_model_and_names_no_family():
    """Model-specific code lives in inference/families/, not in the engine."""
    import ast
    from pathlib import Path

    import segmerge_ros.inference.engine as engine_module

    tree = ast.parse(Path(engine_module.__file__).read_text(encoding="utf-8"))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not [name for name in imported if name.startswith("segmerge_ros.models")]
    assert not [name for name in imported if name.startswith("segmerge_ros.inference.families.")
                and name.rsplit(".", 1)[1] not in ("base", "frames", "registry")]
    compared = [ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.Compare)]
    assert not [text for text in compared if "family" in text], compared
