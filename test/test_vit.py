"""ViT encoder, Segmenter decoders, position-embedding interpolation and checkpoint loaders."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

from segmerge_ros.models.vit.methods import build_vit_model, load_vit_model, parse_vit_name
from segmerge_ros.models.checkpoint_errors import CheckpointError
from segmerge_ros.models.vit.segmenter import SegmenterViT, ViTConfig, check_merge_rate, resize_pos_embed
from segmerge_ros.models.vit.checkpoints import load_vit_weights, save_vit_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")



def small_config(decoder: str = "linear", **overrides) -> ViTConfig:
    values = dict(embed_dim=64, depth=6, num_heads=2, num_classes=5, decoder=decoder, pos_grid=(6, 6))
    values.update(overrides)
    return ViTConfig(**values)


def images(batch: int = 2, height: int = 96, width: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


# --- layouts written the way the other frameworks name their weights (independent of our converters) ------------


def timm_layout(model: SegmenterViT) -> dict[str, torch.Tensor]:
    """timm ``VisionTransformer``: our encoder names without the prefix, plus an ImageNet classifier head."""
    state = {k.removeprefix("encoder."): v.clone() for k, v in model.state_dict().items() if k.startswith("encoder.")}
    state["head.weight"] = torch.zeros(1000, model.config.embed_dim)
    state["head.bias"] = torch.zeros(1000)
    return state


def mmseg_layout(model: SegmenterViT) -> dict[str, torch.Tensor]:
    """mmseg ``VisionTransformer`` + ``SegmenterMaskTransformerHead`` / conv-free ``FCNHead`` names."""
    layer_names = {
        "norm1.": "ln1.", "norm2.": "ln2.", "attn.qkv.weight": "attn.attn.in_proj_weight",
        "attn.qkv.bias": "attn.attn.in_proj_bias", "attn.proj.": "attn.attn.out_proj.",
        "mlp.fc1.": "ffn.layers.0.0.", "mlp.fc2.": "ffn.layers.1.",
    }
    out = {}
    for key, value in model.state_dict().items():
        value = value.clone()
        match = re.match(r"(encoder|decoder)\.blocks\.(\d+)\.(.*)", key)
        if match:
            owner, index, rest = match.groups()
            for ours, theirs in layer_names.items():
                rest = rest.replace(ours, theirs)
            out[f"{'backbone' if owner == 'encoder' else 'decode_head'}.layers.{index}.{rest}"] = value
            continue
        name = {
            "encoder.cls_token": "backbone.cls_token",
            "encoder.pos_embed": "backbone.pos_embed",
            "encoder.patch_embed.proj.weight": "backbone.patch_embed.projection.weight",
            "encoder.patch_embed.proj.bias": "backbone.patch_embed.projection.bias",
            "encoder.norm.weight": "backbone.ln1.weight",
            "encoder.norm.bias": "backbone.ln1.bias",
            "decoder.head.weight": "decode_head.conv_seg.weight",
            "decoder.head.bias": "decode_head.conv_seg.bias",
            "decoder.proj_dec.weight": "decode_head.dec_proj.weight",
            "decoder.proj_dec.bias": "decode_head.dec_proj.bias",
            "decoder.cls_emb": "decode_head.cls_emb",
            "decoder.decoder_norm.weight": "decode_head.decoder_norm.weight",
            "decoder.decoder_norm.bias": "decode_head.decoder_norm.bias",
            "decoder.mask_norm.weight": "decode_head.mask_norm.weight",
            "decoder.mask_norm.bias": "decode_head.mask_norm.bias",
            "decoder.proj_patch": "decode_head.patch_proj.weight",
            "decoder.proj_classes": "decode_head.classes_proj.weight",
        }[key]
        if key == "decoder.head.weight":
            value = value[:, :, None, None]  # a 1x1 conv
        if key in ("decoder.proj_patch", "decoder.proj_classes"):
            value = value.t().contiguous()  # nn.Linear weight: y = x W^T
        out[name] = value
    return out


def test_sizes_and_names():
    assert ViTConfig.for_size("t").embed_dim == 192
    assert (ViTConfig.for_size("small").embed_dim, ViTConfig.for_size("small").num_heads) == (384, 6)
    assert ViTConfig.for_size("b").size_name == "base"
    assert parse_vit_name("algm-vit-s-linear") == ("algm", "s", "linear")
    assert parse_vit_name("vit-t") == ("segmenter", "t", "mask")
    with pytest.raises(ValueError):
        parse_vit_name("vit-huge")
    with pytest.raises(ValueError):
        check_merge_rate(0.96)


@pytest.mark.parametrize("decoder", ["linear", "mask"])
def test_forward_on_non_square_grid(decoder):
    model = SegmenterViT(small_config(decoder)).eval()
    with torch.no_grad():
        logits = model(images(1, 480, 640))
    assert logits.shape == (1, 5, 30, 40)
    assert torch.isfinite(logits).all()
    with torch.no_grad():
        full = model.segment(images(1, 100, 150))  # not multiples of 16: padded, cropped back
    assert full.shape == (1, 5, 100, 150)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(images(1, 100, 150))


def test_pos_embed_resize():
    pos = torch.randn(1, 1 + 24 * 24, 8)
    assert resize_pos_embed(pos, (24, 24), (24, 24)) is pos
    resized = resize_pos_embed(pos, (24, 24), (30, 40))
    assert resized.shape == (1, 1 + 30 * 40, 8)
    assert torch.equal(resized[:, 0], pos[:, 0])  # the class token's embedding is not interpolated
    back = resize_pos_embed(resize_pos_embed(pos, (24, 24), (48, 48)), (48, 48), (24, 24))
    assert (back - pos).abs().mean() < 0.2 * pos.abs().mean()


def test_timm_layout_loads_encoder_only(tmp_path):
    source = SegmenterViT(small_config("linear")).eval()
    path = tmp_path / "vit_timm.safetensors"
    save_file(timm_layout(source), str(path))
    target = SegmenterViT(small_config("linear")).eval()
    decoder_before = target.decoder.head.weight.clone()
    info = load_vit_weights(target, path)
    assert info["layout"] == "timm" and not info["decoder_loaded"]
    assert torch.equal(target.decoder.head.weight, decoder_before)
    x = images(1)
    with torch.no_grad():
        assert torch.equal(target.encoder(x)[0], source.encoder(x)[0])


@pytest.mark.parametrize("decoder", ["linear", "mask"])
def test_mmseg_layout_gives_identical_outputs(tmp_path, decoder):
    source = SegmenterViT(small_config(decoder)).eval()
    path = tmp_path / "segmenter_mmseg.pth"
    torch.save({"meta": {"note": "mmseg"}, "state_dict": mmseg_layout(source)}, path)
    loaded = load_vit_model(path, num_classes=5)  # config inferred from the weights
    assert loaded.config.decoder == decoder and loaded.config.embed_dim == 64 and loaded.config.depth == 6
    assert loaded.config.num_heads == 1  # inferred as dim // 64; give num_heads= for non-standard widths
    loaded = load_vit_model(path, num_heads=2)
    x = images(2)
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))


def test_segmenter_layout_and_pos_grid_resize(tmp_path):
    source = SegmenterViT(small_config("mask", pos_grid=(8, 8))).eval()
    state = {k: v.clone() for k, v in source.state_dict().items()}
    state["encoder.head.weight"] = torch.zeros(1000, 64)  # Segmenter keeps its ImageNet head: dropped
    state["encoder.head.bias"] = torch.zeros(1000)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": state, "epoch": 3}, path)
    target = SegmenterViT(small_config("mask", pos_grid=(6, 6))).eval()
    info = load_vit_weights(target, path)
    assert info["layout"] == "segmenter"
    expected = resize_pos_embed(source.encoder.pos_embed, (8, 8), (6, 6))
    assert torch.allclose(target.encoder.pos_embed, expected)


def test_mismatch_lists_the_bad_keys(tmp_path):
    source = SegmenterViT(small_config("linear"))
    state = {k: v.clone() for k, v in source.state_dict().items()}
    del state["encoder.blocks.2.mlp.fc1.weight"]
    state["encoder.blocks.0.attn.extra"] = torch.zeros(3)
    state["decoder.head.weight"] = torch.zeros(7, 64)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError) as error:
        load_vit_weights(SegmenterViT(small_config("linear")), path)
    message = str(error.value)
    assert "encoder.blocks.2.mlp.fc1.weight" in message
    assert "encoder.blocks.0.attn.extra" in message
    assert "decoder.head.weight: checkpoint (7, 64) vs model (5, 64)" in message
    assert str(path) in message


def test_unreadable_and_unknown_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_vit_weights(SegmenterViT(small_config()), tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_vit_weights(SegmenterViT(small_config()), junk)
    other = tmp_path / "other.safetensors"
    save_file({"conv.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(CheckpointError, match="unrecognised"):
        load_vit_weights(SegmenterViT(small_config()), other)
    distilled = {k: v for k, v in timm_layout(SegmenterViT(small_config())).items()}
    distilled["dist_token"] = torch.zeros(1, 1, 64)
    path = tmp_path / "deit.safetensors"
    save_file(distilled, str(path))
    with pytest.raises(CheckpointError, match="distilled"):
        load_vit_weights(SegmenterViT(small_config()), path)


@pytest.mark.parametrize(
    "name", ["segmenter-vit-t-linear", "algm-vit-t-mask", "clustvit-vit-t-linear", "dovit-vit-t-linear"]
)
def test_own_checkpoint_round_trip(tmp_path, name):
    model = build_vit_model(name, num_classes=4).eval()
    save_vit_checkpoint(model, tmp_path / "ckpt")
    loaded = load_vit_model(tmp_path / "ckpt")
    assert type(loaded) is type(model) and loaded.method_config() == model.method_config()
    x = images(1, 64, 96)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_method_over_plain_checkpoint(tmp_path):
    plain = build_vit_model("segmenter-vit-t-linear", num_classes=4)
    save_vit_checkpoint(plain, tmp_path / "plain")
    clust = load_vit_model(tmp_path / "plain", family="clustvit")
    assert clust.family == "clustvit"
    assert torch.equal(clust.encoder.pos_embed, plain.encoder.pos_embed)
