"""ClustViT (Montello et al., ICRA 2026): semantic token clustering inside a Segmenter ViT. Needs training.

Our own implementation of the method as described in ``docs/methods.md``:

* Cluster module before block ``injection_block`` (``ip``): an MLP (D -> hidden -> k+1) labels every patch token;
  label 0 = keep, label j in 1..k = merge into cluster j. Each cluster becomes one token (plain mean). The sequence
  becomes ``[cls, k cluster tokens, kept tokens]``, each image with its own count, padded in the batch.
* Padding mask: padded slots *and empty clusters* get -inf on the attention keys, so they never leak into attention
  (the official code emits an unmasked zero token for an empty cluster).
* Regenerator after the last block: kept tokens go back to their positions; each clustered position gets
  ``MLP([its feature at the injection point || its final cluster token])`` (2D -> D, GELU, D -> D). The encoder
  norm and the decoder then see the full grid.
* Pseudo-cluster loss (``pseudo_cluster_labels``): a 16x16 patch takes its class only if all its pixels share it
  (otherwise it is ignored); the k most frequent classes of each image (counted over such pure patches) become
  clusters 1..k (most frequent = 1), everything else 0; cross-entropy with weight 0.1.

Token counts depend on the content: shapes are dynamic, eager execution only. ``set_merge_rate`` does not change
a trained reduction; it caps the number of clusters in use (see ``ClustViTSegmenter.set_merge_rate``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from segmerge_ros.merging.token_groups import gather_tokens, merge_groups
from segmerge_ros.models.vit.segmenter import (
    IGNORE_INDEX,
    SegmenterViT,
    ViTConfig,
    check_merge_rate,
    key_bias_from_sizes,
    segmentation_loss,
    tokens_to_grid,
)

CLUSTER_IGNORE = -100  # cross-entropy's default ignore index, for impure patches


def pseudo_cluster_labels(
    labels: torch.Tensor, patch_size: int, num_clusters: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Cluster targets ``(B, N)`` from pixel labels ``(B, H, W)`` (H, W multiples of ``patch_size``).

    0 = keep; j in 1..k = the j-th most frequent class of the image (counted over pure patches); ``CLUSTER_IGNORE``
    for patches whose pixels are not all one class, or are ignore-labelled.
    """
    batch, height, width = labels.shape
    rows, cols = height // patch_size, width // patch_size
    patches = labels[:, : rows * patch_size, : cols * patch_size].reshape(batch, rows, patch_size, cols, patch_size)
    patches = patches.permute(0, 1, 3, 2, 4).reshape(batch, rows * cols, patch_size * patch_size).long()
    first = patches[..., 0]
    pure = (patches == first[..., None]).all(-1) & (first != ignore_index)
    num_classes = int(first[pure].max()) + 1 if bool(pure.any()) else 1
    spare = num_classes  # counting bin for impure patches, zeroed below
    class_of_patch = torch.where(pure, first, torch.full_like(first, spare))
    counts = torch.zeros(batch, num_classes + 1, device=labels.device, dtype=torch.long)
    counts.scatter_add_(1, class_of_patch, torch.ones_like(class_of_patch))
    counts[:, spare] = 0
    top_counts, top_classes = counts.topk(min(num_clusters, num_classes + 1), dim=1)
    match = (first[..., None] == top_classes[:, None, :]) & (top_counts[:, None, :] > 0) & pure[..., None]
    target = torch.where(match.any(-1), match.long().argmax(-1) + 1, torch.zeros_like(first))
    return torch.where(pure, target, torch.full_like(target, CLUSTER_IGNORE))


def cluster_layout(labels: torch.Tensor, num_clusters: int) -> tuple[torch.Tensor, int]:
    """Sequence slot of every patch after clustering: ``(B, N)`` in ``[1, T')`` and ``T'``.

    Slot 0 is the class token, slots 1..k the clusters, then each image's kept patches in raster order.
    """
    kept = labels == 0
    kept_rank = kept.long().cumsum(1) - 1
    slot = torch.where(kept, num_clusters + 1 + kept_rank, labels)
    return slot, 1 + num_clusters + int(kept.sum(1).max())


