"""Load Mask2Former and PRO-SCALE checkpoints from local files, detecting their format.

Formats (nothing is ever downloaded):

* ``huggingface``: the hub layout of ``facebook/mask2former-*`` (transformers' ``save_pretrained``): a folder with
  ``config.json`` and ``model.safetensors`` or ``pytorch_model.bin``. Keys are ``model.<our name>`` plus
  ``class_predictor.*``: our module tree mirrors transformers', so only the prefix goes (and transformers' loss
  buffer ``criterion.empty_weight``). The config comes from ``Mask2FormerConfig.from_hf_dict``.
* ``detectron2``: a ``.pth`` (torch pickle, loaded with ``weights_only``) or ``.pkl`` (plain pickle of numpy arrays,
  read by an unpickler that admits nothing but arrays and containers) of Mask2Former or PRO-SCALE, weights under
  ``"model"``. Keys are mapped to ours by the rules of ``../shared/docs/proscale.md`` section 3: the pixel decoder
  (``sem_seg_head.pixel_decoder.*``), the masked-attention decoder (``sem_seg_head.predictor.*``, self-attention
  ``in_proj`` split into q/k/v), the Swin (``qkv`` split into query/key/value) or ResNet-50 backbone (``backbone.*``).
  The config is read off the weights' shapes: backbone kind and sizes, classes, queries, widths, layer counts, and
  PRO-SCALE (a ``token_excite`` gate, encoder layers on 1/2/3 levels -> the schedule). What shapes cannot tell
  keeps Mask2Former's published value (``pre_norm`` False, ResNet stride in the 3x3 conv, TRC temperature 0.1) and
  can be overridden.

Buffers whose values follow from the shapes (Swin's ``relative_position_index``, BatchNorm's ``num_batches_tracked``,
which detectron2's FrozenBN lacks) are taken from the model when a file has none. Every other mismatch raises
``CheckpointError`` listing the missing keys, unexpected keys and shape conflicts.
"""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from segmerge_ros.models.checkpoint_errors import CheckpointError, load_state_dict_strict
from segmerge_ros.models.segformer.checkpoints import HF_WEIGHT_FILES, _labels_for, _read_tensors, _rename
from segmerge_ros.models.labels import LabelSet
from segmerge_ros.models.mask2former.model import (ENCODER_POINTS, NUM_LEVELS, SEGMERGE_CHECKPOINT_FORMAT, Mask2Former, Mask2FormerConfig,
                          mask2former_config)
from segmerge_ros.models.backbones.resnet import ResNetConfig
from segmerge_ros.models.backbones.swin import SwinConfig

FORMATS = ("huggingface", "detectron2")
# Buffers fixed by the architecture: filled from the model where a checkpoint does not carry them.
DERIVED_BUFFERS = (".relative_position_index", ".num_batches_tracked")
# transformers' loss weights and detectron2's normalisation constants: not model weights here (the engine normalises).
IGNORED_KEYS = ("criterion.empty_weight", "pixel_mean", "pixel_std")


@dataclass
class LoadedMask2Former:
    model: Mask2Former
    labels: LabelSet
    format: str  # one of FORMATS
    source: Path


def is_mask2former_name(name: str) -> bool:
    """Whether ``name`` is a model name ``mask2former_config`` knows (``mask2former-<backbone>[-proscale]``)."""
    try:
        mask2former_config(name)
    except ValueError:
        return False
    return True


