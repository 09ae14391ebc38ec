"""Engine speed: generated tokens/s of this engine against CTranslate2 on the same weights.

This engine is the project's decode loop (`greedy_decode`) over `OnnxSeq2Seq`, at fp32 and with
the entry's int8 variant; CTranslate2 runs a model converted from the same entry's ONNX
initializers (bench/ctranslate2_model.py) in each of its settings that can be fastest on a small
host: fp32 with packed and with unpacked GEMM (`CT2_PACKED_GEMM`) on 2 threads, int8 on 1 and
on 2 threads (OpenMP threads wait passively). Each ratio compares this engine with the faster
CTranslate2 setting at that batch size. Greedy, the same batches of real held-out sentences in
the same order, the same length limits (CTranslate2: beam_size 1, min_decoding_length 0,
max_decoding_length = the manifest's max_tokens). Each engine and batch size runs in a fresh
process, one after another, so thread pools never share the CPU; each run records the load
average it started under. Take ratios from one run on a quiet host: CTranslate2's OpenMP threads
lose far more than ONNX Runtime's when other work shares the cores.

Run: `make bench-engine` (or `python -m attnserve.bench.engine_speed --help`).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class EngineSetting:
    """How one engine runs: which library, precision, threads, and CTranslate2's packed GEMM."""

    kind: str  # "ort" or "ct2"
    precision: str  # "fp32" or "int8"
    threads: int  # 0: the config's ort_threads
    packed_gemm: bool = False


SETTINGS = {
    "ort-fp32": EngineSetting("ort", "fp32", 0),
    "ort-int8": EngineSetting("ort", "int8", 0),
    "ort-int8-1t": EngineSetting("ort", "int8", 1),  # as served: one ONNX Runtime thread per model
    "ct2-fp32": EngineSetting("ct2", "fp32", 2),
    "ct2-fp32-packed": EngineSetting("ct2", "fp32", 2, packed_gemm=True),
    "ct2-int8": EngineSetting("ct2", "int8", 1),
    "ct2-int8-2t": EngineSetting("ct2", "int8", 2),
}
ENGINES = tuple(SETTINGS)
PAIRS = {"ort-fp32": "ct2-fp32", "ort-int8": "ct2-int8"}  # ratio names: this engine / CTranslate2


@dataclass(frozen=True)
class EngineSpeedConfig:
    """What to measure."""

    entry: Path = Path("model_repository/en-fr-transformer/1")
    sentences: int = 256
    batch_sizes: tuple[int, ...] = (1, 8, 32, 64)
    engines: tuple[str, ...] = ENGINES
    ort_threads: int = 2
    rounds: int = 3  # passes per run; the median counts
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
    load_average_before: float  # 1-minute load average when the run started


def _batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _run_ort(entry: str, precision: str, threads: int, ids: list, size: int, max_tokens: int, rounds: int):
    """Decodes every sentence in batches of `size`; returns (median seconds of `rounds` passes,
    outputs as token id lists)."""
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

    return _median_run(decode, ids, size, rounds)


def _median_run(decode, sources: list, size: int, rounds: int) -> tuple[float, list]:
    """One warm-up batch, then `rounds` passes over every source in batches of `size`: the median
    pass's seconds and the outputs."""
    decode(sources[:size])  # first-run allocations and kernel choices
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        outputs = [out for batch in _batches(sources, size) for out in decode(batch)]
        times.append(time.perf_counter() - start)
    return statistics.median(times), outputs


def _run_ct2(
    model_dir: str, setting: EngineSetting, tokens: list, size: int, max_tokens: int, vocab, rounds: int
):
    """As _run_ort for CTranslate2; outputs mapped to target ids."""
    os.environ["CT2_PACKED_GEMM"] = str(int(setting.packed_gemm))  # read when the library loads
    # GNU OpenMP's spin-waiting collapses on shared cores (2 threads, B=8, host load ~6: 75 tokens/s
    # spinning, 540 passive); passive waiting is CTranslate2's better case here. Override by env.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import ctranslate2

    compute = "float32" if setting.precision == "fp32" else "int8"
    translator = ctranslate2.Translator(
        model_dir, device="cpu", compute_type=compute, intra_threads=setting.threads
    )
    index = {t: i for i, t in enumerate(vocab)}
    options = dict(beam_size=1, min_decoding_length=0, max_decoding_length=max_tokens)

    def decode(batch):
        results = translator.translate_batch(batch, max_batch_size=len(batch), **options)
        return [[index[t] for t in r.hypotheses[0]] for r in results]

    return _median_run(decode, tokens, size, rounds)


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
                e = SETTINGS[engine]
                if e.kind == "ort":
                    threads = e.threads or cfg.ort_threads
                    job = (_run_ort, str(cfg.entry), e.precision, threads, ids, size, max_tokens, cfg.rounds)
                else:
                    threads = e.threads
                    job = (_run_ct2, ct2_dir, e, tokens, size, max_tokens, vocab, cfg.rounds)
                load = os.getloadavg()[0]
                with ProcessPoolExecutor(1, mp_context=spawn) as pool:  # a fresh process per run
                    seconds, out = pool.submit(*job).result()
                generated = sum(len(o) for o in out)
                runs.append(Run(engine, size, threads, seconds, generated, generated / seconds, load))
                outputs[engine, size] = out
                print(
                    f"  {engine} B={size}: {generated / seconds:,.0f} tokens/s, load {load:.2f}", flush=True
                )
    result = _summarise(cfg, runs, outputs)
    # Other processes on the host: CTranslate2's OpenMP threads suffer most when cores are shared.
    result["host"]["load_average_1m"] = {"before": load_before, "after": os.getloadavg()[0]}
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))
    return result


def _summarise(cfg: EngineSpeedConfig, runs: list[Run], outputs: dict) -> dict:
    """Runs, ratios against the faster CTranslate2 setting of each precision, and how many outputs
    two engines share."""
    speed = {(r.engine, r.batch_size): r.tokens_per_s for r in runs}
    ratios = {}
    for mine, theirs in PAIRS.items():
        peers = [
            e
            for e in cfg.engines
            if SETTINGS[e].kind == "ct2" and SETTINGS[e].precision == SETTINGS[mine].precision
        ]
        if mine in cfg.engines and peers:
            ratios[f"{mine}/{theirs}"] = {
                str(b): speed[mine, b] / max(speed[p, b] for p in peers) for b in cfg.batch_sizes
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
        cells = " | ".join(f"**{by_size[str(b)]:.2f}x**" for b in sizes)
        lines.append(f"| {name} (the faster CTranslate2 setting) | {cells} |")
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
    p.add_argument("--engine", action="append", choices=ENGINES, help="repeatable; default: all")
    p.add_argument("--ort-threads", type=int, default=defaults.ort_threads)
    p.add_argument("--rounds", type=int, default=defaults.rounds, help="passes per run; the median counts")
    p.add_argument("--out", type=Path, default=defaults.out)
    args = p.parse_args(argv)
    run_engine_speed(
        EngineSpeedConfig(
            entry=args.entry, sentences=args.sentences, batch_sizes=tuple(args.batch_sizes),
            engines=tuple(args.engine or ENGINES), ort_threads=args.ort_threads, rounds=args.rounds,
            out=args.out,
        )
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
