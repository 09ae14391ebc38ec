"""Rebuilds a PyTorch model from an exported entry's ONNX initializers (no checkpoint needed).

Named initializers are the state_dict's names (behind the exporter's "model." prefix). The
exporter leaves the Linear weights of 3-D inputs unnamed (`onnx::MatMul_N`, stored transposed):
each is named by the bias of the Add that follows its MatMul. Revision 2 decoder steps hold each
layer's self-attention Q/K/V as one unnamed Gemm weight and bias (query rows scaled by
1/sqrt(dk)); those Gemms come in layer order, as each layer consumes the one before. What is
left unnamed (the RNN families' packed GRU weights, bias-less MatMuls, Conv weights with their
BatchNorm folded in) is traced: the same family is exported with every weight element holding
its own integer, and each unnamed initializer's elements name the parameter elements they were
copied from (`trace_unnamed`). The rebuilt model must reproduce the old graphs' outputs before
anything is written from it (`check_against_graphs`).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from torch import nn

from attnserve.core.manifest import MANIFEST_FILE, DecoderSpec, ManifestError, verify_files
from attnserve.core.sources import SourceBatch
from attnserve.core.vocab import Vocab
from attnserve.core.wiring import WiredStepModel
from attnserve.export.onnx_graphs import export_graphs
from attnserve.models.architectures import Architecture, architecture
from attnserve.models.tasks import task as task_named

PREFIX = "model."  # the exporter's wrapper module holds the model as `model`
OUTPUT_BIAS = "out_bias"  # the tied output layer (a transposed copy of tgt_embed in older graphs)
FIRST_MARK = 2.0**20  # the traced export's first weight value; float32 holds integers exactly to 2**24


@dataclass(frozen=True)
class Rebuilt:
    """A model rebuilt from an entry, with what export needs from the entry's manifest."""

    model: nn.Module
    src_vocab: Vocab
    tgt_vocab: Vocab
    payload: dict  # as a checkpoint's payload: architecture, config, meta
    raw: dict  # the entry's manifest


def read_entry(folder: Path) -> dict:
    """The entry's manifest.json, with every graph and file checked against its sha256.

    Raises:
        ManifestError: if the manifest cannot be read or a file does not match.
    """
    try:
        raw = json.loads((folder / MANIFEST_FILE).read_text("utf-8"))
        listed = {g["file"]: g["sha256"] for g in raw["graphs"].values()} | raw.get("files", {})
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ManifestError(f"cannot read {folder / MANIFEST_FILE}: {e!r}") from e
    verify_files(folder, listed)
    return raw


def graph_weights(path: Path, head_size: int) -> dict[str, np.ndarray]:
    """state_dict name -> array for every initializer of an ONNX graph that names its weight:
    by its own name, by the bias of the Add after its MatMul, or as a fused Q/K/V Gemm."""
    graph = onnx.load(str(path)).graph
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    weights = {n[len(PREFIX) :]: v for n, v in values.items() if n.startswith(PREFIX)}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    fused = 0
    for node in graph.node:
        unnamed = [n for n in node.input if n in values and not n.startswith(PREFIX)]
        if node.op_type == "Gemm" and len(unnamed) == 2:  # decoder layer `fused`'s self-attention Q/K/V
            weight, bias = (np.split(values[n], 3) for n in unnamed)  # (3D, D), (3D,)
            unscale = np.float32(head_size**0.5)
            for part, w, b in zip("qkv", weight, bias, strict=True):
                scale = unscale if part == "q" else np.float32(1)
                weights[f"decoder.{fused}.self_attn.{part}.weight"] = w * scale
                weights[f"decoder.{fused}.self_attn.{part}.bias"] = b * scale
            fused += 1
            continue
        if node.op_type != "MatMul" or not unnamed:
            continue
        biases = [
            n[len(PREFIX) :]
            for add in consumers.get(node.output[0], [])
            if add.op_type == "Add"
            for n in add.input
            if n.startswith(PREFIX)
        ]
        if len(biases) != 1:
            continue  # traced instead
        tied = biases[0] == OUTPUT_BIAS
        name = "tgt_embed.transposed" if tied else biases[0].removesuffix("bias") + "weight"
        weights[name] = values[unnamed[0]].T
    return weights


def _initializers(path: Path) -> dict[str, np.ndarray]:
    """name -> array of a graph's unnamed float initializers of two or more elements."""
    graph = onnx.load(str(path)).graph
    return {
        i.name: numpy_helper.to_array(i)
        for i in graph.initializer
        if not i.name.startswith(PREFIX) and i.data_type == onnx.TensorProto.FLOAT and np.prod(i.dims) > 1
    }


