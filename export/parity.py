"""PyTorch vs ONNX Runtime: per-graph numeric parity and identical greedy output."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from attnserve.core.decoding import greedy_decode
from attnserve.core.sources import SourceBatch
from attnserve.core.wiring import WiredStepModel


@dataclass(frozen=True)
class ParityReport:
    """Largest |torch - ORT| over all outputs of both graphs, and greedy agreement."""

    max_abs_diff: float
    batch_sizes: tuple[int, ...]
    greedy_examples: int
    greedy_matches: int

    @property
    def greedy_identical(self) -> bool:
        return self.greedy_matches == self.greedy_examples


def _max_diff(a: dict, b: dict) -> float:
    return max(
        float(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)).max(initial=0.0)) for k in a
    )


def check_parity(
    torch_model: WiredStepModel,
    onnx_model: WiredStepModel,
    probes: Sequence[SourceBatch],
    greedy: Sequence[SourceBatch],
    bos_id: int,
    eos_id: int,
    max_steps: int,
    steps: int = 4,
) -> ParityReport:
    """Compares encoder and decoder-step outputs on the probe batches, then greedy output on `greedy`.

    Args:
        torch_model, onnx_model: the same model behind PyTorch and ONNX Runtime.
        probes: batches (of different sizes) for the per-graph comparison.
        greedy: batches whose greedy decoding must be identical token for token.
        bos_id, eos_id, max_steps: as for greedy_decode.
        steps: decoder steps compared per probe.
    """
    worst = 0.0
    for batch in probes:
        s_torch, s_onnx = torch_model.encode(batch.inputs), onnx_model.encode(batch.inputs)
        worst = max(worst, _max_diff(s_torch, s_onnx))
        prev = np.full(batch.size, bos_id, dtype=np.int64)
        for t in range(steps):
            position = np.full(batch.size, t, dtype=np.int64)
            l_t, a_t, s_torch = torch_model.step(prev, s_torch, position)
            l_o, a_o, s_onnx = onnx_model.step(prev, s_onnx, position)
            worst = max(
                worst, _max_diff({"l": l_t, "a": a_t}, {"l": l_o, "a": a_o}), _max_diff(s_torch, s_onnx)
            )
            prev = l_t.argmax(1).astype(np.int64)
    total = matches = 0
    for batch in greedy:
        limits = [max_steps] * batch.size
        ref = greedy_decode(torch_model, batch, bos_id, eos_id, limits)
        got = greedy_decode(onnx_model, batch, bos_id, eos_id, limits)
        total += len(ref)
        matches += sum(r.token_ids == g.token_ids for r, g in zip(ref, got, strict=True))
    return ParityReport(worst, tuple(b.size for b in probes), total, matches)
