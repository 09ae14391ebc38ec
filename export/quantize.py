"""Adds a dynamically quantised int8 variant to a model-repository entry, with its measured quality.

ONNX Runtime's `quantize_dynamic` stores the weights of MatMul/Gemm (and embedding Gather, LSTM)
as int8 and quantises activations at run time. Convolutions stay float: ONNX Runtime's
ConvInteger made the captioner's CNN encoder 4x slower on CPU. The variant is evaluated with the task's own
evaluator next to the float32 graphs on the same examples; `qualifies` records whether every
quality figure lost at most QUALITY_LOSS_LIMIT points, which is what precision "auto" serves.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import onnxruntime as ort
from onnxruntime.quantization import QuantType, quantize_dynamic

from attnserve.core.manifest import MANIFEST_FILE, Manifest, sha256_of
from attnserve.core.onnx_model import OnnxSeq2Seq, RuntimeConfig
from attnserve.models.tasks import task as task_named

log = logging.getLogger(__name__)

QUALITY_LOSS_LIMIT = 0.5  # BLEU / chrF points, or percentage points of a rate
QUANTIZED_OPS = ["MatMul", "Gemm", "Gather", "LSTM"]
LOWER_IS_BETTER = frozenset({"wer", "per", "cer"})
IN_POINTS = frozenset({"bleu", "chrf"})  # already 0..100; other figures are rates in 0..1
COUNTS = frozenset({"words", "examples", "unreadable"})


def quality_loss(fp32: dict[str, float], int8: dict[str, float]) -> dict[str, float]:
    """Per quality figure, how many points int8 is worse than fp32 (negative: better)."""
    loss = {}
    for name, base in fp32.items():
        if name in COUNTS or name not in int8:
            continue
        scale = 1.0 if name in IN_POINTS else 100.0
        worse = int8[name] - base if name in LOWER_IS_BETTER else base - int8[name]
        loss[name] = worse * scale
    return loss


def _int8_file(name: str) -> str:
    return name.removesuffix(".onnx") + ".int8.onnx"


def add_int8_variant(folder: Path, eval_limit: int = 0, progress: bool = False) -> dict:
    """Quantises the entry's graphs, evaluates both precisions, records the variant in the manifest.

    Args:
        folder: the entry (any format revision this attnserve reads).
        eval_limit: evaluate on the first N examples of each split (0 = all, what bundled entries use).
        progress: show progress bars.

    Returns:
        The manifest's new `variants.int8` section.

    Raises:
        ManifestError: if the entry is invalid.
    """
    folder = Path(folder)
    manifest = Manifest.load(folder)
    graphs = {}
    for key, spec in (("encoder", manifest.encoder), ("decoder_step", manifest.decoder_step)):
        target = folder / _int8_file(spec.file)
        quantize_dynamic(
            folder / spec.file, target, weight_type=QuantType.QInt8, op_types_to_quantize=QUANTIZED_OPS
        )
        graphs[key] = {"file": target.name, "sha256": sha256_of(target)}
    raw = dict(manifest.raw)
    variants = dict(raw.get("variants", {}))
    variants["int8"] = {"graphs": graphs}
    _write(folder, {**raw, "variants": variants})  # so the variant can be loaded and evaluated

    manifest = Manifest.load(folder)
    task = task_named(manifest.task, **manifest.raw.get("task_args", {}))
    metrics: dict[str, dict[str, dict[str, float]]] = {}
    for precision in ("fp32", "int8"):
        model = OnnxSeq2Seq(manifest, RuntimeConfig(precision=precision))
        metrics[precision] = {
            split: task.evaluate_model(
                model, split, manifest.source_vocab, manifest.target_vocab, eval_limit, progress=progress
            )
            for split in task.eval_splits
        }
    loss = {split: quality_loss(metrics["fp32"][split], metrics["int8"][split]) for split in task.eval_splits}
    worst = max((v for figures in loss.values() for v in figures.values()), default=0.0)
    variants["int8"] = {
        "graphs": graphs,
        "quantization": {
            "method": "onnxruntime.quantization.quantize_dynamic",
            "weight_type": "QInt8",
            "onnxruntime": ort.__version__,
        },
        "metrics": metrics["int8"],
        "fp32_metrics": metrics["fp32"],  # the same examples through the float graphs
        "quality_loss": loss,
        "qualifies": worst <= QUALITY_LOSS_LIMIT,
        "quality_loss_limit": QUALITY_LOSS_LIMIT,
        "eval_limit": eval_limit,
    }
    _write(folder, {**raw, "variants": variants})
    log.info("%s int8: %s; quality loss %s (limit %.1f points)", folder, metrics["int8"], loss,
             QUALITY_LOSS_LIMIT)  # fmt: skip
    return variants["int8"]


def _write(folder: Path, body: dict) -> None:
    """Replaces the entry's manifest.json atomically."""
    tmp = folder / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(json.dumps(body, indent=2, ensure_ascii=False) + "\n", "utf-8")
    tmp.replace(folder / MANIFEST_FILE)