def _marked(model: nn.Module) -> nn.Module:
    """The model with parameter element k holding FIRST_MARK + k and every BatchNorm an identity
    (weight 1, mean 0, variance + eps = 1), so a folded Conv keeps its weights and takes its
    bias from the BatchNorm's."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.fill_(1.0)
                module.running_mean.zero_()
                module.running_var.fill_(1.0 - module.eps)  # var + eps is 1 to float32 rounding
        mark = FIRST_MARK
        for name, p in model.named_parameters():
            if not _fixed(model, name):  # a fixed one keeps its index range, unmarked
                p.copy_(torch.arange(mark, mark + p.numel(), dtype=torch.float64).reshape(p.shape))
            mark += p.numel()
    if mark >= 2.0**24:
        raise ValueError(f"{mark - FIRST_MARK:.0f} weights are too many to trace in float32")
    return model.eval()


def _fixed(model: nn.Module, name: str) -> bool:
    """Whether a parameter is a BatchNorm scale, which folding multiplies away (kept at 1)."""
    owner, _, leaf = name.rpartition(".")
    return leaf == "weight" and isinstance(model.get_submodule(owner), nn.modules.batchnorm._BatchNorm)


def trace_unnamed(arch: Architecture, model: nn.Module, example: SourceBatch) -> dict[str, np.ndarray]:
    """graph initializer name -> the flat parameter index each of its elements was copied from.

    Exports `model` marked (see `_marked`, which it modifies) and reads back every unnamed
    initializer whose elements are all marks; those with none are constants and left out.

    Raises:
        ValueError: if an initializer mixes marks with other values (a computed weight).
    """
    _marked(model)
    count = sum(p.numel() for p in model.parameters())
    traced: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in export_graphs(model, arch, example, Path(tmp)).values():
            for name, value in _initializers(path).items():
                index = value.astype(np.float64) - FIRST_MARK
                marks = (index >= 0) & (index < count) & (index == np.round(index))
                if marks.all():
                    traced[name] = index.astype(np.int64)
                elif marks.any():
                    raise ValueError(f"{path.name}: {name} is computed from the weights, not copied")
    return traced


def rebuild(folder: Path) -> Rebuilt:
    """The entry's model with its weights, in eval mode.

    Raises:
        ManifestError: if the entry cannot be read.
        ValueError: if the graphs' weights do not fill the model's state_dict exactly.
    """
    folder = Path(folder)
    raw = read_entry(folder)
    arch = architecture(raw["architecture"])
    model = arch.model_cls(arch.config_cls(**raw["model_config"]))
    head_size = model.config.d_model // model.config.heads if hasattr(model.config, "heads") else 0
    src, tgt = Vocab(tuple(raw["source"]["vocab"])), Vocab(tuple(raw["target"]["vocab"]))
    weights: dict[str, np.ndarray] = {}
    for spec in raw["graphs"].values():
        for name, value in graph_weights(folder / spec["file"], head_size).items():
            if name in weights and not np.array_equal(weights[name], value):
                raise ValueError(f"{folder}: the graphs disagree on {name}")
            weights[name] = value
    tied = weights.pop("tgt_embed.transposed", None)
    if tied is not None and not np.array_equal(tied, weights.get("tgt_embed.weight")):
        raise ValueError(f"{folder}: the output layer is not the target embedding it is tied to")
    state = model.state_dict()
    if any(name not in weights for name, _ in model.named_parameters()):
        weights = _with_traced(folder, raw, arch, model, src, weights)
        state = model.state_dict()  # the marked model's: its BatchNorms are identities
    missing, unexpected = sorted(set(state) - set(weights)), sorted(set(weights) - set(state))
    if missing or unexpected:
        raise ValueError(f"{folder}: graph weights missing {missing}, not in the model {unexpected}")
    model.load_state_dict({n: torch.tensor(v) for n, v in weights.items()})
    training = raw.get("training", {})
    meta = {
        "task": raw["task"],
        "task_args": raw.get("task_args", {}),
        "training": {k: v for k, v in training.items() if k != "train_config"},
        "train_config": training.get("train_config"),
        "dev_metrics": raw.get("metrics", {}).get("dev", {}),
    }
    payload = {"architecture": arch.name, "config": raw["model_config"], "meta": meta}
    return Rebuilt(model.eval(), src, tgt, payload, raw)


def _with_traced(
    folder: Path, raw: dict, arch: Architecture, model: nn.Module, src: Vocab, named: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The named weights completed by the traced ones, and the BatchNorm identities."""
    example = task_named(raw["task"], **raw.get("task_args", {})).source_batches("test", 5, 5, src)[0]
    traced = trace_unnamed(arch.for_config(model.config), model, example)
    params = dict(model.named_parameters())
    offsets = np.cumsum([0] + [p.numel() for p in params.values()])
    flat = np.full(offsets[-1], np.nan, dtype=np.float32)
    for (name, p), start in zip(params.items(), offsets[:-1], strict=True):
        if name in named:
            flat[start : start + p.numel()] = named[name].ravel()
    for spec in raw["graphs"].values():
        for name, value in _initializers(folder / spec["file"]).items():
            if name not in traced:
                continue
            index = traced[name].ravel()
            if value.size != index.size:
                raise ValueError(
                    f"{folder}: {name} has {value.size} elements; the family exports {index.size}"
                )
            known = ~np.isnan(flat[index])
            if not np.array_equal(flat[index][known], value.ravel()[known]):
                raise ValueError(f"{folder}: the graphs disagree on the weights behind {name}")
            flat[index] = value.ravel()
    weights = {n: v.numpy() for n, v in model.state_dict().items() if n not in params}  # buffers
    for (name, p), start in zip(params.items(), offsets[:-1], strict=True):
        value = flat[start : start + p.numel()].reshape(p.shape)
        if _fixed(model, name):
            value = p.detach().numpy()
        if np.isnan(value).any():
            raise ValueError(f"{folder}: no graph holds the weights of {name}")
        weights[name] = value
    return weights


