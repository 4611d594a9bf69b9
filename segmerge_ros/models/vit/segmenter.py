"""Plain ViT encoder (patch 16) with the two Segmenter decoders (linear and mask transformer).

Parameter names follow the Segmenter layout (``encoder.*`` = timm's ViT names, ``decoder.*``) so that timm and
Segmenter checkpoints map onto this module with renames only (see ``models/vit/checkpoints.py``).

Every block accepts an optional additive attention bias over the keys, ``(B, 1, 1, T)``: token-reduction methods
(``segmerge_ros/models/vit/algm.py``, ``clustvit.py``, ``dovit.py``) pass ``log(size)`` there for proportional attention
and ``-inf`` for padding. Without a bias the forward is the plain ViT, bit for bit.

``SegmenterViT.forward(images)`` takes normalised ``(B, 3, H, W)`` images with H and W multiples of 16 and returns
class logits on the patch grid, ``(B, C, H/16, W/16)``; ``segment`` pads any size and returns logits at the input
resolution.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from segmerge_ros.models.imagenet import IMAGENET_MEAN, IMAGENET_STD

IGNORE_INDEX = 255

# (embed_dim, depth, num_heads) of the standard patch-16 sizes.
VIT_SIZES = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}
SIZE_ALIASES = {"t": "tiny", "ti": "tiny", "s": "small", "b": "base", "l": "large"}


@dataclass
class ViTConfig:
    """Everything needed to rebuild a Segmenter ViT; stored in a checkpoint's config.json."""

    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    num_classes: int = 19
    decoder: str = "linear"  # "linear" or "mask" (Segmenter's mask transformer)
    patch_size: int = 16
    mlp_ratio: float = 4.0
    pos_grid: tuple[int, int] = (24, 24)  # grid the position embedding is stored at (rows, cols)
    ln_eps: float = 1e-6  # timm and mmseg backbones use 1e-6; Segmenter's own code uses torch's default 1e-5
    decoder_layers: int = 2
    decoder_heads: int = 0  # 0: embed_dim // 64, as Segmenter does
    decoder_ln_eps: float = 1e-5
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    labels: str = "cityscapes"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.decoder not in ("linear", "mask"):
            raise ValueError(f"decoder must be 'linear' or 'mask', got {self.decoder!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        self.pos_grid = tuple(int(v) for v in self.pos_grid)
        self.image_mean = tuple(float(v) for v in self.image_mean)
        self.image_std = tuple(float(v) for v in self.image_std)

    @classmethod
    def for_size(cls, size: str, **overrides) -> "ViTConfig":
        """A config for a named size: tiny/small/base/large (or t/s/b/l)."""
        name = SIZE_ALIASES.get(size.lower(), size.lower())
        if name not in VIT_SIZES:
            raise ValueError(f"unknown ViT size {size!r}; choose one of {sorted(VIT_SIZES)}")
        dim, depth, heads = VIT_SIZES[name]
        return cls(embed_dim=dim, depth=depth, num_heads=heads, **overrides)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ViTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ViT config fields {unknown}")
        return cls(**values)

    @property
    def size_name(self) -> str:
        match = [n for n, v in VIT_SIZES.items() if v == (self.embed_dim, self.depth, self.num_heads)]
        return match[0] if match else f"d{self.embed_dim}x{self.depth}"


def check_merge_rate(rate: float) -> float:
    """The common range of every method's ``set_merge_rate``; ValueError outside it."""
    rate = float(rate)
    if not 0.0 <= rate <= 0.95:
        raise ValueError(f"merge rate must be in [0, 0.95], got {rate}")
    return rate


def key_bias_from_sizes(size: torch.Tensor, proportional: bool) -> torch.Tensor | None:
    """Additive attention bias over the keys, ``(B, 1, 1, T)``, from token sizes ``(B, T)``.

    Size 0 marks padding (-inf: never attended). With ``proportional`` a token standing for ``s`` patches gets
    ``log(s)`` (ToMe's proportional attention), otherwise 0. Returns None when every token is a single patch, so
    unreduced inputs take exactly the plain attention path.
    """
    if bool((size == 1).all()):
        return None
    if proportional:
        bias = size.log()  # log(0) = -inf masks padding
    else:
        bias = torch.zeros_like(size).masked_fill(size <= 0, float("-inf"))
    return bias[:, None, None, :]


class Attention(nn.Module):
    """Multi-head self-attention with a packed qkv projection (timm's layout)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        if bias is not None:
            bias = bias.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block. ``attend`` and ``feed_forward`` are its two halves: ToMe-style methods merge
    tokens between them."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def attend(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return x + self.attn(self.norm1(x), bias)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm2(x))

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.feed_forward(self.attend(x, bias))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


def resize_pos_embed(pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of ``(1, 1 + gh*gw, D)`` position embeddings (class token first) to another grid.

    Works for any pair of grids, square or not (e.g. 24x24 -> 30x40 for a 640x480 frame).
    """
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if old_grid == new_grid:
        return pos_embed
    cls_pos, grid_pos = pos_embed[:, :1], pos_embed[:, 1:]
    if grid_pos.shape[1] != old_grid[0] * old_grid[1]:
        raise ValueError(f"position embedding has {grid_pos.shape[1]} patch entries, not {old_grid[0]}x{old_grid[1]}")
    dim = pos_embed.shape[-1]
    grid_pos = grid_pos.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    grid_pos = F.interpolate(grid_pos, size=new_grid, mode="bicubic", align_corners=False)
    return torch.cat([cls_pos, grid_pos.flatten(2).transpose(1, 2)], dim=1)


class ViTEncoder(nn.Module):
    """ViT with a class token and learned position embeddings, interpolated to the input's patch grid."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        dim = config.embed_dim
        self.patch_size = config.patch_size
        self.pos_grid = tuple(config.pos_grid)
        self.patch_embed = PatchEmbed(config.patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.pos_grid[0] * self.pos_grid[1], dim))
        self.blocks = nn.ModuleList(
            Block(dim, config.num_heads, config.mlp_ratio, config.ln_eps) for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(dim, eps=config.ln_eps)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def grid_of(self, images: torch.Tensor) -> tuple[int, int]:
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"input {height}x{width} is not a multiple of the patch size {self.patch_size}; "
                "pad it first (SegmenterViT.segment does)"
            )
        return height // self.patch_size, width // self.patch_size

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch tokens with the class token in front and position embeddings added: ``(B, 1 + N, D)``."""
        grid = self.grid_of(images)
        patches = self.patch_embed(images)
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=1) + resize_pos_embed(self.pos_embed, self.pos_grid, grid), grid

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x, grid = self.embed(images)
        for block in self.blocks:
            x = block(x)
        return self.norm(x), grid