def load_mask2former(path: str | Path, config: Mask2FormerConfig | None = None, expect: str | None = None,
                     **overrides) -> LoadedMask2Former:
    """Load a Mask2Former / PRO-SCALE checkpoint (hub folder or its files, detectron2 ``.pth``/``.pkl``).

    ``config`` replaces the one read from ``config.json`` or the weights; ``overrides`` change fields of the read
    one (e.g. ``trc_temperature``, ``pre_norm``). ``expect``, a model name such as ``mask2former-swin-t-proscale``,
    makes a checkpoint of another backbone kind or encoder a CheckpointError (sizes come from the checkpoint). The
    model is returned in eval mode.
    """
    path = Path(path)
    kind = detect_format(path)
    if kind == "huggingface":
        folder = path if path.is_dir() else path.parent
        weights, state = _read_huggingface(folder)
        hf_config = json.loads((folder / "config.json").read_text())
        try:
            if config is None and hf_config.get("format") == SEGMERGE_CHECKPOINT_FORMAT:  # segmerge-train's own
                config = replace(Mask2FormerConfig.from_dict(hf_config["mask2former"]), **overrides)
            config = config or Mask2FormerConfig.from_hf_dict(hf_config, **overrides)
        except (ValueError, TypeError, KeyError) as error:
            raise CheckpointError(f"checkpoint {folder / 'config.json'}: {error}") from error
        state, source = mask2former_hub_to_ours(state), f"{weights} (Hugging Face layout)"
    else:
        weights, raw = path, read_detectron2(path)
        state = mask2former_detectron2_to_ours(raw)
        config = config or config_from_detectron2(raw, source=path, **overrides)
        source = f"{path} (detectron2 layout, {config.backbone} backbone, {config.encoder} encoder)"
    if expect is not None:
        named = mask2former_config(expect)
        if (named.backbone, named.encoder) != (config.backbone, config.encoder):
            raise CheckpointError(f"model {expect} has a {named.backbone} backbone and the {named.encoder} encoder, "
                                  f"but checkpoint {source} holds a {config.backbone} backbone and the "
                                  f"{config.encoder} encoder")
    model = Mask2Former(config)
    load_state_dict_strict(model, with_derived_buffers(state, model), source)
    return LoadedMask2Former(model.eval(), _labels_for(config.num_classes, _names(config)), kind, weights)


def detect_format(path: Path) -> str:
    """'huggingface' (a folder with config.json, or a file in one) or 'detectron2' (.pth/.pkl with
    ``sem_seg_head.*`` keys); CheckpointError for a missing path or anything else."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    folder = path if path.is_dir() else path.parent
    if path.is_dir() or path.name in (*HF_WEIGHT_FILES, "config.json"):
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"checkpoint folder {folder} has no config.json (Hugging Face hub layout expected; "
                                  "detectron2 checkpoints are single .pth/.pkl files)")
        return "huggingface"
    if path.suffix in (".pth", ".pt", ".pkl"):
        return "detectron2"
    raise CheckpointError(f"checkpoint {path}: unknown format (expected a Hugging Face hub folder or a detectron2 "
                          ".pth/.pkl)")


def _names(config: Mask2FormerConfig) -> list[str] | None:
    return list(config.class_names) if config.class_names else None


def with_derived_buffers(state: Mapping[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``state`` plus the model's own values of the DERIVED_BUFFERS it lacks."""
    filled = dict(state)
    for key, value in model.state_dict().items():
        if key not in filled and key.endswith(DERIVED_BUFFERS):
            filled[key] = value
    return filled


# --- Hugging Face hub layout ---------------------------------------------------------------------------------------


def _read_huggingface(folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    weights = next((folder / name for name in HF_WEIGHT_FILES if (folder / name).is_file()), None)
    if weights is None:
        raise CheckpointError(f"checkpoint folder {folder} has none of {', '.join(HF_WEIGHT_FILES)}")
    return weights, _read_tensors(weights)


def mask2former_hub_to_ours(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' ``Mask2FormerForUniversalSegmentation`` keys -> ours: ``model.`` removed, the loss buffer
    dropped; anything else is kept as it is (and reported by the strict load if it does not fit)."""
    return {key.removeprefix("model."): value for key, value in state.items() if key not in IGNORED_KEYS}


# --- detectron2 layout ---------------------------------------------------------------------------------------------


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles detectron2 ``.pkl`` checkpoints: numpy arrays, scalars and containers, nothing executable."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} (only numpy arrays are expected)")
        return super().find_class(module, name)


def read_detectron2(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a detectron2 checkpoint: ``"model"`` of a ``.pth`` or ``.pkl`` (or a bare state dict)."""
    if path.suffix == ".pkl":
        try:
            with path.open("rb") as file:
                checkpoint = _ArrayUnpickler(file, encoding="latin1").load()
        except Exception as error:  # corrupt, truncated, or holding more than arrays
            raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error
    else:
        checkpoint = _read_tensors(path)
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("model"), Mapping):
        checkpoint = checkpoint["model"]
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"checkpoint {path} holds {type(checkpoint).__name__}, not a detectron2 state dict")
    state = {}
    for key, value in checkpoint.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.array(value))  # a writable copy; keeps 0-d shapes (ascontiguousarray does not)
        if isinstance(value, torch.Tensor):
            state[key.removeprefix("module.")] = value
    if not any(key.startswith("sem_seg_head.") for key in state):
        raise CheckpointError(f"checkpoint {path}: no 'sem_seg_head.*' keys, so not a detectron2 Mask2Former "
                              f"(first keys: {', '.join(sorted(state)[:5]) or 'none'})")
    return state


