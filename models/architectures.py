"""Model families: config and module classes, ONNX graph signatures and decoder wiring.

Each family's module has `encode(*encoder inputs)` and `decode_step(*decoder inputs)` whose
arguments and results follow the signatures below, in order. Export, parity, training-time
evaluation and the serving runtime all feed the graphs through the same wiring.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from attnserve.models.bahdanau import BahdanauConfig, BahdanauSeq2Seq
from attnserve.models.luong import LuongConfig, LuongSeq2Seq
from attnserve.models.transformer import TransformerConfig, TransformerSeq2Seq

Tensor = tuple[str, str, list[str | int]]  # name, dtype, shape (sizes or axis names)
DYNAMIC_AXES = frozenset({"batch", "src_len", "past_len", "next_len"})
TEXT_INPUTS = [("src_ids", "int64", ["batch", "src_len"]), ("src_mask", "bool", ["batch", "src_len"])]


def text_loss(model: nn.Module, batch: dict[str, torch.Tensor], smoothing: float) -> torch.Tensor:
    """Teacher-forced cross-entropy of a text-to-text model."""
    logits = model(batch["src_ids"], batch["src_mask"], batch["tgt_in"])  # (B, T, V)
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        batch["tgt_out"].reshape(-1),
        ignore_index=0,
        label_smoothing=smoothing,
    )


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


BAHDANAU = Architecture(
    name="bahdanau-gru",
    config_cls=BahdanauConfig,
    model_cls=BahdanauSeq2Seq,
    encoder_inputs=TEXT_INPUTS,
    encoder_outputs=[
        ("memory", "float32", ["batch", "src_len", "memory_size"]),
        ("keys", "float32", ["batch", "src_len", "attention_size"]),
        ("init_state", "float32", ["batch", "decoder_size"]),
    ],
    decoder_inputs=[
        ("prev_token", "int64", ["batch"]),
        ("state", "float32", ["batch", "decoder_size"]),
        ("memory", "float32", ["batch", "src_len", "memory_size"]),
        ("keys", "float32", ["batch", "src_len", "attention_size"]),
        ("src_mask", "bool", ["batch", "src_len"]),
    ],
    decoder_outputs=[
        ("logits", "float32", ["batch", "vocab"]),
        ("new_state", "float32", ["batch", "decoder_size"]),
        ("attention", "float32", ["batch", "src_len"]),
    ],
    wiring={
        "token_input": "prev_token",
        "logits_output": "logits",
        "attention_output": "attention",
        "initial_state": {
            "state": "encoder:init_state",
            "memory": "encoder:memory",
            "keys": "encoder:keys",
            "src_mask": "input:src_mask",
        },
        "recurrent": {"new_state": "state"},
    },
)

LUONG = Architecture(
    name="luong-gru",
    config_cls=LuongConfig,
    model_cls=LuongSeq2Seq,
    encoder_inputs=TEXT_INPUTS,
    encoder_outputs=[
        ("memory", "float32", ["batch", "src_len", "hidden_size"]),
        ("init_state", "float32", ["batch", "hidden_size"]),
        ("init_feed", "float32", ["batch", "hidden_size"]),
    ],
    decoder_inputs=[
        ("prev_token", "int64", ["batch"]),
        ("state", "float32", ["batch", "hidden_size"]),
        ("feed", "float32", ["batch", "hidden_size"]),
        ("memory", "float32", ["batch", "src_len", "hidden_size"]),
        ("src_mask", "bool", ["batch", "src_len"]),
    ],
    decoder_outputs=[
        ("logits", "float32", ["batch", "vocab"]),
        ("new_state", "float32", ["batch", "hidden_size"]),
        ("new_feed", "float32", ["batch", "hidden_size"]),
        ("attention", "float32", ["batch", "src_len"]),
    ],
    wiring={
        "token_input": "prev_token",
        "logits_output": "logits",
        "attention_output": "attention",
        "initial_state": {
            "state": "encoder:init_state",
            "feed": "encoder:init_feed",
            "memory": "encoder:memory",
            "src_mask": "input:src_mask",
        },
        "recurrent": {"new_state": "state", "new_feed": "feed"},
    },
)

_CACHE = ["batch", "layers", "heads", "past_len", "head_size"]
_CROSS = ["batch", "layers", "heads", "src_len", "head_size"]
TRANSFORMER = Architecture(
    name="transformer",
    config_cls=TransformerConfig,
    model_cls=TransformerSeq2Seq,
    encoder_inputs=TEXT_INPUTS,
    encoder_outputs=[
        ("memory", "float32", ["batch", "src_len", "d_model"]),
        ("cross_k", "float32", _CROSS),
        ("cross_v", "float32", _CROSS),
        ("init_past_k", "float32", _CACHE),
        ("init_past_v", "float32", _CACHE),
        ("encoder_attention", "float32", ["batch", "encoder_layers", "heads", "src_len", "src_len"]),
    ],
    decoder_inputs=[
        ("prev_token", "int64", ["batch"]),
        ("past_k", "float32", _CACHE),
        ("past_v", "float32", _CACHE),
        ("cross_k", "float32", _CROSS),
        ("cross_v", "float32", _CROSS),
        ("src_mask", "bool", ["batch", "src_len"]),
    ],
    decoder_outputs=[
        ("logits", "float32", ["batch", "vocab"]),
        ("new_past_k", "float32", ["batch", "layers", "heads", "next_len", "head_size"]),
        ("new_past_v", "float32", ["batch", "layers", "heads", "next_len", "head_size"]),
        ("attention", "float32", ["batch", "src_len"]),
        ("cross_attention_heads", "float32", ["batch", "layers", "heads", "src_len"]),
        ("self_attention_heads", "float32", ["batch", "layers", "heads", "next_len"]),
    ],
    wiring={
        "token_input": "prev_token",
        "logits_output": "logits",
        "attention_output": "attention",
        "initial_state": {
            "past_k": "encoder:init_past_k",
            "past_v": "encoder:init_past_v",
            "cross_k": "encoder:cross_k",
            "cross_v": "encoder:cross_v",
            "src_mask": "input:src_mask",
        },
        "recurrent": {"new_past_k": "past_k", "new_past_v": "past_v"},
    },
)

ARCHITECTURES = {a.name: a for a in (BAHDANAU, LUONG, TRANSFORMER)}


def architecture(name: str) -> Architecture:
    """The registered family called `name`.

    Raises:
        ValueError: for an unknown name.
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; expected one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name]
