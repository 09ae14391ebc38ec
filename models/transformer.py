"""Transformer encoder-decoder built from parts, with a KV cache for single-step decoding.

Pre-LN layers (x + Dropout(Sublayer(LayerNorm(x))), then a final LayerNorm on each stack): they
train without a long warm-up or careful learning-rate tuning, which post-LN needs. Sinusoidal
positions are added to sqrt(D)-scaled embeddings; the output layer is tied to the target embedding.

The decoder step (revision 2, see docs in `decode_step`) takes each row's position, one
self-attention cache per layer of capacity T whose columns at and after the row's position are
ignored, and the cross-attention keys/values computed once by `encode`; it returns only this step's
key and value per layer, which the decode loop writes into the cache at the row's position. It
never copies the cache, so rows of different lengths share one batch and one exported graph serves
every step. Positions index a table of `max_positions` rows: a longer source, or a step past it, is
an index error (in ONNX too).

Shapes: B batch, S source length, T target length (or cache length), D model size, H heads,
dk = D / H head size, L decoder layers, Le encoder layers, V target vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from attnserve.models.attention import scaled_dot_product_attention
from attnserve.models.graph_contract import TEXT_INPUTS, Architecture, Tensor


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

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, D) at one position -> query / sqrt(dk), key, value (B, H, 1, dk) from one product.

        The three weight matrices are concatenated (and the query's scaled) at trace time, a
        constant in the exported graph, so the state_dict keeps its q/k/v names.
        """
        scale = self.head_size**-0.5
        weight = torch.cat([self.q.weight * scale, self.k.weight, self.v.weight])  # (3D, D)
        bias = torch.cat([self.q.bias * scale, self.k.bias, self.v.bias])  # (3D,)
        qkv = nn.functional.linear(x, weight, bias).reshape(-1, 3, self.heads, 1, self.head_size)
        return qkv[:, 0], qkv[:, 1], qkv[:, 2]

    def attend(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None):
        """Queries from x (B, T, D) over keys/values (B, H, S, dk); mask broadcastable to (B, H, T, S).

        Returns:
            output (B, T, D) and weights (B, H, T, S).
        """
        context, weights = scaled_dot_product_attention(self.split(self.q(x)), keys, values, mask)
        context = context.transpose(1, 2).reshape(x.size(0), x.size(1), -1)  # (B, T, D)
        return self.out(context), weights

    def attend_one(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor):
        """attend() for one query position per row: x (B, D) -> output (B, D), weights (B, H, 1, S)."""
        query = self.q(x).reshape(-1, self.heads, 1, self.head_size)  # (B, H, 1, dk)
        context, weights = scaled_dot_product_attention(query, keys, values, mask)  # (B, H, 1, dk)
        return self.out(context.reshape(-1, self.heads * self.head_size)), weights


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

    def forward(self, x, causal, cross_k, cross_v, cross_mask):
        """Teacher-forced pass over all target positions x (B, T, D) at once.

        Args:
            x: (B, T, D) inputs.
            causal: (T, T) bool, True where attending is allowed.
            cross_k, cross_v: (B, H, S, dk) projected encoder memory.
            cross_mask: (B, 1, 1, S) bool, True for real source tokens.

        Returns:
            x (B, T, D).
        """
        h = self.norm_self(x)
        attn, _ = self.self_attn.attend(h, *self.self_attn.project_kv(h), causal)
        x = x + self.dropout(attn)
        attn, _ = self.cross_attn.attend(self.norm_cross(x), cross_k, cross_v, cross_mask)
        x = x + self.dropout(attn)
        return x + self.dropout(self.ff(self.norm_ff(x)))

    def step(self, x, past_k, past_v, cache_mask, cross_k, cross_v, cross_mask):
        """One position per row, attending over a cache it never copies.

        Args:
            x: (B, D) inputs at each row's position p.
            past_k, past_v: (B, H, T, dk) cache; for row r only columns < p[r] are read.
            cache_mask: (B, 1, 1, T) bool, True at the columns to read.
            cross_k, cross_v: (B, H, S, dk) projected encoder memory.
            cross_mask: (B, 1, 1, S) bool, True for real source tokens.

        Returns:
            x (B, D); this position's key and value (B, H, 1, dk); self weights (B, H, T + 1), over the
            cache columns (0 where masked) then the position itself; cross weights (B, H, S).
        """
        attn = self.self_attn
        h = self.norm_self(x)
        q, k_new, v_new = attn.project_qkv(h)  # (B, H, 1, dk), the query scaled by 1 / sqrt(dk)
        cached = (q @ past_k.transpose(-2, -1)).masked_fill(~cache_mask, float("-inf"))  # (B, H, 1, T)
        own = (q * k_new).sum(-1, keepdim=True)  # (B, H, 1, 1)
        weights = torch.softmax(torch.cat([cached, own], dim=-1), dim=-1)  # (B, H, 1, T + 1)
        context = weights[..., :-1] @ past_v + weights[..., -1:] * v_new  # (B, H, 1, dk)
        x = x + attn.out(context.reshape(-1, attn.heads * attn.head_size))
        out, cross_weights = self.cross_attn.attend_one(self.norm_cross(x), cross_k, cross_v, cross_mask)
        x = x + out
        x = x + self.ff(self.norm_ff(x))
        return x, k_new, v_new, weights[:, :, 0], cross_weights[:, :, 0]


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

    def _embed(self, embed: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T) at positions 0..T - 1 -> (B, T, D) scaled embeddings plus positions."""
        return self.dropout(embed(ids) * self.scale + self.positions[: ids.size(1)])

    def _output(self, x: torch.Tensor) -> torch.Tensor:
        """Final decoder states (N, D) -> logits (N, V)."""
        # A 2-D linear exports as Gemm on the embedding itself; a 3-D one would store its transpose too.
        return nn.functional.linear(self.decoder_norm(x), self.tgt_embed.weight, self.out_bias)

    def _encode(self, src_ids: torch.Tensor, src_mask: torch.Tensor):
        """memory (B, S, D), per decoder layer its cross keys and values (B, H, S, dk), and the
        encoder self-attention weights (B, Le, H, S, S)."""
        mask = src_mask[:, None, None, :]  # (B, 1, 1, S)
        x = self._embed(self.src_embed, src_ids)  # (B, S, D)
        encoder_attention = []
        for layer in self.encoder:
            x, weights = layer(x, mask)
            encoder_attention.append(weights)  # (B, H, S, S)
        memory = self.encoder_norm(x)  # (B, S, D)
        cross = [layer.cross_attn.project_kv(memory) for layer in self.decoder]
        return memory, cross, torch.stack(encoder_attention, dim=1)

    def encode(self, src_ids: torch.Tensor, src_mask: torch.Tensor):
        """Encodes a padded batch and prepares the decoder's caches.

        Args:
            src_ids: (B, S) int64 token ids, padded with 0.
            src_mask: (B, S) bool, True for real tokens (at least one per row).

        Returns:
            memory (B, S, D); cross_k_0, cross_v_0, ..., cross_k_{L-1}, cross_v_{L-1} (B, H, S, dk);
            empty self-attention caches init_past_k_0, init_past_v_0, ... (B, H, 0, dk); encoder
            self-attention weights (B, Le, H, S, S).
        """
        c = self.config
        memory, cross, encoder_attention = self._encode(src_ids, src_mask)
        empty = memory.new_zeros((memory.size(0), c.heads, 0, c.d_model // c.heads))  # (B, H, 0, dk)
        caches = [empty] * (2 * c.decoder_layers)
        return memory, *[t for kv in cross for t in kv], *caches, encoder_attention

    def decode_step(self, prev_token: torch.Tensor, position: torch.Tensor, *tensors: torch.Tensor):
        """One decoder step for rows at different positions, with per-layer caches it never copies.

        Args:
            prev_token: (B,) int64 previous output token (<s> at position 0).
            position: (B,) int64 index of prev_token in its row's output.
            tensors: past_k_0, past_v_0, ..., past_k_{L-1}, past_v_{L-1} (B, H, T, dk), caches whose
                columns >= position[r] are ignored for row r (they must hold finite numbers);
                cross_k_0, cross_v_0, ... (B, H, S, dk) from `encode`; src_mask (B, S) bool.

        Returns:
            logits (B, V); new_k_0, new_v_0, ..., new_k_{L-1}, new_v_{L-1} (B, H, 1, dk), this step's
            keys and values, to be written at column position[r]; attention (B, S), the last layer's
            cross-attention averaged over heads; cross_attention_heads (B, L, H, S);
            self_attention_heads (B, L, H, T + 1): weights over the cache columns (0 where masked),
            then over the new position itself.
        """
        L = self.config.decoder_layers
        past, cross, src_mask = tensors[: 2 * L], tensors[2 * L : 4 * L], tensors[4 * L]
        T = past[0].size(2)
        cache_mask = (torch.arange(T, device=position.device) < position[:, None])[:, None, None, :]
        cross_mask = src_mask[:, None, None, :]  # (B, 1, 1, S)
        x = self.tgt_embed(prev_token) * self.scale + self.positions[position]  # (B, D)
        new, self_weights, cross_weights = [], [], []
        for i, layer in enumerate(self.decoder):
            x, k, v, sw, cw = layer.step(
                x, past[2 * i], past[2 * i + 1], cache_mask, cross[2 * i], cross[2 * i + 1], cross_mask
            )
            new += [k, v]
            self_weights.append(sw)
            cross_weights.append(cw)
        cross_heads = torch.stack(cross_weights, dim=1)  # (B, L, H, S)
        return (
            self._output(x),
            *new,
            cross_weights[-1].mean(dim=1),
            cross_heads,
            torch.stack(self_weights, dim=1),
        )

    def forward(self, src_ids, src_mask, tgt_in):
        """Teacher-forced logits (B, T, V) for decoder inputs tgt_in (B, T) starting with <s>."""
        _, cross, _ = self._encode(src_ids, src_mask)
        cross_mask = src_mask[:, None, None, :]  # (B, 1, 1, S)
        T = tgt_in.size(1)
        causal = torch.ones(T, T, dtype=torch.bool, device=tgt_in.device).tril()  # (T, T)
        x = self._embed(self.tgt_embed, tgt_in)  # (B, T, D)
        for layer, (cross_k, cross_v) in zip(self.decoder, cross, strict=True):
            x = layer(x, causal, cross_k, cross_v, cross_mask)
        return self._output(x.flatten(0, 1)).unflatten(0, x.shape[:2])


_HEADS = ["batch", "heads"]


def _tables(arch: Architecture, config: TransformerConfig) -> Architecture:
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


ARCHITECTURE = Architecture(
    name="transformer",
    config_cls=TransformerConfig,
    model_cls=TransformerSeq2Seq,
    encoder_inputs=TEXT_INPUTS,
    encoder_outputs=[],  # per layer: see _tables
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
    per_config=_tables,
)