class ClustViTSegmenter(SegmenterViT):
    """Segmenter with ClustViT's Cluster module and Regenerator (extra parameters ``cluster.*``, ``regenerator.*``).

    ``num_clusters`` (k, 0 = no clustering: exactly the plain ViT), ``injection_block`` (ip, 0-based index of the
    block the Cluster module runs before), ``cluster_hidden`` (3072 in the paper), ``cluster_loss_weight`` (0.1).
    """

    family = "clustvit"

    def __init__(
        self,
        config: ViTConfig,
        num_clusters: int = 3,
        injection_block: int = 3,
        cluster_hidden: int = 3072,
        cluster_loss_weight: float = 0.1,
    ) -> None:
        super().__init__(config)
        if not 0 <= injection_block < config.depth:
            raise ValueError(f"injection_block must be in [0, {config.depth}), got {injection_block}")
        if num_clusters < 0:
            raise ValueError(f"num_clusters must be >= 0, got {num_clusters}")
        dim = config.embed_dim
        self.num_clusters = num_clusters
        self.injection_block = injection_block
        self.cluster_hidden = cluster_hidden
        self.cluster_loss_weight = cluster_loss_weight
        self.active_clusters = num_clusters
        self.merge_rate = 0.95  # all k clusters: the trained behaviour
        self.cluster = nn.Sequential(
            nn.Linear(dim, cluster_hidden), nn.GELU(), nn.Linear(cluster_hidden, num_clusters + 1)
        )
        self.regenerator = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.last_token_counts: list[int] = []
        for module in (self.cluster, self.regenerator):
            module.apply(_init_linear)

    def method_config(self) -> dict:
        return {
            "num_clusters": self.num_clusters,
            "injection_block": self.injection_block,
            "cluster_hidden": self.cluster_hidden,
            "cluster_loss_weight": self.cluster_loss_weight,
        }

    @property
    def static_shapes(self) -> bool:
        return False

    def set_merge_rate(self, rate: float) -> None:
        """ClustViT's reduction is learned (which patches cluster is the trained MLP's decision), so the rate does
        not tune it continuously. It caps the clusters in use: ``ceil(rate / 0.95 * k)`` of the k clusters stay
        active (the rest are treated as 'keep'); rate 0 disables the Cluster module (exactly the plain ViT path,
        which a ClustViT-trained network was not trained for). The trained behaviour is rate 0.95 (all k), the
        default."""
        self.merge_rate = check_merge_rate(rate)
        self.active_clusters = min(self.num_clusters, math.ceil(self.merge_rate / 0.95 * self.num_clusters - 1e-9))

    def cluster_assignment(self, cluster_logits: torch.Tensor) -> torch.Tensor:
        """Hard labels ``(B, N)`` from the Cluster MLP, restricted to the active clusters."""
        return cluster_logits[..., : self.active_clusters + 1].argmax(-1)

    def _forward_with_clusters(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        encoder = self.encoder
        x, grid = encoder.embed(images)
        blocks = list(encoder.blocks)
        for block in blocks[: self.injection_block]:
            x = block(x)
        cluster_logits = None
        if self.num_clusters > 0 and self.active_clusters > 0:
            at_injection = x[:, 1:]
            cluster_logits = self.cluster(at_injection)
            labels = self.cluster_assignment(cluster_logits)
            clustered = labels > 0
            if bool(clustered.any()):
                x = self._run_clustered(x, at_injection, labels, blocks[self.injection_block :])
                tokens = encoder.norm(x)
                return tokens_to_grid(self.decoder(tokens[:, 1:]), grid), cluster_logits
        self.last_token_counts = [x.shape[1] - 1] * x.shape[0]
        for block in blocks[self.injection_block :]:
            x = block(x)
        tokens = encoder.norm(x)
        return tokens_to_grid(self.decoder(tokens[:, 1:]), grid), cluster_logits

    def _run_clustered(self, x, at_injection, labels, blocks) -> torch.Tensor:
        """Cluster, run the remaining blocks on the reduced padded sequence, regenerate the full grid."""
        batch = x.shape[0]
        slot, length = cluster_layout(labels, self.num_clusters)
        group = torch.cat([torch.zeros_like(slot[:, :1]), slot], dim=1)
        size = torch.ones(batch, x.shape[1], device=x.device, dtype=x.dtype)
        reduced, reduced_size = merge_groups(x, size, group, length)
        self.last_token_counts = (reduced_size[:, 1:] > 0).sum(1).tolist()
        bias = key_bias_from_sizes(reduced_size, proportional=False)  # padding and empty clusters: -inf
        for block in blocks:
            reduced = block(reduced, bias)
        per_patch = gather_tokens(reduced, slot)
        clustered = labels > 0
        regenerated = self.regenerator(torch.cat([at_injection[clustered], per_patch[clustered]], dim=-1))
        per_patch = per_patch.masked_scatter(clustered[..., None], regenerated)
        return torch.cat([reduced[:, :1], per_patch], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._forward_with_clusters(images)[0]

    def training_losses(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits, cluster_logits = self._forward_with_clusters(images)
        seg = segmentation_loss(logits, labels)
        losses = {"seg": seg, "total": seg}
        if cluster_logits is not None:
            targets = pseudo_cluster_labels(labels, self.config.patch_size, self.num_clusters)
            cluster = F.cross_entropy(cluster_logits.flatten(0, 1), targets.flatten(), ignore_index=CLUSTER_IGNORE)
            if torch.isfinite(cluster):
                losses["cluster"] = cluster
                losses["total"] = seg + self.cluster_loss_weight * cluster
        return losses


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
