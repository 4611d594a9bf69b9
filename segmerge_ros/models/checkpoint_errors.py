"""Strict state-dict loading with one clear error for every checkpoint family."""

from __future__ import annotations

from typing import Mapping

import torch


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, or does not fit the model."""


def load_state_dict_strict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state_dict`` into ``model`` or raise a CheckpointError listing every problem.

    ``source`` names the file (and detected format) in the message, so a user sees at once which checkpoint
    did not fit and how: missing keys, unexpected keys and shape conflicts.
    """
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in expected)
    conflicts = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    )
    if missing or unexpected or conflicts:
        def block(title: str, items: list[str]) -> str:
            if not items:
                return ""
            shown = "\n    ".join(items[:40])
            more = f"\n    ... and {len(items) - 40} more" if len(items) > 40 else ""
            return f"\n  {title} ({len(items)}):\n    {shown}{more}"

        raise CheckpointError(
            f"checkpoint {source} does not match the model"
            + block("missing keys", missing)
            + block("unexpected keys", unexpected)
            + block("shape conflicts", conflicts)
        )
    model.load_state_dict(dict(state_dict), strict=True)
