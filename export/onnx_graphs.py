"""Exports a Bahdanau model as an encoder graph and a single-step decoder graph."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from attnserve.models.bahdanau import BahdanauSeq2Seq

OPSET = 17

# Graph signatures: (inputs, outputs) with dtype and symbolic shapes, written into the manifest.
ENCODER_IO = (
    [("src_ids", "int64", ["batch", "src_len"]), ("src_mask", "bool", ["batch", "src_len"])],
    [
        ("memory", "float32", ["batch", "src_len", "memory_size"]),
        ("keys", "float32", ["batch", "src_len", "attention_size"]),
        ("init_state", "float32", ["batch", "decoder_size"]),
    ],
)
DECODER_IO = (
    [
        ("prev_token", "int64", ["batch"]),
        ("state", "float32", ["batch", "decoder_size"]),
        ("memory", "float32", ["batch", "src_len", "memory_size"]),
        ("keys", "float32", ["batch", "src_len", "attention_size"]),
        ("src_mask", "bool", ["batch", "src_len"]),
    ],
    [
        ("logits", "float32", ["batch", "vocab"]),
        ("new_state", "float32", ["batch", "decoder_size"]),
        ("attention", "float32", ["batch", "src_len"]),
    ],
)
DECODER_WIRING = {
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
}


class _Encoder(nn.Module):
    def __init__(self, model: BahdanauSeq2Seq):
        super().__init__()
        self.model = model

    def forward(self, src_ids, src_mask):
        return self.model.encode(src_ids, src_mask)


class _DecoderStep(nn.Module):
    def __init__(self, model: BahdanauSeq2Seq):
        super().__init__()
        self.model = model

    def forward(self, prev_token, state, memory, keys, src_mask):
        return self.model.decode_step(prev_token, state, memory, keys, src_mask)


def _dynamic_axes(io) -> dict[str, dict[int, str]]:
    """Every named (non-size) axis of the signature is dynamic."""
    inputs, outputs = io
    return {
        name: {i: axis for i, axis in enumerate(shape) if axis in ("batch", "src_len")}
        for name, _, shape in inputs + outputs
    }


def _export(module: nn.Module, args: tuple, io, path: Path) -> None:
    inputs, outputs = io
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript-path deprecation chatter
        # dynamo=False: 0.2-0.6 s per graph and keeps the GRU's time axis dynamic (FACTS.md).
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=[n for n, _, _ in inputs],
            output_names=[n for n, _, _ in outputs],
            dynamic_axes=_dynamic_axes(io),
        )


@torch.no_grad()
def export_graphs(model: BahdanauSeq2Seq, out_dir: Path) -> dict[str, Path]:
    """Writes encoder.onnx and decoder_step.onnx to out_dir; returns their paths."""
    model = model.eval()
    B, S = 3, 7  # any sizes: the axes are dynamic
    src_ids = torch.randint(3, model.config.src_vocab_size, (B, S))
    src_mask = torch.ones(B, S, dtype=torch.bool)
    src_mask[1, 5:] = False
    memory, keys, state = model.encode(src_ids, src_mask)
    prev = torch.full((B,), 1, dtype=torch.long)
    paths = {"encoder": out_dir / "encoder.onnx", "decoder_step": out_dir / "decoder_step.onnx"}
    _export(_Encoder(model), (src_ids, src_mask), ENCODER_IO, paths["encoder"])
    _export(_DecoderStep(model), (prev, state, memory, keys, src_mask), DECODER_IO, paths["decoder_step"])
    return paths
