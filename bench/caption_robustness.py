"""How caption-fashion holds up to images as clients send them: resized, JPEG, grey or RGB.

Fresh scenes are drawn from the Fashion-MNIST test images (under a seed the caption task's own
test set does not use), each encoded as a client would (PNG at 56 px; PNG at 28, 112 and 224 px;
JPEG q85 and q70 at 112 and 224 px; resized with bicubic, bilinear and Lanczos; grey and RGB), then
read exactly as the Caption endpoint reads a request (the codec's `prepare_image`) and captioned by
the serving runtime in fp32 and int8. Scored by exact caption match and attention localisation,
as the task scores its test set.

Run: `python -m attnserve.bench.caption_robustness` (writes bench/results/caption_robustness.json).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from attnserve.core.manifest import Manifest
from attnserve.core.model_runner import ModelRunner
from attnserve.core.onnx_model import RuntimeConfig
from attnserve.core.requests import AttentionMode
from attnserve.core.versions import latest
from attnserve.models import scenes_data
from attnserve.models.caption_scoring import attention_localisation, exact_match
from attnserve.models.client_images import ClientEncoding, encode
from attnserve.models.tasks.caption import caption_images

SEED = 2212  # the caption task's own splits use seed 0
RESAMPLE = ("bicubic", "bilinear", "lanczos")


def conditions() -> list[ClientEncoding]:
    """Every encoding measured: native grey and RGB, then each resized size and format by method."""
    found = [ClientEncoding(), ClientEncoding(mode="RGB")]
    for size, fmt, quality in [(28, "PNG", 85), (112, "PNG", 85), (224, "PNG", 85), (112, "JPEG", 85),
                               (112, "JPEG", 70), (224, "JPEG", 85), (224, "JPEG", 70)]:  # fmt: skip
        for method in RESAMPLE:
            mode = "RGB" if fmt == "JPEG" else "L"  # photos are RGB; PNG screenshots often grey
            found.append(ClientEncoding(size, method, fmt, quality, mode))
    return found


def measure(
    entry: Path, scenes: list[scenes_data.Scene], encodings: list[ClientEncoding], precision: str
) -> list[dict]:
    """Exact match and localisation of each encoding of the scenes, served at one precision."""
    runner = ModelRunner(Manifest.load(entry), RuntimeConfig(precision=precision))
    spec, vocab = runner.manifest.image, runner.manifest.target_vocab
    references = [s.caption for s in scenes]
    rows = []
    for how in encodings:
        started = time.perf_counter()
        pixels = np.stack(
            [runner.codec.prepare_image(encode(s.image, how), AttentionMode.CROSS).image for s in scenes]
        )  # (N, C, H, W) as the endpoint reads them
        preds, maps = caption_images(runner.model, pixels, vocab, runner.manifest.max_output_tokens)
        rows.append({
            "encoding": how.label, "precision": runner.model.precision,
            "exact_match": exact_match(preds, references),
            "localisation": attention_localisation(scenes, preds, maps, (spec.grid_height, spec.grid_width)),
            "seconds": round(time.perf_counter() - started, 1),
        })  # fmt: skip
        print(f"{how.label:<28} {precision}: {rows[-1]['exact_match']:.3f}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """A markdown table: one line per encoding, exact match and localisation per precision."""
    precisions = sorted({r["precision"] for r in rows})
    cells = {(r["encoding"], r["precision"]): r for r in rows}
    head = " | ".join(f"{p} exact | {p} localisation" for p in precisions)
    lines = [f"| encoding | {head} |", "|---|" + "---|" * 2 * len(precisions)]
    for encoding in dict.fromkeys(r["encoding"] for r in rows):
        scores = [cells[encoding, p] for p in precisions]
        values = " | ".join(f"{s['exact_match']:.1%} | {s['localisation']:.1%}" for s in scores)
        lines.append(f"| {encoding} | {values} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Prints the table and writes every figure as JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--entry", type=Path, help="default: caption-fashion's highest version")
    p.add_argument("--scenes", type=int, default=2000)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--precisions", nargs="+", default=["fp32", "int8"])
    p.add_argument("--out", type=Path, default=Path("bench/results/caption_robustness.json"))
    args = p.parse_args(argv)
    if args.seed == 0:
        p.error("seed 0 draws the caption task's own test scenes; pick another")
    load = os.getloadavg()
    scenes = scenes_data.generate("test", args.scenes, args.seed)
    if args.entry is None:
        args.entry = latest(Path("model_repository"), "caption-fashion")
    rows = [r for precision in args.precisions for r in measure(args.entry, scenes, conditions(), precision)]
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"entry": str(args.entry), "scenes": args.scenes, "seed": args.seed,
              "load_before": load, "load_after": os.getloadavg(), "rows": rows}  # fmt: skip
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
