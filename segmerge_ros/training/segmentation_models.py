"""The trainable segmentation families by name (ViT methods, SegFormer): build, losses, logits, input
normalisation, save and load."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from segmerge_ros.models.imagenet import IMAGENET_MEAN, IMAGENET_STD
from segmerge_ros.models.vit.checkpoints import save_vit_checkpoint
from segmerge_ros.models.vit.methods import build_vit_model, is_vit_model_name, load_vit_model
from segmerge_ros.models.vit.segmenter import segmentation_loss


def build_model(
    name: str, num_classes: int, labels: str = "cityscapes", method_kwargs: dict | None = None
) -> torch.nn.Module:
    """Any trainable family by name: ``<segmenter|algm|clustvit|dovit>-vit-<t|s|b>[-linear|-mask]`` or
    ``segformer-b0`` .. ``segformer-b5`` (the lead's ``segmerge_ros.models.segformer.model``)."""
    method_kwargs = method_kwargs or {}
    if is_vit_model_name(name):
        return build_vit_model(name, num_classes, labels=labels, **method_kwargs)
    if name.lower().startswith("segformer-"):
        from segmerge_ros.models.segformer.model import SegFormer, mit_config

        model = SegFormer(mit_config(name, num_classes=num_classes))
        model.model_name = name.lower()
        return model
    raise ValueError(f"unknown model {name!r}")


def model_losses(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The model's own ``training_losses`` (ViT methods add their auxiliary terms), else plain cross-entropy."""
    if hasattr(model, "training_losses"):
        return model.training_losses(images, labels)
    loss = segmentation_loss(model(images), labels)
    return {"total": loss, "seg": loss}


def predict_logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Logits at the input resolution (ViT ``segment`` pads to the patch multiple; SegFormer's 1/4 output is
    upsampled)."""
    if hasattr(model, "segment"):
        return model.segment(images)
    return F.interpolate(model(images), size=images.shape[-2:], mode="bilinear", align_corners=False)


def model_normalisation(model: torch.nn.Module) -> tuple[tuple, tuple]:
    config = getattr(model, "config", None)
    return getattr(config, "image_mean", IMAGENET_MEAN), getattr(config, "image_std", IMAGENET_STD)


def save_model(model: torch.nn.Module, directory: Path, extra: dict) -> None:
    if hasattr(model, "family"):
        save_vit_checkpoint(model, directory, extra)
        return
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(directory / "model.safetensors"))
    config = {
        "format": "segmerge-segformer", "name": model.model_name, "num_classes": model.config.num_classes, **extra
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))


def load_trained_model(directory: str | Path) -> torch.nn.Module:
    """A model written by this tool (any family), in eval mode."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    if config.get("format") == "segmerge-segformer":
        from segmerge_ros.models.checkpoint_errors import load_state_dict_strict

        model = build_model(config["name"], config["num_classes"])
        load_state_dict_strict(model, load_file(str(directory / "model.safetensors")), str(directory))
        return model.eval()
    return load_vit_model(directory)
