"""Mask2Former (``mask2former-<backbone>[-proscale]``, ``models/mask2former/model.py``): semantic maps, instances and
panoptic segments from one forward pass.

``merge_rate`` maps onto the pixel-decoder encoder's coarse-layer knob (``coarse_layers_for_rate``), whose settings
are the ladder levels; the result also holds instances, thresholded at ``instance_score_threshold``, at most
``max_instances``, and with ``panoptic`` detectron2's panoptic segmentation, stuff and things as
``postprocess/mask2former.thing_classes`` knows them, every class a thing otherwise.

Every knob setting has static shapes for an input size, so the compiled backends serve it like SegFormer's rungs:
the backends run ``KnobNetwork``, which takes the setting from the rung's configuration (``knob_config``) and returns
the class and mask logits packed into one tensor (the backends' one output; ``unpack`` splits it again).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from segmerge_ros.merging.segformerpp import NONE, MergeConfig, Rung
from segmerge_ros.models.labels import label_set
from segmerge_ros.models.mask2former.checkpoints import is_mask2former_name, load_mask2former
from segmerge_ros.models.mask2former.model import Mask2Former, knob_settings, mask2former_config
from segmerge_ros.inference.backends.base import Backend
from segmerge_ros.inference.families.base import FamilyOutputs, ModelFamily, OutputOptions
from segmerge_ros.inference.ladder import Step
from segmerge_ros.inference.postprocess.mask2former import (instance_id_map, instance_segmentation,
                                                            panoptic_segmentation, semantic_maps, semantic_scores,
                                                            thing_classes)

Raw = tuple[torch.Tensor, torch.Tensor]  # class logits (1, Q, K+1), mask logits (1, Q, h/4, w/4)


def knob_config(coarse_layers: int) -> MergeConfig:
    """The rung configuration of one knob setting (no token merging; the name carries the setting)."""
    return replace(NONE, name=f"mask2former coarse_layers={coarse_layers}")


def pack(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """(B, Q, K+1) and (B, Q, h, w) -> (B, Q, K+1 + h*w): one output for the backends."""
    return torch.cat((class_logits, mask_logits.flatten(2)), dim=2)


def mask_size(input_size: tuple[int, int]) -> tuple[int, int]:
    """The mask logits' (h, w) for a network input of (H, W): the backbone's stride-4 level, rounded up."""
    return tuple(-(-int(side) // 4) for side in input_size)  # type: ignore[return-value]


def unpack(packed: torch.Tensor, num_classes: int, input_size: tuple[int, int]) -> Raw:
    """``pack``'s inverse for a network input of ``input_size`` (H, W) and ``num_classes`` classes (K)."""
    height, width = mask_size(input_size)
    if packed.shape[-1] != num_classes + 1 + height * width:
        raise ValueError(f"packed Mask2Former output of {packed.shape[-1]} values per query does not hold {num_classes}"
                         f" + 1 class logits and {height}x{width} mask logits (input {input_size[0]}x{input_size[1]})")
    class_logits, mask_logits = packed.split((num_classes + 1, height * width), dim=2)
    return class_logits, mask_logits.unflatten(2, (height, width))


class KnobNetwork(nn.Module):
    """``(pixels, knob_config(k)) -> pack(class logits, mask logits)`` of the model at knob setting k: what the
    backends run, prepare and export (one graph per setting and input size)."""

    def __init__(self, model: Mask2Former):
        super().__init__()
        self.model = model
        self.coarse_layers = {knob_config(k): k for k in range(model.pixel_level_module.decoder.encoder.full_scale_layers)}

    def forward(self, pixels: torch.Tensor, config: MergeConfig) -> torch.Tensor:
        output = self.model(pixels, coarse_layers=self.coarse_layers[config])
        return pack(output.class_logits, output.mask_logits)


class Mask2FormerFamily(ModelFamily):
    """Mask2Former with the encoder knob; ``panoptic`` may be switched between frames."""

    has_instances = True
    # measured on OpenVINO only (docs/benchmarks.md 16); torch.compile took minutes to compile it and TensorRT was
    # never tried: those run eagerly with a warning, and backend auto never picks them (CUDA included)
    compiled_backends = ("openvino",)

    def __init__(self, *args, options: OutputOptions = OutputOptions(), **kwargs):
        super().__init__(*args, **kwargs)
        self._network = KnobNetwork(self.model)
        self.instance_score_threshold = float(options.instance_score_threshold)
        self.max_instances = int(options.max_instances)
        self.thing_ids = thing_classes(self.labels)
        self.panoptic = bool(options.panoptic)

    @classmethod
    def claims(cls, model_name: str) -> bool:
        return is_mask2former_name(model_name)

    @classmethod
    def load(cls, model_name: str, weights: str | None, *, num_classes: int, device: torch.device,
             options: OutputOptions) -> Mask2FormerFamily:
        if weights:
            loaded = load_mask2former(weights, expect=model_name)
            return cls("mask2former", loaded.model, loaded.labels, device, options=options)
        torch.manual_seed(0)
        model = Mask2Former(mask2former_config(model_name, num_classes=num_classes)).eval()
        return cls("mask2former", model, label_set(num_classes), device, options=options)

    @property
    def network(self) -> nn.Module:
        return self._network

    def rungs(self, backend: str) -> tuple[Rung, ...]:
        """Every knob setting the merge rate reaches, from the smallest rate that selects it."""
        return tuple(Rung(rate, knob_config(layers)) for layers, rate in knob_settings(self.model))

    def ladder_rates(self, ladder: tuple[Step, ...]) -> list[float]:
        return [step.rate for step in ladder]

    def merge_step(self, rate: float, step: Step) -> Step:
        return step

    def forward(self, pixels: torch.Tensor, merge: MergeConfig, precision: str, rate: float, backend: Backend) -> Raw:
        return unpack(backend.run(pixels, merge), self.model.config.num_classes, tuple(pixels.shape[-2:]))

    def scores(self, raw: Raw) -> torch.Tensor:
        return semantic_scores(*raw)

    def outputs(self, raw: Raw, size: tuple[int, int], upsample: str, confidence: bool,
                instances: bool = True) -> FamilyOutputs:
        """Class map and confidence (``upsample`` does not apply: detectron2's semantic inference), and unless
        ``instances`` is False (nobody needs them this frame) instances and (with ``panoptic``) the panoptic
        segmentation at ``size``."""
        class_logits, mask_logits = raw
        class_map, confidence_map = semantic_maps(class_logits, mask_logits, size)
        if not instances:
            return FamilyOutputs(class_map, confidence_map if confidence else None)
        instance_map = instance_id_map(instance_segmentation(class_logits, mask_logits, size, top_k=self.max_instances,
                                                          score_threshold=self.instance_score_threshold,
                                                          thing_ids=self.thing_ids))
        panoptic = None
        if self.panoptic:
            things = range(self.labels.num_classes) if self.thing_ids is None else self.thing_ids
            panoptic = panoptic_segmentation(class_logits, mask_logits, size, thing_ids=things)
        return FamilyOutputs(class_map, confidence_map if confidence else None, instance_map, panoptic)