class LinearDecoder(nn.Module):
    """Segmenter's linear decoder: one linear map per patch token."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.head = nn.Linear(dim, num_classes)

    def forward(self, patches: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, T, D)`` patch tokens -> ``(B, T, C)`` class scores; ``bias`` is unused (per-token map)."""
        return self.head(patches)


class MaskTransformerDecoder(nn.Module):
    """Segmenter's mask transformer: learned class embeddings attend jointly with the patch tokens; class scores are
    the cosine similarities of projected patches and classes, LayerNormed over the classes."""

    def __init__(self, encoder_dim: int, num_classes: int, layers: int, heads: int, eps: float) -> None:
        super().__init__()
        dim = encoder_dim
        self.num_classes = num_classes
        self.proj_dec = nn.Linear(encoder_dim, dim)
        self.cls_emb = nn.Parameter(torch.randn(1, num_classes, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, 4.0, eps) for _ in range(layers))
        self.decoder_norm = nn.LayerNorm(dim, eps=eps)
        # Parameters used as ``x @ P`` (Segmenter's own layout), not nn.Linear weights.
        self.proj_patch = nn.Parameter(torch.randn(dim, dim) * dim**-0.5)
        self.proj_classes = nn.Parameter(torch.randn(dim, dim) * dim**-0.5)
        self.mask_norm = nn.LayerNorm(num_classes, eps=eps)

    def forward(self, patches: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, T, D)`` patch tokens -> ``(B, T, C)`` class scores.

        ``bias`` ``(B, 1, 1, T)`` over the patch keys (proportional attention / padding of merged tokens); the class
        embeddings get bias 0.
        """
        x = torch.cat([self.proj_dec(patches), self.cls_emb.expand(patches.shape[0], -1, -1)], dim=1)
        if bias is not None:
            bias = F.pad(bias, (0, self.num_classes), value=0.0)
        for block in self.blocks:
            x = block(x, bias)
        x = self.decoder_norm(x)
        tokens, classes = x[:, : -self.num_classes], x[:, -self.num_classes :]
        tokens = F.normalize(tokens @ self.proj_patch, dim=-1, eps=1e-12)
        classes = F.normalize(classes @ self.proj_classes, dim=-1, eps=1e-12)
        return self.mask_norm(tokens @ classes.transpose(1, 2))


def tokens_to_grid(scores: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``(B, N, C)`` per-patch scores in raster order -> ``(B, C, gh, gw)``."""
    return scores.transpose(1, 2).reshape(scores.shape[0], scores.shape[2], grid[0], grid[1])


