"""Request text or image -> model inputs, with clear errors for what a model cannot take.

`SourceCodec` needs only the manifest, so the ingress validates a request before it joins a batch.
"""

from __future__ import annotations

from attnserve.core.alignment import DEFAULT_THRESHOLD, AlignmentMode
from attnserve.core.errors import invalid
from attnserve.core.head_selection import ALL_HEADS, MAX_ATTENTION_WEIGHTS, HeadSelection
from attnserve.core.images import decode_image
from attnserve.core.manifest import Manifest
from attnserve.core.requests import AttentionMode, PreparedRequest
from attnserve.core.subwords import MODEL_FILE, Subwords, tokenize
from attnserve.core.text_forms import normalise
from attnserve.core.vocab import locale_token

MAX_BEAM_SIZE = 16
MAX_LENGTH_PENALTY = 2.0
_PER_HEAD_SHAPES = {  # the (rows, cols) of each per-head mode's matrices
    AttentionMode.CROSS_HEADS: ("output", "source"),
    AttentionMode.ENCODER_SELF: ("source", "source"),
    AttentionMode.DECODER_SELF: ("output", "output"),
}


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
        scores: bool = False,
        num_hypotheses: int = 0,
        alignment: AlignmentMode = AlignmentMode.NONE,
        alignment_threshold: float = 0.0,
        selection: HeadSelection = ALL_HEADS,
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
            scores: return the score and each output token's log-probability.
            num_hypotheses: 0 or 1 for the best only; up to beam_size for an n-best list.
            alignment: HARD or SOFT to return the output's alignment with the source tokens.
            alignment_threshold: SOFT's least link weight in (0, 1]; 0 means DEFAULT_THRESHOLD.
            selection: the layers and heads of a per-head attention mode to return, and their
                reduction; what it may return is bounded by MAX_ATTENTION_WEIGHTS.

        Raises:
            RequestError: INVALID_ARGUMENT for empty text, text over the model's maximum
                length, characters outside the model's alphabet, or out-of-range options.
        """
        m = self.manifest
        if m.image is not None:
            raise invalid(f"model {m.name!r} captions images; call Caption")
        text = normalise(text, m.text_form, m.lowercase).strip()
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
        if num_hypotheses > beam_size:
            raise invalid(f"num_hypotheses {num_hypotheses} is more than beam_size {beam_size}")
        if not 0 <= alignment_threshold <= 1:  # also rejects NaN
            raise invalid(f"alignment_threshold must be between 0 and 1, got {alignment_threshold}")
        if m.reads_locale:
            tokens = (locale_token(locale, m.source_vocab), *tokens)
        self._check_selection(attention, selection, limit, len(tokens))
        return PreparedRequest(
            tokens, tuple(m.source_vocab.encode(tokens)), limit, attention, beam_size, length_penalty,
            scores=scores, num_hypotheses=max(num_hypotheses, 1), alignment=alignment,
            alignment_threshold=alignment_threshold or DEFAULT_THRESHOLD, selection=selection,
        )  # fmt: skip

    def prepare_image(
        self,
        data: bytes,
        attention: AttentionMode,
        max_output_tokens: int = 0,
        beam_size: int = 1,
        length_penalty: float = 0.0,
        scores: bool = False,
    ) -> PreparedRequest:
        """Validates and decodes one image request (options as for `prepare`; n-best lists and
        alignments are for text).

        Raises:
            RequestError: INVALID_ARGUMENT for a text model, an image that is not a small PNG
                or JPEG, or out-of-range options.
        """
        m = self.manifest
        if m.image is None:
            raise invalid(f"model {m.name!r} translates text; call Translate")
        pixels = decode_image(data, m.image)  # (C, H, W)
        limit, beam_size = self._options(attention, max_output_tokens, beam_size, length_penalty)
        return PreparedRequest((), (), limit, attention, beam_size, length_penalty, pixels, scores=scores)

    def _check_selection(
        self, attention: AttentionMode, selection: HeadSelection, limit: int, source: int
    ) -> None:
        """Refuses a head selection the mode or the model cannot take, and a per-head mode that
        could return more than MAX_ATTENTION_WEIGHTS weights."""
        if attention not in _PER_HEAD_SHAPES:
            if not selection.everything:
                raise invalid("layers, heads and reduction select among the matrices of a per-head attention "
                              "mode (CROSS_HEADS, ENCODER_SELF, DECODER_SELF)")  # fmt: skip
            return
        config = self.manifest.raw.get("model_config", {})
        layers = config.get(
            "encoder_layers" if attention is AttentionMode.ENCODER_SELF else "decoder_layers", 0
        )
        heads = config.get("heads", 0)
        if problem := selection.problem(layers, heads):
            raise invalid(problem)
        sizes = {"output": limit, "source": source}
        rows, cols = (sizes[axis] for axis in _PER_HEAD_SHAPES[attention])
        matrices = selection.matrices(layers, heads)
        if matrices * rows * cols > MAX_ATTENTION_WEIGHTS:
            raise invalid(
                f"{attention.value} attention could return {matrices * rows * cols:,} weights ({matrices} "
                f"matrices of up to {rows} x {cols}), over the limit of {MAX_ATTENTION_WEIGHTS:,}; choose "
                "layers or heads, reduce them (MEAN or MAX), or lower max_output_tokens"
            )

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