_PIXEL = r"sem_seg_head\.pixel_decoder\."
_PREDICTOR = r"sem_seg_head\.predictor\."
_PIXEL_OURS = "pixel_level_module.decoder."
_DECODER_OURS = "transformer_module.decoder."

_DETECTRON2_DECODER_RULES = [
    (_PIXEL + r"input_proj\.(\d)\.", _PIXEL_OURS + r"input_projections.\1."),
    (_PIXEL + r"transformer\.level_embed$", _PIXEL_OURS + "level_embed"),
    (_PIXEL + r"transformer\.encoder\.layers\.(\d+)\.self_attn\.", _PIXEL_OURS + r"encoder.layers.\1.self_attn."),
    (_PIXEL + r"transformer\.encoder\.layers\.(\d+)\.linear1\.", _PIXEL_OURS + r"encoder.layers.\1.fc1."),
    (_PIXEL + r"transformer\.encoder\.layers\.(\d+)\.linear2\.", _PIXEL_OURS + r"encoder.layers.\1.fc2."),
    (_PIXEL + r"transformer\.encoder\.layers\.(\d+)\.norm1\.",
     _PIXEL_OURS + r"encoder.layers.\1.self_attn_layer_norm."),
    (_PIXEL + r"transformer\.encoder\.layers\.(\d+)\.norm2\.", _PIXEL_OURS + r"encoder.layers.\1.final_layer_norm."),
    (_PIXEL + r"transformer\.encoder\.token_excite\.ops\.", _PIXEL_OURS + "encoder.token_excite.ops."),
    (_PIXEL + r"adapter_1\.weight$", _PIXEL_OURS + "adapter_1.0.weight"),
    (_PIXEL + r"adapter_1\.norm\.", _PIXEL_OURS + "adapter_1.1."),
    (_PIXEL + r"layer_1\.weight$", _PIXEL_OURS + "layer_1.0.weight"),
    (_PIXEL + r"layer_1\.norm\.", _PIXEL_OURS + "layer_1.1."),
    (_PIXEL + r"mask_features\.", _PIXEL_OURS + "mask_projection."),
    (_PREDICTOR + r"query_feat\.", "transformer_module.queries_features."),
    (_PREDICTOR + r"query_embed\.", "transformer_module.queries_embedder."),
    (_PREDICTOR + r"level_embed\.", "transformer_module.level_embed."),
    (_PREDICTOR + r"decoder_norm\.", _DECODER_OURS + "layernorm."),
    (_PREDICTOR + r"mask_embed\.layers\.(\d)\.", _DECODER_OURS + r"mask_predictor.mask_embedder.\1.0."),
    (_PREDICTOR + r"transformer_self_attention_layers\.(\d+)\.self_attn\.",
     _DECODER_OURS + r"layers.\1.self_attn."),  # in_proj_* split below
    (_PREDICTOR + r"transformer_self_attention_layers\.(\d+)\.norm\.",
     _DECODER_OURS + r"layers.\1.self_attn_layer_norm."),
    (_PREDICTOR + r"transformer_cross_attention_layers\.(\d+)\.multihead_attn\.",
     _DECODER_OURS + r"layers.\1.cross_attn."),
    (_PREDICTOR + r"transformer_cross_attention_layers\.(\d+)\.norm\.",
     _DECODER_OURS + r"layers.\1.cross_attn_layer_norm."),
    (_PREDICTOR + r"transformer_ffn_layers\.(\d+)\.linear1\.", _DECODER_OURS + r"layers.\1.fc1."),
    (_PREDICTOR + r"transformer_ffn_layers\.(\d+)\.linear2\.", _DECODER_OURS + r"layers.\1.fc2."),
    (_PREDICTOR + r"transformer_ffn_layers\.(\d+)\.norm\.", _DECODER_OURS + r"layers.\1.final_layer_norm."),
    (_PREDICTOR + r"class_embed\.", "class_predictor."),
]

