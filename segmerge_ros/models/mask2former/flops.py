"""FLOPs of a Mask2Former configuration (stock or PRO-SCALE encoder, any knob setting) at an input size.

Two ways that must agree, and a test holds them to it (test/test_proscale.py):
- ``model_macs``: the whole model, counted by torch's ``FlopCounterMode`` on a model built on the meta device (no
  weights, no arithmetic), split into backbone, pixel decoder and transformer decoder (+ class head).
- ``pixel_decoder_macs_for``: the pixel decoder from shapes alone (``proscale.pixel_decoder_macs``).
Both count multiply-accumulates of matrix products and convolutions (torch's FLOPs / 2; fvcore, which the paper's
GFLOPs come from, counts one per multiply-accumulate too); the deformable attention's bilinear sampling,
element-wise ops and norms are not counted (``proscale.sampling_macs_per_token`` gives the sampling apart).
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch.utils.flop_counter import FlopCounterMode

from segmerge_ros.models.mask2former.model import Mask2Former, Mask2FormerConfig, mask2former_config
from segmerge_ros.models.mask2former.proscale import (
    EncoderShape,
    encoder_shapes,
    pixel_decoder_macs,
    recalibration_macs,
    schedule_levels,
    stock_encoder_levels,
)

PARTS = {  # top-level module of Mask2Former -> the name the counts use
    "pixel_level_module.encoder": "backbone",
    "pixel_level_module.decoder": "pixel_decoder",
    "transformer_module": "transformer_decoder",
    "class_predictor": "class_head",
}


def encoder_levels(config: Mask2FormerConfig, coarse_layers: int = 0) -> list[int]:
    """The levels each encoder layer of the configuration runs on at a knob setting."""
    if config.encoder == "proscale":
        return schedule_levels(config.proscale_schedule, coarse_layers)
    return stock_encoder_levels(config.encoder_layers, coarse_layers)


def pixel_decoder_macs_for(config: Mask2FormerConfig, image_size: tuple[int, int],
                           coarse_layers: int = 0) -> dict[str, int]:
    """The pixel decoder's MACs by part, from shapes (``proscale.pixel_decoder_macs``; the TRC as its own part)."""
    shape = EncoderShape(config.feature_size, config.num_attention_heads, 4, config.encoder_feedforward_dim)
    proscale = config.encoder == "proscale"
    parts = pixel_decoder_macs(image_size, config.backbone_channels, encoder_levels(config, coarse_layers),
                               light_pixel_embedding=proscale, shape=shape, mask_dim=config.mask_feature_size)
    trc = recalibration_macs(encoder_shapes(image_size), config.feature_size) if proscale else 0
    parts["token_recalibration"] = trc
    return parts


@lru_cache(maxsize=4)
def meta_model(config: Mask2FormerConfig) -> Mask2Former:
    """The model on the meta device (shapes only; building it is the slow part, so it is kept)."""
    with torch.device("meta"):
        return Mask2Former(config).eval().requires_grad_(False)


def model_macs(config: Mask2FormerConfig, image_size: tuple[int, int], coarse_layers: int = 0) -> dict[str, int]:
    """MACs of one image through the whole model, by part (``PARTS``) and ``total``."""
    model = meta_model(config)
    pixels = torch.zeros(1, 3, int(image_size[0]), int(image_size[1]), device="meta")
    with FlopCounterMode(display=False, depth=None) as counter:
        model(pixels, coarse_layers=coarse_layers)
    by_module = counter.get_flop_counts()
    prefix = type(model).__name__
    counts = {name: sum(by_module.get(f"{prefix}.{module}", {}).values()) // 2 for module, name in PARTS.items()}
    counts["total"] = counter.get_total_flops() // 2
    if sum(v for k, v in counts.items() if k != "total") != counts["total"]:
        raise RuntimeError(f"FLOPs outside the known parts of {prefix}: {counts}")
    return counts


def settings_table(backbones=("r50", "swin-t", "mit-b0"), sizes=((800, 1216), (576, 768), (512, 1024)),
                   schedules=((3, 3, 3), (2, 2, 2), (1, 1, 4), (1, 1, 1))) -> list[str]:
    """Markdown rows: per backbone and size, the stock encoder at every knob setting and PRO-SCALE schedules (the
    released one at every knob setting), in GMAC and as a share of the stock model's."""
    rows = ["| backbone | input | encoder | knob k | deformable layers GMAC | pixel decoder GMAC | total GMAC | "
            "layers % | pixel decoder % | total % |", "|---|---|---|---|---|---|---|---|---|---|"]
    for backbone in backbones:
        stock_config = mask2former_config(f"mask2former-{backbone}")
        runs = [(stock_config, "stock (6)", k) for k in range(stock_config.encoder_layers)]
        for schedule in schedules:
            config = mask2former_config(f"mask2former-{backbone}-proscale", proscale_schedule=schedule)
            settings = range(schedule[2]) if schedule == (3, 3, 3) else (0,)
            runs += [(config, f"PRO-SCALE {schedule}", k) for k in settings]
        for size in sizes:
            base = None
            for config, label, k in runs:
                parts = pixel_decoder_macs_for(config, size, k)
                layers = parts["encoder"] + parts["token_recalibration"]
                total = model_macs(config, size, k)
                numbers = (layers, total["pixel_decoder"], total["total"])
                base = base or numbers
                shares = " | ".join(f"{100 * n / b:.1f}" for n, b in zip(numbers, base))
                rows.append(f"| {backbone} | {size[0]}x{size[1]} | {label} | {k} | "
                            + " | ".join(f"{n / 1e9:.1f}" for n in numbers) + f" | {shares} |")
    return rows


if __name__ == "__main__":
    print("\n".join(settings_table()))
