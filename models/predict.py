"""A text model's output tokens for many sources, batched by length through the shared decode loop
(ONNX Runtime or PyTorch); what a task's evaluation scores."""

from __future__ import annotations

from collections.abc import Sequence

from tqdm import tqdm

from attnserve.core.decoding import StepModel, decode
from attnserve.core.sources import SourceBatch
from attnserve.core.vocab import Vocab


def predict(
    model: StepModel,
    sources: Sequence[Sequence[str]],
    src_vocab: Vocab,
    tgt_vocab: Vocab,
    max_steps: int,
    batch_size: int = 256,
    progress: bool = False,
    beam_size: int = 1,
) -> list[list[str] | None]:
    """Output tokens per source (greedy, or beam search when beam_size > 1), batched by length.

    A source with a token outside src_vocab cannot be read by the model and gets None.
    """
    readable = [i for i, s in enumerate(sources) if all(t in src_vocab for t in s)]
    order = sorted(readable, key=lambda i: len(sources[i]))
    predictions: list[list[str] | None] = [None] * len(sources)
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="decode", unit="batch", disable=not progress):
        rows = order[start : start + batch_size]
        batch = SourceBatch.from_ids([src_vocab.encode(sources[i]) for i in rows])
        hyps = decode(model, batch, tgt_vocab.bos_id, tgt_vocab.eos_id, [max_steps] * len(rows), beam_size)
        for i, hyp in zip(rows, hyps, strict=True):
            predictions[i] = tgt_vocab.decode(hyp.token_ids)
    return predictions
