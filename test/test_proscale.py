"""PRO-SCALE (segmerge_ros/models/mask2former/proscale.py): the token re-calibration's memory-view semantics, the stages, the
released (3, 3, 3) shapes, the light pixel embedding, the knob on a PRO-SCALE encoder, and the FLOP counts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from segmerge_ros.models.mask2former.deformable_attention import (
    DeformableEncoder,
    coarse_layers_for_rate,
    encoder_reference_points,
)
from segmerge_ros.models.mask2former.proscale import (
    EncoderShape,
    ProScaleEncoder,
    TokenRecalibration,
    encoder_macs,
    encoder_shapes,
    layer_macs_per_token,
    light_pixel_embedding,
    recalibration_macs,
    schedule_levels,
    stock_encoder_levels,
)

SHAPES = [(2, 3), (4, 6), (8, 12)]
COUNTS = [h * w for h, w in SHAPES]
NUM_TOKENS = sum(COUNTS)
D = 64


def randomise(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            scale = 0.6 if "sampling_offsets" in name else 0.3
            offset = 1.0 if name.endswith("norm.weight") else 0.0
            param.copy_(torch.randn(param.shape, generator=generator) * scale + offset)


def inputs(seed=0, batch=2):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, NUM_TOKENS, D, generator=generator),
            torch.randn(batch, NUM_TOKENS, D, generator=generator))


def small_proscale(schedule=(2, 2, 2), seed=1, **kwargs):
    encoder = ProScaleEncoder(schedule, d_model=D, ffn_dim=96, **kwargs).eval()
    randomise(encoder, seed)
    return encoder


def test_trc_reproduces_the_released_view_semantics_on_a_hand_made_case():
    """res3 tokens on a 2x4 grid, C = 2, gating a 1x2 scale. Computed by hand from the note's steps: the (L3, C)
    memory read as (C, H3, W3); a bilinear resize by exactly 2 (align_corners=False) is the mean of each 2x2 block;
    the (C, 1, 2) result read as (2 tokens, C); gate = sigmoid(0.1 * (r . w + b))."""
    guide_rows = [[t + 1.0, 10.0 * (t + 1) ** 0.5] for t in range(8)]  # token t of the 2x4 grid, channels 0, 1
    guide = torch.tensor(guide_rows)[None]
    w, b = (0.5, -1.0), 0.3
    trc = TokenRecalibration(d_model=2, temperature=0.1)
    with torch.no_grad():
        trc.ops.weight.copy_(torch.tensor([w]))
        trc.ops.bias.fill_(b)

    def by_hand(reading_transposed: bool) -> list[float]:
        if reading_transposed:  # the transposing reading: map[c][i][j] = token (i, j)'s channel c
            maps = [[[guide_rows[i * 4 + j][c] for j in range(4)] for i in range(2)] for c in range(2)]
        else:  # raw memory: element c*8 + i*4 + j of the row-major (8, 2) buffer
            flat = [v for row in guide_rows for v in row]
            maps = [[[flat[c * 8 + i * 4 + j] for j in range(4)] for i in range(2)] for c in range(2)]
        resized = [[sum(maps[c][i][2 * j + dj] for i in (0, 1) for dj in (0, 1)) / 4 for j in range(2)]
                   for c in range(2)]
        if reading_transposed:
            tokens = [[resized[c][n] for c in range(2)] for n in range(2)]
        else:
            flat = [v for channel in resized for v in channel]
            tokens = [[flat[n * 2 + c] for c in range(2)] for n in range(2)]
        return [1 / (1 + math.exp(-0.1 * (r[0] * w[0] + r[1] * w[1] + b))) for r in tokens]

    gate = trc.gate((1, 2), guide, (2, 4)).flatten().tolist()
    assert gate == pytest.approx(by_hand(reading_transposed=False), abs=1e-6)
    assert max(abs(a - t) for a, t in zip(gate, by_hand(reading_transposed=True))) > 0.05
    coarse = torch.randn(1, 2, 2)
    assert torch.allclose(trc(coarse, (1, 2), guide, (2, 4)), coarse * torch.tensor(gate)[None, :, None])
    # In a batch each sample's (L3, C) block is reinterpreted on its own, also when the guide is a slice of the
    # whole token sequence (not contiguous across the batch), as the encoder passes it.
    other = torch.randn(1, 8, 2)
    sequence = torch.cat([torch.randn(2, 3, 2), torch.cat([guide, other])], 1)
    batched = trc.gate((1, 2), sequence[:, 3:], (2, 4))
    assert torch.equal(batched[0], trc.gate((1, 2), guide, (2, 4))[0])
    assert torch.equal(batched[1], trc.gate((1, 2), other, (2, 4))[0])


def test_stages_run_on_their_levels_and_tokens():
    """(3,3,3): layers 0-2 see the res5 tokens with one level, 3-5 res5+res4 with two, 6-8 all with three."""
    encoder = small_proscale((3, 3, 3))
    seen = []
    for layer in encoder.layers:
        layer.register_forward_pre_hook(lambda module, args: seen.append((args[0].shape[1], len(args[3]))))
    tokens, pos = inputs()
    with torch.no_grad():
        out = encoder(tokens, pos, SHAPES)
    assert out.shape == tokens.shape
    l5, l4, l3 = COUNTS
    assert seen == [(l5, 1)] * 3 + [(l5 + l4, 2)] * 3 + [(l5 + l4 + l3, 3)] * 3
    assert [layer.n_levels for layer in encoder.layers] == [1, 1, 1, 2, 2, 2, 3, 3, 3]


def test_forward_follows_the_notes_stage_steps():
    """Written out from the note: gate res5 with the TRC (guide: the res3 input tokens), stage 1 with pos and
    reference points of res5; append the gated res4, stage 2; append the raw res3, stage 3."""
    encoder = small_proscale((1, 2, 1))
    tokens, pos = inputs(seed=3)
    l5, l4, _ = COUNTS
    res5, res4, res3 = tokens.split(COUNTS, 1)
    trc = encoder.token_excite
    ref = encoder_reference_points(SHAPES)
    with torch.no_grad():
        x = trc(res5, SHAPES[0], res3, SHAPES[2])
        x = encoder.layers[0](x, pos[:, :l5], ref[:, :l5], SHAPES[:1])
        x = torch.cat([x, trc(res4, SHAPES[1], res3, SHAPES[2])], 1)
        for layer in encoder.layers[1:3]:
            x = layer(x, pos[:, :l5 + l4], ref[:, :l5 + l4], SHAPES[:2])
        x = encoder.layers[3](torch.cat([x, res3], 1), pos, ref, SHAPES)
        assert torch.equal(encoder(tokens, pos, SHAPES), x)
        gate = trc.gate(SHAPES[0], res3, SHAPES[2])
        assert ((gate > 0) & (gate < 1)).all() and gate.std() > 0  # a real, token-dependent gate


def test_residual_adds_each_stage_input_back_after_its_layers():
    encoder = small_proscale((2, 1, 1), residual=True)
    plain = small_proscale((2, 1, 1))
    tokens, pos = inputs(seed=4)
    l5, l4, _ = COUNTS
    res5, res4, res3 = tokens.split(COUNTS, 1)
    trc = encoder.token_excite
    ref = encoder_reference_points(SHAPES)
    with torch.no_grad():
        start = trc(res5, SHAPES[0], res3, SHAPES[2])
        x = start
        for layer in encoder.layers[:2]:
            x = layer(x, pos[:, :l5], ref[:, :l5], SHAPES[:1]) + start
        start = torch.cat([x, trc(res4, SHAPES[1], res3, SHAPES[2])], 1)
        x = encoder.layers[2](start, pos[:, :l5 + l4], ref[:, :l5 + l4], SHAPES[:2]) + start
        x = encoder.layers[3](torch.cat([x, res3], 1), pos, ref, SHAPES)
        assert torch.equal(encoder(tokens, pos, SHAPES), x)
        assert not torch.equal(plain(tokens, pos, SHAPES), x)


def test_released_schedule_has_the_notes_layer_shapes_and_keys():
    encoder = ProScaleEncoder()  # (3, 3, 3), d 256, 8 heads, 4 points
    state = encoder.state_dict()
    for i, (offsets, weights) in enumerate([((64, 256), (32, 256))] * 3 + [((128, 256), (64, 256))] * 3
                                           + [((192, 256), (96, 256))] * 3):
        assert tuple(state[f"layers.{i}.self_attn.sampling_offsets.weight"].shape) == offsets
        assert tuple(state[f"layers.{i}.self_attn.attention_weights.weight"].shape) == weights
        assert tuple(state[f"layers.{i}.fc1.weight"].shape) == (1024, 256)
    assert tuple(state["token_excite.ops.weight"].shape) == (1, 256)
    assert tuple(state["token_excite.ops.bias"].shape) == (1,)
    assert "layers.9.fc1.weight" not in state
    # The layers are independent copies.
    assert encoder.layers[0].fc1.weight.data_ptr() != encoder.layers[1].fc1.weight.data_ptr()
    assert encoder.token_excite.temperature == 0.1


def test_schedule_0_0_6_without_the_gate_is_the_stock_encoder():
    """(0, 0, 6) has six 3-level layers and no stage before them. Without the gate it is the stock encoder (same
    keys, same output bit for bit). With the gate it is not: the gate, in (0, 1), still scales res5 and res4
    once before the first layer, as the released code does whatever the schedule."""
    stock = DeformableEncoder(num_layers=6, d_model=D, ffn_dim=96).eval()
    randomise(stock, 5)
    ungated = ProScaleEncoder((0, 0, 6), token_recalibration=False, d_model=D, ffn_dim=96).eval()
    ungated.load_state_dict(stock.state_dict(), strict=True)
    gated = ProScaleEncoder((0, 0, 6), d_model=D, ffn_dim=96).eval()
    gated.load_state_dict({**stock.state_dict(), **{f"token_excite.{k}": v for k, v in
                                                    gated.token_excite.state_dict().items()}}, strict=True)
    tokens, pos = inputs(seed=6)
    with torch.no_grad():
        expected = stock(tokens, pos, SHAPES)
        assert torch.equal(ungated(tokens, pos, SHAPES), expected)
        assert (gated(tokens, pos, SHAPES) - expected).abs().max() > 1e-3


def test_knob_on_proscale_extends_stage_two_into_stage_three():
    encoder = small_proscale((1, 1, 3))
    assert schedule_levels((1, 1, 3)) == [1, 2, 3, 3, 3]
    assert schedule_levels((1, 1, 3), coarse_layers=2) == [1, 2, 2, 2, 3]
    seen = []
    for layer in encoder.layers:
        layer.register_forward_pre_hook(lambda module, args: seen.append(len(args[3])))
    tokens, pos = inputs(seed=7)
    with torch.no_grad():
        stock = encoder(tokens, pos, SHAPES)
        assert torch.equal(encoder(tokens, pos, SHAPES, coarse_layers=0), stock)
        seen.clear()
        knob = encoder(tokens, pos, SHAPES, coarse_layers=2)
    assert seen == [1, 2, 2, 2, 3]
    assert (knob - stock).abs().max() > 1e-3
    with pytest.raises(ValueError, match="coarse_layers must lie in 0..3"):
        encoder(tokens, pos, SHAPES, coarse_layers=4)
    # The rate mapping reads the range off the encoder: at most p3 - 1 = 2 here, 5 for the stock six layers.
    assert coarse_layers_for_rate(0.95, encoder.full_scale_layers) == 2
    assert coarse_layers_for_rate(0.95, DeformableEncoder().full_scale_layers) == 5
    with pytest.raises(ValueError, match="exactly 3 levels"):
        encoder(tokens[:, :COUNTS[0] + COUNTS[1]], pos[:, :COUNTS[0] + COUNTS[1]], SHAPES[:2])


def test_light_pixel_embedding_is_max_pool_group_norm_relu_with_norm_keys_only():
    lpe = light_pixel_embedding(64).eval()
    assert sorted(lpe.state_dict()) == ["1.bias", "1.weight"]
    randomise(lpe, 8)
    x = torch.randn(2, 64, 5, 7)
    expected = F.relu(F.group_norm(F.max_pool2d(x, 3, stride=1, padding=1), 32, lpe[1].weight, lpe[1].bias))
    with torch.no_grad():
        assert torch.allclose(lpe(x), expected, atol=1e-6)
        assert lpe(x).shape == x.shape


# ---- FLOPs ----

def test_per_token_layer_count_is_the_sum_of_the_layers_linear_weights_and_the_notes_formula():
    """Per token a linear layer costs its weight's element count in MACs (the value projection runs over the same
    tokens as the queries here); at d 256, FFN 1024, 8 heads, 4 points the note gives 655,360 + 24,576 * levels."""
    from segmerge_ros.models.mask2former.deformable_attention import DeformableEncoderLayer

    for levels in (1, 2, 3):
        layer = DeformableEncoderLayer(n_levels=levels)
        linear_weights = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
        assert layer_macs_per_token(levels) == linear_weights
        assert layer_macs_per_token(levels) == 655_360 + 24_576 * levels  # proscale.md section 4


def counted_macs(module, *args, **kwargs) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(*args, **kwargs)
    return counter.get_total_flops() // 2  # torch counts a multiply-accumulate as 2 FLOPs


@pytest.mark.parametrize("coarse_layers", [0, 2])
def test_encoder_counts_match_torchs_flop_counter(coarse_layers):
    shape = EncoderShape(d_model=D, n_heads=8, n_points=4, ffn_dim=96)
    stock = DeformableEncoder(num_layers=4, d_model=D, ffn_dim=96)
    tokens, pos = inputs(batch=1)
    assert counted_macs(stock, tokens, pos, SHAPES, coarse_layers=coarse_layers) == \
        encoder_macs(SHAPES, stock_encoder_levels(4, coarse_layers), shape)
    proscale = ProScaleEncoder((2, 1, 3), d_model=D, ffn_dim=96)
    assert counted_macs(proscale, tokens, pos, SHAPES, coarse_layers=coarse_layers) == \
        encoder_macs(SHAPES, schedule_levels((2, 1, 3), coarse_layers), shape) + recalibration_macs(SHAPES, D)


def test_released_schedule_costs_about_64_percent_of_the_stock_encoder_at_16_4_1():
    """The note's estimate: with L3:L4:L5 = 16:4:1 the nine PRO-SCALE layers cost ~64 % of the six stock ones."""
    shapes = encoder_shapes((512, 512))  # 16x16, 32x32, 64x64 tokens: 1:4:16
    ratio = encoder_macs(shapes, schedule_levels((3, 3, 3))) / encoder_macs(shapes, stock_encoder_levels())
    assert ratio == pytest.approx(0.64, abs=0.005)
    knob = [encoder_macs(shapes, stock_encoder_levels(6, k)) for k in range(6)]
    assert all(b < a for a, b in zip(knob, knob[1:]))


