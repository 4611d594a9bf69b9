"""Load SegFormer checkpoints from local files, detecting their format.

Formats:
- Hugging Face hub layout (nvidia/segformer-*, transformers ``save_pretrained``): a folder with ``config.json`` and
  ``model.safetensors`` or ``pytorch_model.bin``; keys ``segformer.encoder.*`` and ``decode_head.*``.
- mmseg / Segformer++ ``.pth``: a ``state_dict`` wrapper (or a bare state dict) with ``backbone.*`` and
  ``decode_head.*``; attention packed as ``in_proj_weight``, Mix-FFN as 1x1 convs, head projections with BN+ReLU.

Every mismatch raises ``CheckpointError`` listing missing keys, unexpected keys and shape conflicts. Nothing is
ever downloaded.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from segmerge_ros.models.checkpoint_errors import CheckpointError, load_state_dict_strict
from segmerge_ros.models.labels import LabelSet, generic, known_label_set
from segmerge_ros.models.segformer.model import MiTConfig, SegFormer, mit_config

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass
class LoadedSegFormer:
    model: SegFormer
    labels: LabelSet
    format: str  # "huggingface" or "mmseg"
    source: Path


def load_segformer(path: str | Path, size: str | None = None, num_classes: int | None = None) -> LoadedSegFormer:
    """Load a SegFormer from a hub-layout folder (or its weight file) or an mmseg ``.pth``.

    ``size`` ("segformer-b0".."b5") is needed for ``.pth`` files, which carry no config; it is inferred from the
    weights when not given. The returned model is in eval mode with its folded head built.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir() or path.name in HF_WEIGHT_FILES or path.name == "config.json":
        folder = path if path.is_dir() else path.parent
        loaded = _load_huggingface(folder)
        _check_size(loaded.model.config, size, folder)
    elif path.suffix in (".pth", ".pt", ".bin", ".safetensors"):
        loaded = _load_mmseg(path, size, num_classes)
    else:
        raise CheckpointError(f"checkpoint {path}: unknown format (expected a hub folder, .safetensors or .pth)")
    loaded.model.eval().fold_head()
    return loaded


def _check_size(config: MiTConfig, size: str | None, source: Path) -> None:
    """A hub folder carries its own size: refuse one that differs from the size asked for (the logs, the engine
    cache and the diagnostics would name the wrong model)."""
    if size is None:
        return
    size = size if size.startswith("segformer-") else f"segformer-{size}"
    found = next((f"segformer-{name}" for name in ("b0", "b1", "b2", "b3", "b4", "b5")
                  if (mit_config(name).hidden_sizes, mit_config(name).depths) == (config.hidden_sizes, config.depths)),
                 f"a MiT of hidden sizes {list(config.hidden_sizes)} and depths {list(config.depths)}")
    if found != size:
        raise CheckpointError(f"checkpoint {source} holds {found}, not {size}: set model to {found}"
                              if found.startswith("segformer-") else f"checkpoint {source} holds {found}, not {size}")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt or truncated files surface here
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error


# --- Hugging Face hub layout -------------------------------------------------------------------------------------


def _load_huggingface(folder: Path) -> LoadedSegFormer:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"checkpoint folder {folder} has no config.json (Hugging Face hub layout expected)")
    hf = json.loads(config_file.read_text())
    missing = [key for key in ("hidden_sizes", "depths", "num_attention_heads", "sr_ratios", "patch_sizes", "strides",
                               "mlp_ratios", "decoder_hidden_size") if key not in hf]
    if hf.get("model_type", "segformer") != "segformer" or missing:
        raise CheckpointError(f"checkpoint folder {folder} holds a {hf.get('model_type', 'unknown')!r} model "
                              f"(config.json), not a SegFormer; pick the model that matches it"
                              + (f" (missing {', '.join(missing)})" if missing else ""))
    weights = next((folder / name for name in HF_WEIGHT_FILES if (folder / name).is_file()), None)
    if weights is None:
        raise CheckpointError(f"checkpoint folder {folder} has none of {', '.join(HF_WEIGHT_FILES)}")
    id2label = hf.get("id2label") or {}
    num_classes = len(id2label) or hf.get("num_labels", 19)
    config = MiTConfig(
        hidden_sizes=tuple(hf["hidden_sizes"]),
        depths=tuple(hf["depths"]),
        num_heads=tuple(hf["num_attention_heads"]),
        sr_ratios=tuple(hf["sr_ratios"]),
        patch_sizes=tuple(hf["patch_sizes"]),
        strides=tuple(hf["strides"]),
        mlp_ratio=int(hf["mlp_ratios"][0]),
        decoder_hidden_size=int(hf["decoder_hidden_size"]),
        num_classes=num_classes,
        head="mlp",
        layer_norm_eps=1e-5,  # transformers builds its LayerNorms with the default eps, whatever config.json says
    )
    model = SegFormer(config)
    state = huggingface_to_ours(_read_tensors(weights))
    load_state_dict_strict(model, state, f"{weights} (Hugging Face layout)")
    names = [id2label[str(i)] for i in range(num_classes)] if id2label else None
    return LoadedSegFormer(model, _labels_for(num_classes, names), "huggingface", weights)