_BACKBONE = "pixel_level_module.encoder."
_SWIN_BLOCK = r"backbone\.layers\.(\d)\.blocks\.(\d+)\."
_SWIN_BLOCK_OURS = _BACKBONE + r"encoder.layers.\1.blocks.\2."
_DETECTRON2_SWIN_RULES = [
    (r"backbone\.patch_embed\.proj\.", _BACKBONE + "embeddings.patch_embeddings.projection."),
    (r"backbone\.patch_embed\.norm\.", _BACKBONE + "embeddings.norm."),
    (_SWIN_BLOCK + r"norm1\.", _SWIN_BLOCK_OURS + "layernorm_before."),
    (_SWIN_BLOCK + r"attn\.relative_position_", _SWIN_BLOCK_OURS + "attention.self.relative_position_"),
    (_SWIN_BLOCK + r"attn\.qkv\.", _SWIN_BLOCK_OURS + "attention.self.qkv."),  # split below
    (_SWIN_BLOCK + r"attn\.proj\.", _SWIN_BLOCK_OURS + "attention.output.dense."),
    (_SWIN_BLOCK + r"norm2\.", _SWIN_BLOCK_OURS + "layernorm_after."),
    (_SWIN_BLOCK + r"mlp\.fc1\.", _SWIN_BLOCK_OURS + "intermediate.dense."),
    (_SWIN_BLOCK + r"mlp\.fc2\.", _SWIN_BLOCK_OURS + "output.dense."),
    (r"backbone\.layers\.(\d)\.downsample\.", _BACKBONE + r"encoder.layers.\1.downsample."),
    *((rf"backbone\.norm{i}\.", _BACKBONE + f"hidden_states_norms.stage{i + 1}.") for i in range(4)),
]

_RESNET_STAGE_OURS = _BACKBONE + "encoder.stages.{stage}.layers.\\1."
_DETECTRON2_RESNET_RULES = [
    (r"backbone\.stem\.conv1\.weight$", _BACKBONE + "embedder.embedder.convolution.weight"),
    (r"backbone\.stem\.conv1\.norm\.", _BACKBONE + "embedder.embedder.normalization."),
    *(rule for stage in range(4) for rule in (
        (rf"backbone\.res{stage + 2}\.(\d+)\.shortcut\.weight$",
         _RESNET_STAGE_OURS.format(stage=stage) + "shortcut.convolution.weight"),
        (rf"backbone\.res{stage + 2}\.(\d+)\.shortcut\.norm\.",
         _RESNET_STAGE_OURS.format(stage=stage) + "shortcut.normalization."),
        *((rf"backbone\.res{stage + 2}\.(\d+)\.conv{conv + 1}\.weight$",
           _RESNET_STAGE_OURS.format(stage=stage) + f"layer.{conv}.convolution.weight") for conv in range(3)),
        *((rf"backbone\.res{stage + 2}\.(\d+)\.conv{conv + 1}\.norm\.",
           _RESNET_STAGE_OURS.format(stage=stage) + f"layer.{conv}.normalization.") for conv in range(3)),
    )),
]

# Packed projections detectron2 stores in one tensor and transformers (so we) in three, rows in this order.
_PACKED = [
    (re.compile(r"(transformer_module\.decoder\.layers\.\d+\.self_attn)\.in_proj_(weight|bias)$"),
     ("q_proj", "k_proj", "v_proj")),
    (re.compile(r"(pixel_level_module\.encoder\.encoder\.layers\.\d\.blocks\.\d+\.attention\.self)\.qkv\.(weight|bias)$"),
     ("query", "key", "value")),
]


