"""segmerge-train mask2former: the semantic distillation loss falls, checkpoints load back, the knob report has one row
per setting, the student starts from the SegFormer's encoder, and the DeepLab teacher reproduces its reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from segmerge_ros.models.checkpoint_errors import CheckpointError
from segmerge_ros.models.mask2former.model import Mask2Former, Mask2FormerOutput, mask2former_config
from segmerge_ros.models.mask2former.checkpoints import load_mask2former
from segmerge_ros.models.imagenet import IMAGENET_MEAN, IMAGENET_STD
from segmerge_ros.training import cli
from segmerge_ros.training import train_mask2former as m2f
from segmerge_ros.training.segmentation_data import MemoryDataset, read_label
from segmerge_ros.training.train_segmentation import TrainSettings, sample_batch

TINY = dict(num_queries=6, feature_size=32, mask_feature_size=32, hidden_dim=32, num_attention_heads=4,
            encoder_feedforward_dim=64, decoder_feedforward_dim=64, num_decoder_layers=3, num_classes=3)


def tiny_model(proscale: bool = False) -> Mask2Former:
    from segmerge_ros.models.segformer.model import mit_config

    torch.manual_seed(0)
    mit = mit_config("b0", hidden_sizes=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))
    name = "mask2former-mit-b0" + ("-proscale" if proscale else "")
    extra = {"proscale_schedule": (1, 1, 2)} if proscale else {}
    return Mask2Former(mask2former_config(name, mit=mit, **TINY, **extra))


def striped_dataset() -> MemoryDataset:
    """Two 64x64 frames: class 0 on top, 1 in the middle band, 2 at the bottom (flip-invariant horizontally), the
    image's colour following the class."""
    samples = []
    for shift in (0, 4):
        label = np.zeros((64, 64), np.uint8)
        label[20 + shift:44 + shift] = 1
        label[44 + shift:] = 2
        rgb = np.stack([label * 100, 255 - label * 100, np.full_like(label, 60)], -1).astype(np.uint8)
        samples.append((rgb, label))
    return MemoryDataset(samples)


def fixed_batch_loss(model: Mask2Former, settings: TrainSettings) -> float:
    images, labels = sample_batch(striped_dataset(), settings, 1000, IMAGENET_MEAN, IMAGENET_STD)
    with torch.no_grad():
        return float(m2f.semantic_distillation_loss(model.forward_all_layers(images), labels)["total"])


@pytest.mark.parametrize("proscale", [False, True], ids=["stock", "proscale"])
def test_loss_falls_and_the_checkpoint_loads_back(tmp_path, proscale):
    model = tiny_model(proscale)
    settings = TrainSettings(steps=3, batch_size=2, crop=(64, 64), scale_range=(1.0, 1.0), lr=2e-3, warmup=1,
                                  save_every=0, seed=0)
    before = fixed_batch_loss(model, settings)
    records = m2f.distil(model, striped_dataset(), settings, tmp_path)
    after = fixed_batch_loss(model, settings)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert after < before
    loaded = m2f.load_distilled(tmp_path / "model")
    assert loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    stored = json.loads((tmp_path / "model" / "config.json").read_text())
    assert stored["format"] == m2f.CHECKPOINT_FORMAT and stored["step"] == 3
    # The project's loader (the node's weights parameter) reads the folder by its format alone, and checks the name.
    by_name = load_mask2former(tmp_path / "model", expect="mask2former-mit-b0" + ("-proscale" if proscale else ""))
    assert by_name.model.config == model.config
    with pytest.raises(CheckpointError):
        load_mask2former(tmp_path / "model", expect="mask2former-mit-b0" + ("" if proscale else "-proscale"))
    # --resume continues from the saved step (same optimiser state, schedule and batches)
    more = TrainSettings(**{**settings.__dict__, "steps": 4})
    resumed = m2f.distil(m2f.load_distilled(tmp_path / "model").train(), striped_dataset(), more, tmp_path,
                         resume=True)
    assert [r["step"] for r in resumed] == [4]


