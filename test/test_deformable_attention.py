"""Multi-scale deformable attention, the encoder layer and encoder, and the coarse-layer knob
(segmerge_ros/models/mask2former/deformable_attention.py).

The attention is checked against a direct per-sample reference that computes every bilinear tap explicitly (pixel
coordinate loc * size - 0.5, four neighbours, taps outside the map read 0) in float64, a different method from
grid_sample. The layer and encoder are checked against transformers' Mask2Former (test-only import) with the same
weights.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from segmerge_ros.models.mask2former.deformable_attention import (
    KNOB_SETTINGS,
    DeformableEncoder,
    DeformableEncoderLayer,
    coarse_layers_for_rate,
    encoder_reference_points,
    level_sliced_linear,
    multi_scale_deformable_attention,
    sine_position_embedding,
)

transformers_m2f = pytest.importorskip("transformers.models.mask2former.modeling_mask2former")

# Non-square levels, coarse to fine, as the pixel decoder orders them.
SHAPES = [(2, 3), (4, 6), (8, 12)]
NUM_TOKENS = sum(h * w for h, w in SHAPES)


def bilinear_reference(value, spatial_shapes, locations, weights):
    """Per sample, in float64: for query q, head m, level l, point k the four taps around
    (x, y) = (loc_x * W - 0.5, loc_y * H - 0.5), each weighted by its area, reading 0 outside the level."""
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    starts = [0]
    for h, w in spatial_shapes:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(batch, queries, heads, head_dim, dtype=torch.float64)
    for b in range(batch):
        for q in range(queries):
            for m in range(heads):
                for lv, (height, width) in enumerate(spatial_shapes):
                    for k in range(points):
                        x = locations[b, q, m, lv, k, 0].item() * width - 0.5
                        y = locations[b, q, m, lv, k, 1].item() * height - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        fx, fy = x - x0, y - y0
                        sample = torch.zeros(head_dim, dtype=torch.float64)
                        for xi, yi, area in ((x0, y0, (1 - fx) * (1 - fy)), (x0 + 1, y0, fx * (1 - fy)),
                                             (x0, y0 + 1, (1 - fx) * fy), (x0 + 1, y0 + 1, fx * fy)):
                            if 0 <= xi < width and 0 <= yi < height:
                                sample += area * value[b, starts[lv] + yi * width + xi, m].double()
                        out[b, q, m] += weights[b, q, m, lv, k].item() * sample
    return out.reshape(batch, queries, heads * head_dim)


def hand_made_values(spatial_shapes, heads=2, head_dim=3):
    """value[token, head, d] = 100 * level + 10 * token-in-level + head + d / 10: every tap is recognisable."""
    parts = []
    for level, (h, w) in enumerate(spatial_shapes):
        idx = torch.arange(h * w, dtype=torch.float32)[:, None, None]
        parts.append(100 * level + 10 * idx + torch.arange(heads)[None, :, None] + torch.arange(head_dim) / 10)
    return torch.cat(parts)[None]


def test_attention_reads_pixel_centres_exactly_and_zero_outside():
    """Known answers on a 2x3 and a 3x1 level: a pixel centre reads that pixel; the map's outer edge (half a pixel
    beyond the border pixel's centre) reads half the border pixel (its outer tap is 0); far outside reads 0."""
    shapes = [(2, 3), (3, 1)]
    value = hand_made_values(shapes)
    # One query, 2 heads, 2 levels, 3 points; x, y in [0, 1] of each level.
    loc = torch.zeros(1, 1, 2, 2, 3, 2)
    loc[..., 0, 0, :] = torch.tensor([(1 + 0.5) / 3, (1 + 0.5) / 2])  # level 0, pixel (row 1, col 1)
    loc[..., 0, 1, :] = torch.tensor([0.0, (0 + 0.5) / 2])  # level 0, half a pixel left of (row 0, col 0)
    loc[..., 0, 2, :] = torch.tensor([-0.6, 0.5])  # level 0, far outside
    loc[..., 1, 0, :] = torch.tensor([0.5, (2 + 0.5) / 3])  # level 1 (3 rows, 1 column), pixel row 2
    loc[..., 1, 1, :] = torch.tensor([0.5, 1.0])  # level 1, on the bottom edge: half a pixel below row 2's centre
    loc[..., 1, 2, :] = torch.tensor([1.7, 0.5])  # level 1, far outside
    for level in (0, 1):
        for point in range(3):
            one_hot = torch.zeros(1, 1, 2, 2, 3)
            one_hot[..., level, point] = 1.0
            out = multi_scale_deformable_attention(value, shapes, loc, one_hot).view(2, 3)
            token = {(0, 0): 1 * 3 + 1, (0, 1): 0, (1, 0): 6 + 2, (1, 1): 6 + 2}.get((level, point))
            if point == 2:
                expected = torch.zeros(2, 3)
            else:
                expected = value[0, token] * (1.0 if point == 0 else 0.5)
            assert torch.allclose(out, expected, atol=1e-5), (level, point, out, expected)


