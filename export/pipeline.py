"""Checkpoint (or an older entry's weights) -> model-repository entry: load, export, parity-check,
evaluate, write manifest."""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from attnserve.core.manifest import FORMAT_REVISION, MANIFEST_FILE, Manifest, sha256_of
from attnserve.core.onnx_model import OnnxSeq2Seq
from attnserve.core.vocab import Vocab
from attnserve.export.from_entry import check_against_graphs, read_entry, rebuild
from attnserve.export.onnx_graphs import OPSET, export_graphs
from attnserve.export.parity import check_parity
from attnserve.export.quantize import add_int8_variant
from attnserve.models.architectures import Architecture, Tensor, architecture
from attnserve.models.checkpoint import load_checkpoint, save_checkpoint
from attnserve.models.tasks import task as task_named
from attnserve.models.torch_runner import TorchStepModel

log = logging.getLogger(__name__)


class ParityError(RuntimeError):
    """ONNX Runtime does not reproduce the PyTorch model closely enough."""


@dataclass(frozen=True)
class ExportConfig:
    """What to export and how strictly to check it.

    checkpoint: a training checkpoint, or with from_entry, a model-repository entry whose graphs'
    weights are re-exported in the current format (no retraining).
    """

    checkpoint: Path
    repository: Path
    name: str
    version: str = "1"
    force: bool = False
    tolerance: float = 1e-4
    parity_examples: int = 200
    eval_limit: int = 0  # 0 = the whole evaluation splits
    from_entry: bool = False
    int8: bool = True  # add the dynamically quantised variant, its quality measured


@dataclass(frozen=True)
class _Source:
    """A model to export, with its vocabularies, checkpoint-like payload and provenance."""

    model: torch.nn.Module
    src_vocab: Vocab
    tgt_vocab: Vocab
    payload: dict
    provenance: dict


def _tensors(items: list[Tensor]) -> list[dict]:
    return [{"name": n, "dtype": d, "shape": s} for n, d, s in items]


def _graph_entry(path: Path, inputs: list[Tensor], outputs: list[Tensor]) -> dict:
    return {
        "file": path.name,
        "sha256": sha256_of(path),
        "inputs": _tensors(inputs),
        "outputs": _tensors(outputs),
    }


def _write_manifest(folder: Path, body: dict) -> None:
    (folder / MANIFEST_FILE).write_text(json.dumps(body, indent=2, ensure_ascii=False) + "\n", "utf-8")


def _graphs(arch: Architecture, paths: dict[str, Path]) -> dict:
    return {
        "encoder": _graph_entry(paths["encoder"], arch.encoder_inputs, arch.encoder_outputs),
        "decoder_step": _graph_entry(paths["decoder_step"], arch.decoder_inputs, arch.decoder_outputs),
    }


def _from_checkpoint(path: Path) -> _Source:
    model, src_vocab, tgt_vocab, payload = load_checkpoint(path)
    return _Source(model, src_vocab, tgt_vocab, payload, {"checkpoint_sha256": sha256_of(path)})


def _from_entry(folder: Path, task, tolerance: float) -> _Source:
    """The entry's model rebuilt from its graphs, once it reproduces them within `tolerance`.

    Raises:
        ParityError: if the rebuilt model does not reproduce the entry's graphs.
    """
    rebuilt = rebuild(folder)
    probes = [task.source_batches("test", n, n, rebuilt.src_vocab)[0] for n in (1, 5, 17)]
    worst = check_against_graphs(rebuilt, folder, probes, steps=12)
    log.info("rebuilt from %s: max |rebuilt - its graphs| = %.2e", folder, worst)
    if worst > tolerance:
        raise ParityError(f"the model rebuilt from {folder} differs from its graphs by {worst:.2e}")
    provenance = {
        "rebuilt_from": {
            "format_revision": rebuilt.raw.get("format_revision"),
            "graphs_sha256": {k: g["sha256"] for k, g in rebuilt.raw["graphs"].items()},
            "checkpoint_sha256": rebuilt.raw.get("export", {}).get("checkpoint_sha256"),
            "max_abs_diff": worst,
        }
    }
    return _Source(rebuilt.model, rebuilt.src_vocab, rebuilt.tgt_vocab, rebuilt.payload, provenance)


def checkpoint_from_entry(folder: Path, path: Path, tolerance: float = 1e-4) -> Path:
    """Writes an entry's model, rebuilt from its graphs, as a training checkpoint to continue from.

    Raises:
        ManifestError: if the entry cannot be read or its files do not match.
        ParityError: if the rebuilt model does not reproduce the entry's graphs within tolerance.
    """
    raw = read_entry(folder)
    task = task_named(raw["task"], **raw.get("task_args", {}))
    source = _from_entry(folder, task, tolerance)
    meta = {**source.payload["meta"], **source.provenance}
    save_checkpoint(
        path, source.payload["architecture"], source.model, source.src_vocab, source.tgt_vocab, **meta
    )
    return path