def test_loss_is_the_nll_of_normalised_semantic_scores():
    """Hand-made: two queries, one pixel each way; the loss is -log of the label's normalised einsum score."""
    class_logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])  # (B=1, Q=2, K+1=3): K = 2 classes
    mask_logits = torch.tensor([[[[3.0, -3.0]], [[-1.0, 2.0]]]])  # (1, 2, 1, 2)
    labels = torch.tensor([[[0, 1]]])
    loss = m2f.semantic_distillation_loss([Mask2FormerOutput(class_logits, mask_logits)], labels)["total"]
    p = class_logits.softmax(-1)[0, :, :2]  # (Q, K)
    m = mask_logits.sigmoid()[0, :, 0]  # (Q, 2 pixels)
    scores = p.T @ m  # (K, pixels)
    normalised = scores / scores.sum(0, keepdim=True)
    expected = -(normalised[0, 0].log() + normalised[1, 1].log()) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_knob_report_has_a_row_per_setting(tmp_path):
    model = tiny_model().eval()
    report = m2f.knob_report(model, striped_dataset(), input_scale=1.0)
    assert [row["coarse_layers"] for row in report] == [0, 1, 2, 3, 4, 5]
    assert report[0]["agreement_vs_k0"] == 1.0 and report[0]["macs_share_vs_k0"] == 1.0
    assert all(0.0 <= row["miou_vs_teacher"] <= 1.0 and row["frames"] == 2 for row in report)
    assert report[-1]["gmac_total"] < report[0]["gmac_total"]


def test_load_distilled_refuses_other_folders(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"format": "segmerge-segformer"}))
    with pytest.raises(ValueError, match="not a segmerge-mask2former checkpoint"):
        m2f.load_distilled(tmp_path)
    model = tiny_model()
    m2f.save_checkpoint(model, tmp_path / "m", {})
    other = tiny_model(proscale=True)
    with pytest.raises(CheckpointError, match="token_excite|missing"):
        load_mask2former(tmp_path / "m", config=other.config)


def test_student_starts_from_the_segformer_encoder(student_dir):
    from segmerge_ros.models.segformer.checkpoints import load_segformer

    student = m2f.build_student("mask2former-mit-b0", str(student_dir), proscale=True)
    assert student.config.encoder == "proscale" and student.config.num_classes == 19
    segformer = load_segformer(student_dir).model.state_dict()
    ours = student.state_dict()
    encoder_keys = [key for key in segformer if key.startswith("encoder.")]
    assert len(encoder_keys) > 100
    assert all(torch.equal(ours[f"pixel_level_module.{key}"], segformer[key]) for key in encoder_keys)
    with pytest.raises(ValueError, match="widths"):
        m2f.build_student("mask2former-mit-b1", str(student_dir))


def test_deeplab_teacher_reproduces_its_reference_mask(shared_data):
    pytest.importorskip("ai_edge_litert", reason="the DeepLab teacher needs ai-edge-litert (requirements-test.txt)")
    folder = shared_data / "coral_cityscapes_deeplab"
    teacher = m2f.DeepLabTeacher(folder / "deeplab_mobilenet_edgetpu_slim_cityscapes_quant.tflite")
    from segmerge_ros.inference.sources import read_rgb

    rgb = read_rgb(folder / "cityscapes_segmentation.bmp")
    reference = read_label(folder / "cityscapes_segmentation_mask.bmp")
    labels = teacher(rgb[:, :400])  # not 513 wide: the labels come back at the frame's size
    assert labels.shape == (513, 400) and labels.dtype == np.uint8
    assert (labels == reference[:, :400]).mean() > 0.85  # MANIFEST: the model agrees with it on 92.1 % (full image)


def test_cli_distils_from_the_deeplab_teacher_and_writes_metrics(tmp_path, student_dir, shared_data):
    pytest.importorskip("ai_edge_litert", reason="the DeepLab teacher needs ai-edge-litert (requirements-test.txt)")
    out = tmp_path / "run"
    code = cli.main(["mask2former", "--frames", "0:2", "--steps", "2", "--batch", "1", "--crop", "64x96",
                      "--frame-scale", "0.25", "--max-eval", "1", "--threads", "1", "--out", str(out)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 2 and metrics["encoder"] == "stock"
    assert [row["coarse_layers"] for row in metrics["knob"]] == [0, 1, 2, 3, 4, 5]
    assert metrics["knob"][0]["input_size"] == [144, 192]  # held-out 576x768 frames at the training scale
    assert m2f.load_distilled(out / "model").config.mit.hidden_sizes == (32, 64, 160, 256)