_HF_RULES = [
    (r"segformer\.encoder\.patch_embeddings\.(\d)\.proj\.", r"encoder.stages.\1.patch_embed.proj."),
    (r"segformer\.encoder\.patch_embeddings\.(\d)\.layer_norm\.", r"encoder.stages.\1.patch_embed.norm."),
    (r"segformer\.encoder\.block\.(\d)\.(\d+)\.attention\.self\.query\.", r"encoder.stages.\1.blocks.\2.attn.q."),
    (r"segformer\.encoder\.block\.(\d)\.(\d+)\.attention\.self\.key\.", r"encoder.stages.\1.blocks.\2.attn.k."),
    (r"segformer\.encoder\.block\.(\d)\.(\d+)\.attention\.self\.value\.", r"encoder.stages.\1.blocks.\2.attn.v."),
    (r"segformer\.encoder\.block\.(\d)\.(\d+)\.attention\.self\.sr\.", r"encoder.stages.\1.blocks.\2.attn.sr."),
    (
        r"segformer\.encoder\.block\.(\d)\.(\d+)\.attention\.self\.layer_norm\.",
        r"encoder.stages.\1.blocks.\2.attn.sr_norm.",
    ),
    (r"segformer\.encoder\.block\.(\d)\.(\d+)\.attention\.output\.dense\.", r"encoder.stages.\1.blocks.\2.attn.proj."),
    (r"segformer\.encoder\.block\.(\d)\.(\d+)\.layer_norm_1\.", r"encoder.stages.\1.blocks.\2.norm1."),
    (r"segformer\.encoder\.block\.(\d)\.(\d+)\.layer_norm_2\.", r"encoder.stages.\1.blocks.\2.norm2."),
    (r"segformer\.encoder\.block\.(\d)\.(\d+)\.mlp\.dense1\.", r"encoder.stages.\1.blocks.\2.ffn.fc1."),
    (r"segformer\.encoder\.block\.(\d)\.(\d+)\.mlp\.dwconv\.dwconv\.", r"encoder.stages.\1.blocks.\2.ffn.dwconv."),
    (r"segformer\.encoder\.block\.(\d)\.(\d+)\.mlp\.dense2\.", r"encoder.stages.\1.blocks.\2.ffn.fc2."),
    (r"segformer\.encoder\.layer_norm\.(\d)\.", r"encoder.stages.\1.norm."),
    (r"decode_head\.linear_c\.(\d)\.proj\.", r"head.proj.\1."),
    (r"decode_head\.linear_fuse\.", r"head.fuse."),
    (r"decode_head\.batch_norm\.", r"head.bn."),
    (r"decode_head\.classifier\.", r"head.classifier."),
]


