"""Show, attend and tell: a CNN encoder and an LSTM decoder with soft additive attention.

The CNN turns an image into an H x W grid of feature vectors plus a learned embedding of each
grid position (convolutions alone cannot tell the decoder where a feature is); the flattened
grid is the memory the decoder attends over. An optional full-resolution stem and dilated layers
on the grid let each cell see a whole item without coarsening the grid. At step t the query is
the previous state h(t-1); the context z(t) = sum_i a(t,i) m(i), scaled by the gate beta(t) =
sigmoid(f_beta(h(t-1))) when `gate` is on, feeds the LSTM together with the embedding of y(t-1)
(Xu et al., 2015). The doubly stochastic penalty pushes every grid cell to receive, summed over
the caption, about as much attention as any other.

Shapes: B batch, T caption length, N = H * W grid cells, C memory (feature) size, E embedding,
D decoder size, A attention size, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from attnserve.models.attention import AdditiveScore
from attnserve.models.graph_contract import Architecture
from attnserve.models.losses import cross_entropy


@dataclass(frozen=True)
class CaptionerConfig:
    """Hyper-parameters; the model's only constructor argument and stored in checkpoints."""

    vocab_size: int
    channels: tuple[int, ...] = (32, 64)  # CNN stage widths; every stage halves H and W
    stem_channels: int = 0  # width of a full-resolution convolution before the stages (0: none)
    context_layers: int = 0  # residual dilated convolutions (dilation 2, 4, ...) on the grid
    embed_size: int = 64
    decoder_size: int = 256
    attention_size: int = 128
    dropout: float = 0.1
    alpha_c: float = 1.0  # weight of the doubly stochastic attention penalty
    gate: bool = False  # scale the context by the gating scalar beta(t) (slows learning here)
    image_size: int = 56
    image_channels: int = 1  # 1 grey, 3 RGB

    def __post_init__(self) -> None:
        if not self.channels:
            raise ValueError("channels needs at least one stage")
        if self.image_size % self.stride:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the stride {self.stride}")

    @property
    def stride(self) -> int:
        """Pixels per grid cell along each axis."""
        return 2 ** len(self.channels)

    @property
    def grid_height(self) -> int:
        return self.image_size // self.stride

    @property
    def grid_width(self) -> int:
        return self.image_size // self.stride

    @property
    def memory_size(self) -> int:
        return self.channels[-1]


def _conv(in_ch: int, out_ch: int, stride: int, dilation: int = 1) -> list[nn.Module]:
    conv = nn.Conv2d(in_ch, out_ch, 3, stride, padding=dilation, dilation=dilation, bias=False)
    return [conv, nn.BatchNorm2d(out_ch), nn.ReLU()]


