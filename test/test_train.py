"""segmerge-train: loss falls on a short CPU run, dataset layouts, resume, distillation with a teacher."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from segmerge_ros.models.vit.methods import FAMILIES, build_vit_model
from segmerge_ros.models.vit.segmenter import ViTConfig
from segmerge_ros.models.vit.checkpoints import save_vit_checkpoint
from segmerge_ros.training import cli
from segmerge_ros.training.segmentation_data import (
    MemoryDataset,
    PairDataset,
    ade20k_label_transform,
    ade20k_pairs,
    distillation_samples,
    heldout_pairs,
)
from segmerge_ros.training.segmentation_models import load_trained_model
from segmerge_ros.training.segmentation_teachers import SegFormerTeacher
from segmerge_ros.training.train_segmentation import TrainSettings, learning_rate, train

COLOURS = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]], dtype=np.uint8)

pytestmark = pytest.mark.usefixtures("one_thread")



def synthetic_sample(rng: np.random.Generator, height: int = 96, width: int = 128):
    """Random axis-aligned rectangles of three colours (plus noise); the label is the colour's class."""
    label = np.full((height, width), rng.integers(0, 3), dtype=np.uint8)
    for _ in range(3):
        top, left = rng.integers(0, height - 16), rng.integers(0, width - 16)
        label[top : top + rng.integers(16, 48), left : left + rng.integers(16, 64)] = rng.integers(0, 3)
    rgb = COLOURS[label].astype(np.int16) + rng.integers(-20, 20, (height, width, 3))
    return np.clip(rgb, 0, 255).astype(np.uint8), label


def synthetic_dataset(count: int = 16, seed: int = 0) -> MemoryDataset:
    rng = np.random.default_rng(seed)
    return MemoryDataset([synthetic_sample(rng) for _ in range(count)])


def tiny_model(family: str):
    config = ViTConfig(embed_dim=64, depth=6, num_heads=2, num_classes=3, decoder="linear", pos_grid=(4, 4))
    kwargs = {
        "clustvit": {"num_clusters": 2, "injection_block": 2, "cluster_hidden": 64},
        "dovit": {"exit_blocks": (1, 3)},
    }
    return FAMILIES[family](config, **kwargs.get(family, {}))


@pytest.mark.parametrize("family", ["segmenter", "algm", "clustvit", "dovit"])
def test_short_training_run_loss_falls(family):
    torch.manual_seed(0)
    model = tiny_model(family)
    settings = TrainSettings(steps=40, batch_size=4, crop=(64, 64), scale_range=(0.75, 1.25), lr=2e-3, warmup=5)
    records = train(model, synthetic_dataset(), settings, num_classes=3)
    seg = [r["seg"] for r in records if "seg" in r]
    assert len(seg) == 40
    assert np.mean(seg[-8:]) < 0.8 * np.mean(seg[:8]), seg


def test_learning_rate_schedule():
    settings = TrainSettings(steps=100, lr=1.0, warmup=10)
    assert learning_rate(0, settings) == pytest.approx(0.1)
    assert learning_rate(9, settings) == pytest.approx(1.0)
    assert learning_rate(55, settings) < 1.0 and learning_rate(99, settings) < 0.05


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    assert cv2.imwrite(str(path), array)


def make_cityscapes(root: Path) -> None:
    rng = np.random.default_rng(1)
    for split, city, count in [("train", "aachen", 3), ("val", "frankfurt", 1)]:
        for index in range(count):
            rgb, label = synthetic_sample(rng, 64, 128)
            stem = f"{city}_000000_{index:06d}"
            write_png(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", rgb)
            write_png(root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png", label)


def test_cli_cityscapes_layout_with_resume(tmp_path, capsys):
    make_cityscapes(tmp_path / "cs")
    out = tmp_path / "run"
    common = [
        "--model", "segmenter-vit-t-linear", "--data", f"cityscapes:{tmp_path / 'cs'}", "--out", str(out),
        "--crop", "64x64", "--batch-size", "2", "--save-every", "2", "--warmup", "1",
    ]
    assert cli.main(common + ["--steps", "2"]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= first["eval"]["pixel_accuracy"] <= 1.0
    written = {p.name for p in out.iterdir()}
    assert written >= {
        "model.safetensors", "config.json", "optimizer.safetensors", "train_state.json", "train_log.jsonl"
    }
    assert cli.main(common + ["--steps", "4", "--resume"]) == 0
    state = json.loads((out / "train_state.json").read_text())
    assert state["step"] == 4
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines() if "total" in line]
    assert steps == [1, 2, 3, 4]  # the resumed run continued at step 3
    model = load_trained_model(out)
    assert model.family == "segmenter" and model.config.num_classes == 19


def test_ade20k_layout_and_label_shift(tmp_path):
    rng = np.random.default_rng(2)
    rgb, _ = synthetic_sample(rng, 32, 32)
    label = np.zeros((32, 32), dtype=np.uint8)
    label[:, 16:] = 150
    label[:16, :16] = 1
    write_png(tmp_path / "ade" / "images" / "training" / "ADE_train_1.png", rgb)
    cv2.imwrite(str(tmp_path / "ade" / "images" / "training" / "ADE_train_1.jpg"), rgb)
    write_png(tmp_path / "ade" / "annotations" / "training" / "ADE_train_1.png", label)
    dataset = PairDataset(ade20k_pairs(tmp_path / "ade", "training"), ade20k_label_transform)
    _, shifted = dataset[0]
    assert shifted[0, 0] == 0 and shifted[0, 20] == 149 and shifted[20, 0] == 255


def test_distillation_from_a_teacher_checkpoint(tmp_path, capsys):
    rng = np.random.default_rng(3)
    for index in range(3):
        write_png(tmp_path / "frames" / f"frame_{index:03d}.png", synthetic_sample(rng, 64, 96)[0])
    teacher = build_vit_model("segmenter-vit-t-linear", num_classes=3)
    save_vit_checkpoint(teacher, tmp_path / "teacher")
    cache = tmp_path / "labels.npz"
    args = [
        "--model", "dovit-vit-t-linear", "--data", f"frames:{tmp_path / 'frames'}",
        "--teacher", f"vit:{tmp_path / 'teacher'}",
        "--frames", "0:3", "--label-cache", str(cache), "--out", str(tmp_path / "student"), "--steps", "2",
        "--crop", "64x64", "--batch-size", "2",
    ]
    assert cli.main(args) == 0
    assert cache.is_file()
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["last_loss"] is not None
    # a callable is a teacher too; the cache is reused for the same selection
    calls = []
    def counting_teacher(rgb):
        calls.append(1)
        return np.zeros(rgb.shape[:2], np.uint8)

    samples = distillation_samples(tmp_path / "frames", counting_teacher, (0, 3, 1), 0.5, cache, progress=False)
    assert not calls and len(samples) == 3 and samples[0][0].shape == (32, 48, 3) and samples[0][1].shape == (32, 48)


def test_segformer_teacher_on_real_heldout_frame(student_dir):
    pairs = heldout_pairs(student_dir / "heldout")
    assert len(pairs) == 27
    teacher = SegFormerTeacher(student_dir)
    rgb, label = PairDataset(pairs[:1])[0]
    prediction = teacher(rgb)
    assert prediction.shape == label.shape and prediction.dtype == np.uint8
    assert (prediction == label).mean() > 0.5  # the student agrees with its teacher on ~0.67 of pixels
