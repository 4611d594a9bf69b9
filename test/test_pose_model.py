"""The Segformer++ pose model, its mmpose checkpoint loader, and the PoseEstimator end to end."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from segmerge_ros.merging.segformerpp import preset, rung_for_rate
from segmerge_ros.models.checkpoint_errors import CheckpointError
from segmerge_ros.models.labels import CITYSCAPES
from segmerge_ros.models.pose.model import (
    POSE_MEAN,
    POSE_STD,
    SegformerPose,
    build_pose_model,
    load_pose_checkpoint,
    save_pose_checkpoint,
)
from segmerge_ros.inference.pose import PoseEstimator

# The head keys of an mmpose Segformer++ checkpoint (SegformerHead: ConvModules with BN and a plain final conv).
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
MMPOSE_HEAD_KEYS = (
    {f"head.convs.{i}.conv.weight" for i in range(4)}
    | {f"head.convs.{i}.bn.{p}" for i in range(4) for p in BN}
    | {"head.fusion_conv.conv.weight"} | {f"head.fusion_conv.bn.{p}" for p in BN}
    | {"head.final_layer.weight", "head.final_layer.bias"}
)


@pytest.fixture(scope="module")
def model() -> SegformerPose:
    torch.manual_seed(0)
    m = SegformerPose("b0")
    # Non-trivial BatchNorm statistics, so a loader that drops buffers would be caught.
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


@pytest.fixture(scope="module")
def checkpoint(model: SegformerPose, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pose") / "segformer_b0_pose_mmpose.pth"
    save_pose_checkpoint(model, path)
    return path


def test_forward_shapes_and_merge_passthrough(model: SegformerPose):
    x = torch.randn(2, 3, 384, 288)
    with torch.inference_mode():
        plain = model(x)
        merged = model(x, merge=preset("hq"))
    assert plain.shape == merged.shape == (2, 17, 96, 72)
    assert model.heatmap_size == (72, 96)
    assert not torch.allclose(plain, merged)  # the merge config reached the encoder


def test_checkpoint_layout_and_roundtrip(model: SegformerPose, checkpoint: Path):
    raw = torch.load(checkpoint, map_location="cpu", weights_only=True)
    sd = raw["state_dict"]
    assert {k for k in sd if k.startswith("head.")} == MMPOSE_HEAD_KEYS
    assert sd["head.final_layer.weight"].shape == (17, 256, 1, 1)
    assert sd["head.fusion_conv.conv.weight"].shape == (256, 1024, 1, 1)
    # mmseg MiT backbone layout: packed attention, 1x1-conv Mix-FFN.
    assert sd["backbone.layers.0.1.0.attn.attn.in_proj_weight"].shape == (96, 32)
    assert sd["backbone.layers.3.1.1.ffn.layers.0.weight"].shape == (1024, 256, 1, 1)
    assert "backbone.layers.0.1.0.attn.sr.weight" in sd and "backbone.layers.2.2.weight" in sd
    assert not any(k.startswith(("encoder.", "decode_head.")) for k in sd)

    fresh = build_pose_model(None, checkpoint)  # size recognised from the checkpoint
    assert fresh.variant == "b0"
    x = torch.randn(1, 3, 384, 288)
    with torch.inference_mode():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_checkpoint_mismatch_lists_keys(checkpoint: Path, tmp_path: Path):
    sd = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    sd.pop("head.final_layer.bias")
    sd.pop("backbone.layers.1.1.0.norm1.weight")
    sd["head.extra_layer.weight"] = torch.zeros(3)
    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": sd}, bad)
    with pytest.raises(CheckpointError) as err:
        load_pose_checkpoint(SegformerPose("b0"), bad)
    text = str(err.value)
    assert "missing keys (2)" in text and "head.final_layer.bias" in text
    assert "encoder.stages.1.blocks.0.norm1.weight" in text
    assert "unexpected keys (1)" in text and "head.extra_layer.weight" in text
    assert str(bad) in text

    # 16 keypoints where the model has 17: a shape conflict, named.
    sd = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    sd["head.final_layer.weight"] = sd["head.final_layer.weight"][:16]
    sd["head.final_layer.bias"] = sd["head.final_layer.bias"][:16]
    torch.save({"state_dict": sd}, bad)
    with pytest.raises(CheckpointError, match=r"head\.final_layer\.weight: checkpoint \(16, 256, 1, 1\)"):
        load_pose_checkpoint(SegformerPose("b0"), bad)

    # A segmentation checkpoint, a missing file, a non-checkpoint.
    torch.save({"state_dict": {"decode_head.conv_seg.weight": torch.zeros(19, 256, 1, 1)}}, bad)
    with pytest.raises(CheckpointError, match="segmentation checkpoint"):
        load_pose_checkpoint(SegformerPose("b0"), bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pose_checkpoint(SegformerPose("b0"), tmp_path / "nope.pth")
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_pose_checkpoint(SegformerPose("b0"), bad)


class BlobModel(torch.nn.Module):
    """A stand-in pose model whose heatmaps are the crop's brightness sampled at the heatmap grid (x_crop = 4 x_hm).

    A bright spot in the image must come back at its image position through crop, batch, decode and inverse crop.
    """

    input_size = (288, 384)
    heatmap_size = (72, 96)
    num_keypoints = 17

    def __init__(self) -> None:
        super().__init__()
        self.merges = []
        self.batches = []

    def forward(self, pixels: torch.Tensor, merge=None) -> torch.Tensor:
        self.merges.append(merge)
        self.batches.append(pixels.shape[0])
        mean = torch.tensor(POSE_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(POSE_STD).view(1, 3, 1, 1)
        gray = ((pixels * std + mean) / 255.0).mean(1, keepdim=True)
        return gray[:, :, ::4, ::4].expand(-1, 17, -1, -1).contiguous()


def _blob_image(h: int, w: int, spots: list[tuple[float, float]], sigma: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w))
    for x, y in spots:
        img = np.maximum(img, np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2)))
    return np.repeat(np.round(img * 255).astype(np.uint8)[..., None], 3, axis=2)


def test_estimator_end_to_end_places_keypoints():
    person, _ = CITYSCAPES.person_ids
    spots = [(101.3, 150.6), (402.7, 222.2)]
    rgb = _blob_image(360, 640, spots, sigma=8.0)
    seg = np.zeros((360, 640), np.uint8)
    seg[40:300, 40:170] = person  # the larger person holds spot 0
    seg[120:320, 340:450] = person
    seg[10:14, 600:604] = person  # 16 px: filtered
    blob = BlobModel()
    est = PoseEstimator(blob, max_persons=4, min_person_area=100, keypoint_threshold=0.3)
    res = est.estimate(rgb, seg, CITYSCAPES.person_ids)
    assert res.num_persons == 2 and len(blob.merges) == 1  # both crops in one batch
    np.testing.assert_array_equal(res.boxes, [[40, 40, 170, 300], [340, 120, 450, 320]])
    assert res.keypoints.shape == (2, 17, 2) and res.keypoints.dtype == np.float32
    assert res.scores.shape == (2, 17) and res.pose_ms > 0
    for i, (x, y) in enumerate(spots):
        np.testing.assert_allclose(res.keypoints[i], np.tile([x, y], (17, 1)), atol=1.0)
    assert res.visible.all()
    # Flip test: crops and mirrored crops in one batch; the one-pixel heatmap shift costs under a pixel here.
    flip = PoseEstimator(blob, min_person_area=100, flip_test=True).estimate(rgb, seg, CITYSCAPES.person_ids)
    assert blob.batches[-1] == 4
    for i, (x, y) in enumerate(spots):
        np.testing.assert_allclose(flip.keypoints[i], np.tile([x, y], (17, 1)), atol=1.0)
    # max_persons keeps the largest; no people -> empty result.
    est.max_persons = 1
    assert est.estimate(rgb, seg, CITYSCAPES.person_ids).num_persons == 1
    empty = est.estimate(rgb, np.zeros_like(seg), CITYSCAPES.person_ids)
    assert empty.keypoints.shape == (0, 17, 2) and empty.boxes.shape == (0, 4)
    # Merge settings reach the model.
    # The segmentation's scalar rate selects the same ladder rung's encoder stages.
    est.set_merge_rate(0.4)
    est.estimate(rgb, seg, CITYSCAPES.person_ids)
    assert blob.merges[-1].stages == rung_for_rate(0.4).config.stages and est.merge_rate == 0.4
    est.set_merge_rate(0.1)  # the "head2" rung merges nothing in the encoder
    est.estimate(rgb, seg, CITYSCAPES.person_ids)
    assert blob.merges[-1].is_identity and est.preset == "none"
    engine_config = rung_for_rate(0.65).config  # what engine.merge_config would hold
    est.set_merge_config(engine_config, 0.65)
    est.estimate(rgb, seg, CITYSCAPES.person_ids)
    # its encoder stages, as the preset with the same stages: head and input scale are the segmentation's
    assert blob.merges[-1].stages == engine_config.stages and blob.merges[-1].name == "hq"
    assert blob.merges[-1].head_stride == 1 and blob.merges[-1].input_scale == 1.0
    est.set_preset("fast")
    est.estimate(rgb, seg, CITYSCAPES.person_ids)
    assert blob.merges[-1].name == "fast"
    with pytest.raises(ValueError):
        est.set_merge_rate(0.99)
    with pytest.raises(ValueError):
        est.set_preset("turbo")


def test_estimator_full_frame_mode_real_image(shared_data: Path, model: SegformerPose):
    folder = shared_data / "mmpose_coco_keypoints"
    rgb = cv2.cvtColor(cv2.imread(str(folder / "000000000785.jpg")), cv2.COLOR_BGR2RGB)
    est = PoseEstimator(model, mode="full_frame")
    res = est.estimate(rgb)
    assert res.num_persons == 1
    np.testing.assert_array_equal(res.boxes, [[0, 0, rgb.shape[1], rgb.shape[0]]])
    # Keypoints lie inside the crop of the whole frame (aspect-corrected, so it may extend beyond the image).
    assert np.isfinite(res.keypoints).all() and np.isfinite(res.scores).all()
    with pytest.raises(ValueError):
        PoseEstimator(model, mode="bottom_up")


def test_estimator_segmentation_mode_real_boxes(shared_data: Path, model: SegformerPose):
    """Person masks from the real COCO boxes of a two-person image; a crop's result does not depend on its batch."""
    folder = shared_data / "mmpose_coco_keypoints"
    data = json.loads((folder / "test_coco.json").read_text())
    rgb = cv2.cvtColor(cv2.imread(str(folder / "000000040083.jpg")), cv2.COLOR_BGR2RGB)
    seg = np.zeros(rgb.shape[:2], np.uint8)
    boxes = []
    for ann in data["annotations"]:
        if ann["image_id"] == 40083 and ann["num_keypoints"] > 0:
            x, y, w, h = (int(round(v)) for v in ann["bbox"])
            seg[y:y + h, x:x + w] = CITYSCAPES.person_ids[1]  # rider counts as a person
            boxes.append([x, y, x + w, y + h])
    est = PoseEstimator(model, max_persons=2, min_person_area=400)
    both = est.estimate(rgb, seg, CITYSCAPES.person_ids)
    assert both.num_persons == 2
    np.testing.assert_array_equal(both.boxes, sorted(boxes, key=lambda b: -(b[2] - b[0]) * (b[3] - b[1])))
    est.max_persons = 1
    one = est.estimate(rgb, seg, CITYSCAPES.person_ids)
    # Float rounding differs with the batch size; a random model has flat heatmaps, so allow 0.05 px.
    np.testing.assert_allclose(one.keypoints[0], both.keypoints[0], atol=0.05)
    np.testing.assert_allclose(one.scores[0], both.scores[0], atol=1e-5)
