"""Mask2Former (masked-attention mask transformer) in plain PyTorch, with Hugging Face parameter names.

``Mask2Former(config)(pixels, coarse_layers=0) -> Mask2FormerOutput(class_logits (B, Q, K+1), mask_logits
(B, Q, H/4, W/4))`` for ImageNet-normalised pixels; the outputs are those of the last decoder layer.

The module tree mirrors transformers' ``Mask2FormerForUniversalSegmentation`` with the leading ``model.`` removed, so
hub checkpoints load with a strict ``load_state_dict``:

- ``pixel_level_module.encoder``: the backbone (Swin ``models/backbones/swin.py``, ResNet ``models/backbones/resnet.py``, or our MiT
  ``models/segformer/model.py``), four maps at strides 4/8/16/32.
- ``pixel_level_module.decoder``: the multi-scale deformable-attention pixel decoder: ``input_projections``
  (1x1 conv + GroupNorm(32) of res5, res4, res3), ``level_embed``, ``encoder`` (``DeformableEncoder`` or PRO-SCALE's
  ``ProScaleEncoder``), one FPN level (``adapter_1`` lateral 1x1 conv + GN on res2, ``layer_1`` 3x3 conv + GN + ReLU,
  or PRO-SCALE's light pixel embedding), ``mask_projection`` (1x1 conv).
- ``transformer_module``: the masked-attention decoder (``queries_features``, ``queries_embedder``, ``level_embed``,
  ``decoder.layers.{i}`` cross-attention -> self-attention -> FFN, ``decoder.layernorm``,
  ``decoder.mask_predictor.mask_embedder``).
- ``class_predictor``: Linear(hidden, K + 1), the last class being "no object".

transformers' state dict also holds ``criterion.empty_weight`` (its training loss's class weights): not a model
weight, dropped when loading (H2's loaders).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from segmerge_ros.models.mask2former.deformable_attention import (
    KNOB_SETTINGS, DeformableEncoder, MultiScaleDeformableAttention, coarse_layers_for_rate, sine_position_embedding,
)
from segmerge_ros.models.mask2former.proscale import ProScaleEncoder, light_pixel_embedding
from segmerge_ros.models.backbones.resnet import RESNET_CONFIGS, ResNetBackbone, ResNetConfig
from segmerge_ros.models.segformer.model import MiTConfig, MixTransformer, mit_config
from segmerge_ros.models.backbones.swin import SWIN_CONFIGS, SwinBackbone, SwinConfig

BACKBONES = ("swin", "resnet", "mit")
ENCODERS = ("stock", "proscale")
NUM_LEVELS = 3  # res5, res4, res3 go through the deformable encoder and feed the decoder (fixed in Mask2Former)
ENCODER_POINTS = 4  # sampling points per head and level (fixed in Mask2Former and transformers)
GROUP_NORM_GROUPS = 32


# config.json "format" of the checkpoints segmerge-train mask2former writes: our keys, our config under "mask2former"
SEGMERGE_CHECKPOINT_FORMAT = "segmerge-mask2former"


@dataclass(frozen=True)
class Mask2FormerConfig:
    """Everything that fixes the shape of a Mask2Former.

    ``backbone`` picks which of ``swin`` / ``resnet`` / ``mit`` describes the backbone (the other two are ignored).
    Field names follow transformers' ``Mask2FormerConfig`` where one exists; ``num_decoder_layers`` is the number of
    masked-attention layers (transformers' and detectron2's ``decoder_layers``/``DEC_LAYERS`` count one more: the
    prediction from the initial queries).
    """

    backbone: str = "swin"
    swin: SwinConfig = field(default_factory=lambda: SWIN_CONFIGS["swin-t"])
    resnet: ResNetConfig = field(default_factory=lambda: RESNET_CONFIGS["r50"])
    mit: MiTConfig = field(default_factory=lambda: mit_config("b0"))
    num_classes: int = 133
    class_names: tuple[str, ...] | None = None  # id2label of a hub config, in class order
    num_queries: int = 100
    feature_size: int = 256  # pixel decoder width
    mask_feature_size: int = 256  # mask embedding width
    hidden_dim: int = 256  # transformer decoder width (must equal feature_size: see __post_init__)
    num_attention_heads: int = 8  # both the deformable encoder and the decoder
    encoder_layers: int = 6
    encoder_feedforward_dim: int = 1024
    num_decoder_layers: int = 9
    decoder_feedforward_dim: int = 2048
    pre_norm: bool = False
    encoder: str = "stock"  # "stock" (DeformableEncoder) or "proscale" (ProScaleEncoder + light pixel embedding)
    proscale_schedule: tuple[int, int, int] = (3, 3, 3)  # PRO-SCALE layers on 1, 2, 3 levels
    trc_temperature: float = 0.1  # PRO-SCALE token re-calibration temperature (released configs: 0.1)

    def __post_init__(self):
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown Mask2Former backbone {self.backbone!r}; choose one of {BACKBONES}")
        if self.encoder not in ENCODERS:
            raise ValueError(f"unknown Mask2Former pixel-decoder encoder {self.encoder!r}; choose one of {ENCODERS}")
        if self.hidden_dim != self.feature_size:
            # transformers builds the decoder's input projections in a plain list (not registered), so a checkpoint
            # never holds their weights; only the identity case is well defined.
            raise ValueError(f"hidden_dim ({self.hidden_dim}) must equal feature_size ({self.feature_size})")
        for name in ("feature_size", "mask_feature_size"):
            if getattr(self, name) % GROUP_NORM_GROUPS:
                raise ValueError(f"{name} ({getattr(self, name)}) must be a multiple of {GROUP_NORM_GROUPS} "
                                 "(GroupNorm groups)")
        if self.hidden_dim % self.num_attention_heads:
            raise ValueError(f"hidden_dim {self.hidden_dim} is not divisible by {self.num_attention_heads} heads")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")
        if len(self.proscale_schedule) != NUM_LEVELS or min(self.proscale_schedule) < 0:
            raise ValueError(f"proscale_schedule must be 3 layer counts >= 0, got {self.proscale_schedule}")

    @property
    def backbone_config(self) -> SwinConfig | ResNetConfig | MiTConfig:
        return getattr(self, self.backbone)

    @property
    def backbone_channels(self) -> tuple[int, int, int, int]:
        """Channels of the backbone's 1/4, 1/8, 1/16, 1/32 maps."""
        if self.backbone == "mit":
            return tuple(self.mit.hidden_sizes)
        return self.backbone_config.channels

    def to_dict(self) -> dict[str, Any]:
        """Every field as JSON-ready values (``from_dict`` reads it back): what our own checkpoints store."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Mask2FormerConfig":
        """The inverse of ``to_dict`` (JSON lists back to tuples, the backbone's sub-config rebuilt)."""
        def frozen(value):
            return tuple(frozen(v) for v in value) if isinstance(value, list) else value

        subs = {"swin": SwinConfig, "resnet": ResNetConfig, "mit": MiTConfig}
        fields = {key: frozen(value) for key, value in values.items() if key not in subs}
        return cls(**fields, **{key: kind(**{k: frozen(v) for k, v in values[key].items()})
                                for key, kind in subs.items() if values.get(key) is not None})

    @classmethod
    def from_hf_dict(cls, config: Mapping[str, Any], **overrides) -> "Mask2FormerConfig":
        """A hub ``config.json`` (transformers' ``Mask2FormerConfig.to_dict()``) as our config.

        Raises ValueError naming the field for layouts this implementation does not cover (timm backbones, other
        backbone types, absolute position embeddings, unregistered input projections, other strides).
        """
        def require(condition: bool, message: str) -> None:
            if not condition:
                raise ValueError(f"unsupported Mask2Former config.json: {message}")

        model_type = config.get("model_type", "mask2former")
        require(model_type == "mask2former", f"model_type {model_type!r} (expected 'mask2former')")
        require(not config.get("use_timm_backbone", False) and not config.get("backbone"),
                f"named/timm backbone {config.get('backbone')!r} (only an inline backbone_config is supported)")
        require(not config.get("enforce_input_projection", False),
                "enforce_input_projection=True (transformers registers no weights for those projections)")
        require(list(config.get("feature_strides", [4, 8, 16, 32])) == [4, 8, 16, 32],
                f"feature_strides {config.get('feature_strides')} (expected [4, 8, 16, 32])")
        require(config.get("common_stride", 4) == 4, f"common_stride {config.get('common_stride')} (expected 4)")
        require(config.get("activation_function", "relu") == "relu",
                f"activation_function {config.get('activation_function')!r} (expected 'relu')")

        # transformers' default backbone when none is given: Swin with depths (2, 2, 18, 2), embed 96, window 7.
        backbone = dict(config.get("backbone_config") or {
            "model_type": "swin", "embed_dim": 96, "depths": [2, 2, 18, 2], "num_heads": [3, 6, 12, 24],
            "window_size": 7, "use_absolute_embeddings": False})
        backbone_type = backbone.get("model_type")
        out_features = backbone.get("out_features") or ["stage1", "stage2", "stage3", "stage4"]
        require(list(out_features) == ["stage1", "stage2", "stage3", "stage4"],
                f"backbone out_features {out_features} (expected stage1..stage4)")
        require(backbone.get("num_channels", 3) == 3, f"backbone num_channels {backbone.get('num_channels')}")
        if backbone_type == "swin":
            require(not backbone.get("use_absolute_embeddings", False), "Swin use_absolute_embeddings=True")
            require(backbone.get("hidden_act", "gelu") == "gelu", f"Swin hidden_act {backbone.get('hidden_act')!r}")
            kind = {"backbone": "swin", "swin": SwinConfig(
                embed_dim=int(backbone.get("embed_dim", 96)),
                depths=tuple(backbone.get("depths", (2, 2, 6, 2))),
                num_heads=tuple(backbone.get("num_heads", (3, 6, 12, 24))),
                window_size=int(backbone.get("window_size", 7)),
                patch_size=int(backbone.get("patch_size", 4)),
                mlp_ratio=float(backbone.get("mlp_ratio", 4.0)),
                qkv_bias=bool(backbone.get("qkv_bias", True)),
                layer_norm_eps=float(backbone.get("layer_norm_eps", 1e-5)),
            )}
        elif backbone_type == "resnet":
            require(backbone.get("layer_type", "bottleneck") == "bottleneck",
                    f"ResNet layer_type {backbone.get('layer_type')!r} (expected 'bottleneck')")
            require(backbone.get("hidden_act", "relu") == "relu", f"ResNet hidden_act {backbone.get('hidden_act')!r}")
            require(not backbone.get("downsample_in_first_stage", False), "ResNet downsample_in_first_stage=True")
            kind = {"backbone": "resnet", "resnet": ResNetConfig(
                embedding_size=int(backbone.get("embedding_size", 64)),
                hidden_sizes=tuple(backbone.get("hidden_sizes", (256, 512, 1024, 2048))),
                depths=tuple(backbone.get("depths", (3, 4, 6, 3))),
                downsample_in_bottleneck=bool(backbone.get("downsample_in_bottleneck", False)),
            )}
        else:
            raise ValueError(f"unsupported Mask2Former config.json: backbone model_type {backbone_type!r} "
                             "(supported: 'swin', 'resnet')")

        id2label = config.get("id2label") or {}
        num_classes = len(id2label) if id2label else int(config.get("num_labels", 133))
        names = tuple(str(id2label[key]) for key in sorted(id2label, key=int)) if id2label else None
        values = dict(
            kind,
            num_classes=num_classes,
            class_names=names,
            num_queries=int(config.get("num_queries", 100)),
            feature_size=int(config.get("feature_size", 256)),
            mask_feature_size=int(config.get("mask_feature_size", 256)),
            hidden_dim=int(config.get("hidden_dim", 256)),
            num_attention_heads=int(config.get("num_attention_heads", 8)),
            encoder_layers=int(config.get("encoder_layers", 6)),
            encoder_feedforward_dim=int(config.get("encoder_feedforward_dim", 1024)),
            num_decoder_layers=int(config.get("decoder_layers", 10)) - 1,
            decoder_feedforward_dim=int(config.get("dim_feedforward", 2048)),
            pre_norm=bool(config.get("pre_norm", False)),
        )
        values.update(overrides)
        return cls(**values)


def mask2former_config(name: str, **overrides) -> Mask2FormerConfig:
    """A named Mask2Former: ``mask2former-<backbone>[-proscale]``.

    Backbones: ``swin-t``/``swin-s``/``swin-b``/``swin-l`` and ``r50``/``r101`` as the published checkpoints use them
    (133 COCO-panoptic classes unless overridden), ``mit-b0`` .. ``mit-b5`` (our MiT; 19 Cityscapes classes unless
    overridden). ``-proscale`` selects the PRO-SCALE encoder with the released (3, 3, 3) schedule.
    """
    key = name.lower()
    if not key.startswith("mask2former-"):
        raise ValueError(f"unknown Mask2Former name {name!r}; expected mask2former-<backbone>[-proscale]")
    key = key.removeprefix("mask2former-")
    values: dict[str, Any] = {}
    if key.endswith("-proscale"):
        key, values["encoder"] = key.removesuffix("-proscale"), "proscale"
    if key in SWIN_CONFIGS:
        values.update(backbone="swin", swin=SWIN_CONFIGS[key])
    elif key in RESNET_CONFIGS:
        values.update(backbone="resnet", resnet=RESNET_CONFIGS[key])
    elif key.startswith("mit-") and key.removeprefix("mit-") in ("b0", "b1", "b2", "b3", "b4", "b5"):
        values.update(backbone="mit", mit=mit_config(key), num_classes=19)
    else:
        known = [f"mask2former-{b}" for b in (*SWIN_CONFIGS, *RESNET_CONFIGS, "mit-b0", "...", "mit-b5")]
        raise ValueError(f"unknown Mask2Former backbone in {name!r}; choose one of {', '.join(known)} "
                         "(optionally with -proscale)")
    values.update(overrides)
    return Mask2FormerConfig(**values)


class Mask2FormerOutput(NamedTuple):
    class_logits: torch.Tensor  # (B, Q, K + 1), the last class is "no object"
    mask_logits: torch.Tensor  # (B, Q, H/4, W/4)


def build_backbone(config: Mask2FormerConfig) -> nn.Module:
    """The backbone module: ``forward(pixels) -> [1/4, 1/8, 1/16, 1/32]`` NCHW maps."""
    if config.backbone == "swin":
        return SwinBackbone(config.swin)
    if config.backbone == "resnet":
        return ResNetBackbone(config.resnet)
    return MixTransformer(config.mit)


def conv_group_norm(in_channels: int, out_channels: int, kernel_size: int, bias: bool, relu: bool) -> nn.Sequential:
    """Conv (same padding) + GroupNorm(32) [+ ReLU] as one Sequential (keys ``0.weight``, ``1.weight`` ...)."""
    layers = [nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias),
              nn.GroupNorm(GROUP_NORM_GROUPS, out_channels)]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)


