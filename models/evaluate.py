"""Evaluates a G2P model through the shared decode loop (works for ONNX Runtime and PyTorch)."""

from __future__ import annotations

from collections.abc import Sequence

from tqdm import tqdm

from attnserve.models.g2p_data import G2PEntry
from attnserve.models.scoring import error_rates
from attnserve.service.runtime.decoding import StepModel, decode
from attnserve.service.vocab import Vocab


def predict_words(
    model: StepModel,
    words: Sequence[str],
    src_vocab: Vocab,
    tgt_vocab: Vocab,
    max_steps: int,
    batch_size: int = 256,
    progress: bool = False,
    beam_size: int = 1,
) -> list[list[str]]:
    """Phoneme predictions for words (greedy, or beam search when beam_size > 1), batched by length."""
    order = sorted(range(len(words)), key=lambda i: len(words[i]))
    predictions: list[list[str]] = [[] for _ in words]
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="decode", unit="batch", disable=not progress):
        rows = order[start : start + batch_size]
        sources = [src_vocab.encode(list(words[i])) for i in rows]
        hyps = decode(model, sources, tgt_vocab.bos_id, tgt_vocab.eos_id, [max_steps] * len(rows), beam_size)
        for i, hyp in zip(rows, hyps, strict=True):
            predictions[i] = tgt_vocab.decode(hyp.token_ids)
    return predictions


def evaluate_g2p(
    model: StepModel,
    entries: Sequence[G2PEntry],
    src_vocab: Vocab,
    tgt_vocab: Vocab,
    max_steps: int,
    batch_size: int = 256,
    progress: bool = False,
    beam_size: int = 1,
) -> dict[str, float]:
    """WER/PER of the predictions on entries. Returns {"wer", "per", "words"}."""
    preds = predict_words(
        model, [e.word for e in entries], src_vocab, tgt_vocab, max_steps, batch_size, progress, beam_size
    )
    return error_rates(preds, [e.pronunciations for e in entries])
