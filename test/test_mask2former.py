"""Our Mask2Former against transformers' Mask2FormerForUniversalSegmentation (tiny random configs), and its configs."""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency: run `make setup`")
pytest.importorskip("scipy", reason="transformers' Mask2FormerForUniversalSegmentation needs scipy (requirements-test)")
from transformers import Mask2FormerConfig as HFMask2FormerConfig  # noqa: E402
from transformers import Mask2FormerForUniversalSegmentation, ResNetConfig, SwinConfig  # noqa: E402

from segmerge_ros.models.mask2former.model import (  # noqa: E402
    Mask2Former,
    Mask2FormerConfig,
    attention_mask_for,
    mask2former_config,
)
from segmerge_ros.models.mask2former.deformable_attention import MultiScaleDeformableAttention  # noqa: E402
from segmerge_ros.models.backbones.resnet import ResNetConfig as ResNetBackboneConfig  # noqa: E402
from segmerge_ros.models.segformer.model import mit_config  # noqa: E402
from segmerge_ros.models.backbones.swin import SwinConfig as SwinBackboneConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TOLERANCE = 1e-4
HEIGHT, WIDTH = 96, 160  # non-square, and 96/32 = 3 rows at the coarsest level vs 5 columns
TINY_HEADS = dict(feature_size=64, mask_feature_size=64, hidden_dim=64, encoder_feedforward_dim=96,
                  dim_feedforward=96, encoder_layers=2, decoder_layers=5, num_attention_heads=4, num_queries=7,
                  num_labels=5)
OUT_FEATURES = ["stage1", "stage2", "stage3", "stage4"]


def tiny_swin_hf_config(**overrides) -> HFMask2FormerConfig:
    backbone = SwinConfig(embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=3,
                          out_features=OUT_FEATURES)
    return HFMask2FormerConfig(backbone_config=backbone, **{**TINY_HEADS, **overrides})


def tiny_swin_pre_norm_hf_config() -> HFMask2FormerConfig:
    return tiny_swin_hf_config(pre_norm=True)


