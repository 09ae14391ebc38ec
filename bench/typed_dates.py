"""How dates-luong holds up to dates as people type them, per language, read as the service reads them.

Typed dates (`models.typed_dates`: English and the ten most-spoken languages) are drawn fresh from
the held-out test dates, under a seed the task's own `test_typed` split does not use, then read
exactly as the Translate endpoint reads a request (the codec's `prepare`, text form and locale
included) and decoded greedily by the serving runtime in fp32 and int8. A text the codec refuses
counts as wrong. The inputs the issue found wrong are listed one by one.

Run: `python -m attnserve.bench.typed_dates` (writes bench/results/typed_dates.json).
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from pathlib import Path

from attnserve.core.errors import RequestError
from attnserve.core.manifest import Manifest
from attnserve.core.model_runner import ModelRunner
from attnserve.core.onnx_model import RuntimeConfig
from attnserve.core.requests import AttentionMode
from attnserve.core.versions import latest
from attnserve.models import typed_dates
from attnserve.models.dates_data import DateExample
from attnserve.models.predict import predict

SEED = 2212  # the task's typed splits use seed 0
ISSUE_INPUTS = (  # issue 22's table: typed outside the project, all 2024-03-07
    ("march 7 2024", "en_US"),
    ("MARCH 7 2024", "en_US"),
    ("mar 7, 2024", "en_US"),
    ("march 7th, 2024", "en_US"),
    ("the 7th of march 2024", "en_US"),
    ("7 MARS 2024", "fr_FR"),
)


def _answers(runner: ModelRunner, examples: list[DateExample]) -> list[str | None]:
    """The ISO date the served model gives each example, None where the codec refuses the text."""
    tokens: list[tuple[str, ...] | None] = []
    for e in examples:
        try:
            tokens.append(runner.codec.prepare(e.text, AttentionMode.NONE, locale=e.locale).source_tokens)
        except RequestError:
            tokens.append(None)
    m = runner.manifest
    readable = [t for t in tokens if t is not None]
    preds = iter(predict(runner.model, readable, m.source_vocab, m.target_vocab, m.max_output_tokens))
    return [None if t is None else "".join(next(preds) or []) for t in tokens]


def measure(entry: Path, examples: list[DateExample], precision: str) -> dict:
    """Exact match per language and overall, and the issue's inputs, served at one precision."""
    runner = ModelRunner(Manifest.load(entry), RuntimeConfig(precision=precision))
    right: dict[str, list[bool]] = defaultdict(list)
    for e, got in zip(examples, _answers(runner, examples), strict=True):
        right[typed_dates.language_of(e)].append(got == e.iso)
    issue = [DateExample(locale, "typed", text, "2024-03-07") for text, locale in ISSUE_INPUTS]
    every = [ok for oks in right.values() for ok in oks]
    return {
        "precision": precision,
        "exact_match": {lang: sum(oks) / len(oks) for lang, oks in right.items()},
        "overall": sum(every) / len(every),
        "examples": len(every),
        "issue_inputs": {e.text: got for e, got in zip(issue, _answers(runner, issue), strict=True)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entry", type=Path, help="default: dates-luong's highest version")
    parser.add_argument("--per-language", type=int, default=500, help="typed dates per language")
    parser.add_argument("--out", type=Path, default=Path("bench/results/typed_dates.json"))
    args = parser.parse_args(argv)
    if args.entry is None:
        args.entry = latest(Path("model_repository"), "dates-luong")
    languages = tuple(typed_dates.LOCALES)
    examples = typed_dates.sample("test", args.per_language * len(languages), SEED)
    results = [measure(args.entry, examples, p) for p in ("fp32", "int8")]
    print(f"{args.entry}: {len(examples)} typed test dates, exact match (%)")
    print(f"{'language':<10}" + "".join(f"{r['precision']:>8}" for r in results))
    for lang in languages:
        print(f"{lang:<10}" + "".join(f"{100 * r['exact_match'][lang]:>8.1f}" for r in results))
    print(f"{'all':<10}" + "".join(f"{100 * r['overall']:>8.2f}" for r in results))
    for text, _ in ISSUE_INPUTS:
        answers = "  ".join(f"{r['precision']}: {r['issue_inputs'][text]}" for r in results)
        print(f"{text!r:<26} -> {answers}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"entry": str(args.entry), "seed": SEED, "load_average": os.getloadavg(), "results": results}
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
