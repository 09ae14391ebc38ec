"""Which cross-attention layer and head aligns best, measured where the true alignment's shape is
known: grapheme-to-phoneme, whose letters and phones run in the same order.

For each held-out word the bundled Transformer's HARD alignment (each phone with its most-attended
letter) is read from every decoder layer and head, from each layer's mean over heads, and from the
last layer's mean (what `alignment` uses). Two scores, both against the monotone truth:
- monotone: the share of consecutive phones whose letters do not go backwards;
- diagonal distance: the mean |aligned letter - expected letter| / letters, where phone t of T is
  expected at letter (t + 0.5) * S / T (letters and phones advance together).

Run: `python -m attnserve.bench.alignment_heads` (writes bench/results/alignment_heads.json).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from attnserve.core.engine import Engine, EngineConfig, answer_all
from attnserve.core.manifest import Manifest
from attnserve.core.model_runner import ModelRunner
from attnserve.core.requests import AttentionMode
from attnserve.models.g2p_data import load_split


def _scores(alignment: np.ndarray, letters: int) -> tuple[float, float]:
    """(monotone share, diagonal distance) of one HARD alignment (T,) over `letters` letters."""
    steps = len(alignment)
    monotone = float(np.mean(np.diff(alignment) >= 0)) if steps > 1 else 1.0
    expected = (np.arange(steps) + 0.5) * letters / steps
    return monotone, float(np.mean(np.abs(alignment - expected)) / letters)


def measure(entry: Path, words: int) -> dict[str, dict[str, float]]:
    """Mean scores per reading of the attention: "layer L head H", "layer L mean", "last layer mean"."""
    runner = ModelRunner(Manifest.load(entry))
    samples = [e.word for e in load_split("test")[:words]]
    requests = [runner.codec.prepare(w, AttentionMode.CROSS_HEADS) for w in samples]
    with Engine(runner, EngineConfig(max_batch_size=64)) as engine:
        answers = list(answer_all(engine, requests))
    found: dict[str, list[tuple[float, float]]] = {}
    for answer in answers:
        heads = {(h.layer, h.head): h.weights for h in answer.heads}  # (T, S) each
        layers = sorted({layer for layer, _ in heads})
        readings = {f"layer {layer} head {head}": w for (layer, head), w in heads.items()}
        for layer in layers:
            same_layer = [w for (at, _), w in heads.items() if at == layer]
            readings[f"layer {layer} mean"] = np.mean(same_layer, axis=0)
        readings["last layer mean (the `attention` output)"] = readings[f"layer {layers[-1]} mean"]
        for name, weights in readings.items():
            found.setdefault(name, []).append(_scores(weights.argmax(axis=1), weights.shape[1]))
    return {
        name: {
            "monotone": float(np.mean([m for m, _ in scores])),
            "diagonal_distance": float(np.mean([d for _, d in scores])),
        }
        for name, scores in found.items()
    }


def main(argv: list[str] | None = None) -> int:
    """Prints every reading's scores, best (least diagonal distance) first, and writes them as JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--entry", type=Path, default=Path("model_repository/g2p-transformer/1"))
    p.add_argument("--words", type=int, default=500)
    p.add_argument("--out", type=Path, default=Path("bench/results/alignment_heads.json"))
    args = p.parse_args(argv)
    result = measure(args.entry, args.words)
    print("| reading | monotone | diagonal distance |\n|---|---|---|")
    for name, s in sorted(result.items(), key=lambda item: item[1]["diagonal_distance"]):
        print(f"| {name} | {s['monotone']:.3f} | {s['diagonal_distance']:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"entry": str(args.entry), "words": args.words, "readings": result}, indent=2)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