def mask2former_detectron2_to_ours(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """detectron2 Mask2Former / PRO-SCALE keys -> ours (proscale.md section 3); keys no rule matches are kept, so a
    strict load reports them as unexpected."""
    state = {key: value for key, value in state.items() if key not in IGNORED_KEYS}
    renamed = _rename(state, _DETECTRON2_DECODER_RULES + _DETECTRON2_SWIN_RULES + _DETECTRON2_RESNET_RULES)
    result = {}
    for key, value in renamed.items():
        for pattern, names in _PACKED:
            packed = pattern.match(key)
            if packed:
                if value.shape[0] % 3:
                    raise CheckpointError(f"{key}: packed projection of {value.shape[0]} rows is not 3 equal parts")
                for name, part in zip(names, value.chunk(3, dim=0)):
                    result[f"{packed.group(1)}.{name}.{packed.group(2)}"] = part
                break
        else:
            result[key] = value
    return result


def _count(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    """How many distinct values the one group of ``pattern`` takes over the keys."""
    compiled = re.compile(pattern)
    return len({match.group(1) for key in state if (match := compiled.match(key))})


def _shape(state: Mapping[str, torch.Tensor], key: str, source: str | Path) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"checkpoint {source} (detectron2 layout) has no {key}, so its configuration cannot "
                              "be read off the weights")
    return tuple(state[key].shape)


def config_from_detectron2(state: Mapping[str, torch.Tensor], source: str | Path = "<state dict>",
                           **overrides) -> Mask2FormerConfig:
    """The Mask2FormerConfig of a detectron2 state dict, read off its shapes (module docstring)."""
    def shape(key: str) -> tuple[int, ...]:
        return _shape(state, key, source)

    pixel, predictor = "sem_seg_head.pixel_decoder.", "sem_seg_head.predictor."
    if "backbone.patch_embed.proj.weight" in state:
        depths = tuple(_count(state, rf"backbone\.layers\.{i}\.blocks\.(\d+)\.") for i in range(4))
        tables = [shape(f"backbone.layers.{i}.blocks.0.attn.relative_position_bias_table") for i in range(4)]
        window = int(round(tables[0][0] ** 0.5) + 1) // 2
        backbone = {"backbone": "swin", "swin": SwinConfig(
            embed_dim=shape("backbone.patch_embed.proj.weight")[0], depths=depths,
            num_heads=tuple(table[1] for table in tables), window_size=window,
            qkv_bias="backbone.layers.0.blocks.0.attn.qkv.bias" in state)}
    elif "backbone.stem.conv1.weight" in state:
        depths = tuple(_count(state, rf"backbone\.res{i + 2}\.(\d+)\.conv1\.weight$") for i in range(4))
        backbone = {"backbone": "resnet", "resnet": ResNetConfig(
            embedding_size=shape("backbone.stem.conv1.weight")[0],
            hidden_sizes=tuple(shape(f"backbone.res{i + 2}.0.conv3.weight")[0] for i in range(4)), depths=depths)}
    else:
        raise CheckpointError(f"checkpoint {source}: unknown detectron2 backbone (neither Swin 'backbone.patch_embed.*' "
                              "nor ResNet 'backbone.stem.*' keys)")
    encoder_layers = _count(state, rf"{re.escape(pixel)}transformer\.encoder\.layers\.(\d+)\.")
    if encoder_layers == 0:
        raise CheckpointError(f"checkpoint {source}: no pixel-decoder encoder layers "
                              f"({pixel}transformer.encoder.layers.*)")
    # attention_weights rows = heads x levels x points; the last layer always sees all levels.
    rows = [shape(f"{pixel}transformer.encoder.layers.{i}.self_attn.attention_weights.weight")[0]
            for i in range(encoder_layers)]
    heads = rows[-1] // (NUM_LEVELS * ENCODER_POINTS)
    levels = [count // (heads * ENCODER_POINTS) for count in rows]
    proscale = f"{pixel}transformer.encoder.token_excite.ops.weight" in state or min(levels) < NUM_LEVELS
    encoder: dict[str, Any] = {"encoder": "stock", "encoder_layers": encoder_layers}
    if proscale:
        schedule = tuple(levels.count(level) for level in range(1, NUM_LEVELS + 1))
        if levels != sorted(levels) or sum(schedule) != encoder_layers:
            raise CheckpointError(f"checkpoint {source}: PRO-SCALE encoder layers on {levels} levels; expected "
                                  "1-level, then 2-level, then 3-level layers")
        encoder.update(encoder="proscale", proscale_schedule=schedule)
    values = dict(
        backbone,
        **encoder,
        num_classes=shape(f"{predictor}class_embed.weight")[0] - 1,
        num_queries=shape(f"{predictor}query_feat.weight")[0],
        hidden_dim=shape(f"{predictor}query_feat.weight")[1],
        feature_size=shape(f"{pixel}input_proj.0.0.weight")[0],
        mask_feature_size=shape(f"{pixel}mask_features.weight")[0],
        num_attention_heads=heads,
        encoder_feedforward_dim=shape(f"{pixel}transformer.encoder.layers.0.linear1.weight")[0],
        num_decoder_layers=_count(state, rf"{re.escape(predictor)}transformer_ffn_layers\.(\d+)\."),
        decoder_feedforward_dim=shape(f"{predictor}transformer_ffn_layers.0.linear1.weight")[0],
    )
    values.update(overrides)
    try:
        return Mask2FormerConfig(**values)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {source}: unsupported configuration: {error}") from error