def tiny_resnet_hf_config() -> HFMask2FormerConfig:
    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[16, 32, 32, 48], depths=[2, 1, 2, 1],
                            out_features=OUT_FEATURES)
    return HFMask2FormerConfig(backbone_config=backbone, **TINY_HEADS)


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter and norm statistic random (norm affines around 1/0, BN variances positive), scaled by fan-in
    so activations stay O(1) and the masked attention sees mixed masks."""
    generator = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    for key, value in state.items():
        if not value.is_floating_point():
            continue
        noise = torch.randn(value.shape, generator=generator)
        if key.endswith("running_var"):
            value.copy_(0.5 + torch.rand(value.shape, generator=generator))
        elif key.endswith("running_mean"):
            value.copy_(0.2 * noise)
        elif value.dim() == 1 and key.endswith("weight"):  # LayerNorm / GroupNorm / BatchNorm scale
            value.copy_(1.0 + 0.3 * noise)
        elif value.dim() == 1:  # biases
            value.copy_(0.1 * noise)
        else:
            fan_in = value[0].numel() if value.dim() > 1 else 1
            value.copy_(noise / fan_in**0.5)
    model.load_state_dict(state)


def ours_from_hf(hf: Mask2FormerForUniversalSegmentation) -> Mask2Former:
    config = Mask2FormerConfig.from_hf_dict(hf.config.to_dict())
    ours = Mask2Former(config).eval()
    state = {key.removeprefix("model."): value for key, value in hf.state_dict().items()
             if not key.startswith("criterion.")}  # the training loss's class weights: not a model weight
    ours.load_state_dict(state, strict=True)
    return ours


@pytest.mark.parametrize("hf_config", [tiny_swin_hf_config, tiny_resnet_hf_config, tiny_swin_pre_norm_hf_config],
                         ids=["swin", "resnet", "swin-pre-norm"])
@pytest.mark.parametrize("height, width", [(HEIGHT, WIDTH), (97, 61)])  # 97x61: no size divides by 4 (padding)
def test_matches_transformers_at_non_square_size(hf_config, height, width):
    torch.manual_seed(0)
    hf = Mask2FormerForUniversalSegmentation(hf_config()).eval()
    randomise(hf, seed=1)
    ours = ours_from_hf(hf)
    pixels = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(pixel_values=pixels, output_auxiliary_logits=True)
        got = ours(pixels)
        every_layer = ours.forward_all_layers(pixels)
    assert got.class_logits.shape == (2, 7, 6)
    assert got.mask_logits.shape == (2, 7, -(-height // 4), -(-width // 4))
    assert expected.masks_queries_logits.shape == got.mask_logits.shape
    class_diff = (got.class_logits - expected.class_queries_logits).abs().max().item()
    mask_diff = (got.mask_logits - expected.masks_queries_logits).abs().max().item()
    print(f"max |diff| class {class_diff:.3g} mask {mask_diff:.3g}; "
          f"mask logit scale {expected.masks_queries_logits.abs().max().item():.3g}")
    assert class_diff <= TOLERANCE and mask_diff <= TOLERANCE
    # Every earlier prediction too (transformers' auxiliary logits: the initial queries' and layers 1..n-1).
    assert len(every_layer) == len(expected.auxiliary_logits) + 1 == 5
    assert torch.equal(every_layer[-1].mask_logits, got.mask_logits)
    for ours_layer, hf_layer in zip(every_layer, expected.auxiliary_logits):
        assert (ours_layer.class_logits - hf_layer["class_queries_logits"]).abs().max() <= TOLERANCE
        assert (ours_layer.mask_logits - hf_layer["masks_queries_logits"]).abs().max() <= TOLERANCE
    # The comparison means something only if the masked attention really masked: some queries' masks at a decoder
    # level cover part of the map, neither nothing nor everything.
    attend = attention_mask_for(got.mask_logits, (-(-height // 8), -(-width // 8)))
    share = attend.float().mean(-1)
    assert ((share > 0) & (share < 1)).any()


def test_state_dict_keys_are_transformers_keys_without_the_model_prefix():
    hf = Mask2FormerForUniversalSegmentation(tiny_swin_hf_config())
    ours = Mask2Former(Mask2FormerConfig.from_hf_dict(hf.config.to_dict()))
    hf_keys = {k.removeprefix("model.") for k in hf.state_dict() if not k.startswith("criterion.")}
    assert set(ours.state_dict()) == hf_keys


def tiny_config(backbone: str, **overrides) -> Mask2FormerConfig:
    values = dict(backbone=backbone, swin=SwinBackboneConfig(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4),
                                                             window_size=3),
                  resnet=ResNetBackboneConfig(embedding_size=8, hidden_sizes=(16, 32, 32, 48), depths=(1, 1, 1, 1)),
                  mit=mit_config("b0", depths=(1, 1, 1, 1)), num_classes=4, num_queries=6, feature_size=64,
                  mask_feature_size=64, hidden_dim=64, num_attention_heads=4, encoder_layers=2,
                  encoder_feedforward_dim=64, num_decoder_layers=3, decoder_feedforward_dim=64)
    return Mask2FormerConfig(**{**values, **overrides})


@pytest.mark.parametrize("encoder", ["stock", "proscale"])
def test_mit_backbone_runs_with_the_right_output_shapes(encoder):
    model = Mask2Former(tiny_config("mit", encoder=encoder, proscale_schedule=(1, 1, 1))).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96))
    assert out.class_logits.shape == (1, 6, 5)
    assert out.mask_logits.shape == (1, 6, 16, 24)
    assert torch.isfinite(out.mask_logits).all() and torch.isfinite(out.class_logits).all()


@pytest.mark.parametrize("name, backbone, encoder", [
    ("mask2former-swin-t", "swin", "stock"), ("mask2former-swin-s", "swin", "stock"),
    ("mask2former-swin-b", "swin", "stock"), ("mask2former-r50", "resnet", "stock"),
    ("mask2former-r50-proscale", "resnet", "proscale"), ("mask2former-swin-t-proscale", "swin", "proscale"),
    ("mask2former-mit-b0", "mit", "stock"), ("mask2former-mit-b0-proscale", "mit", "proscale"),
])
def test_named_configs_build(name, backbone, encoder):
    config = mask2former_config(name)
    assert (config.backbone, config.encoder) == (backbone, encoder)
    model = Mask2Former(config)
    keys = model.state_dict()
    assert "class_predictor.weight" in keys and "transformer_module.decoder.layers.8.fc2.weight" in keys
    if encoder == "proscale":
        assert keys["pixel_level_module.decoder.encoder.token_excite.ops.weight"].shape == (1, 256)
        assert len({k.split(".")[4] for k in keys if k.startswith("pixel_level_module.decoder.encoder.layers.")}) == 9
        assert "pixel_level_module.decoder.layer_1.0.weight" not in keys  # the light pixel embedding has no conv
    else:
        assert "pixel_level_module.decoder.layer_1.0.weight" in keys


def test_unknown_names_and_unsupported_configs_fail_clearly():
    with pytest.raises(ValueError, match="unknown Mask2Former backbone"):
        mask2former_config("mask2former-vgg16")
    with pytest.raises(ValueError, match="hidden_dim"):
        Mask2FormerConfig(feature_size=256, hidden_dim=128)
    hf = tiny_swin_hf_config().to_dict()
    hf["backbone_config"]["model_type"] = "convnext"
    with pytest.raises(ValueError, match="backbone model_type 'convnext'"):
        Mask2FormerConfig.from_hf_dict(hf)


def test_coarse_layers_reach_the_encoder_and_zero_is_the_default():
    torch.manual_seed(0)
    model = Mask2Former(tiny_config("swin")).eval()
    pixels = torch.randn(1, 3, HEIGHT, WIDTH)
    with torch.no_grad():
        default, zero, coarse = model(pixels), model(pixels, coarse_layers=0), model(pixels, coarse_layers=2)
    assert torch.equal(default.mask_logits, zero.mask_logits)
    assert not torch.allclose(default.mask_logits, coarse.mask_logits)
    assert coarse.mask_logits.shape == default.mask_logits.shape


@pytest.mark.parametrize("backbone", ["swin", "resnet", "mit"])
def test_traces_without_data_dependent_python_in_our_modules(backbone):
    """A trace records tensor ops only: any Python decision on tensor values in the model's own modules would show
    as a TracerWarning from them (shape-only conversions in other modules are fine for a fixed input size)."""
    torch.manual_seed(0)
    model = Mask2Former(tiny_config(backbone)).eval()
    pixels = torch.randn(1, 3, HEIGHT, WIDTH)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(model, (pixels,))
    ours = ("mask2former.py", "swin.py", "resnet.py", "segformer.py")
    assert not [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)
                and w.filename.endswith(ours)]
    other = torch.randn(1, 3, HEIGHT, WIDTH)
    with torch.no_grad():
        assert torch.allclose(traced(other)[1], model(other).mask_logits, atol=1e-5)


def test_fresh_model_starts_as_the_training_recipe():
    """Deformable attention starts with uniform weights (zero logits) and offsets along one direction per head:
    with 8 heads, head 0 looks right (1, 0), head 1 diagonally (1, 1), head 2 down (0, 1); point k at k+1 steps."""
    model = Mask2Former(tiny_config("swin", num_attention_heads=8))
    attentions = [m for m in model.modules() if isinstance(m, MultiScaleDeformableAttention)]
    assert len(attentions) == 2
    for attention in attentions:
        assert not attention.attention_weights.weight.any() and not attention.attention_weights.bias.any()
        assert not attention.sampling_offsets.weight.any()
        offsets = attention.sampling_offsets.bias.view(8, 3, 4, 2)
        assert torch.allclose(offsets[0, 2], torch.tensor([[1.0, 0], [2, 0], [3, 0], [4, 0]]), atol=1e-6)
        assert torch.allclose(offsets[1, 0, 1], torch.tensor([2.0, 2.0]))
        assert torch.allclose(offsets[2, 1, 3], torch.tensor([0.0, 4.0]), atol=1e-6)
        assert torch.allclose(offsets[4, 0, 0], torch.tensor([-1.0, 0.0]), atol=1e-6)
    layer = model.transformer_module.decoder.layers[0]
    assert not layer.cross_attn.in_proj_bias.any() and not layer.self_attn.q_proj.bias.any()
    assert model.pixel_level_module.decoder.level_embed.std() > 0.5  # N(0, 1), not zeros


@pytest.mark.parametrize("name, backbone", [
    ("mask2former-swin-t", SwinConfig(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7,
                                      out_features=OUT_FEATURES)),
    ("mask2former-swin-b", SwinConfig(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=12,
                                      out_features=OUT_FEATURES)),
    ("mask2former-r50", ResNetConfig(embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3],
                                     out_features=OUT_FEATURES)),
])
def test_hub_config_of_a_published_layout_reads_as_the_named_preset(name, backbone):
    labels = {i: f"class {i}" for i in range(133)}
    hub = HFMask2FormerConfig(backbone_config=backbone, id2label=labels).to_dict()
    config = Mask2FormerConfig.from_hf_dict(hub)
    assert config.class_names == tuple(f"class {i}" for i in range(133))
    assert config == mask2former_config(name, class_names=config.class_names)