def _rename(state: dict[str, torch.Tensor], rules: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Rename keys by the first matching rule; keys no rule matches are kept (and reported as unexpected)."""
    compiled = [(re.compile("^" + pattern), target) for pattern, target in rules]
    renamed = {}
    for key, value in state.items():
        for pattern, target in compiled:
            new_key, hits = pattern.subn(target, key)
            if hits:
                renamed[new_key] = value
                break
        else:
            renamed[key] = value
    return renamed


def huggingface_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renamed = _rename(state, _HF_RULES)
    # The head projections are nn.Linear in transformers; ours are 1x1 convs on the feature map.
    for key, value in renamed.items():
        if re.match(r"head\.proj\.\d\.weight$", key) and value.dim() == 2:
            renamed[key] = value[:, :, None, None]
    return renamed


# --- mmseg / Segformer++ layout ------------------------------------------------------------------------------------

_MMSEG_RULES = [
    (r"backbone\.layers\.(\d)\.0\.projection\.", r"encoder.stages.\1.patch_embed.proj."),
    (r"backbone\.layers\.(\d)\.0\.norm\.", r"encoder.stages.\1.patch_embed.norm."),
    (r"backbone\.layers\.(\d)\.1\.(\d+)\.norm1\.", r"encoder.stages.\1.blocks.\2.norm1."),
    (r"backbone\.layers\.(\d)\.1\.(\d+)\.norm2\.", r"encoder.stages.\1.blocks.\2.norm2."),
    (r"backbone\.layers\.(\d)\.1\.(\d+)\.attn\.attn\.out_proj\.", r"encoder.stages.\1.blocks.\2.attn.proj."),
    (r"backbone\.layers\.(\d)\.1\.(\d+)\.attn\.attn\.in_proj_", r"encoder.stages.\1.blocks.\2.attn.in_proj_"),
    (r"backbone\.layers\.(\d)\.1\.(\d+)\.attn\.sr\.", r"encoder.stages.\1.blocks.\2.attn.sr."),
    (r"backbone\.layers\.(\d)\.1\.(\d+)\.attn\.norm\.", r"encoder.stages.\1.blocks.\2.attn.sr_norm."),
    (r"backbone\.layers\.(\d)\.1\.(\d+)\.ffn\.layers\.0\.", r"encoder.stages.\1.blocks.\2.ffn.fc1."),
    (r"backbone\.layers\.(\d)\.1\.(\d+)\.ffn\.layers\.1\.", r"encoder.stages.\1.blocks.\2.ffn.dwconv."),
    (r"backbone\.layers\.(\d)\.1\.(\d+)\.ffn\.layers\.4\.", r"encoder.stages.\1.blocks.\2.ffn.fc2."),
    (r"backbone\.layers\.(\d)\.2\.", r"encoder.stages.\1.norm."),
    (r"decode_head\.convs\.(\d)\.conv\.", r"head.proj.\1.conv."),
    (r"decode_head\.convs\.(\d)\.bn\.", r"head.proj.\1.bn."),
    (r"decode_head\.fusion_conv\.conv\.", r"head.fuse."),
    (r"decode_head\.fusion_conv\.bn\.", r"head.bn."),
    (r"decode_head\.conv_seg\.", r"head.classifier."),
]


def mmseg_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an mmseg SegFormer state dict; split packed attention, flatten 1x1 Mix-FFN convs to linears."""
    renamed = _rename(state, _MMSEG_RULES)
    result = {}
    for key, value in renamed.items():
        packed = re.match(r"(.*\.attn)\.in_proj_(weight|bias)$", key)
        if packed:
            for name, part in zip(("q", "k", "v"), value.chunk(3, dim=0)):
                result[f"{packed.group(1)}.{name}.{packed.group(2)}"] = part
        elif re.search(r"\.ffn\.fc[12]\.weight$", key) and value.dim() == 4:
            result[key] = value.flatten(1)
        else:
            result[key] = value
    return result


def ours_to_mmseg(state: Mapping[str, torch.Tensor], backbone_only: bool = False) -> dict[str, torch.Tensor]:
    """Our keys -> mmseg/mmpose keys (the inverse of ``mmseg_to_ours``, for writing ``.pth`` files): q/k/v packed
    into ``in_proj_*``, Mix-FFN linears as 1x1 convs. ``backbone_only`` leaves non-encoder keys as they are (the
    pose head already uses mmpose's names)."""
    rules = [rule for rule in _inverse_rules(_MMSEG_RULES) if not backbone_only or rule[1].startswith("backbone.")]
    staged: dict[str, torch.Tensor] = {}
    packed: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        split = re.match(r"(encoder\..*\.attn)\.([qkv])\.(weight|bias)$", key)
        if split:
            packed.setdefault(f"{split.group(1)}.in_proj_{split.group(3)}", {})[split.group(2)] = value
            continue
        if re.search(r"\.ffn\.fc[12]\.weight$", key) and value.dim() == 2:
            value = value[:, :, None, None]
        staged[key] = value
    for key, parts in packed.items():
        staged[key] = torch.cat([parts[name] for name in "qkv"], dim=0)
    return _rename(staged, rules)


def _inverse_rules(rules: list[tuple[str, str]]) -> list[tuple[str, str]]:
    r"""Swap pattern and target of renaming rules whose groups are ``(\d)``/``(\d+)`` used in order."""
    inverse = []
    for pattern, target in rules:
        groups = re.findall(r"\(\\d\+?\)", pattern)
        pieces = re.split(r"\\(\d)", target)  # literal, group number, literal, ...
        inverse_pattern = "".join(
            re.escape(piece) if i % 2 == 0 else groups[int(piece) - 1] for i, piece in enumerate(pieces)
        )
        numbers = iter(range(1, len(groups) + 1))
        inverse_target = re.sub(r"\(\\d\+?\)", lambda _: f"\\{next(numbers)}", pattern).replace("\\.", ".")
        inverse.append((inverse_pattern, inverse_target))
    return inverse


def unwrap_state_dict(checkpoint: object, source: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a loaded ``.pth``: a bare state dict or an mmseg/mmpose ``state_dict`` wrapper."""
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, Mapping) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise CheckpointError(f"checkpoint {source} holds no state dict (expected tensors or a 'state_dict' wrapper)")
    return {k.removeprefix("module."): v for k, v in checkpoint.items()}


def infer_mmseg_size(state: dict[str, torch.Tensor]) -> str:
    """Recognise B0..B5 from the stage widths and depths of an mmseg state dict."""
    widths = tuple(state[f"backbone.layers.{i}.0.projection.weight"].shape[0] for i in range(4) if f"backbone.layers.{i}.0.projection.weight" in state)
    depths = tuple(
        len({m.group(1) for k in state if (m := re.match(rf"backbone\.layers\.{i}\.1\.(\d+)\.", k))}) for i in range(4)
    )
    for name in ("b0", "b1", "b2", "b3", "b4", "b5"):
        config = mit_config(name)
        if config.hidden_sizes == widths and config.depths == depths:
            return name
    raise CheckpointError(f"cannot recognise the MiT size (widths {widths}, depths {depths}); pass size=segformer-bN")


def _load_mmseg(path: Path, size: str | None, num_classes: int | None) -> LoadedSegFormer:
    raw = unwrap_state_dict(_read_tensors(path), path)
    if not any(k.startswith("backbone.layers.") for k in raw):
        raise CheckpointError(
            f"checkpoint {path}: no 'backbone.layers.*' keys; neither the mmseg nor the Hugging Face layout "
            f"(first keys: {', '.join(sorted(raw)[:5])})"
        )
    size = size or infer_mmseg_size(raw)
    classifier = raw.get("decode_head.conv_seg.weight")
    fuse = raw.get("decode_head.fusion_conv.conv.weight")
    config = mit_config(
        size,
        num_classes=num_classes or (classifier.shape[0] if classifier is not None else 19),
        decoder_hidden_size=fuse.shape[0] if fuse is not None else mit_config(size).decoder_hidden_size,
        head="mmseg",
        layer_norm_eps=1e-6,
    )
    model = SegFormer(config)
    load_state_dict_strict(model, mmseg_to_ours(raw), f"{path} (mmseg layout, {size})")
    return LoadedSegFormer(model, _labels_for(config.num_classes, None), "mmseg", path)


def _labels_for(num_classes: int, names: list[str] | None) -> LabelSet:
    known = known_label_set(num_classes)
    if known is not None and (names is None or [n.lower() for n in names] == [n.lower() for n in known.classes]):
        return known
    if names is not None:
        base = known or generic(num_classes)
        return LabelSet(name="custom", classes=tuple(names), palette=base.palette, person_ids=tuple(
            i for i, n in enumerate(names) if n.lower() in ("person", "rider", "pedestrian")
        ))
    return known or generic(num_classes)
