"""RNN encoder-decoder with Bahdanau (additive) attention.

The query is the decoder's previous state s(t-1); the context c(t) = sum_i a(t,i) h(i) feeds the
next state together with the embedding of y(t-1). The encoder is bidirectional: the backward
GRU reads each sequence reversed within its own length, so padding never reaches real positions
(and the graph exports to ONNX without packed sequences).

Shapes: B batch, S source length, E embedding, H encoder size per direction, D decoder size,
A attention size, V target vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from attnserve.models.attention import AdditiveScore
from attnserve.models.graph_contract import TEXT_INPUTS, Architecture


@dataclass(frozen=True)
class BahdanauConfig:
    """Hyper-parameters; the model's only constructor argument and stored in checkpoints."""

    src_vocab_size: int
    tgt_vocab_size: int
    embed_size: int = 64
    encoder_size: int = 256
    decoder_size: int = 512
    attention_size: int = 256
    dropout: float = 0.2


def reverse_within_length(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverses each sequence of x (B, S, F) within its own length; padding stays in place."""
    S = x.size(1)
    t = torch.arange(S, device=x.device).unsqueeze(0)  # (1, S)
    last = (lengths - 1).unsqueeze(1)  # (B, 1)
    idx = torch.where(t <= last, last - t, t)  # (B, S)
    return torch.gather(x, 1, idx.unsqueeze(2).expand(-1, -1, x.size(2)))


class BahdanauSeq2Seq(nn.Module):
    """Bidirectional GRU encoder, GRU decoder with additive attention over the encoder states."""

    def __init__(self, config: BahdanauConfig):
        super().__init__()
        c = self.config = config
        self.src_embed = nn.Embedding(c.src_vocab_size, c.embed_size, padding_idx=0)
        self.enc_fwd = nn.GRU(c.embed_size, c.encoder_size, batch_first=True)
        self.enc_bwd = nn.GRU(c.embed_size, c.encoder_size, batch_first=True)
        self.init_state = nn.Linear(c.encoder_size, c.decoder_size)
        self.attention = AdditiveScore(c.decoder_size, 2 * c.encoder_size, c.attention_size)
        self.tgt_embed = nn.Embedding(c.tgt_vocab_size, c.embed_size, padding_idx=0)
        self.cell = nn.GRUCell(c.embed_size + 2 * c.encoder_size, c.decoder_size)
        self.readout = nn.Linear(c.decoder_size + 2 * c.encoder_size + c.embed_size, c.decoder_size)
        self.out = nn.Linear(c.decoder_size, c.tgt_vocab_size)
        self.dropout = nn.Dropout(c.dropout)

    def encode(self, src_ids: torch.Tensor, src_mask: torch.Tensor):
        """Encodes a padded batch.

        Args:
            src_ids: (B, S) int64 token ids, padded with 0.
            src_mask: (B, S) bool, True for real tokens.

        Returns:
            memory (B, S, 2H), projected attention keys (B, S, A), initial decoder state (B, D).
        """
        lengths = src_mask.sum(1)  # (B,)
        x = self.dropout(self.src_embed(src_ids))  # (B, S, E)
        fwd, _ = self.enc_fwd(x)  # (B, S, H)
        bwd_rev, _ = self.enc_bwd(reverse_within_length(x, lengths))  # (B, S, H)
        bwd = reverse_within_length(bwd_rev, lengths)  # (B, S, H)
        memory = torch.cat([fwd, bwd], dim=2) * src_mask.unsqueeze(2)  # (B, S, 2H)
        state = torch.tanh(self.init_state(bwd[:, 0]))  # (B, D): backward state after the whole word
        return memory, self.attention.project_keys(memory), state

    def decode_step(self, prev_token, state, memory, keys, src_mask):
        """One decoder step.

        Args:
            prev_token: (B,) int64 previous output token (<s> at the first step).
            state: (B, D) previous decoder state s(t-1).
            memory: (B, S, 2H) encoder states; keys: (B, S, A) projected keys.
            src_mask: (B, S) bool, True for real source tokens.

        Returns:
            logits (B, V), new state s(t) (B, D), attention weights a(t) (B, S).
        """
        emb = self.dropout(self.tgt_embed(prev_token))  # (B, E)
        context, weights = self.attention(state, memory, memory, src_mask, projected_keys=keys)
        new_state = self.cell(torch.cat([emb, context], dim=1), state)  # (B, D)
        hidden = torch.tanh(self.readout(torch.cat([new_state, context, emb], dim=1)))  # (B, D)
        return self.out(self.dropout(hidden)), new_state, weights

    def forward(self, src_ids, src_mask, tgt_in):
        """Teacher-forced logits (B, T, V) for decoder inputs tgt_in (B, T) starting with <s>."""
        memory, keys, state = self.encode(src_ids, src_mask)
        logits = []
        for t in range(tgt_in.size(1)):
            step_logits, state, _ = self.decode_step(tgt_in[:, t], state, memory, keys, src_mask)
            logits.append(step_logits)
        return torch.stack(logits, dim=1)


ARCHITECTURE = Architecture(
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
