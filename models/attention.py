"""Attention score functions; every module returns its context vector and its weights.

Shapes: B batch, S source positions, Dq query size, Dk key size, Dv value size.
A mask is a bool tensor (B, S), True where a source position is real (not padding).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last axis that gives padded positions exactly zero weight.

    Args:
        scores: (..., S) unnormalised scores.
        mask: (..., S) bool, True for real positions; broadcastable to scores. None = no padding.

    Returns:
        (..., S) weights summing to 1 over the real positions.
    """
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1)


def _attend(scores: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None):
    """Weights from (B, S) scores, then the (B, Dv) weighted sum of values (B, S, Dv)."""
    weights = masked_softmax(scores, mask)  # (B, S)
    context = torch.bmm(weights.unsqueeze(1), values).squeeze(1)  # (B, Dv)
    return context, weights


class DotScore(nn.Module):
    """Luong `dot`: score(q, k) = q · k (query and key of equal size)."""

    def forward(self, query, keys, values, mask=None):
        """query (B, D), keys (B, S, D), values (B, S, Dv) -> context (B, Dv), weights (B, S)."""
        scores = torch.bmm(keys, query.unsqueeze(2)).squeeze(2)  # (B, S)
        return _attend(scores, values, mask)


class GeneralScore(nn.Module):
    """Luong `general`: score(q, k) = q · W · k, a learnable bilinear form."""

    def __init__(self, query_size: int, key_size: int):
        super().__init__()
        self.W = nn.Linear(key_size, query_size, bias=False)

    def forward(self, query, keys, values, mask=None):
        """query (B, Dq), keys (B, S, Dk), values (B, S, Dv) -> context (B, Dv), weights (B, S)."""
        scores = torch.bmm(self.W(keys), query.unsqueeze(2)).squeeze(2)  # (B, S)
        return _attend(scores, values, mask)


class AdditiveScore(nn.Module):
    """Bahdanau additive / Luong `concat`: score(q, k) = v · tanh(W_q q + W_k k).

    The key projection W_k k does not depend on the decoder step, so callers may compute it once
    per source with `project_keys` and pass `projected_keys` to every step.
    """

    def __init__(self, query_size: int, key_size: int, attention_size: int):
        super().__init__()
        self.W_q = nn.Linear(query_size, attention_size, bias=False)
        self.W_k = nn.Linear(key_size, attention_size, bias=True)
        self.v = nn.Linear(attention_size, 1, bias=False)

    def project_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """keys (B, S, Dk) -> (B, S, A)."""
        return self.W_k(keys)

    def forward(self, query, keys, values, mask=None, projected_keys=None):
        """query (B, Dq), keys (B, S, Dk), values (B, S, Dv) -> context (B, Dv), weights (B, S)."""
        if projected_keys is None:
            projected_keys = self.project_keys(keys)  # (B, S, A)
        energy = torch.tanh(projected_keys + self.W_q(query).unsqueeze(1))  # (B, S, A)
        scores = self.v(energy).squeeze(2)  # (B, S)
        return _attend(scores, values, mask)


def scaled_dot_product_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention, divided by sqrt(d_k) so the softmax does not saturate.

    Args:
        query: (..., T, Dk) queries.
        keys: (..., S, Dk) keys.
        values: (..., S, Dv) values.
        mask: bool, broadcastable to (..., T, S); True where attending is allowed.

    Returns:
        context (..., T, Dv) and weights (..., T, S).
    """
    scores = query @ keys.transpose(-2, -1) / math.sqrt(query.size(-1))  # (..., T, S)
    weights = masked_softmax(scores, mask)
    return weights @ values, weights


SCORE_FUNCTIONS = ("dot", "general", "concat")


def make_score(kind: str, query_size: int, key_size: int, attention_size: int) -> nn.Module:
    """Builds a score module by name: `dot`, `general` or `concat` (additive)."""
    if kind == "dot":
        if query_size != key_size:
            raise ValueError(
                f"dot attention needs equal query and key sizes, got {query_size} and {key_size}"
            )
        return DotScore()
    if kind == "general":
        return GeneralScore(query_size, key_size)
    if kind == "concat":
        return AdditiveScore(query_size, key_size, attention_size)
    raise ValueError(f"unknown attention score {kind!r}; expected one of {SCORE_FUNCTIONS}")