def _old_graphs(folder: Path, raw: dict):
    """The entry's own encoder (named inputs -> named outputs) and its graphs behind the decode
    loop's interface, wired as its manifest says."""
    sessions = {
        k: ort.InferenceSession(str(folder / g["file"]), providers=["CPUExecutionProvider"])
        for k, g in raw["graphs"].items()
    }

    def named(session: ort.InferenceSession):
        inputs = [i.name for i in session.get_inputs()]
        outputs = [o.name for o in session.get_outputs()]
        return lambda feeds: dict(zip(outputs, session.run(None, {k: feeds[k] for k in inputs}), strict=True))

    encoder, decoder = named(sessions["encoder"]), sessions["decoder_step"]
    spec = DecoderSpec(**raw["decoder"])
    return encoder, WiredStepModel(
        spec, encoder, named(decoder), [(i.name, i.shape) for i in decoder.get_inputs()]
    )


@torch.no_grad()
def check_against_graphs(rebuilt: Rebuilt, folder: Path, batches: list[SourceBatch], steps: int) -> float:
    """Largest |rebuilt - old graphs| over the encoder's outputs and `steps` greedy steps' logits.
    The old graphs decode greedily; the rebuilt model scores the tokens they fed, teacher-forced
    (its training-time pass, independent of the new decoder step)."""
    encoder, old = _old_graphs(Path(folder), rebuilt.raw)
    arch = architecture(rebuilt.payload["architecture"]).for_config(rebuilt.model.config)
    bos = rebuilt.tgt_vocab.bos_id
    worst = 0.0
    for batch in batches:
        src = [torch.from_numpy(batch.inputs[name]) for name, _, _ in arch.encoder_inputs]
        got = encoder(batch.inputs)
        encoded = rebuilt.model.encode(*src)
        for (name, _, _), value in zip(arch.encoder_outputs, encoded, strict=True):
            worst = max(worst, float(np.abs(got[name] - value.numpy()).max(initial=0.0)))
        state = old.encode(batch.inputs)
        fed, logits = [np.full(batch.size, bos, dtype=np.int64)], []
        for t in range(steps):
            step_logits, _, state = old.step(fed[-1], state, np.full(batch.size, t, dtype=np.int64))
            logits.append(step_logits)
            fed.append(step_logits.argmax(1).astype(np.int64))
        tgt_in = torch.from_numpy(np.stack(fed[:-1], axis=1))  # (B, steps)
        want = rebuilt.model(*src, tgt_in)  # (B, steps, V), or with the attention (the captioner)
        want = (want[0] if isinstance(want, tuple) else want).numpy()
        worst = max(worst, float(np.abs(np.stack(logits, axis=1) - want).max()))
    return worst
