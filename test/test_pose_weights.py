"""The pose student the package ships (weights/, issue 22): what an empty pose.weights loads, how 'random' and other
pose models are told apart, and the .safetensors layout it is stored in."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from segmerge_ros.models.pose.model import SegformerPose, build_pose_model, save_pose_checkpoint
from segmerge_ros.ros.startup import (PACKAGED_POSE_WEIGHTS, StartupError, packaged_pose_weights,
                                      pose_weights_path)

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"


def test_the_package_ships_its_pose_student_small_and_documented():
    path = WEIGHTS / PACKAGED_POSE_WEIGHTS
    assert path.is_file(), f"{path} missing: the node's default pose.weights"
    assert path.stat().st_size < 20 * 1024 * 1024
    readme = (WEIGHTS / "README.md").read_text()
    assert PACKAGED_POSE_WEIGHTS in readme and "PCK@0.2" in readme and "segmerge-train pose" in readme
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    assert metadata["written_by"] == "segmerge_ros" and "teacher" in metadata
    assert json.loads(metadata["metrics"])  # the figures it shipped with travel inside it


def test_empty_pose_weights_mean_the_packaged_student_and_random_means_none():
    assert pose_weights_path("") == str(packaged_pose_weights())
    assert Path(pose_weights_path("")).name == PACKAGED_POSE_WEIGHTS
    assert pose_weights_path("random") is None
    assert pose_weights_path("/somewhere/pose.pth") == "/somewhere/pose.pth"
    with pytest.raises(StartupError, match="packaged pose student is a segformer-b0"):
        pose_weights_path("", "segformer-b2")


def test_the_packaged_student_loads_and_differs_from_a_random_model():
    student = build_pose_model("segformer-b0", packaged_pose_weights())
    random = SegformerPose("b0").eval()
    pixels = torch.randn(1, 3, 384, 288, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert not torch.allclose(student(pixels), random(pixels))


def test_safetensors_round_trip_gives_the_same_heatmaps(tmp_path):
    model = SegformerPose("b0").eval()
    path = tmp_path / "pose.safetensors"
    save_pose_checkpoint(model, path, metadata={"teacher": "test"})
    loaded = build_pose_model("segformer-b0", path)
    pixels = torch.randn(1, 3, 128, 96, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        np.testing.assert_array_equal(model(pixels).numpy(), loaded(pixels).numpy())