def export_model(cfg: ExportConfig) -> Path:
    """Runs the pipeline and returns the new entry's folder.

    Raises:
        FileExistsError: if the entry exists and cfg.force is not set.
        ManifestError: with from_entry, if the entry cannot be read or its files do not match.
        ValueError: if the task's tokenizer, rebuilt from its data, does not match the checkpoint.
        ParityError: if ONNX Runtime disagrees with PyTorch beyond cfg.tolerance or on any
            greedy output, or a model rebuilt from an entry does not reproduce its graphs.
    """
    entry = cfg.repository / cfg.name / cfg.version
    if entry.exists() and not cfg.force:
        raise FileExistsError(f"{entry} exists; pass --force to replace it")
    if cfg.from_entry:
        raw = read_entry(cfg.checkpoint)
        task = task_named(raw["task"], **raw.get("task_args", {}))
        source = _from_entry(cfg.checkpoint, task, cfg.tolerance)
    else:
        source = _from_checkpoint(cfg.checkpoint)
        meta = source.payload["meta"]
        task = task_named(meta["task"], **meta.get("task_args", {}))
    model, src_vocab, tgt_vocab, payload = source.model, source.src_vocab, source.tgt_vocab, source.payload
    arch, meta = architecture(payload["architecture"]).for_config(model.config), payload["meta"]
    assets = task.assets()
    if assets and task.vocabularies() != (src_vocab, tgt_vocab):
        raise ValueError(
            f"the tokenizer rebuilt from {meta['task_args']} does not match the vocabulary of "
            f"{cfg.checkpoint}; was the training data changed?"
        )
    staging = entry.with_name(f".{cfg.version}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)

    log.info("exporting %s (%s on %s) to ONNX (opset %d)", cfg.checkpoint, arch.name, task.name, OPSET)
    probes = [task.source_batches("test", n, n, src_vocab)[0] for n in (1, 5, 17)]
    graphs = export_graphs(model, arch, probes[1], staging)
    for name, data in assets.items():
        (staging / name).write_bytes(data)
    body = {
        "format_revision": FORMAT_REVISION,
        "name": cfg.name,
        "version": cfg.version,
        "task": task.name,
        "task_args": task.arguments,
        "architecture": arch.name,
        "description": task.description,
        "source": task.source_section(src_vocab, model.config),
        "target": {
            "vocab": list(tgt_vocab.tokens),
            "separator": task.target_separator,
            "max_tokens": task.max_output_tokens,
        },
        "graphs": _graphs(arch, graphs),
        "files": {name: sha256_of(staging / name) for name in assets},
        "decoder": arch.wiring,
        "attention_modes": list(arch.attention_modes),
        "opset": OPSET,
        "model_config": payload["config"],
        "training": {**meta.get("training", {}), "train_config": meta.get("train_config")},
    }
    body["training"].pop("history", None)
    _write_manifest(staging, body)

    onnx_model = OnnxSeq2Seq(Manifest.load(staging))
    parity = check_parity(
        TorchStepModel(model, arch),
        onnx_model,
        probes,
        task.source_batches("test", cfg.parity_examples, 64, src_vocab),
        tgt_vocab.bos_id,
        tgt_vocab.eos_id,
        task.max_output_tokens,
    )
    log.info("parity: max |torch - ORT| = %.2e, greedy identical on %d/%d examples",
             parity.max_abs_diff, parity.greedy_matches, parity.greedy_examples)  # fmt: skip
    if parity.max_abs_diff > cfg.tolerance or not parity.greedy_identical:
        raise ParityError(f"ONNX Runtime differs from PyTorch: {parity}")

    log.info("evaluating the exported graphs on %s", ", ".join(task.eval_splits))
    metrics = {
        split: task.evaluate_model(onnx_model, split, src_vocab, tgt_vocab, cfg.eval_limit, progress=True)
        for split in task.eval_splits
    }
    body["metrics"] = {**metrics, "dev": meta.get("dev_metrics", {})}
    body["export"] = {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        **source.provenance,
        "parity": asdict(parity),
    }
    _write_manifest(staging, body)
    if entry.exists():
        shutil.rmtree(entry)
    staging.rename(entry)
    log.info("wrote %s: %s", entry, metrics)
    if cfg.int8:
        add_int8_variant(entry, cfg.eval_limit, progress=True)
    return entry
