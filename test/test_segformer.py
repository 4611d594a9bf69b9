"""Our SegFormer against Hugging Face transformers (test-only reference), and the folded head against the trained one."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency: run `make setup`")
from transformers import SegformerConfig, SegformerForSemanticSegmentation  # noqa: E402

from segmerge_ros.merging.segformerpp import NONE, PRESETS, config_for_rate  # noqa: E402
from segmerge_ros.models.segformer.checkpoints import load_segformer  # noqa: E402
from segmerge_ros.models.segformer.model import FoldedHead, SegFormer, mit_config  # noqa: E402

HF_SIZES = {
    "b0": dict(hidden_sizes=[32, 64, 160, 256], depths=[2, 2, 2, 2], decoder_hidden_size=256),
    "b2": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 4, 6, 3], decoder_hidden_size=768),
}


def hf_model_with_bn_statistics(size: str, seed: int = 0) -> SegformerForSemanticSegmentation:
    """A randomly initialised transformers SegFormer whose BatchNorm is not the identity."""
    torch.manual_seed(seed)
    model = SegformerForSemanticSegmentation(SegformerConfig(num_labels=19, **HF_SIZES[size])).eval()
    bn = model.decode_head.batch_norm
    with torch.no_grad():
        bn.running_mean.normal_(0.0, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_(1.0, 0.2)
        bn.bias.normal_(0.0, 0.2)
    return model


@pytest.fixture(scope="module", params=["b0", "b2"])
def hf_and_ours(request, tmp_path_factory):
    hf = hf_model_with_bn_statistics(request.param)
    folder = tmp_path_factory.mktemp(f"hf_{request.param}")
    hf.save_pretrained(folder)
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    return hf, load_segformer(folder).model


def test_matches_transformers_at_non_square_size(hf_and_ours):
    hf, ours = hf_and_ours
    pixels = torch.randn(1, 3, 200, 328)  # non-square, not a multiple of 32
    with torch.no_grad():
        reference = hf(pixel_values=pixels).logits
        folded = ours(pixels)
        ours.folded_head, saved = None, ours.folded_head
        unfolded = ours(pixels)
        ours.__dict__["folded_head"] = saved
    assert folded.shape == reference.shape == (1, 19, 50, 82)
    assert (folded - reference).abs().max().item() <= 1e-4
    assert (unfolded - reference).abs().max().item() <= 1e-4


def test_folded_head_is_exact_for_both_layouts():
    torch.manual_seed(1)
    for layout in ("mlp", "mmseg"):
        model = SegFormer(mit_config("b0", head=layout)).eval()
        for module in model.head.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                with torch.no_grad():
                    module.running_mean.normal_(0, 0.5)
                    module.running_var.uniform_(0.5, 2)
        features = model.encoder(torch.randn(2, 3, 96, 160))
        with torch.no_grad():
            trained, folded = model.head(features), FoldedHead(model.head)(features)
        assert (trained - folded).abs().max().item() <= 1e-5, layout


def test_rate_zero_is_bit_identical_to_unmerged():
    torch.manual_seed(2)
    model = SegFormer(mit_config("b0")).eval().fold_head()
    pixels = torch.randn(1, 3, 130, 250)
    with torch.no_grad():
        assert torch.equal(model(pixels, NONE), model(pixels, config_for_rate(0.0)))
        assert torch.equal(model(pixels), model(pixels, PRESETS["none"]))


@pytest.mark.parametrize("name", ["hq", "fast", "2x2"])
def test_presets_run_on_awkward_sizes_and_change_the_output(name):
    torch.manual_seed(3)
    model = SegFormer(mit_config("b0")).eval().fold_head()
    for height, width in ((130, 250), (97, 161), (256, 192)):
        pixels = torch.randn(1, 3, height, width)
        with torch.no_grad():
            merged, plain = model(pixels, PRESETS[name]), model(pixels, NONE)
        assert merged.shape == plain.shape
        assert torch.isfinite(merged).all()
        assert not torch.equal(merged, plain)


def test_merge_settings_change_between_calls_without_rebuilding():
    torch.manual_seed(4)
    model = SegFormer(mit_config("b0")).eval().fold_head()
    pixels = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        plain = model(pixels)
        fast = model(pixels, PRESETS["fast"])
        again = model(pixels)
    assert torch.equal(plain, again)
    assert not torch.equal(plain, fast)


def test_ffn_merging_is_switchable_and_exact_when_off():
    from segmerge_ros.merging.segformerpp import MergeConfig, StageMerge

    torch.manual_seed(5)
    model = SegFormer(mit_config("b0")).eval().fold_head()
    pixels = torch.randn(1, 3, 96, 160)
    ffn_off = MergeConfig((StageMerge(ffn_rate=0.0),) * 4)
    ffn_on = MergeConfig((StageMerge(ffn_rate=0.5, matching="local"),) * 2 + (StageMerge(),) * 2)
    with torch.no_grad():
        plain = model(pixels)
        assert torch.equal(plain, model(pixels, ffn_off))
        merged = model(pixels, ffn_on)
    assert merged.shape == plain.shape and not torch.equal(merged, plain)