def flatten_map(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C), row-major tokens."""
    return x.flatten(2).transpose(1, 2)


def level_position_embedding(height: int, width: int, channels: int, like: torch.Tensor) -> torch.Tensor:
    """(1, H*W, channels) sine position embedding of one level."""
    return flatten_map(sine_position_embedding(height, width, channels // 2, device=like.device, dtype=like.dtype))


class PixelDecoder(nn.Module):
    """Multi-scale deformable-attention pixel decoder: returns (mask_features at 1/4, [1/32, 1/16, 1/8] maps)."""

    def __init__(self, config: Mask2FormerConfig):
        super().__init__()
        width = config.feature_size
        channels = config.backbone_channels
        self.level_embed = nn.Parameter(torch.zeros(NUM_LEVELS, width))
        # Coarse to fine: res5, res4, res3.
        self.input_projections = nn.ModuleList(
            conv_group_norm(c, width, 1, bias=True, relu=False) for c in channels[:0:-1])
        self.encoder = build_pixel_encoder(config)
        self.mask_projection = nn.Conv2d(width, config.mask_feature_size, 1)
        self.adapter_1 = conv_group_norm(channels[0], width, 1, bias=False, relu=False)
        self.layer_1 = build_output_layer(config)

    def forward(self, features: list[torch.Tensor], coarse_layers: int = 0
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        coarse_to_fine = features[:0:-1]
        projected = [projection(x) for projection, x in zip(self.input_projections, coarse_to_fine)]
        shapes = [(x.shape[-2], x.shape[-1]) for x in projected]
        tokens = torch.cat([flatten_map(x) for x in projected], 1)
        pos = torch.cat([level_position_embedding(h, w, self.level_embed.shape[1], tokens) + self.level_embed[i]
                         for i, (h, w) in enumerate(shapes)], 1).expand(tokens.shape[0], -1, -1)
        encoded = self.encoder(tokens, pos, shapes, coarse_layers=coarse_layers)
        sizes = [h * w for h, w in shapes]
        levels = [part.transpose(1, 2).reshape(part.shape[0], -1, h, w)
                  for part, (h, w) in zip(torch.split(encoded, sizes, 1), shapes)]
        lateral = self.adapter_1(features[0])
        finest = lateral + F.interpolate(levels[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
        return self.mask_projection(self.layer_1(finest)), levels


def build_pixel_encoder(config: Mask2FormerConfig) -> nn.Module:
    """The deformable encoder of the pixel decoder: stock or PRO-SCALE."""
    if config.encoder == "proscale":
        return ProScaleEncoder(schedule=config.proscale_schedule, trc_temperature=config.trc_temperature,
                               d_model=config.feature_size, n_heads=config.num_attention_heads,
                               n_points=ENCODER_POINTS, ffn_dim=config.encoder_feedforward_dim)
    return DeformableEncoder(num_layers=config.encoder_layers, d_model=config.feature_size, n_levels=NUM_LEVELS,
                             n_heads=config.num_attention_heads, n_points=ENCODER_POINTS,
                             ffn_dim=config.encoder_feedforward_dim)


def build_output_layer(config: Mask2FormerConfig) -> nn.Module:
    """``layer_1``: 3x3 conv + GN + ReLU, or PRO-SCALE's light pixel embedding (max-pool + GN + ReLU)."""
    if config.encoder == "proscale":
        return light_pixel_embedding(config.feature_size)
    return conv_group_norm(config.feature_size, config.feature_size, 3, bias=False, relu=True)