def test_attention_equals_direct_bilinear_reference():
    """Random locations spread over [-0.3, 1.3] (so many taps fall partly or wholly outside), random weights,
    two heads, three non-square levels: equal to the explicit-tap reference."""
    generator = torch.Generator().manual_seed(3)
    shapes = [(2, 3), (3, 5), (1, 4)]
    tokens = sum(h * w for h, w in shapes)
    value = torch.randn(2, tokens, 2, 4, generator=generator)
    loc = torch.rand(2, 5, 2, 3, 4, 2, generator=generator) * 1.6 - 0.3
    weights = torch.softmax(torch.randn(2, 5, 2, 12, generator=generator), -1).view(2, 5, 2, 3, 4)
    outside = ((loc < 0) | (loc > 1)).any(-1)
    assert outside.any() and (~outside).any()  # the case covers both kinds of taps
    out = multi_scale_deformable_attention(value, shapes, loc, weights)
    expected = bilinear_reference(value, shapes, loc, weights)
    assert out.shape == (2, 5, 8)
    assert torch.allclose(out.double(), expected, atol=1e-5)


def test_attention_rejects_shapes_that_do_not_fit():
    value = torch.zeros(1, 10, 2, 4)
    with pytest.raises(ValueError, match="do not fit"):
        multi_scale_deformable_attention(value, [(2, 3)], torch.zeros(1, 1, 2, 1, 4, 2), torch.zeros(1, 1, 2, 1, 4))


def hf_config(d_model=64, ffn=96, heads=8, layers=6):
    return transformers_m2f.Mask2FormerConfig(
        feature_size=d_model, encoder_feedforward_dim=ffn, num_attention_heads=heads, encoder_layers=layers
    )


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial weights everywhere (LayerNorm gains and biases too); large offsets so taps leave the maps."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            scale = 0.6 if "sampling_offsets" in name else 0.1
            offset = 1.0 if name.endswith("norm.weight") else 0.0
            param.copy_(torch.randn(param.shape, generator=generator) * scale + offset)


def inputs(d_model=64, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, NUM_TOKENS, d_model, generator=generator)
    pos = torch.randn(batch, NUM_TOKENS, d_model, generator=generator)
    return tokens, pos


def hf_reference_points(batch):
    valid = torch.ones(batch, len(SHAPES), 2)
    return transformers_m2f.Mask2FormerPixelDecoderEncoderOnly.get_reference_points(SHAPES, valid, "cpu")


def test_encoder_layer_equals_transformers_layer():
    hf_layer = transformers_m2f.Mask2FormerPixelDecoderEncoderLayer(hf_config()).eval()
    randomise(hf_layer, 1)
    ours = DeformableEncoderLayer(d_model=64, n_levels=3, n_heads=8, n_points=4, ffn_dim=96).eval()
    ours.load_state_dict(hf_layer.state_dict(), strict=True)
    tokens, pos = inputs()
    with torch.no_grad():
        expected = hf_layer(
            tokens, torch.zeros(2, NUM_TOKENS, dtype=torch.bool), position_embeddings=pos,
            reference_points=hf_reference_points(2), spatial_shapes_list=SHAPES,
        )[0]
        got = ours(tokens, pos, encoder_reference_points(SHAPES), SHAPES)
    assert (got - expected).abs().max() <= 1e-5
    assert (got - tokens).abs().max() > 0.1  # the layer did something


