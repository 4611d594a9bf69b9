"""DoViT: exactness when nothing stops, reconstruction of stopped tokens, per-image stopping, annealing."""

from __future__ import annotations

import pytest
import torch

from segmerge_ros.models.vit.dovit import DoViTSegmenter, anneal_exit_confidence, confidence_for_rate
from segmerge_ros.models.vit.segmenter import SegmenterViT, ViTConfig, tokens_to_grid

pytestmark = pytest.mark.usefixtures("one_thread")



def small_config(decoder: str = "linear") -> ViTConfig:
    return ViTConfig(embed_dim=64, depth=6, num_heads=2, num_classes=5, decoder=decoder, pos_grid=(6, 6))


def images(batch=2, height=96, width=128, seed=0):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def twins(decoder: str, **kwargs) -> tuple[SegmenterViT, DoViTSegmenter]:
    torch.manual_seed(0)
    plain = SegmenterViT(small_config(decoder)).eval()
    dovit = DoViTSegmenter(small_config(decoder), exit_blocks=(1, 3), **kwargs).eval()
    missing, unexpected = dovit.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("aux_heads.") for k in missing)
    return plain, dovit


@pytest.mark.parametrize("decoder", ["linear", "mask"])
def test_exact_plain_output_when_nothing_stops(decoder):
    plain, dovit = twins(decoder, exit_confidence=1.01)
    x = images()
    with torch.no_grad():
        assert torch.equal(dovit(x), plain(x))
        dovit.set_merge_rate(0.0)
        assert torch.equal(dovit(x), plain(x))


def test_everything_stopping_at_first_exit_freezes_the_tokens():
    """With confidence 0 every patch stops after block 1: the decoder sees the block-1 features."""
    plain, dovit = twins("linear", exit_confidence=0.0)
    x = images(1)
    with torch.no_grad():
        tokens, grid = plain.encoder.embed(x)
        for block in plain.encoder.blocks[:2]:
            tokens = block(tokens)
        expected = tokens_to_grid(plain.decoder(plain.encoder.norm(tokens)[:, 1:]), grid)
        assert torch.allclose(dovit(x), expected, atol=1e-6)
    assert dovit.last_token_counts == [[0], [0]]


def test_partial_stopping_is_per_image_and_batch_independent():
    _, dovit = twins("mask")
    with torch.no_grad():  # a confident head for some tokens only: large logits on a random direction
        dovit.aux_heads[0][1].weight.normal_(0, 3.0)
        dovit.aux_heads[1][1].weight.normal_(0, 3.0)
    x = torch.cat([images(1, seed=1), images(1, seed=2) * 3])
    dovit.exit_confidence = 0.9
    with torch.no_grad():
        batched = dovit(x)
        counts = dovit.last_token_counts
        single = torch.cat([dovit(x[:1]), dovit(x[1:])])
    assert any(0 < c < 48 for step in counts for c in step), counts
    assert counts[-1][0] <= counts[0][0] and counts[-1][1] <= counts[0][1]  # stopped tokens stay stopped
    assert torch.allclose(batched, single, atol=1e-5)


def test_rate_mapping_and_annealing():
    assert confidence_for_rate(0.0) == float("inf")
    assert confidence_for_rate(0.1) == pytest.approx(0.985)
    assert anneal_exit_confidence(0.0, 0.985) == 1.0
    assert anneal_exit_confidence(1.0, 0.985) == pytest.approx(0.985)
    _, dovit = twins("linear")
    dovit.on_train_step(0, 100)
    assert dovit.exit_confidence == 1.0
    dovit.on_train_step(50, 100)
    assert 0.985 < dovit.exit_confidence < 1.0
    assert not dovit.static_shapes


def test_training_losses_include_auxiliary_heads():
    _, dovit = twins("linear")
    dovit.train()
    losses = dovit.training_losses(images(2), torch.randint(0, 5, (2, 96, 128)))
    assert set(losses) == {"total", "seg", "aux"}
    losses["total"].backward()
    assert dovit.aux_heads[1][1].weight.grad.abs().sum() > 0
