"""Transformer encoder-decoder built from parts, with a KV cache for single-step decoding.

Pre-LN layers (x + Dropout(Sublayer(LayerNorm(x))), then a final LayerNorm on each stack): they
train without a long warm-up or careful learning-rate tuning, which post-LN needs. Sinusoidal
positions are added to sqrt(D)-scaled embeddings; the output layer is tied to the target embedding.

The decoder step takes the self-attention cache (keys and values of the tokens already decoded)
and the cross-attention keys/values (computed once by `encode`), and returns the cache grown by
one position. The new token's position is the cache length, read from the tensor shape, so one
exported graph serves every step, the first one (empty cache) included. Positions index a table of
`max_positions` rows: a longer source, or a step past it, is an index error (in ONNX too).

Shapes: B batch, S source length, T target length (or cache length), D model size, H heads,
dk = D / H head size, L decoder layers, Le encoder layers, V target vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from attnserve.models.attention import scaled_dot_product_attention


@dataclass(frozen=True)
class TransformerConfig:
    """Hyper-parameters; the model's only constructor argument and stored in checkpoints."""

    src_vocab_size: int
    tgt_vocab_size: int
    d_model: int = 256
    heads: int = 4
    encoder_layers: int = 2
    decoder_layers: int = 2
    ff_size: int = 1024
    dropout: float = 0.1
    max_positions: int = 256

    def __post_init__(self) -> None:
        if self.d_model % self.heads:
            raise ValueError(f"d_model {self.d_model} is not a multiple of heads {self.heads}")
        if self.encoder_layers < 1 or self.decoder_layers < 1:
            raise ValueError("the encoder and decoder need at least one layer each")


