"""Checkpoint -> model-repository entry: load, export, parity-check, evaluate, write manifest."""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from attnserve.export.onnx_graphs import (
    DECODER_IO,
    DECODER_WIRING,
    ENCODER_IO,
    OPSET,
    export_graphs,
)
from attnserve.export.parity import check_parity
from attnserve.models.checkpoint import load_checkpoint
from attnserve.models.evaluate import evaluate_g2p
from attnserve.models.g2p_data import load_split
from attnserve.models.torch_runner import TorchBahdanauRunner
from attnserve.models.train import MAX_OUTPUT_TOKENS
from attnserve.service.manifest import FORMAT_REVISION, MANIFEST_FILE, Manifest, sha256_of
from attnserve.service.runtime.onnx_model import OnnxSeq2Seq

log = logging.getLogger(__name__)
MAX_SOURCE_TOKENS = 32


class ParityError(RuntimeError):
    """ONNX Runtime does not reproduce the PyTorch model closely enough."""


@dataclass(frozen=True)
class ExportConfig:
    """What to export and how strictly to check it."""

    checkpoint: Path
    repository: Path
    name: str
    version: str = "1"
    force: bool = False
    tolerance: float = 1e-4
    parity_words: int = 200
    eval_limit: int = 0  # 0 = the whole test split


def _tensors(items) -> list[dict]:
    return [{"name": n, "dtype": d, "shape": s} for n, d, s in items]


def _graph_entry(path: Path, io) -> dict:
    inputs, outputs = io
    return {
        "file": path.name,
        "sha256": sha256_of(path),
        "inputs": _tensors(inputs),
        "outputs": _tensors(outputs),
    }


def _write_manifest(folder: Path, body: dict) -> None:
    (folder / MANIFEST_FILE).write_text(json.dumps(body, indent=2, ensure_ascii=False) + "\n", "utf-8")


def export_model(cfg: ExportConfig) -> Path:
    """Runs the pipeline and returns the new entry's folder.

    Raises:
        FileExistsError: if the entry exists and cfg.force is not set.
        ParityError: if ONNX Runtime disagrees with PyTorch beyond cfg.tolerance or on any
            greedy output.
    """
    entry = cfg.repository / cfg.name / cfg.version
    if entry.exists() and not cfg.force:
        raise FileExistsError(f"{entry} exists; pass --force to replace it")
    model, src_vocab, tgt_vocab, payload = load_checkpoint(cfg.checkpoint)
    staging = entry.with_name(f".{cfg.version}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)

    log.info("exporting %s to ONNX (opset %d)", cfg.checkpoint, OPSET)
    graphs = export_graphs(model, staging)
    meta = payload["meta"]
    body = {
        "format_revision": FORMAT_REVISION,
        "name": cfg.name,
        "version": cfg.version,
        "task": meta.get("task", "g2p"),
        "architecture": payload["architecture"],
        "description": "English word -> ARPAbet phonemes (stress removed), CMU Pronouncing Dictionary",
        "source": {
            "tokenizer": "characters",
            "lowercase": True,
            "vocab": list(src_vocab.tokens),
            "max_tokens": MAX_SOURCE_TOKENS,
        },
        "target": {"vocab": list(tgt_vocab.tokens), "separator": " ", "max_tokens": MAX_OUTPUT_TOKENS},
        "graphs": {
            "encoder": _graph_entry(graphs["encoder"], ENCODER_IO),
            "decoder_step": _graph_entry(graphs["decoder_step"], DECODER_IO),
        },
        "decoder": DECODER_WIRING,
        "attention_modes": ["cross"],
        "opset": OPSET,
        "model_config": payload["config"],
        "training": {**meta.get("training", {}), "train_config": meta.get("train_config")},
    }
    body["training"].pop("history", None)
    _write_manifest(staging, body)

    onnx_model = OnnxSeq2Seq(Manifest.load(staging))
    test = load_split("test")
    parity = check_parity(
        TorchBahdanauRunner(model),
        onnx_model,
        [e.word for e in test[: cfg.parity_words]],
        src_vocab,
        tgt_vocab,
        MAX_OUTPUT_TOKENS,
    )
    log.info(
        "parity: max |torch - ORT| = %.2e, greedy identical on %d/%d words",
        parity.max_abs_diff,
        parity.greedy_matches,
        parity.greedy_words,
    )
    if parity.max_abs_diff > cfg.tolerance or not parity.greedy_identical:
        raise ParityError(f"ONNX Runtime differs from PyTorch: {parity}")

    log.info("evaluating the exported graphs on the test split")
    test = test[: cfg.eval_limit] if cfg.eval_limit else test
    metrics = evaluate_g2p(onnx_model, test, src_vocab, tgt_vocab, MAX_OUTPUT_TOKENS, progress=True)
    body["metrics"] = {"test": metrics, "dev": meta.get("dev_metrics", {})}
    body["export"] = {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "checkpoint_sha256": sha256_of(cfg.checkpoint),
        "parity": asdict(parity),
    }
    _write_manifest(staging, body)
    if entry.exists():
        shutil.rmtree(entry)
    staging.rename(entry)
    log.info("wrote %s: test WER %.2f%% PER %.2f%%", entry, 100 * metrics["wer"], 100 * metrics["per"])
    return entry
