"""DoViT (Liu et al., WACV 2024): dynamic token stopping with auxiliary heads in a Segmenter ViT. Needs training.

Our own implementation of the method as described in ``docs/methods.md``:

* Auxiliary heads after blocks ``exit_blocks`` (0-based indices; default 2, 5, 8 of a 12-block ViT) predict a class
  for every patch token (LayerNorm + linear, i.e. a 1x1 "FCN" head on the token grid).
* A token whose softmax maximum exceeds ``exit_confidence`` (0.985 in the paper) stops and stays stopped; only the
  kept tokens (and the class token) go through later blocks, each image with its own count, padded in the batch
  and masked in attention.
* Reconstruction after every block: kept tokens are written back into the full-grid buffer, so stopped tokens keep
  their value in place and the decoder sees a full grid.
* When over 10 % of an image's tokens have stopped, its class token is averaged with their mean (at each exit).
* Training: auxiliary cross-entropy with weight 0.4 per head; the exit confidence is annealed from 1.0 (nothing
  stops) to its final value over training (``anneal_exit_confidence``; the trainer calls ``on_train_step``).

Token counts depend on the content: shapes are dynamic, eager execution only.
"""

from __future__ import annotations

import torch
from torch import nn

from segmerge_ros.merging.token_groups import compact_selected, gather_tokens
from segmerge_ros.models.vit.segmenter import SegmenterViT, ViTConfig, check_merge_rate, segmentation_loss, tokens_to_grid

OFF = float("inf")


def confidence_for_rate(rate: float) -> float:
    """``set_merge_rate`` mapping: 0 -> off (inf: no token stops); otherwise ``1 - 0.15 * rate``
    (0.1 -> 0.985, the paper's value; 0.95 -> 0.8575). Higher rates stop tokens at lower confidence."""
    rate = check_merge_rate(rate)
    return OFF if rate == 0.0 else 1.0 - 0.15 * rate


def anneal_exit_confidence(progress: float, final: float, start: float = 1.0) -> float:
    """Linear annealing of the exit confidence over training, ``progress`` in [0, 1]: ``start`` -> ``final``.
    At 1.0 nothing stops (the test is a strict '>')."""
    progress = min(max(progress, 0.0), 1.0)
    return start + (final - start) * progress


class DoViTSegmenter(SegmenterViT):
    """Segmenter with DoViT token stopping (extra parameters ``aux_heads.*``).

    With ``exit_confidence`` >= 1 nothing stops and the output equals the plain ViT exactly.
    ``last_token_counts`` holds the per-image count of still-running patch tokens after each exit of the last
    forward.
    """

    family = "dovit"

    def __init__(
        self,
        config: ViTConfig,
        exit_blocks: tuple[int, ...] = (2, 5, 8),
        exit_confidence: float = 0.985,
        aux_loss_weight: float = 0.4,
        cls_update_fraction: float = 0.1,
    ) -> None:
        super().__init__(config)
        exit_blocks = tuple(int(b) for b in exit_blocks)
        if any(not 0 <= b < config.depth - 1 for b in exit_blocks):
            raise ValueError(f"exit blocks must be in [0, {config.depth - 1}), got {exit_blocks}")
        self.exit_blocks = exit_blocks
        self.exit_confidence = float(exit_confidence)
        self.final_exit_confidence = float(exit_confidence)
        self.aux_loss_weight = aux_loss_weight
        self.cls_update_fraction = cls_update_fraction
        dim = config.embed_dim
        self.aux_heads = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim, eps=config.ln_eps), nn.Linear(dim, config.num_classes)) for _ in exit_blocks
        )
        self.last_token_counts: list[list[int]] = []
        # The rate that set_merge_rate maps onto this confidence (0 when off).
        self.merge_rate = min(0.95, max(0.0, (1.0 - self.exit_confidence) / 0.15))

    def method_config(self) -> dict:
        return {
            "exit_blocks": list(self.exit_blocks),
            "exit_confidence": self.final_exit_confidence,
            "aux_loss_weight": self.aux_loss_weight,
            "cls_update_fraction": self.cls_update_fraction,
        }

    @property
    def static_shapes(self) -> bool:
        return False

    def set_merge_rate(self, rate: float) -> None:
        """Map ``rate`` in [0, 0.95] onto the exit confidence (``confidence_for_rate``); 0 = no token stops."""
        self.merge_rate = check_merge_rate(rate)
        self.exit_confidence = confidence_for_rate(rate)

    def on_train_step(self, step: int, total_steps: int) -> None:
        """Threshold annealing: 1.0 at the start of training -> the final exit confidence at the end."""
        self.exit_confidence = anneal_exit_confidence(step / max(total_steps, 1), self.final_exit_confidence)

    def _run_kept(self, block: nn.Module, x: torch.Tensor, stopped: torch.Tensor) -> torch.Tensor:
        """One block over the class token and the kept tokens only; stopped tokens keep their values in place."""
        keep = torch.cat([torch.ones_like(stopped[:, :1]), ~stopped], dim=1)
        index, valid = compact_selected(keep)
        subset = gather_tokens(x, index)
        bias = None
        if not bool(valid.all()):
            bias = torch.zeros(valid.shape, device=x.device, dtype=x.dtype).masked_fill(~valid, float("-inf"))
            bias = bias[:, None, None, :]
        updated = torch.where(valid[..., None], block(subset, bias), subset)
        return x.scatter(1, index[..., None].expand(-1, -1, x.shape[-1]), updated)

    def _update_class_token(self, x: torch.Tensor, stopped: torch.Tensor) -> torch.Tensor:
        """Average the class token with the mean of the stopped tokens where more than the set fraction stopped."""
        fraction = stopped.float().mean(1)
        weights = stopped.to(x.dtype)[..., None]
        stopped_mean = (x[:, 1:] * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        update = (fraction > self.cls_update_fraction)[:, None]
        cls = torch.where(update, 0.5 * (x[:, 0] + stopped_mean), x[:, 0])
        return torch.cat([cls[:, None], x[:, 1:]], dim=1)

    def _forward_with_aux(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        encoder = self.encoder
        x, grid = encoder.embed(images)
        stopped = torch.zeros(x.shape[0], x.shape[1] - 1, dtype=torch.bool, device=x.device)
        aux_logits: list[torch.Tensor] = []
        counts: list[list[int]] = []
        stopping = self.exit_confidence < 1.0
        for index, block in enumerate(encoder.blocks):
            x = self._run_kept(block, x, stopped) if bool(stopped.any()) else block(x)
            if index not in self.exit_blocks or not (stopping or self.training):
                continue
            logits = self.aux_heads[self.exit_blocks.index(index)](x[:, 1:])
            aux_logits.append(logits)
            if stopping:
                confidence = logits.detach().softmax(-1).amax(-1)
                newly = (confidence > self.exit_confidence) & ~stopped
                if bool(newly.any()):
                    stopped = stopped | newly
                    x = self._update_class_token(x, stopped)
                counts.append((~stopped).sum(1).tolist())
        self.last_token_counts = counts
        tokens = encoder.norm(x)
        return tokens_to_grid(self.decoder(tokens[:, 1:]), grid), [tokens_to_grid(a, grid) for a in aux_logits]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._forward_with_aux(images)[0]

    def training_losses(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits, aux_logits = self._forward_with_aux(images)
        seg = segmentation_loss(logits, labels)
        losses = {"seg": seg, "total": seg}
        if aux_logits:
            aux = sum(segmentation_loss(a, labels) for a in aux_logits)
            losses["aux"] = aux
            losses["total"] = seg + self.aux_loss_weight * aux
        return losses