def sinusoidal_positions(max_positions: int, d_model: int) -> torch.Tensor:
    """(max_positions, D) table: sin on even features, cos on odd ones (Vaswani et al., 2017)."""
    position = torch.arange(max_positions, dtype=torch.float64).unsqueeze(1)  # (P, 1)
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model))
    table = torch.zeros(max_positions, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq[: d_model // 2])
    return table.float()


class MultiHeadAttention(nn.Module):
    """Multi-head scaled dot-product attention that returns every head's weights."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads, self.head_size = heads, d_model // heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, H, T, dk)."""
        return x.reshape(x.size(0), x.size(1), self.heads, self.head_size).transpose(1, 2)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, S, D) -> keys and values (B, H, S, dk)."""
        return self.split(self.k(x)), self.split(self.v(x))

    def attend(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None):
        """Queries from x (B, T, D) over keys/values (B, H, S, dk); mask broadcastable to (B, H, T, S).

        Returns:
            output (B, T, D) and weights (B, H, T, S).
        """
        context, weights = scaled_dot_product_attention(self.split(self.q(x)), keys, values, mask)
        context = context.transpose(1, 2).reshape(x.size(0), x.size(1), -1)  # (B, T, D)
        return self.out(context), weights


class FeedForward(nn.Module):
    """Position-wise Linear -> ReLU -> Linear.

    No dropout on the (B, T, ff_size) hidden layer (fairseq's default activation_dropout=0): on one
    CPU thread its random mask alone cost a fifth of a training step.
    """

    def __init__(self, d_model: int, ff_size: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, ff_size), nn.ReLU(), nn.Linear(ff_size, d_model))

    def forward(self, x):
        """(B, T, D) -> (B, T, D)."""
        return self.net(x)


class EncoderLayer(nn.Module):
    """Pre-LN self-attention and feed-forward sublayers."""

    def __init__(self, c: TransformerConfig):
        super().__init__()
        self.norm_self = nn.LayerNorm(c.d_model)
        self.self_attn = MultiHeadAttention(c.d_model, c.heads)
        self.norm_ff = nn.LayerNorm(c.d_model)
        self.ff = FeedForward(c.d_model, c.ff_size)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x, mask):
        """x (B, S, D), mask (B, 1, 1, S) -> x (B, S, D), self-attention weights (B, H, S, S)."""
        h = self.norm_self(x)
        attn, weights = self.self_attn.attend(h, *self.self_attn.project_kv(h), mask)
        x = x + self.dropout(attn)
        return x + self.dropout(self.ff(self.norm_ff(x))), weights


class DecoderLayer(nn.Module):
    """Pre-LN causal self-attention, cross-attention and feed-forward sublayers."""

    def __init__(self, c: TransformerConfig):
        super().__init__()
        self.norm_self = nn.LayerNorm(c.d_model)
        self.self_attn = MultiHeadAttention(c.d_model, c.heads)
        self.norm_cross = nn.LayerNorm(c.d_model)
        self.cross_attn = MultiHeadAttention(c.d_model, c.heads)
        self.norm_ff = nn.LayerNorm(c.d_model)
        self.ff = FeedForward(c.d_model, c.ff_size)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x, past_k, past_v, self_mask, cross_k, cross_v, cross_mask):
        """One layer over the new positions x (B, T, D).

        Args:
            x: (B, T, D) inputs at the new positions.
            past_k, past_v: (B, H, P, dk) cached self-attention keys/values (P may be 0).
            self_mask: None or bool broadcastable to (B, H, T, P + T), True where attending is allowed.
            cross_k, cross_v: (B, H, S, dk) projected encoder memory.
            cross_mask: (B, 1, 1, S) bool, True for real source tokens.

        Returns:
            x (B, T, D), keys and values (B, H, P + T, dk), self weights (B, H, T, P + T),
            cross weights (B, H, T, S).
        """
        h = self.norm_self(x)
        k_new, v_new = self.self_attn.project_kv(h)  # (B, H, T, dk)
        keys = torch.cat([past_k, k_new], dim=2)  # (B, H, P + T, dk)
        values = torch.cat([past_v, v_new], dim=2)
        attn, self_weights = self.self_attn.attend(h, keys, values, self_mask)
        x = x + self.dropout(attn)
        attn, cross_weights = self.cross_attn.attend(self.norm_cross(x), cross_k, cross_v, cross_mask)
        x = x + self.dropout(attn)
        x = x + self.dropout(self.ff(self.norm_ff(x)))
        return x, keys, values, self_weights, cross_weights


class TransformerSeq2Seq(nn.Module):
    """Pre-LN Transformer encoder-decoder; the output layer shares the target embedding's weights."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        c = self.config = config
        self.src_embed = nn.Embedding(c.src_vocab_size, c.d_model, padding_idx=0)
        self.tgt_embed = nn.Embedding(c.tgt_vocab_size, c.d_model)  # tied to the output layer
        for embed in (self.src_embed, self.tgt_embed):
            nn.init.normal_(embed.weight, std=c.d_model**-0.5)  # unit variance after the sqrt(D) scale
        with torch.no_grad():
            self.src_embed.weight[0].zero_()
        self.register_buffer("positions", sinusoidal_positions(c.max_positions, c.d_model), persistent=False)
        self.encoder = nn.ModuleList(EncoderLayer(c) for _ in range(c.encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(c) for _ in range(c.decoder_layers))
        self.encoder_norm = nn.LayerNorm(c.d_model)
        self.decoder_norm = nn.LayerNorm(c.d_model)
        self.out_bias = nn.Parameter(torch.zeros(c.tgt_vocab_size))
        self.dropout = nn.Dropout(c.dropout)
        self.scale = math.sqrt(c.d_model)

    def _embed(self, embed: nn.Embedding, ids: torch.Tensor, start) -> torch.Tensor:
        """ids (B, T) at positions start.. start + T - 1 -> (B, T, D) scaled embeddings plus positions."""
        index = torch.arange(ids.size(1), device=ids.device) + start  # (T,)
        return self.dropout(embed(ids) * self.scale + self.positions[index])

    def encode(self, src_ids: torch.Tensor, src_mask: torch.Tensor):
        """Encodes a padded batch and prepares the decoder's caches.

        Args:
            src_ids: (B, S) int64 token ids, padded with 0.
            src_mask: (B, S) bool, True for real tokens (at least one per row).

        Returns:
            memory (B, S, D); cross-attention keys and values (B, L, H, S, dk) per decoder layer;
            empty self-attention caches past_k, past_v (B, L, H, 0, dk); encoder self-attention
            weights (B, Le, H, S, S).
        """
        c = self.config
        mask = src_mask[:, None, None, :]  # (B, 1, 1, S)
        x = self._embed(self.src_embed, src_ids, 0)  # (B, S, D)
        encoder_attention = []
        for layer in self.encoder:
            x, weights = layer(x, mask)
            encoder_attention.append(weights)  # (B, H, S, S)
        memory = self.encoder_norm(x)  # (B, S, D)
        cross = [layer.cross_attn.project_kv(memory) for layer in self.decoder]
        cross_k = torch.stack([k for k, _ in cross], dim=1)  # (B, L, H, S, dk)
        cross_v = torch.stack([v for _, v in cross], dim=1)
        head_size = c.d_model // c.heads
        past_k = memory.new_zeros((memory.size(0), c.decoder_layers, c.heads, 0, head_size))
        past_v = memory.new_zeros((memory.size(0), c.decoder_layers, c.heads, 0, head_size))
        return memory, cross_k, cross_v, past_k, past_v, torch.stack(encoder_attention, dim=1)

    def _decode(self, tgt_ids, past_k, past_v, self_mask, cross_k, cross_v, src_mask):
        """Decoder stack over tgt_ids (B, T) at positions P.. P + T - 1 where P = past_k.size(3).

        Returns:
            logits (B, T, V), keys and values (B, L, H, P + T, dk), self weights (B, L, H, T, P + T),
            cross weights (B, L, H, T, S).
        """
        cross_mask = src_mask[:, None, None, :]  # (B, 1, 1, S)
        x = self._embed(self.tgt_embed, tgt_ids, past_k.size(3))  # (B, T, D)
        keys, values, self_weights, cross_weights = [], [], [], []
        for i, layer in enumerate(self.decoder):
            x, k, v, sw, cw = layer(
                x, past_k[:, i], past_v[:, i], self_mask, cross_k[:, i], cross_v[:, i], cross_mask
            )
            keys.append(k)
            values.append(v)
            self_weights.append(sw)
            cross_weights.append(cw)
        hidden = self.decoder_norm(x).flatten(0, 1)  # (B * T, D)
        # A 2-D linear exports as Gemm on the embedding itself; a 3-D one would store its transpose too.
        logits = nn.functional.linear(hidden, self.tgt_embed.weight, self.out_bias).unflatten(0, x.shape[:2])
        keys, values = torch.stack(keys, dim=1), torch.stack(values, dim=1)
        return logits, keys, values, torch.stack(self_weights, dim=1), torch.stack(cross_weights, dim=1)

    def decode_step(self, prev_token, past_k, past_v, cross_k, cross_v, src_mask):
        """One decoder step with the KV cache.

        Args:
            prev_token: (B,) int64 previous output token (<s> at the first step).
            past_k, past_v: (B, L, H, T, dk) self-attention cache of the T tokens before (T may be 0).
            cross_k, cross_v: (B, L, H, S, dk) from `encode`.
            src_mask: (B, S) bool, True for real source tokens.

        Returns:
            logits (B, V); new_past_k, new_past_v (B, L, H, T + 1, dk); cross_attention (B, S), the
            last layer's cross-attention averaged over heads; cross_attention_heads (B, L, H, S);
            self_attention_heads (B, L, H, T + 1).
        """
        logits, keys, values, self_w, cross_w = self._decode(
            prev_token.unsqueeze(1), past_k, past_v, None, cross_k, cross_v, src_mask
        )
        cross_heads = cross_w[:, :, :, 0]  # (B, L, H, S)
        return logits[:, 0], keys, values, cross_heads[:, -1].mean(dim=1), cross_heads, self_w[:, :, :, 0]

    def forward(self, src_ids, src_mask, tgt_in):
        """Teacher-forced logits (B, T, V) for decoder inputs tgt_in (B, T) starting with <s>."""
        _, cross_k, cross_v, past_k, past_v, _ = self.encode(src_ids, src_mask)
        T = tgt_in.size(1)
        causal = torch.ones(T, T, dtype=torch.bool, device=tgt_in.device).tril()  # (T, T)
        logits, *_ = self._decode(tgt_in, past_k, past_v, causal, cross_k, cross_v, src_mask)
        return logits
