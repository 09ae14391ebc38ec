"""Training losses the families share: teacher-forced token cross-entropy (a text family's
`Architecture.loss`; the captioner adds its attention penalty to it)."""

from __future__ import annotations

import torch
from torch import nn


def cross_entropy(logits: torch.Tensor, tgt_out: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Mean token cross-entropy of logits (B, T, V) against tgt_out (B, T), padding ignored."""
    flat = logits.float().reshape(-1, logits.size(-1))  # (B*T, V)
    return nn.functional.cross_entropy(flat, tgt_out.reshape(-1), ignore_index=0, label_smoothing=smoothing)


def text_loss(model: nn.Module, batch: dict[str, torch.Tensor], smoothing: float) -> torch.Tensor:
    """Teacher-forced cross-entropy of a text-to-text model."""
    logits = model(batch["src_ids"], batch["src_mask"], batch["tgt_in"])  # (B, T, V)
    return cross_entropy(logits, batch["tgt_out"], smoothing)