@pytest.mark.parametrize("name", ["mask2former-mit-b0", "mask2former-mit-b0-proscale"])
def test_whole_model_counts_split_by_part_and_the_pixel_decoder_matches_its_shape_count(name):
    """torch's count of the pixel decoder of our Mask2Former (meta device) equals the count from shapes alone,
    at every knob setting and a non-square size; the knob lowers the total, and only the pixel decoder changes."""
    from segmerge_ros.models.mask2former.model import mask2former_config
    from segmerge_ros.models.mask2former.flops import model_macs, pixel_decoder_macs_for

    config = mask2former_config(name)
    size = (192, 320)
    settings = (0, 2) if name.endswith("proscale") else (0, 5)
    counts = [model_macs(config, size, k) for k in settings]
    for k, count in zip(settings, counts):
        assert count["pixel_decoder"] == sum(pixel_decoder_macs_for(config, size, k).values())
        assert count["total"] == sum(v for part, v in count.items() if part != "total")
        assert count["backbone"] == counts[0]["backbone"] and count["transformer_decoder"] > 0
    totals = [count["total"] for count in counts]
    assert all(b < a for a, b in zip(totals, totals[1:]))


def test_released_proscale_saves_about_half_the_pixel_decoder_at_coco_size():
    """At 800x1216 (R50 channels) the (3,3,3) pixel decoder with the LPE costs about half the stock one (the note's
    estimate, ~135 -> ~67 GMAC)."""
    from segmerge_ros.models.mask2former.model import mask2former_config
    from segmerge_ros.models.mask2former.flops import pixel_decoder_macs_for

    stock = sum(pixel_decoder_macs_for(mask2former_config("mask2former-r50"), (800, 1216)).values())
    proscale = sum(pixel_decoder_macs_for(mask2former_config("mask2former-r50-proscale"), (800, 1216)).values())
    assert stock / 1e9 == pytest.approx(135, abs=1) and proscale / 1e9 == pytest.approx(67, abs=1)


def test_scales_without_layers_still_enter_through_the_gate():
    """(2, 0, 0): res4 and res3 have no layers; as in the released code (every stage's input is concatenated, with
    or without layers) res4 comes out gated and res3 raw."""
    encoder = small_proscale((2, 0, 0))
    tokens, pos = inputs(seed=9)
    res5, res4, res3 = tokens.split(COUNTS, 1)
    with torch.no_grad():
        out = encoder(tokens, pos, SHAPES)
        gated_res4 = encoder.token_excite(res4, SHAPES[1], res3, SHAPES[2])
    assert torch.equal(out[:, COUNTS[0]:COUNTS[0] + COUNTS[1]], gated_res4)
    assert not torch.equal(gated_res4, res4)
    assert torch.equal(out[:, COUNTS[0] + COUNTS[1]:], res3)
