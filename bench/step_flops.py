"""The physical view of a decoder step: its achieved GFLOP/s against this machine's GEMM speed at
the same shapes, and how much of the step is not GEMM at all.

The step's FLOPs are its weight GEMMs (every MatMul or Gemm with a constant weight: 2 * B * K * N);
attention over the cache and the source, layer norms and the rest are counted as time, not FLOPs.
The GEMM speed at the same shapes comes from one-node ONNX Runtime graphs of each (B, K) x (K, N)
product on the same threads; numpy's 1024^3 product gives the machine's large-GEMM speed.

Run: `python -m attnserve.bench.step_flops --batch-size 64` (fp32 graphs; on a quiet machine).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from attnserve.core.manifest import Manifest
from attnserve.core.onnx_model import RuntimeConfig, session_options


def weight_gemms(graph: onnx.GraphProto) -> Counter:
    """(K, N) -> how many MatMul/Gemm nodes multiply an activation by a constant K x N weight."""
    shapes = {i.name: tuple(i.dims) for i in graph.initializer}
    found = Counter()
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm") or node.input[1] not in shapes:
            continue
        k, n = shapes[node.input[1]]
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        found[(n, k) if trans_b else (k, n)] += 1
    return found


def _seconds(run, repeats: int) -> float:
    """Median seconds of `run()` over `repeats` calls after a warm-up."""
    for _ in range(max(3, repeats // 10)):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _gemm_seconds(rows: int, k: int, n: int, options: ort.SessionOptions, repeats: int) -> float:
    """One (rows, k) x (k, n) product in a one-node ONNX Runtime graph."""
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((k, n), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])], [weight],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((rows, k), np.float32)
    return _seconds(lambda: session.run(None, {"x": x}), repeats)


def _step_feeds(session: ort.InferenceSession, rows: int, cache: int, source: int) -> dict[str, np.ndarray]:
    """Inputs for one step of `rows` rows at position cache // 2 of a `cache`-column cache over
    `source`-token sources (every source column real)."""
    sizes = {"batch": rows, "past_len": cache, "src_len": source}
    rng = np.random.default_rng(0)
    feeds = {}
    for i in session.get_inputs():
        shape = [sizes.get(d, d) if isinstance(d, str) else d for d in i.shape]
        if i.type == "tensor(int64)":
            feeds[i.name] = np.full(shape, cache // 2 if i.name == "position" else 5, np.int64)
        elif i.type == "tensor(bool)":
            feeds[i.name] = np.ones(shape, bool)
        else:
            feeds[i.name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    return feeds


def step_flops(entry: Path, rows: int, threads: int, cache: int = 32, source: int = 24) -> dict:
    """The decoder step's time and achieved GFLOP/s at `rows` rows, beside its weight GEMMs alone."""
    manifest = Manifest.load(entry)
    path = manifest.path / manifest.decoder_step.file
    gemms = weight_gemms(onnx.load(str(path)).graph)
    flops = sum(2 * rows * k * n * count for (k, n), count in gemms.items())
    options = session_options(RuntimeConfig(intra_op_threads=threads))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = _step_feeds(session, rows, cache, source)
    repeats = max(20, 2000 // rows)
    step = _seconds(lambda: session.run(None, feeds), repeats)
    gemm = sum(count * _gemm_seconds(rows, k, n, options, repeats) for (k, n), count in gemms.items())
    a = np.random.default_rng(2).standard_normal((1024, 1024), np.float32)
    big = _seconds(lambda: a @ a, 20)
    return {
        "model": manifest.name, "rows": rows, "threads": threads, "cache_columns": cache,
        "source_tokens": source, "weight_gemms": {f"{k}x{n}": c for (k, n), c in sorted(gemms.items())},
        "step_ms": step * 1e3, "step_gflops": flops / step / 1e9,
        "gemms_alone_ms": gemm * 1e3, "gemms_alone_gflops": flops / gemm / 1e9,
        "not_gemm_share": 1 - gemm / step, "numpy_1024_gflops": 2 * 1024**3 / big / 1e9,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Prints the physical view of the step at each batch size and writes it as JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--entry", type=Path, default=Path("model_repository/en-fr-transformer/1"))
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 64])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("bench/results/step_flops.json"))
    args = p.parse_args(argv)
    before = os.getloadavg()[0]
    results = [step_flops(args.entry, b, args.threads) for b in args.batch_size]
    after = os.getloadavg()[0]
    for r in results:
        print(
            f"{r['model']} B={r['rows']}: step {r['step_ms']:.2f} ms = {r['step_gflops']:.0f} GFLOP/s; "
            f"its weight GEMMs alone {r['gemms_alone_ms']:.2f} ms = {r['gemms_alone_gflops']:.0f} GFLOP/s; "
            f"not GEMM {r['not_gemm_share']:.0%} of the step; "
            f"numpy 1024^3 {r['numpy_1024_gflops']:.0f} GFLOP/s"
        )
    print(f"load average (1 min): {before:.2f} before, {after:.2f} after")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"load_average_1m": [before, after], "steps": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
