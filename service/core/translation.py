"""The serving core for one model: validate a request, decode a batch (no Ray, no protos).

`SourceCodec` needs only the manifest, so the ingress can validate a request before it joins a
batch; `Translator` adds the ONNX Runtime model and decodes batches of prepared requests.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np

from attnserve.service.core.decoding import DecodeJob, Hypothesis, RunningBatch, SourceBatch
from attnserve.service.core.errors import ErrorCode, RequestError, invalid
from attnserve.service.core.images import decode_image
from attnserve.service.core.manifest import Manifest
from attnserve.service.core.onnx_model import OnnxSeq2Seq, RuntimeConfig
from attnserve.service.core.subwords import MODEL_FILE, Subwords, tokenize
from attnserve.service.core.vocab import locale_token

log = logging.getLogger(__name__)
MAX_BEAM_SIZE = 16
MAX_LENGTH_PENALTY = 2.0
StreamCallback = Callable[[str, np.ndarray | None], None]  # output token, its attention row or None


class AttentionMode(Enum):
    """Which attention weights a request wants back."""

    NONE = "none"
    CROSS = "cross"
    CROSS_HEADS = "cross_heads"
    ENCODER_SELF = "encoder_self"
    DECODER_SELF = "decoder_self"


@dataclass(frozen=True)
class PreparedRequest:
    """A validated request, ready to join a batch."""

    source_tokens: tuple[str, ...]
    source_ids: tuple[int, ...]
    max_output_tokens: int
    attention: AttentionMode
    beam_size: int = 1
    length_penalty: float = 0.0
    image: np.ndarray | None = None  # (C, H, W) pixels for image models


@dataclass(frozen=True)
class HeadAttention:
    """One layer and head of a per-head attention mode, with the labels of its rows and columns."""

    mode: AttentionMode
    layer: int
    head: int
    weights: np.ndarray  # (rows, cols)
    row_labels: tuple[str, ...]
    col_labels: tuple[str, ...]


@dataclass(frozen=True)
class Translation:
    """The result for one request. attention: (output tokens, source tokens) or None."""

    output_tokens: tuple[str, ...]
    text: str
    source_tokens: tuple[str, ...]
    attention: np.ndarray | None
    batch_size: int
    heads: tuple[HeadAttention, ...] = ()


class SourceCodec:
    """Turns request text into model inputs, with clear errors for what the model cannot take."""

    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        subwords = manifest.tokenizer == "sentencepiece"
        self.subwords = Subwords((manifest.path / MODEL_FILE).read_bytes()) if subwords else None
        self._unit = {"characters": "characters", "words": "words"}.get(manifest.tokenizer, "subword tokens")
        known = [t for t in manifest.source_vocab.tokens[3:] if not t.startswith("<")]
        self._alphabet = (
            f"it accepts only these characters: {''.join(known)}"
            if len(known) <= 100 and manifest.tokenizer == "characters"
            else f"its {len(known)} {self._unit} are listed in its manifest"
        )

    def tokens(self, text: str) -> tuple[str, ...]:
        """The model's source tokens of a text."""
        return tokenize(text, self.manifest.tokenizer, self.subwords)

    def detokenize(self, tokens: tuple[str, ...]) -> str:
        """The text of output tokens."""
        return self.subwords.decode(tokens) if self.subwords else self.manifest.target_separator.join(tokens)

    def prepare(
        self,
        text: str,
        attention: AttentionMode,
        max_output_tokens: int = 0,
        beam_size: int = 1,
        length_penalty: float = 0.0,
        locale: str = "",
    ) -> PreparedRequest:
        """Validates and tokenises one request.

        Args:
            text: the source text; surrounding whitespace is ignored.
            attention: which attention weights to return.
            max_output_tokens: 0 for the model's maximum; larger values are capped to it.
            beam_size: 0 or 1 for greedy decoding, up to MAX_BEAM_SIZE for beam search.
            length_penalty: GNMT alpha for ranking beam hypotheses, 0..MAX_LENGTH_PENALTY.
            locale: the text's CLDR locale, for models that read one (others ignore it); a
                locale the model was not trained on is read as unknown.

        Raises:
            RequestError: INVALID_ARGUMENT for empty text, text over the model's maximum
                length, characters outside the model's alphabet, or out-of-range options.
        """
        m = self.manifest
        if m.image is not None:
            raise invalid(f"model {m.name!r} captions images; call Caption")
        text = text.strip()
        if m.lowercase:
            text = text.lower()
        if not text:
            raise invalid("text is empty")
        tokens = self.tokens(text)
        if len(tokens) > m.max_source_tokens:
            raise invalid(
                f"text has {len(tokens)} {self._unit}; model {m.name!r} accepts at most {m.max_source_tokens}"
            )
        unknown = sorted({t for t in tokens if t not in m.source_vocab})
        if unknown:
            shown = ", ".join(repr(t) for t in unknown[:10])
            raise invalid(f"model {m.name!r} cannot read {shown}; {self._alphabet}")
        limit, beam_size = self._options(attention, max_output_tokens, beam_size, length_penalty)
        if m.reads_locale:
            tokens = (locale_token(locale, m.source_vocab), *tokens)
        return PreparedRequest(
            tokens, tuple(m.source_vocab.encode(tokens)), limit, attention, beam_size, length_penalty
        )

    def prepare_image(
        self,
        data: bytes,
        attention: AttentionMode,
        max_output_tokens: int = 0,
        beam_size: int = 1,
        length_penalty: float = 0.0,
    ) -> PreparedRequest:
        """Validates and decodes one image request (options as for `prepare`).

        Raises:
            RequestError: INVALID_ARGUMENT for a text model, an image that is not a small PNG
                or JPEG, or out-of-range options.
        """
        m = self.manifest
        if m.image is None:
            raise invalid(f"model {m.name!r} translates text; call Translate")
        pixels = decode_image(data, m.image)  # (C, H, W)
        limit, beam_size = self._options(attention, max_output_tokens, beam_size, length_penalty)
        return PreparedRequest((), (), limit, attention, beam_size, length_penalty, pixels)

    def _options(
        self, attention: AttentionMode, max_output_tokens: int, beam_size: int, length_penalty: float
    ) -> tuple[int, int]:
        """Validates the decoding options; returns (output token limit, beam size)."""
        m = self.manifest
        if attention.value not in m.attention_modes and attention is not AttentionMode.NONE:
            raise invalid(f"model {m.name!r} does not return {attention.value} attention")
        if max_output_tokens < 0:
            raise invalid("max_output_tokens must not be negative")
        if not 0 <= beam_size <= MAX_BEAM_SIZE:
            raise invalid(f"beam_size must be between 1 and {MAX_BEAM_SIZE} (0 means 1), got {beam_size}")
        if not 0 <= length_penalty <= MAX_LENGTH_PENALTY:  # also rejects NaN
            raise invalid(f"length_penalty must be between 0 and {MAX_LENGTH_PENALTY}, got {length_penalty}")
        return min(max_output_tokens or m.max_output_tokens, m.max_output_tokens), max(beam_size, 1)