def init_vit_weights(module: nn.Module) -> None:
    """timm/Segmenter initialisation: truncated-normal linear weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of grid logits upsampled (bilinear) to the label resolution; 255 is ignored."""
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, labels.long(), ignore_index=IGNORE_INDEX)


class SegmenterViT(nn.Module):
    """Segmenter: ViT encoder + linear or mask-transformer decoder. The plain (unreduced) baseline.

    Token counts are static (N = H/16 * W/16): suitable for tracing and compiled backends. ``set_merge_rate`` exists
    for interface parity with the reduction methods and only validates its argument (there is no knob).
    """

    family = "segmenter"
    output_stride = 16

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = ViTEncoder(config)
        if config.decoder == "linear":
            self.decoder: nn.Module = LinearDecoder(config.embed_dim, config.num_classes)
        else:
            heads = config.decoder_heads or max(1, config.embed_dim // 64)
            self.decoder = MaskTransformerDecoder(
                config.embed_dim, config.num_classes, config.decoder_layers, heads, config.decoder_ln_eps
            )
        self.apply(init_vit_weights)
        self.merge_rate = 0.0

    # -- interface shared by all ViT methods -------------------------------------------------------------------
    def method_config(self) -> dict:
        """Constructor arguments of the method beyond the ViT config (stored in checkpoints)."""
        return {}

    def set_merge_rate(self, rate: float) -> None:
        """Plain ViT: nothing to reduce; accepts any rate in [0, 0.95] and changes nothing."""
        self.merge_rate = check_merge_rate(rate)

    @property
    def static_shapes(self) -> bool:
        """Whether token counts depend only on the input size (True here; False for ALGM, ClustViT, DoViT)."""
        return True

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens, grid = self.encoder(images)
        return tokens_to_grid(self.decoder(tokens[:, 1:]), grid)

    def training_losses(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Losses for one batch; ``total`` is what the optimiser minimises."""
        loss = segmentation_loss(self(images), labels)
        return {"total": loss, "seg": loss}

    def segment(self, images: torch.Tensor) -> torch.Tensor:
        """Logits at the input resolution for any H, W: pads to a multiple of 16 (zeros = the mean colour after
        normalisation), runs ``forward`` and crops the bilinearly upsampled logits."""
        height, width = images.shape[-2:]
        step = self.output_stride
        pad_h, pad_w = (-height) % step, (-width) % step
        padded = F.pad(images, (0, pad_w, 0, pad_h)) if pad_h or pad_w else images
        logits = F.interpolate(self(padded), size=padded.shape[-2:], mode="bilinear", align_corners=False)
        return logits[..., :height, :width]

    def normalise(self, rgb_uint8: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, 3)`` or ``(B, 3, H, W)`` uint8 RGB -> normalised float ``(B, 3, H, W)`` on the model's device."""
        if rgb_uint8.shape[-1] == 3 and rgb_uint8.shape[1] != 3:
            rgb_uint8 = rgb_uint8.permute(0, 3, 1, 2)
        device = self.encoder.pos_embed.device
        mean = torch.tensor(self.config.image_mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.config.image_std, device=device).view(1, 3, 1, 1)
        return (rgb_uint8.to(device).float() / 255.0 - mean) / std


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
