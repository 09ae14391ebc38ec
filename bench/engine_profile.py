"""Where this engine's time goes: encoder, decoder step and the Python decode loop, then the
decoder step's kernels by operator type (ONNX Runtime's profiler).

The wall-clock split times every session run from outside; the operator shares come from ORT's
profiler, which adds a few microseconds per node, so small operators look bigger than they are.

Run: `python -m attnserve.bench.engine_profile --batch-size 1 64` (under the bench lock).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

from attnserve.bench.engine_speed import _batches, _inputs
from attnserve.core.decoding import greedy_decode
from attnserve.core.manifest import Manifest
from attnserve.core.onnx_model import OnnxSeq2Seq, RuntimeConfig
from attnserve.core.sources import SourceBatch


def _timed(function, totals: dict[str, float], key: str):
    """function, adding its wall time to totals[key] on every call."""

    def run(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - start

    return run


def _wall_split(manifest: Manifest, precision: str, threads: int, ids: list, size: int) -> dict:
    """Shares of wall time in the encoder, the decoder step and the rest (the decode loop)."""
    model = OnnxSeq2Seq(manifest, RuntimeConfig(intra_op_threads=threads, precision=precision))
    totals = {"encoder": 0.0, "decoder_step": 0.0}
    model.encode = _timed(model.encode, totals, "encoder")  # the decode loop's only two calls
    model.run_decoder = _timed(model.run_decoder, totals, "decoder_step")
    bos, eos, limit = manifest.target_vocab.bos_id, manifest.target_vocab.eos_id, manifest.max_output_tokens
    greedy_decode(model, SourceBatch.from_ids(ids[:size]), bos, eos, [limit] * size)  # warm-up
    totals.update(encoder=0.0, decoder_step=0.0)
    start, tokens = time.perf_counter(), 0
    for batch in _batches(ids, size):
        hyps = greedy_decode(model, SourceBatch.from_ids(batch), bos, eos, [limit] * len(batch))
        tokens += sum(len(h.token_ids) for h in hyps)
    wall = time.perf_counter() - start
    shares = {k: v / wall for k, v in totals.items()}
    return {"tokens_per_s": tokens / wall, **shares, "loop": 1 - sum(shares.values())}


def _op_shares(manifest: Manifest, precision: str, threads: int, ids: list, size: int, prefix: str) -> dict:
    """The decoder step's kernel time by operator type, as shares, from ORT's profiler."""
    model = OnnxSeq2Seq(
        manifest, RuntimeConfig(intra_op_threads=threads, precision=precision, profile_prefix=prefix)
    )
    bos, eos, limit = manifest.target_vocab.bos_id, manifest.target_vocab.eos_id, manifest.max_output_tokens
    for batch in _batches(ids, size)[:4]:
        greedy_decode(model, SourceBatch.from_ids(batch), bos, eos, [limit] * len(batch))
    Path(model.encoder.end_profiling()).unlink()
    profile = Path(model.decoder.end_profiling())
    events = json.loads(profile.read_text())
    profile.unlink()
    kernels = Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            kernels[e["args"]["op_name"]] += e["dur"]
    total = sum(kernels.values())
    return {op: us / total for op, us in kernels.most_common(10)}


def main(argv: list[str] | None = None) -> int:
    """Prints the wall-clock split and the decoder step's top operators per precision and batch size."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--entry", type=Path, default=Path("model_repository/en-fr-transformer/1"))
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 64])
    p.add_argument("--precision", nargs="+", default=["fp32", "int8"])
    p.add_argument("--sentences", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--profile-dir", type=Path, default=Path("/tmp"))
    args = p.parse_args(argv)
    manifest = Manifest.load(args.entry)
    ids = _inputs(args.entry, args.sentences)[0]
    for precision in args.precision:
        for size in args.batch_size:
            split = _wall_split(manifest, precision, args.threads, ids, size)
            ops = _op_shares(
                manifest, precision, args.threads, ids, size, str(args.profile_dir / "attnserve-ort")
            )
            wall = ", ".join(f"{k} {split[k]:.0%}" for k in ("encoder", "decoder_step", "loop"))
            print(f"{precision} B={size}: {split['tokens_per_s']:,.0f} tokens/s; wall: {wall}")
            print("  decoder step kernels: " + ", ".join(f"{op} {share:.0%}" for op, share in ops.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
