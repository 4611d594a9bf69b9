"""The interface one model family implements for the engine: load, network input, merge ladder, forward, outputs.

The engine (``inference/engine.py``) knows no model: it asks its family object for everything that differs between
families, and adds what all share (the precision ladder, backends, threads, timing, the result). Adding a family is
one subclass of :class:`ModelFamily` listed in ``registry.py``:

    family = family_for("segformer-b0").load("segformer-b0", weights, num_classes=19, device=device, options=options)
    pixels = family.network_input(rgb, merge, input_size)      # (1, 3, h, w) normalised
    raw = family.forward(pixels, merge, precision, rate, backend)  # whatever the family's outputs() takes
    family.scores(raw)                                         # (1, K, h', w') class scores
    family.outputs(raw, rgb.shape[:2], upsample, confidence)   # class map, confidence, instances, panoptic
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from torch import nn

from segmerge_ros.merging.segformerpp import NONE, MergeConfig, Rung, scaled_size
from segmerge_ros.models.labels import LabelSet
from segmerge_ros.inference.backends.base import Backend
from segmerge_ros.inference.families.frames import logits_to_maps, to_tensor
from segmerge_ros.inference.ladder import Step, merge_rungs
from segmerge_ros.inference.postprocess.mask2former import DETECTIONS_PER_IMAGE, InstanceMap, PanopticSegmentation


@dataclass(frozen=True)
class OutputOptions:
    """What a result holds beyond the semantic maps, for families with instances: the score an instance needs, how
    many at most, and whether to add the panoptic segmentation. Families without instances ignore them."""

    instance_score_threshold: float = 0.5
    max_instances: int = DETECTIONS_PER_IMAGE
    panoptic: bool = False


class FamilyOutputs(NamedTuple):
    """One frame's outputs at the frame's resolution."""

    class_map: np.ndarray  # (H, W) class ids
    confidence: np.ndarray | None  # (H, W) uint8; None when not asked for
    instances: InstanceMap | None = None
    panoptic: PanopticSegmentation | None = None


class ModelFamily:
    """One model family as the engine sees it. Class attributes answer questions callers ask before or without an
    engine (``family_for(name).has_instances``); an instance holds the loaded model, its labels and device."""

    has_instances: ClassVar[bool] = False  # results carry instances (and panoptic segments when asked for)
    merge_configs: ClassVar[bool] = False  # merge rates select Segformer++ MergeConfigs: presets, shared with pose
    # the compiled backends that serve it (static shapes per rung, measured); any other runs eagerly with a warning
    compiled_backends: ClassVar[tuple[str, ...]] = ()

    def __init__(self, name: str, model: nn.Module, labels: LabelSet, device: torch.device):
        self.name = name  # the family's name, for logs and messages (e.g. "segformer", "algm", "mask2former")
        self.model = model
        self.labels = labels
        self.device = device

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    # --- which names, and loading --------------------------------------------------------------------------------

    @classmethod
    def claims(cls, model_name: str) -> bool:
        """Whether ``model_name`` names a model of this family."""
        raise NotImplementedError

    @classmethod
    def load(cls, model_name: str, weights: str | None, *, num_classes: int, device: torch.device,
             options: OutputOptions) -> ModelFamily:
        """The family with its model (in eval mode, still on the CPU) loaded from ``weights``, or randomly
        initialised (seed 0) with ``num_classes`` classes without them."""
        raise NotImplementedError

    @property
    def network(self) -> nn.Module:
        """What the engine's backends run, prepare and export: ``network(pixels, config) -> one tensor`` (by default
        the model itself)."""
        return self.model

    @property
    def minimum_input_side(self) -> int:
        """The smallest height/width the network runs at (1: any size)."""
        return 1

    # --- merge rates ---------------------------------------------------------------------------------------------

    def rungs(self, backend: str) -> tuple[Rung, ...]:
        """The rungs of the engine's ladder: their rates choose each rate's compute precision (and, for
        ``merge_configs`` families, its merge configuration)."""
        return merge_rungs(backend)

    def ladder_rates(self, ladder: tuple[Step, ...]) -> list[float]:
        """The merge rates at which the network's setting changes (the budget controller's levels); empty when the
        family's control is continuous."""
        return []

    def merge_step(self, rate: float, step: Step) -> Step:
        """The step the engine runs at ``rate``, given the ladder's ``step`` for it (which fixes the precision): by
        default the rate itself is the network's setting, named ``<family> rate=<rate>``."""
        return Step(rate, replace(NONE, name=f"{self.name} rate={rate:g}"), step.precision)

    # --- one frame -----------------------------------------------------------------------------------------------

    def network_input(self, rgb: np.ndarray, merge: MergeConfig, input_size: tuple[int, int] | None) -> torch.Tensor:
        """The normalised network input: the frame resized once, on uint8, straight to ``input_size`` (the frame's
        own size when None) scaled by the rung's ``input_scale`` (scaling inside the network would first normalise
        every camera pixel)."""
        height, width = input_size or rgb.shape[:2]
        return to_tensor(rgb, scaled_size(height, width, merge.input_scale), self.device)

    def forward(self, pixels: torch.Tensor, merge: MergeConfig, precision: str, rate: float, backend: Backend) -> Any:
        """The network's raw output for ``pixels`` at ``rate`` / ``merge`` in ``precision``; ``backend`` is the
        engine's backend for that precision (families that compile run through it)."""
        raise NotImplementedError

    def scores(self, raw: Any) -> torch.Tensor:
        """The class scores (1, K, h, w) at the network's resolution of a raw output (by default the raw output)."""
        return raw

    def outputs(self, raw: Any, size: tuple[int, int], upsample: str, confidence: bool,
                instances: bool = True) -> FamilyOutputs:
        """The frame's outputs at ``size`` (by default the class map and confidence of logits, ``logits_to_maps``);
        ``instances=False``: a family with instances skips them (and panoptic) for this frame. The engine calls this
        on the inferring thread."""
        return FamilyOutputs(*logits_to_maps(raw, size, upsample, confidence))
