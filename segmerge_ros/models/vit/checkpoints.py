"""Reading and writing ViT / Segmenter checkpoints: our own format and timm, Segmenter and mmseg files.

Formats (detected from the keys, after unwrapping ``state_dict`` / ``model`` and a ``module.`` prefix):

* ``segmerge``: a directory with ``config.json`` (``"format": "segmerge-vit"``) + ``model.safetensors`` in this
  package's names (the Segmenter layout: ``encoder.*``, ``decoder.*`` + method parameters).
* ``segmenter`` (rstrudel/segmenter ``checkpoint.pth``): the same names; its ImageNet head ``encoder.head.*`` is
  dropped. Note its LayerNorms use eps 1e-5 (``ViTConfig.ln_eps``).
* ``timm`` (``vit_*_patch16_*``): encoder only (``blocks.*``, ``patch_embed.*``, ...); the classifier ``head.*`` is
  dropped and the decoder stays randomly initialised.
* ``mmseg`` (``backbone.layers.{i}.ln1/attn.attn.in_proj_*/ffn.layers.*``, ``decode_head.*`` of
  ``SegmenterMaskTransformerHead`` or a conv-free ``FCNHead`` = linear decoder). Its ``patch_proj``/``classes_proj``
  are ``nn.Linear`` weights, transposed into Segmenter's ``x @ P`` parameters.

Position embeddings are resized (bicubic) to the model's stored grid when the checkpoint's grid differs; the
forward pass resizes them again to each input's grid. Mismatches raise ``CheckpointError`` listing the bad keys.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file, save_file

from segmerge_ros.models.checkpoint_errors import CheckpointError, load_state_dict_strict
from segmerge_ros.models.vit.segmenter import VIT_SIZES, ViTConfig, resize_pos_embed

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_TAG = "segmerge-vit"

_MMSEG_LAYER_RENAMES = (
    (r"ln1\.", "norm1."),
    (r"ln2\.", "norm2."),
    (r"attn\.attn\.in_proj_weight$", "attn.qkv.weight"),
    (r"attn\.attn\.in_proj_bias$", "attn.qkv.bias"),
    (r"attn\.attn\.out_proj\.", "attn.proj."),
    (r"ffn\.layers\.0\.0\.", "mlp.fc1."),
    (r"ffn\.layers\.1\.", "mlp.fc2."),
)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or torch pickle (``.pth``/``.pt``/``.bin``, loaded with weights_only)."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            raw: Mapping = load_file(str(path))
        else:
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any reader failure is reported as one clear error
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error
    for wrapper in ("state_dict", "model"):
        if isinstance(raw, Mapping) and isinstance(raw.get(wrapper), Mapping):
            raw = raw[wrapper]
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"checkpoint {path} holds {type(raw).__name__}, not a state dict")
    state = {k.removeprefix("module."): v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(f"checkpoint {path} contains no tensors")
    return state


def detect_layout(state: Mapping[str, torch.Tensor]) -> str:
    """'segmenter' (also our own names), 'timm' or 'mmseg'; CheckpointError for anything else."""
    if "encoder.cls_token" in state:
        return "segmenter"
    if "backbone.cls_token" in state or any(k.startswith("backbone.layers.") for k in state):
        return "mmseg"
    if "cls_token" in state and any(k.startswith("blocks.") for k in state):
        return "timm"
    sample = ", ".join(sorted(state)[:8])
    raise CheckpointError(f"unrecognised ViT checkpoint layout (first keys: {sample})")


def _reject_distilled(state: Mapping[str, torch.Tensor], source: str) -> None:
    if any(k.endswith("dist_token") for k in state):
        raise CheckpointError(
            f"checkpoint {source} is a distilled (DeiT, dist_token) ViT; only a class token is supported"
        )


def _rename_mmseg_layer(name: str) -> str:
    for pattern, replacement in _MMSEG_LAYER_RENAMES:
        name = re.sub(pattern, replacement, name)
    return name


def mmseg_to_native(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mmseg ``VisionTransformer`` + Segmenter head names -> ours. Unknown keys keep their names (and will be
    reported as unexpected)."""
    native: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key
        if key.startswith("backbone."):
            name = key.replace("backbone.", "encoder.", 1)
            name = name.replace("encoder.patch_embed.projection.", "encoder.patch_embed.proj.")
            name = re.sub(r"^encoder\.ln1\.", "encoder.norm.", name)
            name = re.sub(r"^encoder\.layers\.(\d+)\.", r"encoder.blocks.\1.", name)
        elif key.startswith("decode_head."):
            name = key.replace("decode_head.", "decoder.", 1)
            name = re.sub(r"^decoder\.layers\.(\d+)\.", r"decoder.blocks.\1.", name)
            name = name.replace("decoder.dec_proj.", "decoder.proj_dec.")
            if name == "decoder.conv_seg.weight":
                name, value = "decoder.head.weight", value.flatten(1)
            elif name == "decoder.conv_seg.bias":
                name = "decoder.head.bias"
            elif name == "decoder.patch_proj.weight":
                name, value = "decoder.proj_patch", value.t().contiguous()
            elif name == "decoder.classes_proj.weight":
                name, value = "decoder.proj_classes", value.t().contiguous()
        if ".blocks." in name:
            name = _rename_mmseg_layer(name)
        native[name] = value
    return native


