"""Mask2Former / PRO-SCALE checkpoint loaders: the hub layout written by transformers' own ``save_pretrained``, and
detectron2 ``.pth``/``.pkl`` files written from random models by an inverse key map written here from the naming of
``../shared/docs/proscale.md`` section 3 (not by calling the loader's map); mismatch messages."""

from __future__ import annotations

import pickle
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mask2former_fixtures import hf_mask2former, randomise
from segmerge_ros.models.checkpoint_errors import CheckpointError
from segmerge_ros.models.mask2former.model import Mask2Former, Mask2FormerConfig
from segmerge_ros.models.mask2former.checkpoints import (config_from_detectron2, detect_format, is_mask2former_name,
                                                         load_mask2former)
from segmerge_ros.models.backbones.resnet import ResNetConfig
from segmerge_ros.models.backbones.swin import SwinConfig


SMALL = dict(num_classes=5, num_queries=6, feature_size=32, mask_feature_size=32, hidden_dim=32,
             num_attention_heads=4, encoder_layers=2, encoder_feedforward_dim=64, num_decoder_layers=3,
             decoder_feedforward_dim=64)
SMALL_SWIN = SwinConfig(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), window_size=4)
SMALL_RESNET = ResNetConfig(embedding_size=16, hidden_sizes=(32, 64, 96, 128), depths=(1, 2, 1, 1))


# --- Hugging Face hub layout ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone, weights_file", [("swin", "model.safetensors"), ("resnet", "pytorch_model.bin")])
def test_hub_folder_from_save_pretrained_reproduces_transformers(tmp_path, backbone, weights_file):
    reference = hf_mask2former(backbone)
    reference.save_pretrained(tmp_path, safe_serialization=weights_file.endswith("safetensors"))
    assert (tmp_path / weights_file).is_file()
    loaded = load_mask2former(tmp_path)
    assert loaded.format == "huggingface" and loaded.source == tmp_path / weights_file
    assert loaded.model.config.backbone == backbone and loaded.model.config.num_classes == 5
    assert loaded.labels.classes == tuple(f"thing{i}" for i in range(5))
    pixels = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(2))  # non-square
    with torch.no_grad():
        expected = reference(pixel_values=pixels)
        ours = loaded.model(pixels)
    assert ours.class_logits.shape == expected.class_queries_logits.shape == (1, 6, 6)
    torch.testing.assert_close(ours.class_logits, expected.class_queries_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.mask_logits, expected.masks_queries_logits, atol=1e-4, rtol=0)
    # The weight file itself or config.json also name the folder.
    assert load_mask2former(tmp_path / weights_file).format == "huggingface"


