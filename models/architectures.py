"""Model families: config and module classes, ONNX graph signatures and decoder wiring.

Each family's module has `encode(*encoder inputs)` and `decode_step(*decoder inputs)` whose
arguments and results follow the signatures below, in order. Export, parity, training-time
evaluation and the serving runtime all feed the graphs through the same wiring.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from attnserve.models.bahdanau import BahdanauConfig, BahdanauSeq2Seq
from attnserve.models.captioner import Captioner, CaptionerConfig
from attnserve.models.luong import LuongConfig, LuongSeq2Seq
from attnserve.models.transformer import TransformerConfig, TransformerSeq2Seq

Tensor = tuple[str, str, list[str | int]]  # name, dtype, shape (sizes or axis names)
DYNAMIC_AXES = frozenset({"batch", "src_len", "past_len", "next_len"})
TEXT_INPUTS = [("src_ids", "int64", ["batch", "src_len"]), ("src_mask", "bool", ["batch", "src_len"])]


def _cross_entropy(logits: torch.Tensor, tgt_out: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Mean token cross-entropy of logits (B, T, V) against tgt_out (B, T), padding ignored."""
    flat = logits.float().reshape(-1, logits.size(-1))  # (B*T, V)
    return nn.functional.cross_entropy(flat, tgt_out.reshape(-1), ignore_index=0, label_smoothing=smoothing)


def text_loss(model: nn.Module, batch: dict[str, torch.Tensor], smoothing: float) -> torch.Tensor:
    """Teacher-forced cross-entropy of a text-to-text model."""
    logits = model(batch["src_ids"], batch["src_mask"], batch["tgt_in"])  # (B, T, V)
    return _cross_entropy(logits, batch["tgt_out"], smoothing)


def caption_loss(model: nn.Module, batch: dict[str, torch.Tensor], smoothing: float) -> torch.Tensor:
    """Teacher-forced cross-entropy plus the doubly stochastic attention penalty."""
    logits, attention = model(batch["images"], batch["tgt_in"])  # (B, T, V), (B, T, N)
    penalty = model.doubly_stochastic_penalty(attention, batch["tgt_out"] != 0)
    return _cross_entropy(logits, batch["tgt_out"], smoothing) + penalty


def text_config(config_cls: type, src_vocab_size: int, tgt_vocab_size: int, **fields):
    """A text model's config: both vocabulary sizes and the given fields."""
    return config_cls(src_vocab_size, tgt_vocab_size, **fields)


def image_config(config_cls: type, src_vocab_size: int, tgt_vocab_size: int, **fields):
    """An image model's config: the caption vocabulary size and the given fields."""
    return config_cls(tgt_vocab_size, **fields)


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

_HEADS = ["batch", "heads"]


def _transformer_tables(arch: Architecture, config: TransformerConfig) -> Architecture:
    """Per-layer cache and cross-attention tensors of a Transformer with config.decoder_layers layers."""
    layers = range(config.decoder_layers)

    def per_layer(fmt: str, time_axis: str | int) -> list[Tensor]:
        shape = [*_HEADS, time_axis, "head_size"]
        return [(fmt.format(kv=kv, i=i), "float32", shape) for i in layers for kv in "kv"]

    cross = per_layer("cross_{kv}_{i}", "src_len")
    past = per_layer("past_{kv}_{i}", "past_len")
    return replace(
        arch,
        encoder_outputs=[
            ("memory", "float32", ["batch", "src_len", "d_model"]),
            *cross,
            *per_layer("init_past_{kv}_{i}", "past_len"),
            ("encoder_attention", "float32", ["batch", "encoder_layers", "heads", "src_len", "src_len"]),
        ],
        decoder_inputs=[
            ("prev_token", "int64", ["batch"]),
            ("position", "int64", ["batch"]),
            *past,
            *cross,
            ("src_mask", "bool", ["batch", "src_len"]),
        ],
        decoder_outputs=[
            ("logits", "float32", ["batch", "vocab"]),
            *per_layer("new_{kv}_{i}", 1),
            ("attention", "float32", ["batch", "src_len"]),
            ("cross_attention_heads", "float32", ["batch", "layers", "heads", "src_len"]),
            ("self_attention_heads", "float32", ["batch", "layers", "heads", "next_len"]),
        ],
        wiring={
            **arch.wiring,
            "initial_state": {
                **{name: f"encoder:init_{name}" for name, _, _ in past},
                **{name: f"encoder:{name}" for name, _, _ in cross},
                "src_mask": "input:src_mask",
            },
            "cache": {f"new_{name[5:]}": name for name, _, _ in past},
        },
    )


TRANSFORMER = Architecture(
    name="transformer",
    config_cls=TransformerConfig,
    model_cls=TransformerSeq2Seq,
    encoder_inputs=TEXT_INPUTS,
    encoder_outputs=[],  # per layer: see _transformer_tables
    decoder_inputs=[],
    decoder_outputs=[],
    wiring={
        "token_input": "prev_token",
        "position_input": "position",
        "logits_output": "logits",
        "attention_output": "attention",
        "initial_state": {},
        "recurrent": {},
        "cache": {},
        "step_attention": {"cross_heads": "cross_attention_heads", "decoder_self": "self_attention_heads"},
        "encoder_attention": {"encoder_self": "encoder_attention"},
    },
    attention_modes=("cross", "cross_heads", "encoder_self", "decoder_self"),
    per_config=_transformer_tables,
)

CAPTIONER = Architecture(
    name="captioner-lstm",
    config_cls=CaptionerConfig,
    model_cls=Captioner,
    encoder_inputs=[("images", "float32", ["batch", "channels", "height", "width"])],
    encoder_outputs=[
        ("memory", "float32", ["batch", "cells", "memory_size"]),
        ("keys", "float32", ["batch", "cells", "attention_size"]),
        ("init_h", "float32", ["batch", "decoder_size"]),
        ("init_c", "float32", ["batch", "decoder_size"]),
    ],
    decoder_inputs=[
        ("prev_token", "int64", ["batch"]),
        ("h", "float32", ["batch", "decoder_size"]),
        ("c", "float32", ["batch", "decoder_size"]),
        ("memory", "float32", ["batch", "cells", "memory_size"]),
        ("keys", "float32", ["batch", "cells", "attention_size"]),
    ],
    decoder_outputs=[
        ("logits", "float32", ["batch", "vocab"]),
        ("new_h", "float32", ["batch", "decoder_size"]),
        ("new_c", "float32", ["batch", "decoder_size"]),
        ("attention", "float32", ["batch", "cells"]),
    ],
    wiring={
        "token_input": "prev_token",
        "logits_output": "logits",
        "attention_output": "attention",
        "initial_state": {
            "h": "encoder:init_h",
            "c": "encoder:init_c",
            "memory": "encoder:memory",
            "keys": "encoder:keys",
        },
        "recurrent": {"new_h": "h", "new_c": "c"},
    },
    loss=caption_loss,
    make_config=image_config,
)

ARCHITECTURES = {a.name: a for a in (BAHDANAU, LUONG, TRANSFORMER, CAPTIONER)}


def architecture(name: str) -> Architecture:
    """The registered family called `name`.

    Raises:
        ValueError: for an unknown name.
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; expected one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name]
