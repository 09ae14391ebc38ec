"""The graph contract every model family follows: tensor tables and the `Architecture` record.

Each family's module has `encode(*encoder inputs)` and `decode_step(*decoder inputs)` whose
arguments and results follow the tables of its `ARCHITECTURE`, in order. Export, parity,
training-time evaluation and the serving runtime all feed the graphs through the same wiring.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from attnserve.models.losses import text_loss

Tensor = tuple[str, str, list[str | int]]  # name, dtype, shape (sizes or axis names)
DYNAMIC_AXES = frozenset({"batch", "src_len", "past_len", "next_len"})
TEXT_INPUTS = [("src_ids", "int64", ["batch", "src_len"]), ("src_mask", "bool", ["batch", "src_len"])]


def text_config(config_cls: type, src_vocab_size: int, tgt_vocab_size: int, **fields):
    """A text model's config: both vocabulary sizes and the given fields."""
    return config_cls(src_vocab_size, tgt_vocab_size, **fields)


@dataclass(frozen=True)
class Architecture:
    """One model family as training, export and serving see it."""

    name: str
    config_cls: type
    model_cls: type
    encoder_inputs: list[Tensor]
    encoder_outputs: list[Tensor]
    decoder_inputs: list[Tensor]
    decoder_outputs: list[Tensor]
    wiring: dict = field(default_factory=dict)
    attention_modes: tuple[str, ...] = ("cross",)
    loss: Callable[[nn.Module, dict[str, torch.Tensor], float], torch.Tensor] = text_loss
    make_config: Callable[..., object] = text_config
    per_config: Callable[[Architecture, object], Architecture] | None = None  # tables that depend on it

    def for_config(self, config) -> Architecture:
        """The family's tables for a model of this config (the Transformer's depend on its layers)."""
        return self if self.per_config is None else self.per_config(self, config)

    def new_model(self, src_vocab_size: int, tgt_vocab_size: int, **fields) -> nn.Module:
        """A freshly initialised model for the given vocabulary sizes and config fields."""
        return self.model_cls(self.make_config(self.config_cls, src_vocab_size, tgt_vocab_size, **fields))