def test_hub_folder_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_mask2former(tmp_path / "missing")
    (tmp_path / "config.json").write_text('{"model_type": "mask2former"}')
    with pytest.raises(CheckpointError, match="model.safetensors, pytorch_model.bin"):
        load_mask2former(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_mask2former(other)
    (tmp_path / "weights.onnx").write_bytes(b"")
    with pytest.raises(CheckpointError, match="unknown format"):
        detect_format(tmp_path / "weights.onnx")


def test_hub_config_the_model_cannot_build_is_a_checkpoint_error(tmp_path):
    reference = hf_mask2former("swin")
    reference.save_pretrained(tmp_path)
    config = (tmp_path / "config.json").read_text().replace('"model_type": "swin"', '"model_type": "convnext"')
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(CheckpointError, match="convnext"):
        load_mask2former(tmp_path)


# --- detectron2 layout: the inverse map, from the note's naming ----------------------------------------------------

PIXEL, PREDICTOR = "sem_seg_head.pixel_decoder.", "sem_seg_head.predictor."
OURS_TO_DETECTRON2 = [
    # pixel decoder
    (r"pixel_level_module\.decoder\.input_projections\.", PIXEL + "input_proj."),
    (r"pixel_level_module\.decoder\.level_embed$", PIXEL + "transformer.level_embed"),
    (r"pixel_level_module\.decoder\.encoder\.layers\.(\d+)\.self_attn_layer_norm\.",
     PIXEL + r"transformer.encoder.layers.\1.norm1."),
    (r"pixel_level_module\.decoder\.encoder\.layers\.(\d+)\.final_layer_norm\.",
     PIXEL + r"transformer.encoder.layers.\1.norm2."),
    (r"pixel_level_module\.decoder\.encoder\.layers\.(\d+)\.fc1\.", PIXEL + r"transformer.encoder.layers.\1.linear1."),
    (r"pixel_level_module\.decoder\.encoder\.layers\.(\d+)\.fc2\.", PIXEL + r"transformer.encoder.layers.\1.linear2."),
    (r"pixel_level_module\.decoder\.encoder\.layers\.(\d+)\.self_attn\.",
     PIXEL + r"transformer.encoder.layers.\1.self_attn."),
    (r"pixel_level_module\.decoder\.encoder\.token_excite\.(ops\.)?", PIXEL + "transformer.encoder.token_excite.ops."),
    (r"pixel_level_module\.decoder\.adapter_1\.0\.weight$", PIXEL + "adapter_1.weight"),
    (r"pixel_level_module\.decoder\.adapter_1\.1\.", PIXEL + "adapter_1.norm."),
    (r"pixel_level_module\.decoder\.layer_1\.0\.weight$", PIXEL + "layer_1.weight"),
    (r"pixel_level_module\.decoder\.layer_1\.1\.", PIXEL + "layer_1.norm."),
    (r"pixel_level_module\.decoder\.mask_projection\.", PIXEL + "mask_features."),
    # transformer decoder
    (r"transformer_module\.queries_features\.", PREDICTOR + "query_feat."),
    (r"transformer_module\.queries_embedder\.", PREDICTOR + "query_embed."),
    (r"transformer_module\.level_embed\.", PREDICTOR + "level_embed."),
    (r"transformer_module\.decoder\.layernorm\.", PREDICTOR + "decoder_norm."),
    (r"transformer_module\.decoder\.mask_predictor\.mask_embedder\.(\d)\.0\.", PREDICTOR + r"mask_embed.layers.\1."),
    (r"transformer_module\.decoder\.layers\.(\d+)\.self_attn_layer_norm\.",
     PREDICTOR + r"transformer_self_attention_layers.\1.norm."),
    (r"transformer_module\.decoder\.layers\.(\d+)\.self_attn\.",
     PREDICTOR + r"transformer_self_attention_layers.\1.self_attn."),
    (r"transformer_module\.decoder\.layers\.(\d+)\.cross_attn_layer_norm\.",
     PREDICTOR + r"transformer_cross_attention_layers.\1.norm."),
    (r"transformer_module\.decoder\.layers\.(\d+)\.cross_attn\.",
     PREDICTOR + r"transformer_cross_attention_layers.\1.multihead_attn."),
    (r"transformer_module\.decoder\.layers\.(\d+)\.fc1\.", PREDICTOR + r"transformer_ffn_layers.\1.linear1."),
    (r"transformer_module\.decoder\.layers\.(\d+)\.fc2\.", PREDICTOR + r"transformer_ffn_layers.\1.linear2."),
    (r"transformer_module\.decoder\.layers\.(\d+)\.final_layer_norm\.", PREDICTOR + r"transformer_ffn_layers.\1.norm."),
    (r"class_predictor\.", PREDICTOR + "class_embed."),
    # Swin backbone
    (r"pixel_level_module\.encoder\.embeddings\.patch_embeddings\.projection\.", "backbone.patch_embed.proj."),
    (r"pixel_level_module\.encoder\.embeddings\.norm\.", "backbone.patch_embed.norm."),
    (r"pixel_level_module\.encoder\.encoder\.layers\.(\d)\.blocks\.(\d+)\.layernorm_before\.",
     r"backbone.layers.\1.blocks.\2.norm1."),
    (r"pixel_level_module\.encoder\.encoder\.layers\.(\d)\.blocks\.(\d+)\.layernorm_after\.",
     r"backbone.layers.\1.blocks.\2.norm2."),
    (r"pixel_level_module\.encoder\.encoder\.layers\.(\d)\.blocks\.(\d+)\.attention\.self\.",
     r"backbone.layers.\1.blocks.\2.attn."),
    (r"pixel_level_module\.encoder\.encoder\.layers\.(\d)\.blocks\.(\d+)\.attention\.output\.dense\.",
     r"backbone.layers.\1.blocks.\2.attn.proj."),
    (r"pixel_level_module\.encoder\.encoder\.layers\.(\d)\.blocks\.(\d+)\.intermediate\.dense\.",
     r"backbone.layers.\1.blocks.\2.mlp.fc1."),
    (r"pixel_level_module\.encoder\.encoder\.layers\.(\d)\.blocks\.(\d+)\.output\.dense\.",
     r"backbone.layers.\1.blocks.\2.mlp.fc2."),
    (r"pixel_level_module\.encoder\.encoder\.layers\.(\d)\.downsample\.", r"backbone.layers.\1.downsample."),
    (r"pixel_level_module\.encoder\.hidden_states_norms\.stage(\d)\.",
     lambda m: f"backbone.norm{int(m.group(1)) - 1}."),
    # ResNet backbone
    (r"pixel_level_module\.encoder\.embedder\.embedder\.convolution\.", "backbone.stem.conv1."),
    (r"pixel_level_module\.encoder\.embedder\.embedder\.normalization\.", "backbone.stem.conv1.norm."),
    (r"pixel_level_module\.encoder\.encoder\.stages\.(\d)\.layers\.(\d+)\.shortcut\.convolution\.",
     lambda m: f"backbone.res{int(m.group(1)) + 2}.{m.group(2)}.shortcut."),
    (r"pixel_level_module\.encoder\.encoder\.stages\.(\d)\.layers\.(\d+)\.shortcut\.normalization\.",
     lambda m: f"backbone.res{int(m.group(1)) + 2}.{m.group(2)}.shortcut.norm."),
    (r"pixel_level_module\.encoder\.encoder\.stages\.(\d)\.layers\.(\d+)\.layer\.(\d)\.convolution\.",
     lambda m: f"backbone.res{int(m.group(1)) + 2}.{m.group(2)}.conv{int(m.group(3)) + 1}."),
    (r"pixel_level_module\.encoder\.encoder\.stages\.(\d)\.layers\.(\d+)\.layer\.(\d)\.normalization\.",
     lambda m: f"backbone.res{int(m.group(1)) + 2}.{m.group(2)}.conv{int(m.group(3)) + 1}.norm."),
]
# Separate projections packed the detectron2 way (rows q, k, v).
PACK = [(r"(.*\.self_attn)\.([qkv])_proj\.(weight|bias)$", "in_proj_", ("q", "k", "v")),
        (r"(backbone\..*\.attn)\.(query|key|value)\.(weight|bias)$", "qkv.", ("query", "key", "value"))]


def to_detectron2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, value in state.items():
        for pattern, target in OURS_TO_DETECTRON2:
            new_key, hits = re.subn("^" + pattern, target, key)
            if hits:
                break
        else:
            raise AssertionError(f"the test's inverse map misses {key}")
        renamed[new_key] = value
    packed: dict[str, dict[str, torch.Tensor]] = {}
    result = {}
    for key, value in renamed.items():
        for pattern, prefix, _ in PACK:
            match = re.match(pattern, key)
            if match:
                packed.setdefault(f"{match.group(1)}.{prefix}{match.group(3)}", {})[match.group(2)] = value
                break
        else:
            result[key] = value
    for key, parts in packed.items():
        order = next(names for _, prefix, names in PACK if f".{prefix}" in key)
        result[key] = torch.cat([parts[name] for name in order])
    return result


def small_model(backbone: str, seed: int = 3, **overrides) -> Mask2Former:
    config = Mask2FormerConfig(backbone=backbone, swin=SMALL_SWIN, resnet=SMALL_RESNET, **{**SMALL, **overrides})
    torch.manual_seed(seed)
    return randomise(Mask2Former(config), seed=seed)


def write_pth(path: Path, state: dict[str, torch.Tensor]) -> Path:
    torch.save({"model": state, "iteration": 7}, path)
    return path


def write_pkl(path: Path, state: dict[str, torch.Tensor]) -> Path:
    with path.open("wb") as file:
        pickle.dump({"model": {k: v.numpy() for k, v in state.items()}, "__author__": "test", "matching_heuristics": True},
                    file)
    return path


def same_shape(config: Mask2FormerConfig, other: Mask2FormerConfig) -> bool:
    """Equal configs but for the sub-configs of backbones not in use."""
    unused = {name: getattr(other, name) for name in ("swin", "resnet", "mit") if name != other.backbone}
    return replace(config, **unused) == other


def assert_same_tensors(loaded: torch.nn.Module, original: torch.nn.Module, skip: tuple[str, ...] = ()) -> None:
    expected = original.state_dict()
    got = loaded.state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if not key.endswith(skip):
            assert torch.equal(got[key], value), key


@pytest.mark.parametrize("backbone", ["swin", "resnet"])
@pytest.mark.parametrize("writer", [write_pth, write_pkl])
def test_detectron2_file_loads_back_to_the_same_tensors(tmp_path, backbone, writer):
    original = small_model(backbone)
    state = to_detectron2(original.state_dict())
    assert "sem_seg_head.predictor.transformer_self_attention_layers.0.self_attn.in_proj_weight" in state
    if backbone == "resnet":  # detectron2's FrozenBN has no num_batches_tracked
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
        assert "backbone.res3.0.shortcut.norm.running_var" in state
    else:
        assert state["backbone.layers.0.blocks.0.attn.qkv.weight"].shape == (96, 32)
    path = writer(tmp_path / f"model_final{'.pth' if writer is write_pth else '.pkl'}", state)
    loaded = load_mask2former(path)
    assert loaded.format == "detectron2" and loaded.source == path
    assert same_shape(loaded.model.config, original.config)
    assert_same_tensors(loaded.model, original, skip=("num_batches_tracked",))


def test_detectron2_config_read_off_the_shapes():
    original = small_model("swin", num_classes=7, num_queries=9)
    config = config_from_detectron2(to_detectron2(original.state_dict()))
    assert config.swin == SMALL_SWIN and config.num_classes == 7 and config.num_queries == 9
    assert config.encoder == "stock" and config.encoder_layers == 2 and config.num_decoder_layers == 3


def test_detectron2_mismatch_messages_name_the_keys(tmp_path):
    state = to_detectron2(small_model("swin").state_dict())
    key = "sem_seg_head.pixel_decoder.transformer.encoder.layers.1.linear2.bias"
    state.pop(key)
    state["sem_seg_head.predictor.something_new.weight"] = torch.zeros(3)
    state["sem_seg_head.pixel_decoder.mask_features.bias"] = torch.zeros(31)
    with pytest.raises(CheckpointError) as error:
        load_mask2former(write_pth(tmp_path / "bad.pth", state))
    message = str(error.value)
    assert "bad.pth (detectron2 layout" in message
    assert "missing keys (1):\n    pixel_level_module.decoder.encoder.layers.1.fc2.bias" in message
    assert "unexpected keys (1):\n    sem_seg_head.predictor.something_new.weight" in message
    assert "pixel_level_module.decoder.mask_projection.bias: checkpoint (31,) vs model (32,)" in message


def test_detectron2_files_that_are_not_mask2former(tmp_path):
    torch.save({"model": {"backbone.layers.0.weight": torch.zeros(2)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="no 'sem_seg_head"):
        load_mask2former(tmp_path / "other.pth")
    (tmp_path / "broken.pkl").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_mask2former(tmp_path / "broken.pkl")
    with (tmp_path / "evil.pkl").open("wb") as file:
        pickle.dump({"model": {"x": Path("/")}}, file)  # any class but numpy arrays is refused, not instantiated
    with pytest.raises(CheckpointError, match="refusing to unpickle pathlib"):
        load_mask2former(tmp_path / "evil.pkl")
    state = {k: v for k, v in to_detectron2(small_model("swin").state_dict()).items() if not k.startswith("backbone.")}
    with pytest.raises(CheckpointError, match="unknown detectron2 backbone"):
        load_mask2former(write_pth(tmp_path / "headless.pth", state))


@pytest.mark.parametrize("backbone, schedule", [("swin", (3, 3, 3)), ("resnet", (3, 3, 3)), ("swin", (1, 2, 3))])
def test_proscale_detectron2_checkpoint_loads_into_a_proscale_model(tmp_path, backbone, schedule):
    # encoder_layers: read off the file as the number of layers there are (PRO-SCALE's encoder ignores it)
    original = small_model(backbone, encoder="proscale", proscale_schedule=schedule, encoder_layers=sum(schedule))
    state = to_detectron2(original.state_dict())
    # The released layout: 9 (here sum(schedule)) encoder layers on 1, 2, 3 levels, the TRC gate, LPE norm only.
    layers = [state[f"{PIXEL}transformer.encoder.layers.{i}.self_attn.attention_weights.weight"].shape[0]
              for i in range(sum(schedule))]
    heads_points = 4 * 4
    assert layers == [heads_points * level for level, count in zip((1, 2, 3), schedule) for _ in range(count)]
    assert state[f"{PIXEL}transformer.encoder.token_excite.ops.weight"].shape == (1, 32)
    assert f"{PIXEL}layer_1.norm.weight" in state and f"{PIXEL}layer_1.weight" not in state
    path = write_pkl(tmp_path / f"{backbone}_proscale.pkl", state)
    loaded = load_mask2former(path)
    assert loaded.model.config.encoder == "proscale" and loaded.model.config.proscale_schedule == schedule
    assert same_shape(loaded.model.config, original.config)
    assert_same_tensors(loaded.model, original)
    pixels = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(pixels).mask_logits, original(pixels).mask_logits, atol=0, rtol=0)


def test_stock_checkpoint_into_a_proscale_config_names_the_misfit(tmp_path):
    state = to_detectron2(small_model("swin").state_dict())
    config = config_from_detectron2(state, encoder="proscale", proscale_schedule=(1, 1, 0))
    with pytest.raises(CheckpointError) as error:
        load_mask2former(write_pth(tmp_path / "stock.pth", state), config=config)
    message = str(error.value)
    assert "pixel_level_module.decoder.encoder.token_excite.ops.weight" in message  # missing
    assert "pixel_level_module.decoder.layer_1.0.weight" in message  # unexpected: LPE has no conv
    assert ("pixel_level_module.decoder.encoder.layers.0.self_attn.attention_weights.weight: checkpoint (48, 32) "
            "vs model (16, 32)") in message


def test_model_names_and_the_expected_architecture(tmp_path):
    assert is_mask2former_name("mask2former-swin-t") and is_mask2former_name("mask2former-mit-b0-proscale")
    assert not is_mask2former_name("mask2former-vit-s") and not is_mask2former_name("segformer-b0")
    path = write_pth(tmp_path / "swin.pth", to_detectron2(small_model("swin").state_dict()))
    assert load_mask2former(path, expect="mask2former-swin-b").model.config.swin == SMALL_SWIN  # sizes: the file's
    with pytest.raises(CheckpointError, match="model mask2former-r50 has a resnet backbone and the stock encoder, "
                                              "but checkpoint .*swin.pth .* holds a swin backbone"):
        load_mask2former(path, expect="mask2former-r50")
