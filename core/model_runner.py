"""One model's ONNX Runtime sessions, and what turns prepared requests into decoding jobs and answers.

The engine (and nothing else) drives a `ModelRunner`'s running batch; evaluation and parity checks
drive the model through `decoding.decode`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from attnserve.core.alignment import AlignmentMode, links, pharaoh, word_links
from attnserve.core.codec import SourceCodec
from attnserve.core.decoding import DecodeJob, Hypothesis, RunningBatch, length_normalised
from attnserve.core.manifest import Manifest
from attnserve.core.onnx_model import OnnxSeq2Seq, RuntimeConfig
from attnserve.core.requests import (
    Answer,
    AttentionMode,
    Candidate,
    HeadAttention,
    PreparedRequest,
    Scores,
    StreamCallback,
    StreamToken,
)
from attnserve.core.sources import SourceBatch

_MATRIX_MODES = (AttentionMode.NONE, AttentionMode.CROSS)  # served without per-head outputs
CROSS_HEADS = AttentionMode.CROSS_HEADS.value

WARMUP_SOURCE_TOKENS = 12  # a typical request's length: warm-up shapes near the real ones


class ModelRunner:
    """One model's ONNX Runtime sessions and codec: decoding jobs of prepared requests, and their answers."""

    def __init__(self, manifest: Manifest, runtime: RuntimeConfig = RuntimeConfig()):
        self.manifest = manifest
        self.codec = SourceCodec(manifest)
        self.model = OnnxSeq2Seq(manifest, runtime)

    def warmup_request(self) -> PreparedRequest:
        """A representative request for warming the sessions up: a source of typical length made
        of the model's own tokens (or a blank image), decoding to the model's output limit."""
        m = self.manifest
        if m.image is not None:
            image = np.zeros((m.image.channels, m.image.height, m.image.width), np.float32)
            return PreparedRequest((), (), m.max_output_tokens, AttentionMode.NONE, image=image)
        words = [t for t in m.source_vocab.tokens if not t.startswith("<")]
        tokens = tuple(words[i % len(words)] for i in range(min(WARMUP_SOURCE_TOKENS, m.max_source_tokens)))
        ids = tuple(m.source_vocab.encode(tokens))
        return PreparedRequest(tokens, ids, m.max_output_tokens, AttentionMode.NONE)

    def running_batch(self) -> RunningBatch:
        """An empty running batch of this model that requests can join at any step."""
        vocab = self.manifest.target_vocab
        return RunningBatch(self.model, vocab.bos_id, vocab.eos_id, self.manifest.max_output_tokens)

    def job(
        self, request: PreparedRequest, tag: object = None, on_token: StreamCallback | None = None
    ) -> DecodeJob:
        """The decoding job of a request; `on_token` sees each output token (special tokens
        skipped) with the text it adds, its attention row when the request asked for cross
        attention, and its log-probability when it asked for scores."""
        extras = () if request.attention in _MATRIX_MODES else (request.attention.value,)
        if request.alignment is not AlignmentMode.NONE and CROSS_HEADS in self.manifest.attention_modes:
            extras = tuple(dict.fromkeys((*extras, CROSS_HEADS)))  # what alignments are read from
        callback = None
        if on_token is not None:
            vocab, cross = self.manifest.target_vocab, request.attention is AttentionMode.CROSS
            tokens: list[str] = []
            shown = [""]  # the text streamed so far

            def callback(token_id: int, row: np.ndarray, logprob: float | None) -> None:
                if token_id in vocab.special_ids:
                    return
                tokens.append(vocab.tokens[token_id])
                text = self.codec.detokenize(tuple(tokens))
                # A piece that completes nothing yet (a split character) adds no text until one does.
                added = text[len(shown[0]) :] if text.startswith(shown[0]) else ""
                shown[0] += added
                scored = logprob if request.scores else None
                on_token(StreamToken(tokens[-1], added, row if cross else None, scored))

        return DecodeJob(
            request.max_output_tokens, request.beam_size, request.length_penalty, extras, callback, tag,
            scores=request.scores, num_hypotheses=request.num_hypotheses,
        )  # fmt: skip

    def source_batch(self, requests: Sequence[PreparedRequest]) -> SourceBatch:
        """Token ids, or pixels for an image model, of the requests as one encoder batch."""
        if self.manifest.image is None:
            return SourceBatch.from_ids([list(r.source_ids) for r in requests])
        return SourceBatch.from_images(np.stack([r.image for r in requests]))

    def result(self, request: PreparedRequest, hyp: Hypothesis, batch_size: int) -> Answer:
        """The request's answer from its hypothesis (special tokens dropped with their attention
        rows and log-probabilities), with the scores, n-best list and alignment it asked for."""
        keep, tokens = self._kept(hyp)
        mode = request.attention
        candidates = (hyp, *hyp.alternatives) if request.num_hypotheses > 1 else ()
        alignment = word_alignment = ""
        if request.alignment is not AlignmentMode.NONE:
            found = links(self._alignment_weights(hyp, keep), request.alignment, request.alignment_threshold)
            alignment = pharaoh(found)
            if self.codec.subwords is not None:
                word_alignment = pharaoh(word_links(found, request.source_tokens, tokens))
        return Answer(
            output_tokens=tokens,
            text=self.codec.detokenize(tokens),
            source_tokens=request.source_tokens,
            attention=hyp.attention[keep] if mode is AttentionMode.CROSS else None,
            batch_size=batch_size,
            heads=() if mode in _MATRIX_MODES else self._heads(request, hyp, keep, tokens),
            scores=self._scores(request, hyp, keep) if request.scores else None,
            hypotheses=tuple(self._candidate(request, h) for h in candidates),
            alignment=alignment,
            word_alignment=word_alignment,
        )

    @staticmethod
    def _alignment_weights(hyp: Hypothesis, keep: list[int]) -> np.ndarray:
        """The (T, S) weights alignments are read from: for models with per-head cross attention,
        the middle decoder layer's mean over heads, which aligns best on the bundled
        g2p-transformer (bench/alignment_heads.py); else the cross attention."""
        heads = hyp.extras.get(CROSS_HEADS)  # (T, L, H, S); (0,) for an empty output
        if heads is None or heads.ndim != 4:
            return hyp.attention[keep]
        return heads[keep][:, heads.shape[1] // 2].mean(axis=1)

    def _kept(self, hyp: Hypothesis) -> tuple[list[int], tuple[str, ...]]:
        """Indexes and text of a hypothesis's output tokens that are not special tokens."""
        vocab = self.manifest.target_vocab
        keep = [i for i, t in enumerate(hyp.token_ids) if t not in vocab.special_ids]
        return keep, tuple(vocab.tokens[hyp.token_ids[i]] for i in keep)

    @staticmethod
    def _scores(request: PreparedRequest, hyp: Hypothesis, keep: list[int]) -> Scores:
        """A hypothesis's score, its kept tokens' log-probabilities, and the length-normalised score."""
        normalised = None
        if request.length_penalty:
            normalised = length_normalised(hyp.score, len(hyp.token_ids), request.length_penalty)
        return Scores(hyp.score, tuple(hyp.token_logprobs[keep].tolist()), normalised)

    def _candidate(self, request: PreparedRequest, hyp: Hypothesis) -> Candidate:
        """One n-best entry."""
        keep, tokens = self._kept(hyp)
        attention = hyp.attention[keep] if request.attention is AttentionMode.CROSS else None
        return Candidate(tokens, self.codec.detokenize(tokens), self._scores(request, hyp, keep), attention)

    def _heads(
        self, request: PreparedRequest, hyp: Hypothesis, keep: list[int], tokens
    ) -> tuple[HeadAttention, ...]:
        """The selected layer and head matrices of a per-head mode, labelled."""
        mode, source = request.attention, request.source_tokens
        value = hyp.extras[mode.value]
        if mode is AttentionMode.ENCODER_SELF:  # (Le, H, S, S)
            rows, cols, matrices = source, source, value
        elif mode is AttentionMode.CROSS_HEADS:  # (T, L, H, S) -> (L, H, T, S)
            rows, cols, matrices = tokens, source, value[keep].transpose(1, 2, 0, 3)
        else:  # DECODER_SELF (T, L, H, T): step t attends to the decoder inputs <s>, y(1) .. y(t)
            inputs = ["<s>", *(self.manifest.target_vocab.tokens[i] for i in hyp.token_ids)]
            cols = tuple(inputs[: len(hyp.token_ids)])
            rows, matrices = tokens, value[keep][..., : len(cols)].transpose(1, 2, 0, 3)
        selection = request.selection
        return tuple(
            HeadAttention(mode, layer, head, matrix, tuple(rows), tuple(cols), selection.reduction)
            for layer, head, matrix in selection.apply(matrices)
        )