def test_encoder_equals_transformers_encoder_with_hf_position_embedding_and_reference_points():
    hf_encoder = transformers_m2f.Mask2FormerPixelDecoderEncoderOnly(hf_config()).eval()
    randomise(hf_encoder, 2)
    ours = DeformableEncoder(num_layers=6, d_model=64, ffn_dim=96).eval()
    ours.load_state_dict(hf_encoder.state_dict(), strict=True)
    tokens, pos = inputs()
    with torch.no_grad():
        expected = hf_encoder(
            inputs_embeds=tokens, attention_mask=torch.zeros(2, NUM_TOKENS, dtype=torch.bool),
            position_embeddings=pos, spatial_shapes_list=SHAPES, level_start_index=None,
            valid_ratios=torch.ones(2, 3, 2), return_dict=True,
        ).last_hidden_state
        got = ours(tokens, pos, SHAPES)
    assert (got - expected).abs().max() <= 1e-5
    # Position embedding and reference points are the same numbers as transformers'.
    hf_pe = transformers_m2f.Mask2FormerSinePositionEmbedding(num_pos_feats=32, normalize=True)
    for height, width in SHAPES:
        assert torch.equal(sine_position_embedding(height, width, num_pos_feats=32),
                           hf_pe((1, 3, height, width), "cpu", torch.float32))
    assert torch.equal(encoder_reference_points(SHAPES).expand(2, -1, -1), hf_reference_points(2)[:, :, 0])
    assert torch.equal(hf_reference_points(2)[:, :, 0], hf_reference_points(2)[:, :, 2])  # same point per level


def small_encoder(num_layers=4, seed=4):
    encoder = DeformableEncoder(num_layers=num_layers, d_model=64, ffn_dim=96).eval()
    randomise(encoder, seed)
    return encoder


def test_coarse_layers_zero_is_the_stock_encoder_bit_for_bit():
    encoder = small_encoder()
    tokens, pos = inputs()
    reference = encoder_reference_points(SHAPES)
    with torch.no_grad():
        stock = tokens
        for layer in encoder.layers:
            stock = layer(stock, pos, reference, SHAPES)
        assert torch.equal(encoder(tokens, pos, SHAPES, coarse_layers=0), stock)
        assert torch.equal(encoder(tokens, pos, SHAPES), stock)


def test_coarse_layers_change_the_output_and_keep_its_shape():
    encoder = small_encoder()
    tokens, pos = inputs()
    with torch.no_grad():
        stock = encoder(tokens, pos, SHAPES)
        for k in (1, 2, 4):
            out = encoder(tokens, pos, SHAPES, coarse_layers=k)
            assert out.shape == stock.shape
            assert (out - stock).abs().max() > 1e-3, k


def test_sliced_weights_with_all_levels_kept_equal_the_stock_layer():
    layer = DeformableEncoderLayer(d_model=64, ffn_dim=96).eval()
    randomise(layer, 5)
    rebuilt = copy.deepcopy(layer)
    attn = rebuilt.self_attn
    with torch.no_grad():
        for linear in (attn.sampling_offsets, attn.attention_weights):
            weight, bias = level_sliced_linear(linear, heads=8, levels=3, keep=3)
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
    assert torch.equal(rebuilt.self_attn.sampling_offsets.weight, layer.self_attn.sampling_offsets.weight)
    tokens, pos = inputs(d_model=64)
    reference = encoder_reference_points(SHAPES)
    with torch.no_grad():
        assert torch.equal(rebuilt(tokens, pos, reference, SHAPES), layer(tokens, pos, reference, SHAPES))


def test_a_three_level_layer_on_two_levels_is_a_two_level_layer_with_the_sliced_weights():
    """Running a stock layer on res5+res4 equals a layer built with n_levels=2 whose offset and attention rows are
    the per-head rows of the first two levels; its softmax is the full one re-normalised over the kept levels."""
    layer = DeformableEncoderLayer(d_model=64, ffn_dim=96).eval()
    randomise(layer, 6)
    two_level = DeformableEncoderLayer(d_model=64, n_levels=2, ffn_dim=96).eval()
    state = layer.state_dict()
    for name in ("sampling_offsets", "attention_weights"):
        weight, bias = level_sliced_linear(getattr(layer.self_attn, name), heads=8, levels=3, keep=2)
        state[f"self_attn.{name}.weight"], state[f"self_attn.{name}.bias"] = weight, bias
    two_level.load_state_dict(state, strict=True)
    # The rows kept for head 1, level 1, point 2 of the offsets (x, y) are rows ((1*3 + 1)*4 + 2)*2 + (0, 1).
    kept = level_sliced_linear(layer.self_attn.sampling_offsets, heads=8, levels=3, keep=2)[0]
    stock_rows = layer.self_attn.sampling_offsets.weight
    assert torch.equal(kept[((1 * 2 + 1) * 4 + 2) * 2], stock_rows[((1 * 3 + 1) * 4 + 2) * 2])

    coarse = SHAPES[:2]
    count = sum(h * w for h, w in coarse)
    tokens, pos = inputs(d_model=64)
    tokens, pos = tokens[:, :count], pos[:, :count]
    reference = encoder_reference_points(coarse)
    with torch.no_grad():
        assert torch.equal(layer(tokens, pos, reference, coarse), two_level(tokens, pos, reference, coarse))
        queries = tokens + pos
        full_logits = layer.self_attn.attention_weights(queries).view(2, count, 8, 12)
        full = torch.softmax(full_logits, -1).view(2, count, 8, 3, 4)
        sliced = torch.softmax(two_level.self_attn.attention_weights(queries).view(2, count, 8, 8), -1)
        renormalised = full[:, :, :, :2] / full[:, :, :, :2].sum((-2, -1), keepdim=True)
        assert torch.allclose(sliced.view(2, count, 8, 2, 4), renormalised, atol=1e-6)
    with pytest.raises(ValueError, match="cannot run on 3"):
        two_level(*inputs(d_model=64), encoder_reference_points(SHAPES), SHAPES)