class PixelLevelModule(nn.Module):
    def __init__(self, config: Mask2FormerConfig):
        super().__init__()
        self.encoder = build_backbone(config)
        self.decoder = PixelDecoder(config)

    def forward(self, pixels: torch.Tensor, coarse_layers: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.decoder(self.encoder(pixels), coarse_layers)


class QueryAttention(nn.Module):
    """Multi-head attention with transformers' separate ``q_proj``/``k_proj``/``v_proj``/``out_proj`` (the decoder's
    self-attention). Position embeddings go into queries and keys, not values."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        with_pos = x + pos
        out = attend(self.q_proj(with_pos), self.k_proj(with_pos), self.v_proj(x), self.num_heads, None)
        return self.out_proj(out)


class MaskedCrossAttention(nn.Module):
    """Cross-attention with ``nn.MultiheadAttention``'s parameter layout (``in_proj_weight`` = [Wq; Wk; Wv])."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                attend_mask: torch.Tensor) -> torch.Tensor:
        """attend_mask (B, 1, Q, S) bool: True where a query may look."""
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        out = attend(F.linear(queries, w_q, b_q), F.linear(keys, w_k, b_k), F.linear(values, w_v, b_v),
                     self.num_heads, attend_mask)
        return self.out_proj(out)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
           mask: torch.Tensor | None) -> torch.Tensor:
    """Scaled dot-product attention over (B, L, C) projections split into heads; returns (B, Lq, C)."""
    batch, length, dim = q.shape

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(batch, t.shape[1], num_heads, dim // num_heads).transpose(1, 2)

    out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask)
    return out.transpose(1, 2).reshape(batch, length, dim)


