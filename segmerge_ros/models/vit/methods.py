"""Build and load the plain-ViT model families by name: Segmenter, ALGM, ClustViT, DoViT.

Names: ``<family>-vit-<size>[-<decoder>]`` with family in segmenter/algm/clustvit/dovit, size in t/s/b/l (or
tiny/small/base/large) and decoder linear or mask (default mask), e.g. ``segmenter-vit-t-linear``,
``algm-vit-s-mask``, ``clustvit-vit-t``. ``vit-t`` alone means ``segmenter-vit-t``.

Only ``segmenter`` has static shapes (token count fixed by the input size). ALGM, ClustViT and DoViT keep
data-dependent token counts inside their forward: run them eagerly (no tracing / TensorRT / CUDA graphs).
"""

from __future__ import annotations

import re
from pathlib import Path

from segmerge_ros.models.vit.algm import ALGMSegmenter
from segmerge_ros.models.vit.clustvit import ClustViTSegmenter
from segmerge_ros.models.vit.dovit import DoViTSegmenter
from segmerge_ros.models.checkpoint_errors import CheckpointError
from segmerge_ros.models.vit.segmenter import SegmenterViT, ViTConfig
from segmerge_ros.models.vit.checkpoints import (
    config_from_state,
    load_vit_weights,
    read_checkpoint_config,
    read_state_dict,
    to_native,
)

FAMILIES: dict[str, type[SegmenterViT]] = {
    "segmenter": SegmenterViT,
    "algm": ALGMSegmenter,
    "clustvit": ClustViTSegmenter,
    "dovit": DoViTSegmenter,
}
# Parameters a method adds to the plain Segmenter (absent from plain checkpoints).
METHOD_PREFIXES = {"segmenter": (), "algm": (), "clustvit": ("cluster.", "regenerator."), "dovit": ("aux_heads.",)}
_NAME = re.compile(r"^(?:(segmenter|algm|clustvit|dovit)-)?vit-(t|ti|s|b|l|tiny|small|base|large)(?:-(linear|mask))?$")


def parse_vit_name(name: str) -> tuple[str, str, str]:
    """``"algm-vit-s-linear"`` -> ("algm", "s", "linear"); ValueError for anything else."""
    match = _NAME.match(name.lower())
    if not match:
        raise ValueError(
            f"unknown ViT model name {name!r}; expected <segmenter|algm|clustvit|dovit>-vit-<t|s|b|l>[-linear|-mask]"
        )
    family, size, decoder = match.groups()
    return family or "segmenter", size, decoder or "mask"


def is_vit_model_name(name: str) -> bool:
    return bool(_NAME.match(name.lower()))


def build_vit_model(name: str, num_classes: int = 19, labels: str = "cityscapes", **method_kwargs) -> SegmenterViT:
    """A randomly initialised model of a named family/size/decoder; ``method_kwargs`` go to the method class
    (e.g. ``num_clusters=3, injection_block=3`` for ClustViT)."""
    family, size, decoder = parse_vit_name(name)
    config = ViTConfig.for_size(size, num_classes=num_classes, decoder=decoder, labels=labels)
    return FAMILIES[family](config, **method_kwargs)


def build_from_config(family: str, config: ViTConfig, method: dict | None = None) -> SegmenterViT:
    if family not in FAMILIES:
        raise CheckpointError(f"unknown ViT family {family!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[family](config, **(method or {}))


def load_vit_model(path: str | Path, family: str | None = None, **overrides) -> SegmenterViT:
    """Load a ViT-family model in eval mode.

    * A directory written by ``save_vit_checkpoint`` (config.json + model.safetensors): rebuilt from its config;
      ``family`` may switch to another method over the same weights (e.g. ALGM over a plain Segmenter), with the
      new method's extra parameters left at their initial values.
    * A foreign file (timm / Segmenter / mmseg ``.pth`` or ``.safetensors``): the config is inferred from the weights
      (``overrides`` go to ``ViTConfig``, e.g. ``num_classes`` for a timm encoder, ``ln_eps=1e-5`` for Segmenter's
      own files); ``family`` defaults to segmenter.
    """
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        stored = read_checkpoint_config(path)
        config = ViTConfig.from_dict({**stored["vit"], **overrides})
        stored_family = stored["family"]
        chosen = family or stored_family
        method = stored.get("method", {}) if chosen == stored_family else {}
        model = build_from_config(chosen, config, method)
        allowed = METHOD_PREFIXES[chosen] if chosen != stored_family else ()
        load_vit_weights(model, path, allow_missing_prefixes=allowed)
        return model.eval()
    native, _ = to_native(read_state_dict(path), str(path))
    config = config_from_state(native, str(path), **overrides)
    chosen = family or "segmenter"
    model = build_from_config(chosen, config)
    load_vit_weights(model, path, allow_missing_prefixes=METHOD_PREFIXES[chosen])
    return model.eval()
