"""SegFormer (``segformer-b0`` .. ``b5``): Segformer++ token merging, the merge-rate ladder of MergeConfigs, presets.

Every rung has static shapes, so the compiled backends (compile, OpenVINO, TensorRT) serve it: the forward runs
through the engine's backend for the step's precision, with the rung's configuration as the network sees it.
"""

from __future__ import annotations

import torch

from segmerge_ros.merging.segformerpp import MergeConfig
from segmerge_ros.models.labels import label_set
from segmerge_ros.models.segformer.checkpoints import load_segformer
from segmerge_ros.models.segformer.model import SegFormer, mit_config
from segmerge_ros.inference.backends.base import Backend
from segmerge_ros.inference.families.base import ModelFamily, OutputOptions
from segmerge_ros.inference.families.frames import network_config
from segmerge_ros.inference.ladder import Step


class SegFormerFamily(ModelFamily):
    """SegFormer with Segformer++ merging: merge rates select the ladder's MergeConfigs."""

    merge_configs = True
    compiled_backends = ("compile", "openvino", "tensorrt")

    @classmethod
    def claims(cls, model_name: str) -> bool:
        """Every name no other family claims: ``mit_config`` / ``load_segformer`` refuse what is no SegFormer size."""
        return True

    @classmethod
    def load(cls, model_name: str, weights: str | None, *, num_classes: int, device: torch.device,
             options: OutputOptions) -> SegFormerFamily:
        if weights:
            loaded = load_segformer(weights, size=model_name)
            return cls("segformer", loaded.model, loaded.labels, device)
        torch.manual_seed(0)
        model = SegFormer(mit_config(model_name, num_classes=num_classes)).eval().fold_head()
        return cls("segformer", model, label_set(num_classes), device)

    @property
    def minimum_input_side(self) -> int:
        """Every MiT stage's spatial-reduction convolution needs a grid at least as large as its kernel (29 px for
        SegFormer's strides and reductions)."""
        config = self.model.config
        side = 1
        while True:
            grid, fits = side, True
            for patch, stride, reduction in zip(config.patch_sizes, config.strides, config.sr_ratios):
                grid = _conv_out(grid, patch, stride, patch // 2)
                if grid < max(reduction, 1):
                    fits = False
                    break
            if fits:
                return side
            side += 1

    def ladder_rates(self, ladder: tuple[Step, ...]) -> list[float]:
        return [step.rate for step in ladder]

    def merge_step(self, rate: float, step: Step) -> Step:
        return step

    def forward(self, pixels: torch.Tensor, merge: MergeConfig, precision: str, rate: float,
                backend: Backend) -> torch.Tensor:
        return backend.run(pixels, network_config(merge))


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1