class MaskedAttentionDecoderLayer(nn.Module):
    """Masked cross-attention to one pixel-decoder level, self-attention among the queries, FFN (post- or pre-norm)."""

    def __init__(self, config: Mask2FormerConfig):
        super().__init__()
        dim = config.hidden_dim
        self.pre_norm = config.pre_norm
        self.self_attn = QueryAttention(dim, config.num_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.cross_attn = MaskedCrossAttention(dim, config.num_attention_heads)
        self.cross_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, config.decoder_feedforward_dim)
        self.fc2 = nn.Linear(config.decoder_feedforward_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(self, queries: torch.Tensor, query_pos: torch.Tensor, memory: torch.Tensor, memory_pos: torch.Tensor,
                attend_mask: torch.Tensor) -> torch.Tensor:
        def block(x: torch.Tensor, norm: nn.LayerNorm, update) -> torch.Tensor:
            return x + update(norm(x)) if self.pre_norm else norm(x + update(x))

        queries = block(queries, self.cross_attn_layer_norm,
                        lambda x: self.cross_attn(x + query_pos, memory + memory_pos, memory, attend_mask))
        queries = block(queries, self.self_attn_layer_norm, lambda x: self.self_attn(x, query_pos))
        return block(queries, self.final_layer_norm, lambda x: self.fc2(F.relu(self.fc1(x))))


class MaskPredictor(nn.Module):
    """3-layer MLP on the normalised queries; masks are its dot product with the per-pixel mask features."""

    def __init__(self, config: Mask2FormerConfig):
        super().__init__()
        dim = config.hidden_dim
        self.mask_embedder = nn.Sequential(
            nn.Sequential(nn.Linear(dim, dim), nn.ReLU()),
            nn.Sequential(nn.Linear(dim, dim), nn.ReLU()),
            nn.Sequential(nn.Linear(dim, config.mask_feature_size)),
        )

    def forward(self, normed_queries: torch.Tensor, mask_features: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bqc,bchw->bqhw", self.mask_embedder(normed_queries), mask_features)


def attention_mask_for(mask_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 1, Q, h*w) bool, True where a query may attend: its previous mask, resized to the level, has
    sigmoid >= 0.5. A query whose mask is empty at that level attends everywhere (as transformers/detectron2)."""
    resized = F.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False)
    attend = (resized.sigmoid() >= 0.5).flatten(2)
    return (attend | ~attend.any(-1, keepdim=True)).unsqueeze(1)


class MaskedAttentionDecoder(nn.Module):
    def __init__(self, config: Mask2FormerConfig):
        super().__init__()
        self.layers = nn.ModuleList(MaskedAttentionDecoderLayer(config) for _ in range(config.num_decoder_layers))
        self.layernorm = nn.LayerNorm(config.hidden_dim)
        self.mask_predictor = MaskPredictor(config)


class TransformerModule(nn.Module):
    """Learned queries refined by the masked-attention decoder over the three pixel-decoder levels in turn."""

    def __init__(self, config: Mask2FormerConfig):
        super().__init__()
        self.queries_embedder = nn.Embedding(config.num_queries, config.hidden_dim)
        self.queries_features = nn.Embedding(config.num_queries, config.hidden_dim)
        self.decoder = MaskedAttentionDecoder(config)
        self.level_embed = nn.Embedding(NUM_LEVELS, config.hidden_dim)

    def forward(self, levels: list[torch.Tensor], mask_features: torch.Tensor
                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """levels: [1/32, 1/16, 1/8] maps. Returns the normalised queries and mask logits of every prediction: the
        initial queries' and each decoder layer's (num_decoder_layers + 1; the last is the model's output). Each
        layer's mask is needed for the next layer's attention mask anyway, so keeping them costs nothing."""
        batch, dim = mask_features.shape[0], self.queries_features.weight.shape[1]
        sizes = [(x.shape[-2], x.shape[-1]) for x in levels]
        memories = [flatten_map(x) + self.level_embed.weight[i] for i, x in enumerate(levels)]
        memory_pos = [level_position_embedding(h, w, dim, mask_features) for h, w in sizes]
        query_pos = self.queries_embedder.weight.unsqueeze(0).expand(batch, -1, -1)
        queries = self.queries_features.weight.unsqueeze(0).expand(batch, -1, -1)
        decoder = self.decoder
        normed = [decoder.layernorm(queries)]
        mask_logits = [decoder.mask_predictor(normed[-1], mask_features)]
        for index, layer in enumerate(decoder.layers):
            level = index % NUM_LEVELS
            attend_mask = attention_mask_for(mask_logits[-1], sizes[level])
            queries = layer(queries, query_pos, memories[level], memory_pos[level], attend_mask)
            normed.append(decoder.layernorm(queries))
            mask_logits.append(decoder.mask_predictor(normed[-1], mask_features))
        return normed, mask_logits


class Mask2Former(nn.Module):
    """Backbone + pixel decoder + masked-attention decoder + class head (module docstring)."""

    def __init__(self, config: Mask2FormerConfig):
        super().__init__()
        self.config = config
        self.pixel_level_module = PixelLevelModule(config)
        self.transformer_module = TransformerModule(config)
        self.class_predictor = nn.Linear(config.hidden_dim, config.num_classes + 1)
        initialise_for_training(self)

    def forward(self, pixels: torch.Tensor, coarse_layers: int = 0) -> Mask2FormerOutput:
        """pixels (B, 3, H, W), ImageNet-normalised; ``coarse_layers``: the encoder knob (0 = the stock model)."""
        mask_features, levels = self.pixel_level_module(pixels, coarse_layers)
        normed_queries, mask_logits = self.transformer_module(levels, mask_features)
        return Mask2FormerOutput(self.class_predictor(normed_queries[-1]), mask_logits[-1])

    def forward_all_layers(self, pixels: torch.Tensor, coarse_layers: int = 0) -> list[Mask2FormerOutput]:
        """Every prediction, the initial queries' first and the output's last (num_decoder_layers + 1): the deep
        supervision targets of training (transformers' ``auxiliary_logits`` are all but the last)."""
        mask_features, levels = self.pixel_level_module(pixels, coarse_layers)
        normed_queries, mask_logits = self.transformer_module(levels, mask_features)
        return [Mask2FormerOutput(self.class_predictor(q), m) for q, m in zip(normed_queries, mask_logits)]


def deformable_attention_initial_offsets(attention: MultiScaleDeformableAttention) -> torch.Tensor:
    """Deformable DETR's starting sampling offsets (the bias of ``sampling_offsets``; its weight starts at 0):
    head h looks along the direction at angle 2*pi*h/heads, scaled so the larger coordinate is 1, point k at k+1
    times that step, the same on every level. Laid out heads x levels x points x 2 (x, y)."""
    heads, levels, points = attention.n_heads, attention.n_levels, attention.n_points
    angles = torch.arange(heads, dtype=torch.float32) * (2 * torch.pi / heads)
    directions = torch.stack([angles.cos(), angles.sin()], -1)
    directions = directions / directions.abs().max(-1, keepdim=True).values
    steps = torch.arange(1, points + 1, dtype=torch.float32)
    return (directions[:, None, None, :] * steps[None, None, :, None]).expand(heads, levels, points, 2).reshape(-1)


@torch.no_grad()
def initialise_for_training(model: Mask2Former) -> None:
    """Start the pixel decoder and the transformer decoder as Mask2Former's training recipe does (detectron2); the
    backbone keeps its own initialisation (it is meant to be loaded from a pretrained checkpoint).

    Pixel decoder: input projections Xavier-uniform, the FPN and mask-projection convs Kaiming-uniform (a=1, "C2
    Xavier"), biases 0, ``level_embed`` N(0, 1); encoder matrices Xavier-uniform, then each deformable attention's
    offsets from ``deformable_attention_initial_offsets``, its attention logits 0 (uniform weights over levels and
    points), value/output projections Xavier-uniform with bias 0. Transformer decoder: every layer's matrices
    Xavier-uniform and attention biases 0; the queries, their embeddings and the level embedding N(0, 1)
    (``nn.Embedding``'s own init), the class and mask heads PyTorch's Linear default.
    """
    decoder = model.pixel_level_module.decoder
    for projection in decoder.input_projections:
        nn.init.xavier_uniform_(projection[0].weight)
        nn.init.zeros_(projection[0].bias)
    for conv in [decoder.adapter_1[0], decoder.mask_projection] + [
            m for m in decoder.layer_1.modules() if isinstance(m, nn.Conv2d)]:
        nn.init.kaiming_uniform_(conv.weight, a=1)
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)
    nn.init.normal_(decoder.level_embed)
    for parameter in decoder.encoder.parameters():
        if parameter.dim() > 1:
            nn.init.xavier_uniform_(parameter)
    for attention in decoder.encoder.modules():
        if isinstance(attention, MultiScaleDeformableAttention):
            nn.init.zeros_(attention.sampling_offsets.weight)
            attention.sampling_offsets.bias.copy_(deformable_attention_initial_offsets(attention))
            nn.init.zeros_(attention.attention_weights.weight)
            nn.init.zeros_(attention.attention_weights.bias)
            for linear in (attention.value_proj, attention.output_proj):
                nn.init.xavier_uniform_(linear.weight)
                nn.init.zeros_(linear.bias)
    for parameter in model.transformer_module.decoder.layers.parameters():
        if parameter.dim() > 1:
            nn.init.xavier_uniform_(parameter)
    for attention in model.transformer_module.decoder.layers.modules():
        if isinstance(attention, (QueryAttention, MaskedCrossAttention)):  # nn.MultiheadAttention's zero biases
            for name, parameter in attention.named_parameters():
                if name.endswith("bias"):
                    nn.init.zeros_(parameter)


def knob_settings(model: Mask2Former) -> list[tuple[int, float]]:
    """(k, the smallest merge rate giving k) for every knob setting the rate mapping reaches, k = 0 first."""
    full = model.pixel_level_module.decoder.encoder.full_scale_layers
    settings: dict[int, float] = {}
    for rate, _ in KNOB_SETTINGS:
        settings.setdefault(coarse_layers_for_rate(rate, full), rate)
    return sorted(settings.items())
