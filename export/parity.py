"""PyTorch vs ONNX Runtime: per-graph numeric parity and identical greedy output."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from attnserve.models.evaluate import predict_words
from attnserve.models.torch_runner import TorchBahdanauRunner
from attnserve.service.runtime.decoding import StepModel, pad_batch
from attnserve.service.vocab import Vocab


@dataclass(frozen=True)
class ParityReport:
    """Largest |torch - ORT| over all outputs of both graphs, and greedy agreement."""

    max_abs_diff: float
    batch_sizes: tuple[int, ...]
    greedy_words: int
    greedy_matches: int

    @property
    def greedy_identical(self) -> bool:
        return self.greedy_matches == self.greedy_words


def _max_diff(a: dict, b: dict) -> float:
    return max(float(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)).max()) for k in a)


def check_parity(
    torch_model: TorchBahdanauRunner,
    onnx_model: StepModel,
    words: Sequence[str],
    src_vocab: Vocab,
    tgt_vocab: Vocab,
    max_steps: int,
    batch_sizes: Sequence[int] = (1, 5, 17),
    steps: int = 4,
) -> ParityReport:
    """Compares encoder and decoder-step outputs on real words, then greedy output on all words."""
    worst = 0.0
    for size in batch_sizes:
        ids, mask = pad_batch([src_vocab.encode(list(w)) for w in words[:size]])
        s_torch, s_onnx = torch_model.encode(ids, mask), onnx_model.encode(ids, mask)
        worst = max(worst, _max_diff(s_torch, s_onnx))
        prev = np.full(len(ids), tgt_vocab.bos_id, dtype=np.int64)
        for _ in range(steps):
            l_t, a_t, s_torch = torch_model.step(prev, s_torch)
            l_o, a_o, s_onnx = onnx_model.step(prev, s_onnx)
            worst = max(
                worst, _max_diff({"l": l_t, "a": a_t}, {"l": l_o, "a": a_o}), _max_diff(s_torch, s_onnx)
            )
            prev = l_t.argmax(1).astype(np.int64)
    ref = predict_words(torch_model, words, src_vocab, tgt_vocab, max_steps)
    got = predict_words(onnx_model, words, src_vocab, tgt_vocab, max_steps)
    matches = sum(r == g for r, g in zip(ref, got, strict=True))
    return ParityReport(worst, tuple(batch_sizes), len(words), matches)
