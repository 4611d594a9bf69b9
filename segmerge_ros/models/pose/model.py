"""Segformer++ top-down pose model: the MiT encoder and a SegFormer-style heatmap head (mmpose layout).

The head follows the Segformer++ mmpose ``SegformerHead``: every encoder stage goes through a 1x1 convolution to
``channels`` (256) with BatchNorm and ReLU, is resized (bilinear, align_corners=False) to the 1/4 grid of stage 1,
the four maps are concatenated and fused by a 1x1 convolution with BatchNorm and ReLU, and a 1x1 ``final_layer``
gives one heatmap per keypoint (COCO-17). For the default 288x384 (w x h) crop the heatmaps are 72x96.

Module names match the mmpose checkpoint keys after the ``head.`` prefix (``convs.{i}.conv.weight``,
``convs.{i}.bn.*``, ``fusion_conv.conv.weight``, ``fusion_conv.bn.*``, ``final_layer.{weight,bias}``): the
convolutions followed by BatchNorm have no bias, as in mmcv's ``ConvModule`` with ``bias='auto'``.
The backbone keys (``backbone.*``) are the mmseg MiT layout and go through the backbone mapper of
``segmerge_ros.models.segformer.checkpoints``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segmerge_ros.merging.segformerpp import NONE, MergeConfig
from segmerge_ros.models.checkpoint_errors import CheckpointError, load_state_dict_strict
from segmerge_ros.models.segformer.checkpoints import infer_mmseg_size, mmseg_to_ours, ours_to_mmseg, unwrap_state_dict
from segmerge_ros.models.segformer.model import ConvBNReLU, MixTransformer, mit_config

# COCO-17 keypoints in dataset order.
COCO_KEYPOINTS: tuple[str, ...] = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
    "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
)
# The 19 limbs of the COCO person category (its 1-based "skeleton" list, here 0-based).
COCO_SKELETON: tuple[tuple[int, int], ...] = (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8),
    (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6),
)
# Side of each keypoint: 0 centre (nose), 1 left, 2 right. Used for colours.
COCO_KEYPOINT_SIDES: tuple[int, ...] = (0, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2)
# Index of each keypoint's mirror image (for horizontal flip).
COCO_FLIP_INDICES: tuple[int, ...] = (0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15)

# Segformer++ pose defaults (mmpose config td-hm_segformer-b0-210e_coco-384x288).
POSE_INPUT_SIZE: tuple[int, int] = (288, 384)  # (width, height) of the crop
POSE_HEATMAP_STRIDE = 4
POSE_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)  # RGB
POSE_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)


class SegformerPoseHead(nn.Module):
    """Heatmap head of Segformer++ pose: per-stage ConvBNReLU to ``channels``, fusion ConvBNReLU, 1x1 final layer."""

    def __init__(self, in_channels: Sequence[int], channels: int = 256, num_keypoints: int = 17) -> None:
        super().__init__()
        self.in_channels = tuple(int(c) for c in in_channels)
        self.channels = channels
        self.num_keypoints = num_keypoints
        self.convs = nn.ModuleList(ConvBNReLU(c, channels) for c in self.in_channels)
        self.fusion_conv = ConvBNReLU(channels * len(self.in_channels), channels)
        self.final_layer = nn.Conv2d(channels, num_keypoints, kernel_size=1)
        self._init_weights()

    def _init_weights(self) -> None:
        # As mmpose: Normal(std=0.001) convolutions, BatchNorm weight 1.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.001)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(features) != len(self.convs):
            raise ValueError(f"expected {len(self.convs)} feature maps, got {len(features)}")
        size = features[0].shape[2:]
        outs = []
        for conv, x in zip(self.convs, features):
            y = conv(x)
            if y.shape[2:] != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            outs.append(y)
        return self.final_layer(self.fusion_conv(torch.cat(outs, dim=1)))


class SegformerPose(nn.Module):
    """Top-down pose model: MiT encoder (with optional token merging) + SegformerPoseHead.

    ``forward(pixels, merge=None)`` takes normalised crops (B, 3, H, W) and returns heatmaps (B, K, H/4, W/4).
    ``merge`` is the MergeConfig passed through to the encoder unchanged (None = unmerged). The encoder uses
    mmseg's LayerNorm eps (1e-6), as the Segformer++ checkpoints were trained with.
    """

    def __init__(self, variant: str = "b0", num_keypoints: int = 17, channels: int = 256,
                 input_size: tuple[int, int] = POSE_INPUT_SIZE) -> None:
        super().__init__()
        config = mit_config(variant, layer_norm_eps=1e-6, head="mmseg")
        self.variant = variant.lower().removeprefix("segformer-").removeprefix("mit-")
        self.input_size = (int(input_size[0]), int(input_size[1]))
        if self.input_size[0] % 32 or self.input_size[1] % 32:
            raise ValueError(f"pose input size {self.input_size} must be a multiple of 32")
        self.encoder = MixTransformer(config)
        self.head = SegformerPoseHead(config.hidden_sizes, channels, num_keypoints)

    @property
    def num_keypoints(self) -> int:
        return self.head.num_keypoints

    @property
    def heatmap_size(self) -> tuple[int, int]:
        """(width, height) of the heatmaps for the model's crop size."""
        return (self.input_size[0] // POSE_HEATMAP_STRIDE, self.input_size[1] // POSE_HEATMAP_STRIDE)

    def forward(self, pixels: torch.Tensor, merge: MergeConfig | None = None) -> torch.Tensor:
        return self.head(self.encoder(pixels, NONE if merge is None else merge))


# --- checkpoints (mmpose layout) -----------------------------------------------------------------------------------

def mmpose_to_ours(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mmpose TopdownPoseEstimator keys -> SegformerPose keys.

    ``backbone.*`` (mmseg MiT) becomes ``encoder.*`` through the segmentation loader's mapper (packed attention
    split into q/k/v, 1x1 Mix-FFN convs flattened); ``head.*`` is already our layout. Other keys stay as they are,
    so the strict loader reports them as unexpected.
    """
    return mmseg_to_ours(dict(state_dict))


def ours_to_mmpose(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SegformerPose keys -> mmpose keys (what a Segformer++ pose checkpoint holds); inverse of mmpose_to_ours."""
    return ours_to_mmseg(state_dict, backbone_only=True)


def load_pose_checkpoint(model: SegformerPose, path: str | Path) -> None:
    """Load a Segformer++ mmpose ``.pth`` (``{"state_dict": {backbone.*, head.*}}``) into ``model``.

    Raises CheckpointError for a missing or unreadable file, or one that does not fit (listing missing and
    unexpected keys and shape conflicts).
    """
    load_state_dict_strict(model, mmpose_to_ours(read_pose_checkpoint(path)),
                           f"{path} (mmpose Segformer++ pose layout)")


def read_pose_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The raw mmpose-layout state dict of a pose ``.pth`` or ``.safetensors``, checked to be a pose checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"pose checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = {k: v.float() for k, v in load_file(str(path)).items()}  # shipped weights may be fp16
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch and safetensors raise many types for a bad file
        raise CheckpointError(f"cannot read pose checkpoint {path}: {exc}") from exc
    sd = unwrap_state_dict(raw, str(path))
    if not any(k.startswith("head.") for k in sd):
        hint = " (it looks like a segmentation checkpoint: decode_head.*)" if any(
            k.startswith("decode_head.") for k in sd) else ""
        raise CheckpointError(f"checkpoint {path} (mmpose pose layout expected) has no head.* keys{hint}; "
                              f"first keys: {', '.join(sorted(sd)[:5])}")
    return sd


def save_pose_checkpoint(model: SegformerPose, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Save ``model`` in the mmpose layout: ``{"state_dict": {backbone.*, head.*}}`` in a ``.pth``, or the flat
    ``backbone.*``/``head.*`` tensors in a ``.safetensors`` (with ``metadata``), which ``read_pose_checkpoint``
    reads back."""
    sd = ours_to_mmpose({k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()})
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path), metadata={"written_by": "segmerge_ros", **(metadata or {})})
        return
    torch.save({"meta": {"written_by": "segmerge_ros"}, "state_dict": sd}, Path(path))


def build_pose_model(name: str | None = "segformer-b0", weights: str | Path | None = None,
                     input_size: tuple[int, int] = POSE_INPUT_SIZE) -> SegformerPose:
    """Pose model ``segformer-b0`` ... ``segformer-b5``, randomly initialised or from a Segformer++ mmpose ``weights``.

    ``name=None`` with weights recognises the MiT size from the checkpoint. ``input_size`` (w, h) is the crop the
    model runs at: the weights do not depend on it, but a model is only as good at a size as it was trained for.
    """
    if weights is None:
        if name is None:
            raise ValueError("build_pose_model needs a model name when no weights are given")
        return SegformerPose(name, input_size=input_size).eval()
    sd = read_pose_checkpoint(weights)
    variant = name or infer_mmseg_size(sd)
    final = sd.get("head.final_layer.weight")
    model = SegformerPose(variant, num_keypoints=final.shape[0] if final is not None else 17, input_size=input_size)
    load_state_dict_strict(model, mmpose_to_ours(sd), f"{weights} (mmpose Segformer++ pose layout, {variant})")
    return model.eval()