class Captioner(nn.Module):
    """CNN grid encoder, LSTM decoder with additive attention over the grid cells."""

    def __init__(self, config: CaptionerConfig):
        super().__init__()
        c = self.config = config
        layers: list[nn.Module] = []
        in_ch = c.image_channels
        if c.stem_channels:
            layers, in_ch = _conv(in_ch, c.stem_channels, 1), c.stem_channels
        for ch in c.channels:
            layers += _conv(in_ch, ch, 2) + _conv(ch, ch, 1)
            in_ch = ch
        self.cnn = nn.Sequential(*layers)
        C, N = c.memory_size, c.grid_height * c.grid_width
        # Dilated layers widen each cell's view (to the whole item) without shrinking the grid.
        self.dilated = nn.ModuleList(
            nn.Sequential(*_conv(C, C, 1, dilation=2 ** (i + 1))) for i in range(c.context_layers)
        )
        self.position = nn.Parameter(torch.randn(N, C))  # (N, C) learned grid-cell embedding
        self.init_h = nn.Linear(C, c.decoder_size)
        self.init_c = nn.Linear(C, c.decoder_size)
        self.attention = AdditiveScore(c.decoder_size, C, c.attention_size)
        self.f_beta = nn.Linear(c.decoder_size, 1) if c.gate else None
        self.embed = nn.Embedding(c.vocab_size, c.embed_size, padding_idx=0)
        self.cell = nn.LSTMCell(c.embed_size + C, c.decoder_size)
        self.readout = nn.Linear(c.decoder_size + C + c.embed_size, c.decoder_size)
        self.out = nn.Linear(c.decoder_size, c.vocab_size)
        self.dropout = nn.Dropout(c.dropout)

    def encode(self, images: torch.Tensor):
        """Encodes a batch of images.

        Args:
            images: (B, I, H0, W0) float32 in [0, 1], I = config.image_channels,
                H0 = W0 = config.image_size.

        Returns:
            memory (B, N, C) in row-major grid order, projected attention keys (B, N, A), and the
            initial LSTM state h0 (B, D), c0 (B, D) computed from the mean of the memory.
        """
        features = self.cnn(images)  # (B, C, H, W)
        for layer in self.dilated:
            features = features + layer(features)  # (B, C, H, W)
        memory = features.flatten(2).transpose(1, 2) + self.position  # (B, N, C)
        mean = memory.mean(1)  # (B, C)
        h0, c0 = torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean))  # (B, D)
        return memory, self.attention.project_keys(memory), h0, c0

    def decode_step(self, prev_token, h, c, memory, keys):
        """One decoder step.

        Args:
            prev_token: (B,) int64 previous output token (<s> at the first step).
            h, c: (B, D) previous LSTM state.
            memory: (B, N, C) grid features; keys: (B, N, A) projected keys.

        Returns:
            logits (B, V), new h (B, D), new c (B, D), attention weights a(t) (B, N).
        """
        emb = self.dropout(self.embed(prev_token))  # (B, E)
        mask = torch.ones_like(memory[..., 0], dtype=torch.bool)  # (B, N): every cell is real
        context, weights = self.attention(h, memory, memory, mask, projected_keys=keys)  # (B, C), (B, N)
        if self.f_beta is not None:
            context = torch.sigmoid(self.f_beta(h)) * context  # (B, C)
        h, c = self.cell(torch.cat([emb, context], dim=1), (h, c))  # (B, D)
        hidden = torch.tanh(self.readout(torch.cat([h, context, emb], dim=1)))  # (B, D)
        return self.out(self.dropout(hidden)), h, c, weights

    def forward(self, images, tgt_in):
        """Teacher-forced logits (B, T, V) and attention (B, T, N) for tgt_in (B, T) starting with <s>."""
        memory, keys, h, c = self.encode(images)
        logits, attention = [], []
        for t in range(tgt_in.size(1)):
            step_logits, h, c, weights = self.decode_step(tgt_in[:, t], h, c, memory, keys)
            logits.append(step_logits)
            attention.append(weights)
        return torch.stack(logits, dim=1), torch.stack(attention, dim=1)

    def doubly_stochastic_penalty(self, attention: torch.Tensor, tgt_mask: torch.Tensor) -> torch.Tensor:
        """alpha_c * mean over the batch of sum_i (1 - sum_t a(t, i))^2, over real target steps only.

        Args:
            attention: (B, T, N) attention weights of every decoder step.
            tgt_mask: (B, T) bool, True for real target steps (the caption tokens and </s>).

        Returns:
            A scalar tensor.
        """
        total = (attention * tgt_mask.unsqueeze(2).to(attention.dtype)).sum(1)  # (B, N)
        return self.config.alpha_c * ((1.0 - total) ** 2).sum(1).mean()


def caption_loss(model: nn.Module, batch: dict[str, torch.Tensor], smoothing: float) -> torch.Tensor:
    """Teacher-forced cross-entropy plus the doubly stochastic attention penalty."""
    logits, attention = model(batch["images"], batch["tgt_in"])  # (B, T, V), (B, T, N)
    penalty = model.doubly_stochastic_penalty(attention, batch["tgt_out"] != 0)
    return cross_entropy(logits, batch["tgt_out"], smoothing) + penalty


def image_config(config_cls: type, src_vocab_size: int, tgt_vocab_size: int, **fields):
    """An image model's config: the caption vocabulary size and the given fields."""
    return config_cls(tgt_vocab_size, **fields)


ARCHITECTURE = Architecture(
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
