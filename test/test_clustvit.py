"""ClustViT: pseudo-cluster labels, exactness without clusters, masking of empty clusters, per-image counts."""

from __future__ import annotations

import pytest
import torch

from segmerge_ros.models.vit.clustvit import CLUSTER_IGNORE, ClustViTSegmenter, cluster_layout, pseudo_cluster_labels
from segmerge_ros.models.vit.segmenter import SegmenterViT, ViTConfig

pytestmark = pytest.mark.usefixtures("one_thread")



def small_config(decoder: str = "linear") -> ViTConfig:
    return ViTConfig(embed_dim=64, depth=6, num_heads=2, num_classes=5, decoder=decoder, pos_grid=(6, 6))


def images(batch=2, height=96, width=128, seed=0):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def test_pseudo_cluster_labels_by_hand():
    # 2x3 patches of 4x4 pixels. Classes per patch (row-major): 7 7 7 / 3 3 mixed; one 255 patch replaces a 3.
    mask = torch.zeros(1, 8, 12, dtype=torch.long)
    mask[0, :4, :] = 7
    mask[0, 4:, :8] = 3
    mask[0, 4:, 8:] = 1
    mask[0, 7, 11] = 2  # makes the last patch impure
    labels = pseudo_cluster_labels(mask, patch_size=4, num_clusters=2)
    assert labels.tolist() == [[1, 1, 1, 2, 2, CLUSTER_IGNORE]]  # 7 is most frequent -> cluster 1, 3 -> cluster 2
    only_one = pseudo_cluster_labels(mask, patch_size=4, num_clusters=1)
    assert only_one.tolist() == [[1, 1, 1, 0, 0, CLUSTER_IGNORE]]
    mask[0, 4:, :4] = 255
    ignored = pseudo_cluster_labels(mask, patch_size=4, num_clusters=3)
    assert ignored.tolist() == [[1, 1, 1, CLUSTER_IGNORE, 2, CLUSTER_IGNORE]]


def test_pseudo_labels_per_image_and_fewer_classes_than_k():
    mask = torch.stack([torch.full((4, 8), 2), torch.cat([torch.full((4, 4), 0), torch.full((4, 4), 4)], 1)])
    labels = pseudo_cluster_labels(mask, patch_size=4, num_clusters=3)
    assert labels[0].tolist() == [1, 1]  # a single class: cluster 1 only, no phantom clusters
    assert sorted(labels[1].tolist()) == [1, 2]


def test_cluster_layout():
    labels = torch.tensor([[0, 2, 0, 1, 0], [1, 1, 1, 1, 0]])
    slot, length = cluster_layout(labels, num_clusters=2)
    assert slot.tolist() == [[3, 2, 4, 1, 5], [1, 1, 1, 1, 3]]
    assert length == 6  # cls + 2 clusters + at most 3 kept


def twins(decoder: str, num_clusters: int = 3) -> tuple[SegmenterViT, ClustViTSegmenter]:
    torch.manual_seed(0)
    plain = SegmenterViT(small_config(decoder)).eval()
    clust = ClustViTSegmenter(small_config(decoder), num_clusters=num_clusters, injection_block=2, cluster_hidden=32)
    clust.eval()
    missing, unexpected = clust.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("cluster.", "regenerator.")) for k in missing)
    return plain, clust


@pytest.mark.parametrize("decoder", ["linear", "mask"])
def test_exact_plain_output_without_clusters(decoder):
    plain, clust = twins(decoder)
    x = images()
    with torch.no_grad():
        clust.set_merge_rate(0.0)
        assert torch.equal(clust(x), plain(x))
    _, no_k = twins(decoder, num_clusters=0)
    with torch.no_grad():
        assert torch.equal(no_k(x), plain(x))


def force_clusters(model: ClustViTSegmenter, logits_bias: list[float]) -> None:
    """Make the Cluster MLP output constant logits (labels then follow the bias, plus a content term)."""
    with torch.no_grad():
        model.cluster[2].weight.zero_()
        model.cluster[2].bias.copy_(torch.tensor(logits_bias))


def test_empty_clusters_do_not_leak_into_attention():
    """k=3 with clusters 2 and 3 always empty must equal k=1 with the same weights."""
    _, k3 = twins("mask", num_clusters=3)
    _, k1 = twins("mask", num_clusters=1)
    k1.load_state_dict({k: v for k, v in k3.state_dict().items() if not k.startswith("cluster.2")}, strict=False)
    with torch.no_grad():
        # Content-dependent split between keep (0) and cluster 1; clusters 2, 3 never chosen.
        k3.cluster[2].weight.zero_()
        k3.cluster[2].weight[1].normal_(0, 1.0)
        k3.cluster[2].bias.copy_(torch.tensor([0.0, 0.0, -1e4, -1e4]))
        k1.cluster[2].weight.copy_(k3.cluster[2].weight[:2])
        k1.cluster[2].bias.copy_(k3.cluster[2].bias[:2])
    x = images(2)
    with torch.no_grad():
        out3, out1 = k3(x), k1(x)
    counts = k3.last_token_counts
    assert all(0 < c < 48 for c in counts)  # something clustered, something kept
    assert torch.allclose(out3, out1, atol=1e-5)


def test_batch_equals_single_images():
    _, clust = twins("linear", num_clusters=3)
    with torch.no_grad():
        clust.cluster[2].weight.normal_(0, 0.5)
    x = images(3)
    with torch.no_grad():
        batched = clust(x)
        single = torch.cat([clust(x[i : i + 1]) for i in range(3)])
    assert torch.allclose(batched, single, atol=1e-5)


def test_all_clustered_image_still_works():
    _, clust = twins("linear", num_clusters=2)
    force_clusters(clust, [-1e4, 1e4, 0.0])  # every patch into cluster 1
    with torch.no_grad():
        out = clust(images(1, 480, 640))
    assert out.shape == (1, 5, 30, 40) and torch.isfinite(out).all()
    assert clust.last_token_counts == [1]


def test_rate_caps_active_clusters():
    _, clust = twins("linear", num_clusters=3)
    for rate, active in [(0.0, 0), (0.3, 1), (0.5, 2), (0.95, 3)]:
        clust.set_merge_rate(rate)
        assert clust.active_clusters == active
    assert not clust.static_shapes


def test_training_losses_include_cluster_term():
    _, clust = twins("linear", num_clusters=2)
    clust.train()
    labels = torch.zeros(2, 96, 128, dtype=torch.long)
    labels[:, 48:] = 3
    losses = clust.training_losses(images(2), labels)
    assert set(losses) == {"total", "seg", "cluster"}
    losses["total"].backward()
    assert clust.cluster[0].weight.grad is not None and clust.cluster[0].weight.grad.abs().sum() > 0