def test_fine_tokens_skip_the_first_k_layers():
    """With k = 2 of 4 layers coarse: the first two layers see only res5+res4 (the res3 input cannot change
    their result), res3 enters layer 2 as its raw input tokens, and the result is the last two stock layers run
    on that concatenation."""
    encoder = small_encoder(num_layers=4)
    tokens, pos = inputs()
    count = sum(h * w for h, w in SHAPES[:2])
    with torch.no_grad():
        coarse = tokens[:, :count]
        for layer in encoder.layers[:2]:
            coarse = layer(coarse, pos[:, :count], encoder_reference_points(SHAPES[:2]), SHAPES[:2])
        hidden = torch.cat([coarse, tokens[:, count:]], 1)
        for layer in encoder.layers[2:]:
            hidden = layer(hidden, pos, encoder_reference_points(SHAPES), SHAPES)
        assert torch.equal(encoder(tokens, pos, SHAPES, coarse_layers=2), hidden)

        # An encoder of only the two coarse layers returns the res3 tokens untouched, whatever they are, and
        # its res5+res4 result does not depend on them.
        first_two = copy.deepcopy(encoder)
        first_two.layers = first_two.layers[:2]
        changed = tokens.clone()
        changed[:, count:] += 5.0
        out, out_changed = first_two(tokens, pos, SHAPES, 2), first_two(changed, pos, SHAPES, 2)
        assert torch.equal(out[:, count:], tokens[:, count:])
        assert torch.equal(out[:, :count], out_changed[:, :count])
        assert torch.equal(out[:, :count], coarse)


def test_coarse_layers_out_of_range_and_wrong_levels_are_refused():
    encoder = small_encoder(num_layers=2)
    tokens, pos = inputs()
    with pytest.raises(ValueError, match="coarse_layers must lie in 0..2"):
        encoder(tokens, pos, SHAPES, coarse_layers=3)
    with pytest.raises(ValueError, match="3 levels got 2"):
        encoder(tokens, pos, SHAPES[:2])
    with pytest.raises(ValueError, match="give 126 tokens, got 125"):
        encoder(tokens[:, :-1], pos[:, :-1], SHAPES)


def test_knob_rate_mapping():
    rates = [i / 100 for i in range(0, 96)]
    settings = [coarse_layers_for_rate(r) for r in rates]
    assert settings[0] == 0 and coarse_layers_for_rate(0.1) == 0
    assert all(b >= a for a, b in zip(settings, settings[1:]))
    assert set(settings) == {k for _, k in KNOB_SETTINGS}
    assert max(settings) == 5  # the last stock layer always sees every scale
    assert coarse_layers_for_rate(0.95, full_scale_layers=3) == 2  # a PRO-SCALE (3,3,3) stage 3
    for rate, k in KNOB_SETTINGS:
        assert coarse_layers_for_rate(rate) == k
    with pytest.raises(ValueError, match="merge rate"):
        coarse_layers_for_rate(0.96)
    with pytest.raises(ValueError, match="merge rate"):
        coarse_layers_for_rate(-0.1)


def test_bf16_encoder_stays_finite_and_close_to_fp32():
    """torch's CPU grid_sample gave NaN on strided bf16 maps/grids (a batch of 1 at d 256 hit it): the attention
    hands it contiguous tensors. bf16 keeps ~8 bits, so only the mean error is held tight."""
    torch.manual_seed(0)
    shapes = [(3, 5), (6, 10), (12, 20)]
    tokens = sum(h * w for h, w in shapes)
    encoder = DeformableEncoder(num_layers=1).eval()
    x, pos = torch.randn(1, tokens, 256), torch.randn(1, tokens, 256)
    with torch.no_grad():
        reference = encoder(x, pos, shapes)
        low = encoder.to(torch.bfloat16)(x.bfloat16(), pos.bfloat16(), shapes).float()
    assert torch.isfinite(low).all()
    assert (low - reference).abs().mean() < 0.02
