"""A CTranslate2 model with the same weights as a Transformer entry (for the engine speed bench).

The weights come from the entry's ONNX graphs (`export.from_entry.rebuild`), so no checkpoint is
needed. CTranslate2's layout: self-attention takes one fused Q/K/V matrix, cross-attention a query
matrix and a fused K/V matrix; embeddings are scaled by sqrt(d_model) as ours are; the position
table is given explicitly (its built-in sinusoid puts all sines first, ours interleaves sin and
cos); the output layer is the tied target embedding plus its bias.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from attnserve.export.from_entry import rebuild

CONVERTED = "ctranslate2-fp32"  # sub-folder of the cache folder holding the converted model


def _linear(spec, *layers: torch.nn.Linear) -> None:
    """Fills a CTranslate2 linear spec with the rows of one or more Linear layers stacked."""
    spec.weight = np.concatenate([layer.weight.detach().numpy() for layer in layers])
    spec.bias = np.concatenate([layer.bias.detach().numpy() for layer in layers])


def _norm(spec, norm: torch.nn.LayerNorm) -> None:
    spec.gamma, spec.beta = norm.weight.detach().numpy(), norm.bias.detach().numpy()


def _ffn(spec, norm: torch.nn.LayerNorm, ff) -> None:
    _norm(spec.layer_norm, norm)
    _linear(spec.linear_0, ff.net[0])
    _linear(spec.linear_1, ff.net[2])


def convert(entry: Path, out: Path) -> Path:
    """Writes the CTranslate2 model (float32) of a Transformer entry to out; returns out.

    Raises:
        ValueError: if the entry is not a Transformer, or CTranslate2 rejects the spec.
    """
    import ctranslate2

    rebuilt = rebuild(entry)
    if rebuilt.payload["architecture"] != "transformer":
        raise ValueError(f"{entry}: CTranslate2 runs Transformers only")
    model, c = rebuilt.model, rebuilt.model.config
    spec = ctranslate2.specs.TransformerSpec.from_config(
        (c.encoder_layers, c.decoder_layers), c.heads, pre_norm=True, alignment_heads=c.heads
    )
    positions = model.positions.numpy()
    enc, dec = spec.encoder, spec.decoder
    enc.embeddings[0].weight = model.src_embed.weight.detach().numpy()
    enc.position_encodings.encodings = positions
    _norm(enc.layer_norm, model.encoder_norm)
    for layer_spec, layer in zip(enc.layer, model.encoder, strict=True):
        attn = layer.self_attn
        _norm(layer_spec.self_attention.layer_norm, layer.norm_self)
        _linear(layer_spec.self_attention.linear[0], attn.q, attn.k, attn.v)
        _linear(layer_spec.self_attention.linear[1], attn.out)
        _ffn(layer_spec.ffn, layer.norm_ff, layer.ff)
    dec.embeddings.weight = model.tgt_embed.weight.detach().numpy()
    dec.position_encodings.encodings = positions
    _norm(dec.layer_norm, model.decoder_norm)
    dec.projection.weight = model.tgt_embed.weight.detach().numpy()
    dec.projection.bias = model.out_bias.detach().numpy()
    for layer_spec, layer in zip(dec.layer, model.decoder, strict=True):
        own, cross = layer.self_attn, layer.cross_attn
        _norm(layer_spec.self_attention.layer_norm, layer.norm_self)
        _linear(layer_spec.self_attention.linear[0], own.q, own.k, own.v)
        _linear(layer_spec.self_attention.linear[1], own.out)
        _norm(layer_spec.attention.layer_norm, layer.norm_cross)
        _linear(layer_spec.attention.linear[0], cross.q)
        _linear(layer_spec.attention.linear[1], cross.k, cross.v)
        _linear(layer_spec.attention.linear[2], cross.out)
        _ffn(layer_spec.ffn, layer.norm_ff, layer.ff)
    spec.register_source_vocabulary(list(rebuilt.src_vocab.tokens))
    spec.register_target_vocabulary(list(rebuilt.tgt_vocab.tokens))
    spec.validate()
    spec.optimize(quantization="float32")
    out.mkdir(parents=True, exist_ok=True)
    spec.save(str(out))
    return out
