"""RNN encoder-decoder with Luong attention (`dot`, `general` or `concat`, chosen by config).

The query is the current decoder state s(t); the context c(t) over the encoder states gives the
attentional state z(t) = tanh(W [c(t); s(t)]), which predicts y(t) and is fed into the next step
together with the embedding of y(t-1) ("input feeding").

Shapes: B batch, S source length, E embedding, H hidden size, V target vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from attnserve.models.attention import SCORE_FUNCTIONS, make_score
from attnserve.models.bahdanau import reverse_within_length
from attnserve.models.graph_contract import TEXT_INPUTS, Architecture


@dataclass(frozen=True)
class LuongConfig:
    """Hyper-parameters; the model's only constructor argument and stored in checkpoints."""

    src_vocab_size: int
    tgt_vocab_size: int
    score: str = "general"
    embed_size: int = 64
    hidden_size: int = 256
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.score not in SCORE_FUNCTIONS:
            raise ValueError(f"unknown score {self.score!r}; expected one of {SCORE_FUNCTIONS}")


class LuongSeq2Seq(nn.Module):
    """Bidirectional GRU encoder (projected to H), GRU decoder with input feeding."""

    def __init__(self, config: LuongConfig):
        super().__init__()
        c = self.config = config
        H = c.hidden_size
        self.src_embed = nn.Embedding(c.src_vocab_size, c.embed_size, padding_idx=0)
        self.enc_fwd = nn.GRU(c.embed_size, H, batch_first=True)
        self.enc_bwd = nn.GRU(c.embed_size, H, batch_first=True)
        self.memory_proj = nn.Linear(2 * H, H)  # keys/values of size H, so `dot` works
        self.init_state = nn.Linear(H, H)
        self.tgt_embed = nn.Embedding(c.tgt_vocab_size, c.embed_size, padding_idx=0)
        self.cell = nn.GRUCell(c.embed_size + H, H)
        self.attention = make_score(c.score, H, H, H)
        self.combine = nn.Linear(2 * H, H)
        self.out = nn.Linear(H, c.tgt_vocab_size)
        self.dropout = nn.Dropout(c.dropout)

    def encode(self, src_ids: torch.Tensor, src_mask: torch.Tensor):
        """src_ids (B, S), src_mask (B, S) -> memory (B, S, H), state (B, H), feed z(0) (B, H)."""
        lengths = src_mask.sum(1)  # (B,)
        x = self.dropout(self.src_embed(src_ids))  # (B, S, E)
        fwd, _ = self.enc_fwd(x)  # (B, S, H)
        bwd = reverse_within_length(self.enc_bwd(reverse_within_length(x, lengths))[0], lengths)  # (B, S, H)
        memory = self.memory_proj(torch.cat([fwd, bwd], dim=2)) * src_mask.unsqueeze(2)  # (B, S, H)
        state = torch.tanh(self.init_state(bwd[:, 0]))  # (B, H)
        return memory, state, torch.zeros_like(state)

    def decode_step(self, prev_token, state, feed, memory, src_mask):
        """One step: prev_token (B,), state s(t-1) (B, H), feed z(t-1) (B, H), memory (B, S, H),
        src_mask (B, S) -> logits (B, V), s(t) (B, H), z(t) (B, H), attention (B, S)."""
        emb = self.dropout(self.tgt_embed(prev_token))  # (B, E)
        state = self.cell(torch.cat([emb, feed], dim=1), state)  # (B, H)
        context, weights = self.attention(state, memory, memory, src_mask)  # (B, H), (B, S)
        feed = torch.tanh(self.combine(torch.cat([context, state], dim=1)))  # (B, H)
        return self.out(self.dropout(feed)), state, feed, weights

    def forward(self, src_ids, src_mask, tgt_in):
        """Teacher-forced logits (B, T, V) for decoder inputs tgt_in (B, T) starting with <s>."""
        memory, state, feed = self.encode(src_ids, src_mask)
        logits = []
        for t in range(tgt_in.size(1)):
            step_logits, state, feed, _ = self.decode_step(tgt_in[:, t], state, feed, memory, src_mask)
            logits.append(step_logits)
        return torch.stack(logits, dim=1)


ARCHITECTURE = Architecture(
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
