"""Engine speed: generated tokens/s of this engine against CTranslate2 on the same weights.

This engine is the project's decode loop (`greedy_decode`) over `OnnxSeq2Seq`, at fp32 and with
the entry's int8 variant; CTranslate2 runs a model converted from the same entry's ONNX
initializers (bench/ctranslate2_model.py), fp32 with `CT2_PACKED_GEMM=0` on 2 threads (its packed
GEMM stalls on thread wake-ups on small hosts; OpenMP threads wait passively) and int8 on 1
thread (its fastest here). Greedy,
the same batches of real held-out sentences in the same order, the same length limits
(CTranslate2: beam_size 1, min_decoding_length 0, max_decoding_length = the manifest's
max_tokens). Each engine and batch size runs in a fresh process, one after another, so thread
pools never share the CPU; take ratios from one run (the host is shared and noisy).

Run: `make bench-engine` (or `python -m attnserve.bench.engine_speed --help`).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ENGINES = ("ort-fp32", "ort-int8", "ct2-fp32", "ct2-int8")
PAIRS = {"ort-fp32": "ct2-fp32", "ort-int8": "ct2-int8"}  # compared like for like


@dataclass(frozen=True)
class EngineSpeedConfig:
    """What to measure."""

    entry: Path = Path("model_repository/en-fr-transformer/1")
    sentences: int = 512
    batch_sizes: tuple[int, ...] = (1, 8, 32, 64)
    engines: tuple[str, ...] = ENGINES
    ort_threads: int = 2
    ct2_fp32_threads: int = 2
    ct2_int8_threads: int = 1
    out: Path = Path("bench/results/engine_speed.json")


@dataclass(frozen=True)
class Run:
    """One engine at one batch size over every sentence."""

    engine: str
    batch_size: int
    threads: int
    seconds: float
    tokens: int
    tokens_per_s: float


def _batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _run_ort(entry: str, precision: str, threads: int, ids: list, size: int, max_tokens: int):
    """Decodes every sentence in batches of `size`; returns (seconds, outputs as token id lists)."""
    from attnserve.core.decoding import greedy_decode
    from attnserve.core.manifest import Manifest
    from attnserve.core.onnx_model import OnnxSeq2Seq, RuntimeConfig
    from attnserve.core.sources import SourceBatch

    manifest = Manifest.load(Path(entry))
    model = OnnxSeq2Seq(manifest, RuntimeConfig(intra_op_threads=threads, precision=precision))
    bos, eos = manifest.target_vocab.bos_id, manifest.target_vocab.eos_id

    def decode(batch):
        hyps = greedy_decode(model, SourceBatch.from_ids(batch), bos, eos, [max_tokens] * len(batch))
        return [h.token_ids for h in hyps]

    decode(ids[:size])  # warm-up: first-run allocations and kernel choices
    start = time.perf_counter()
    outputs = [out for batch in _batches(ids, size) for out in decode(batch)]
    return time.perf_counter() - start, outputs


def _run_ct2(model_dir: str, compute: str, threads: int, tokens: list, size: int, max_tokens: int, vocab):
    """As _run_ort for CTranslate2; outputs mapped to target ids."""
    os.environ["CT2_PACKED_GEMM"] = "0"  # read when the library loads, in this fresh process
    # GNU OpenMP's spin-waiting collapses on shared cores (2 threads, B=8, host load ~6: 75 tokens/s
    # spinning, 540 passive); passive waiting is CTranslate2's better case here. Override by env.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import ctranslate2

    translator = ctranslate2.Translator(model_dir, device="cpu", compute_type=compute, intra_threads=threads)
    index = {t: i for i, t in enumerate(vocab)}
    options = dict(beam_size=1, min_decoding_length=0, max_decoding_length=max_tokens)

    def decode(batch):
        results = translator.translate_batch(batch, max_batch_size=len(batch), **options)
        return [[index[t] for t in r.hypotheses[0]] for r in results]

    decode(tokens[:size])
    start = time.perf_counter()
    outputs = [out for batch in _batches(tokens, size) for out in decode(batch)]
    return time.perf_counter() - start, outputs


def _inputs(entry: Path, count: int):
    """(source id lists, source token lists, max output tokens, target vocab) of the held-out test
    sentences the model accepts, tokenised as the service does."""
    from attnserve.bench.inputs import load_workload
    from attnserve.core.codec import SourceCodec
    from attnserve.core.manifest import Manifest
    from attnserve.core.requests import AttentionMode

    manifest = Manifest.load(entry)
    codec = SourceCodec(manifest)
    prepared = [codec.prepare(s.text, AttentionMode.NONE) for s in load_workload(manifest, count).samples]
    return (
        [list(p.source_ids) for p in prepared],
        [list(p.source_tokens) for p in prepared],
        manifest.max_output_tokens,
        list(manifest.target_vocab.tokens),
    )


def run_engine_speed(cfg: EngineSpeedConfig) -> dict:
    """Measures every engine at every batch size, prints the table and writes cfg.out (JSON)."""
    from attnserve.bench.ctranslate2_model import convert

    ids, tokens, max_tokens, vocab = _inputs(cfg.entry, cfg.sentences)
    load_before = os.getloadavg()[0]
    runs: list[Run] = []
    outputs: dict[tuple[str, int], list] = {}
    spawn = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        ct2_dir = (
            str(convert(cfg.entry, Path(tmp) / "ct2"))
            if any(e.startswith("ct2") for e in cfg.engines)
            else ""
        )
        for size in cfg.batch_sizes:
            for engine in cfg.engines:
                kind, precision = engine.split("-")
                if kind == "ort":
                    threads = cfg.ort_threads
                    job = (_run_ort, str(cfg.entry), precision, threads, ids, size, max_tokens)
                else:
                    threads = cfg.ct2_fp32_threads if precision == "fp32" else cfg.ct2_int8_threads
                    job = (_run_ct2, ct2_dir, "float32" if precision == "fp32" else "int8", threads, tokens,
                           size, max_tokens, vocab)  # fmt: skip
                with ProcessPoolExecutor(1, mp_context=spawn) as pool:  # a fresh process per run
                    seconds, out = pool.submit(*job).result()
                generated = sum(len(o) for o in out)
                runs.append(Run(engine, size, threads, seconds, generated, generated / seconds))
                outputs[engine, size] = out
                print(f"  {engine} B={size}: {generated / seconds:,.0f} tokens/s", flush=True)
    result = _summarise(cfg, runs, outputs)
    # Other processes on the host: CTranslate2's OpenMP threads suffer most when cores are shared.
    result["host"]["load_average_1m"] = {"before": load_before, "after": os.getloadavg()[0]}
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))
    return result


def _summarise(cfg: EngineSpeedConfig, runs: list[Run], outputs: dict) -> dict:
    """Runs, ratios of like-for-like engines, and how many outputs two engines share."""
    speed = {(r.engine, r.batch_size): r.tokens_per_s for r in runs}
    ratios = {
        f"{mine}/{theirs}": {str(b): speed[mine, b] / speed[theirs, b] for b in cfg.batch_sizes}
        for mine, theirs in PAIRS.items()
        if mine in cfg.engines and theirs in cfg.engines
    }
    pairs = [*PAIRS.items(), ("ort-fp32", "ort-int8"), ("ct2-fp32", "ct2-int8")]
    identical = {
        f"{a} = {b}": {
            str(s): sum(x == y for x, y in zip(outputs[a, s], outputs[b, s], strict=True))
            for s in cfg.batch_sizes
        }
        for a, b in pairs
        if a in cfg.engines and b in cfg.engines
    }
    first = cfg.engines[0]
    return {
        "config": {**asdict(cfg), "entry": str(cfg.entry), "out": str(cfg.out)},
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()},
        "sentences": len(outputs[first, cfg.batch_sizes[0]]),
        "runs": [asdict(r) for r in runs],
        "ratios": ratios,
        "identical_outputs": identical,
    }


def format_table(result: dict) -> str:
    """The tokens/s table (engines by batch size), ratios and identical-output counts, as markdown."""
    sizes = result["config"]["batch_sizes"]
    speed = {(r["engine"], r["batch_size"]): r for r in result["runs"]}
    engines = list(dict.fromkeys(r["engine"] for r in result["runs"]))
    lines = [
        "| engine (threads) | " + " | ".join(f"B={b}" for b in sizes) + " |",
        "|---" * (len(sizes) + 1) + "|",
    ]
    for e in engines:
        cells = [f"{speed[e, b]['tokens_per_s']:,.0f}" for b in sizes]
        lines.append(f"| {e} ({speed[e, sizes[0]]['threads']}) | " + " | ".join(cells) + " |")
    for name, by_size in result["ratios"].items():
        lines.append(f"| {name} | " + " | ".join(f"{by_size[str(b)]:.2f}x" for b in sizes) + " |")
    n = result["sentences"]
    for name, by_size in result["identical_outputs"].items():
        lines.append(f"| identical {name} | " + " | ".join(f"{by_size[str(b)]}/{n}" for b in sizes) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m attnserve.bench.engine_speed`: the engine speed bench."""
    defaults = EngineSpeedConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--entry", type=Path, default=defaults.entry, help="a Transformer repository entry")
    p.add_argument("--sentences", type=int, default=defaults.sentences)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=list(defaults.batch_sizes))
    p.add_argument("--engine", action="append", choices=ENGINES, help="repeatable; default: all four")
    p.add_argument("--ort-threads", type=int, default=defaults.ort_threads)
    p.add_argument("--out", type=Path, default=defaults.out)
    args = p.parse_args(argv)
    run_engine_speed(
        EngineSpeedConfig(
            entry=args.entry, sentences=args.sentences, batch_sizes=tuple(args.batch_sizes),
            engines=tuple(args.engine or ENGINES), ort_threads=args.ort_threads, out=args.out,
        )
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