def to_native(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> tuple[dict[str, torch.Tensor], str]:
    """Convert any supported layout to our names. Returns (state, layout)."""
    layout = detect_layout(state)
    _reject_distilled(state, source)
    if layout == "timm":
        dropped = ("head.", "head_dist.")
        native = {f"encoder.{k}": v for k, v in state.items() if not k.startswith(dropped)}
    elif layout == "segmenter":
        native = {k: v for k, v in state.items() if not k.startswith(("encoder.head.", "encoder.head_dist."))}
    else:
        native = mmseg_to_native(state)
    # timm keeps identity fc_norm / norm_pre without parameters; nothing else is silently dropped.
    return native, layout


def square_grid(pos_embed: torch.Tensor, source: str) -> tuple[int, int]:
    """The grid of a ``(1, 1 + n, D)`` position embedding when n is a square; CheckpointError otherwise."""
    patches = pos_embed.shape[1] - 1
    side = math.isqrt(patches)
    if side * side != patches:
        raise CheckpointError(
            f"checkpoint {source}: position embedding of {patches} patches is not square; give its grid explicitly"
        )
    return side, side


def config_from_state(native: Mapping[str, torch.Tensor], source: str = "checkpoint", **overrides) -> ViTConfig:
    """Infer a ViTConfig (size, depth, heads, decoder, classes, position grid) from converted weights."""
    if "encoder.cls_token" not in native:
        raise CheckpointError(f"checkpoint {source} has no encoder.cls_token")
    dim = native["encoder.cls_token"].shape[-1]
    depth = 1 + max(int(m.group(1)) for k in native if (m := re.match(r"encoder\.blocks\.(\d+)\.", k)))
    heads = next((h for d, _, h in VIT_SIZES.values() if d == dim), max(1, dim // 64))
    values: dict = {"embed_dim": dim, "depth": depth, "num_heads": heads}
    if "decoder.cls_emb" in native:
        values["decoder"] = "mask"
        values["num_classes"] = native["decoder.cls_emb"].shape[1]
        values["decoder_layers"] = 1 + max(
            int(m.group(1)) for k in native if (m := re.match(r"decoder\.blocks\.(\d+)\.", k))
        )
    elif "decoder.head.weight" in native:
        values["decoder"] = "linear"
        values["num_classes"] = native["decoder.head.weight"].shape[0]
    if "pos_grid" not in overrides:
        values["pos_grid"] = square_grid(native["encoder.pos_embed"], source)
    values.update(overrides)
    return ViTConfig(**values)


def load_vit_weights(
    model: torch.nn.Module,
    path: str | Path,
    allow_missing_prefixes: tuple[str, ...] = (),
    checkpoint_grid: tuple[int, int] | None = None,
) -> dict:
    """Load any supported checkpoint into a ``SegmenterViT`` (or a method subclass), strictly.

    ``allow_missing_prefixes``: parameters the file may lack and that keep their current (initial) values, e.g.
    ``("cluster.", "regenerator.")`` when starting ClustViT from a plain Segmenter checkpoint. A timm file has no
    decoder: only the encoder is loaded. ``checkpoint_grid`` gives a non-square stored position grid.
    Returns ``{"layout", "decoder_loaded", "kept_initial": [...]}``.
    """
    source = str(path)
    native, layout = to_native(read_state_dict(path), source)
    expected = model.state_dict()
    model_grid = tuple(model.encoder.pos_grid)
    pos, wanted = native.get("encoder.pos_embed"), expected["encoder.pos_embed"]
    if pos is not None and pos.shape != wanted.shape and pos.shape[-1] == wanted.shape[-1]:
        grid = tuple(checkpoint_grid) if checkpoint_grid else square_grid(pos, source)
        native["encoder.pos_embed"] = resize_pos_embed(pos.float(), grid, model_grid).to(pos.dtype)
    decoder_loaded = any(k.startswith("decoder.") for k in native)
    allowed = tuple(allow_missing_prefixes) + (() if decoder_loaded else ("decoder.",))
    kept_initial = sorted(k for k in expected if k not in native and k.startswith(allowed))
    full = dict(native)
    full.update({k: expected[k] for k in kept_initial})
    load_state_dict_strict(model, full, f"{source} ({layout} layout)")
    return {"layout": layout, "decoder_loaded": decoder_loaded, "kept_initial": kept_initial}


def save_vit_checkpoint(model: torch.nn.Module, directory: str | Path, extra: dict | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (family, ViT config, method config, ``extra``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS_NAME))
    config = {
        "format": FORMAT_TAG,
        "family": model.family,
        "vit": model.config.to_dict(),
        "method": model.method_config(),
        **(extra or {}),
    }
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return directory


def read_checkpoint_config(directory: str | Path) -> dict:
    """The config.json of a checkpoint directory written by ``save_vit_checkpoint``."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist (not a segmerge ViT checkpoint directory)")
    config = json.loads(path.read_text())
    if config.get("format") != FORMAT_TAG:
        raise CheckpointError(f"{path} is not a {FORMAT_TAG} config (format={config.get('format')!r})")
    return config