_MATRIX_MODES = (AttentionMode.NONE, AttentionMode.CROSS)  # served without per-head outputs


class Translator:
    """Decodes prepared requests with one model's ONNX Runtime sessions."""

    def __init__(self, manifest: Manifest, runtime: RuntimeConfig = RuntimeConfig()):
        self.manifest = manifest
        self.codec = SourceCodec(manifest)
        self.model = OnnxSeq2Seq(manifest, runtime)

    def running_batch(self) -> RunningBatch:
        """An empty running batch of this model that requests can join at any step."""
        vocab = self.manifest.target_vocab
        return RunningBatch(self.model, vocab.bos_id, vocab.eos_id, self.manifest.max_output_tokens)

    def job(
        self, request: PreparedRequest, tag: object = None, on_token: StreamCallback | None = None
    ) -> DecodeJob:
        """The decoding job of a request; `on_token` sees each output token (special tokens
        skipped) with its attention row when the request asked for cross attention."""
        extras = () if request.attention in _MATRIX_MODES else (request.attention.value,)
        callback = None
        if on_token is not None:
            vocab, cross = self.manifest.target_vocab, request.attention is AttentionMode.CROSS

            def callback(token_id: int, row: np.ndarray) -> None:
                if token_id not in vocab.special_ids:
                    on_token(vocab.tokens[token_id], row if cross else None)

        return DecodeJob(
            request.max_output_tokens, request.beam_size, request.length_penalty, extras, callback, tag
        )

    def source_batch(self, requests: Sequence[PreparedRequest]) -> SourceBatch:
        """Token ids, or pixels for an image model, of the requests as one encoder batch."""
        if self.manifest.image is None:
            return SourceBatch.from_ids([list(r.source_ids) for r in requests])
        return SourceBatch.from_images(np.stack([r.image for r in requests]))

    def translate_batch(self, requests: list[PreparedRequest]) -> list[Translation | RequestError]:
        """Decodes requests together to the end; if that fails, retries each alone so one bad
        request cannot fail the others. Failures come back as RequestError(INTERNAL)."""
        try:
            return self._decode(requests)
        except Exception:
            if len(requests) == 1:
                log.exception("decoding failed for a request of %d tokens", len(requests[0].source_ids))
                return [RequestError(ErrorCode.INTERNAL, "the model failed on this input")]
            log.exception("batch of %d failed; retrying its requests one by one", len(requests))
            return [self.translate_batch([r])[0] for r in requests]

    def _decode(self, requests: list[PreparedRequest]) -> list[Translation]:
        """Decodes the requests in one running batch (each with its own beam settings)."""
        jobs = [self.job(r, i) for i, r in enumerate(requests)]
        results: list[Translation | None] = [None] * len(requests)
        for job, hyp in self.running_batch().run(jobs, self.source_batch(requests)):
            results[job.tag] = self.result(requests[job.tag], hyp, len(requests))
        return results

    def result(self, request: PreparedRequest, hyp: Hypothesis, batch_size: int) -> Translation:
        """The request's answer from its hypothesis (special tokens dropped with their attention rows)."""
        vocab = self.manifest.target_vocab
        keep = [i for i, t in enumerate(hyp.token_ids) if t not in vocab.special_ids]
        tokens = tuple(vocab.tokens[hyp.token_ids[i]] for i in keep)
        mode = request.attention
        return Translation(
            output_tokens=tokens,
            text=self.codec.detokenize(tokens),
            source_tokens=request.source_tokens,
            attention=hyp.attention[keep] if mode is AttentionMode.CROSS else None,
            batch_size=batch_size,
            heads=()
            if mode in _MATRIX_MODES
            else self._heads(mode, hyp, keep, tokens, request.source_tokens),
        )

    def _heads(self, mode, hyp: Hypothesis, keep: list[int], tokens, source) -> tuple[HeadAttention, ...]:
        """Per layer and head matrices of a per-head mode, labelled."""
        value = hyp.extras[mode.value]
        if mode is AttentionMode.ENCODER_SELF:  # (Le, H, S, S)
            rows, cols, matrices = source, source, value
        elif mode is AttentionMode.CROSS_HEADS:  # (T, L, H, S) -> (L, H, T, S)
            rows, cols, matrices = tokens, source, value[keep].transpose(1, 2, 0, 3)
        else:  # DECODER_SELF (T, L, H, T): step t attends to the decoder inputs <s>, y(1) .. y(t)
            inputs = ["<s>", *(self.manifest.target_vocab.tokens[i] for i in hyp.token_ids)]
            cols = tuple(inputs[: len(hyp.token_ids)])
            rows, matrices = tokens, value[keep][..., : len(cols)].transpose(1, 2, 0, 3)
        return tuple(
            HeadAttention(mode, layer, head, matrices[layer, head], tuple(rows), tuple(cols))
            for layer in range(matrices.shape[0])
            for head in range(matrices.shape[1])
        )
