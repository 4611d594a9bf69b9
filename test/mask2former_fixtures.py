"""Tiny random Mask2Formers for the loader and node tests: transformers' own model (the hub layout's writer) with
non-trivial weights everywhere."""

from __future__ import annotations

import re
from pathlib import Path

import torch


def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial weights everywhere, norms included (fresh norms are the identity and would hide swaps)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith("running_var"):
                tensor.copy_(0.5 + noise.abs())
            elif re.search(r"(norm|normalization|layernorm|layer_norm|\.1)\.weight$", name) and tensor.dim() == 1:
                tensor.copy_(1.0 + 0.2 * noise)
            else:
                tensor.copy_(0.2 * noise)
    return model.eval()


def hf_mask2former(backbone: str = "swin", class_names: tuple[str, ...] = tuple(f"thing{i}" for i in range(5))):
    """transformers' Mask2FormerForUniversalSegmentation, tiny (width 32, 6 queries), Swin or ResNet backbone."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig, SwinConfig

    stages = ["stage1", "stage2", "stage3", "stage4"]
    if backbone == "swin":
        backbone_config = SwinConfig(embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], window_size=4,
                                     out_features=stages)
    else:
        backbone_config = ResNetConfig(embedding_size=16, hidden_sizes=[32, 64, 96, 128], depths=[1, 2, 1, 1],
                                       out_features=stages)
    config = Mask2FormerConfig(backbone_config=backbone_config, num_labels=len(class_names), num_queries=6,
                               hidden_dim=32, mask_feature_size=32, feature_size=32, encoder_feedforward_dim=64,
                               dim_feedforward=64, decoder_layers=4, encoder_layers=2, num_attention_heads=4,
                               id2label=dict(enumerate(class_names)),
                               label2id={name: i for i, name in enumerate(class_names)})
    torch.manual_seed(0)
    return randomise(Mask2FormerForUniversalSegmentation(config), seed=1)


def write_hub_folder(folder: Path, model, safe: bool = True) -> Path:
    model.save_pretrained(folder, safe_serialization=safe)
    return folder
