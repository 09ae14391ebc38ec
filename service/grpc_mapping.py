"""Proto <-> domain conversions for attnserve.v1 (the only module that knows both)."""

from __future__ import annotations

from attnserve.core.alignment import AlignmentMode
from attnserve.core.errors import invalid
from attnserve.core.head_selection import HeadSelection, Reduction
from attnserve.core.manifest import Manifest
from attnserve.core.requests import Answer, AttentionMode, Scores
from attnserve.v1 import translator_pb2 as pb

_ATTENTION_FROM_PB = {
    pb.ATTENTION_MODE_NONE: AttentionMode.NONE,
    pb.ATTENTION_MODE_CROSS: AttentionMode.CROSS,
    pb.ATTENTION_MODE_CROSS_HEADS: AttentionMode.CROSS_HEADS,
    pb.ATTENTION_MODE_ENCODER_SELF: AttentionMode.ENCODER_SELF,
    pb.ATTENTION_MODE_DECODER_SELF: AttentionMode.DECODER_SELF,
}
_ATTENTION_TO_PB = {v: k for k, v in _ATTENTION_FROM_PB.items()}


def _from_pb(table: dict, value: int, what: str):
    """The domain value of a proto enum value; one this server does not know is INVALID_ARGUMENT."""
    try:
        return table[value]
    except KeyError:
        raise invalid(f"unknown {what} {value}") from None


def attention_from_pb(value: int) -> AttentionMode:
    """Domain attention mode (INVALID_ARGUMENT for an unknown one)."""
    return _from_pb(_ATTENTION_FROM_PB, value, "attention mode")


_ALIGNMENT_FROM_PB = {
    pb.ALIGNMENT_MODE_NONE: AlignmentMode.NONE,
    pb.ALIGNMENT_MODE_HARD: AlignmentMode.HARD,
    pb.ALIGNMENT_MODE_SOFT: AlignmentMode.SOFT,
}


def alignment_from_pb(value: int) -> AlignmentMode:
    """Domain alignment mode (INVALID_ARGUMENT for an unknown one)."""
    return _from_pb(_ALIGNMENT_FROM_PB, value, "alignment mode")


_REDUCTION_FROM_PB = {
    pb.ATTENTION_REDUCTION_NONE: Reduction.NONE,
    pb.ATTENTION_REDUCTION_MEAN: Reduction.MEAN,
    pb.ATTENTION_REDUCTION_MAX: Reduction.MAX,
}
_REDUCTION_TO_PB = {v: k for k, v in _REDUCTION_FROM_PB.items()}


def selection_from_pb(options: pb.TranslateOptions) -> HeadSelection:
    """The layers, heads and reduction a request selects; an unknown reduction is INVALID_ARGUMENT."""
    reduction = _from_pb(_REDUCTION_FROM_PB, options.reduction, "attention reduction")
    return HeadSelection(tuple(options.layers), tuple(options.heads), reduction)


def _set_scores(message, scores: Scores | None) -> None:
    """Fills a response's or hypothesis's score, normalized_score and token_logprobs."""
    if scores is None:
        return
    message.score = scores.score
    message.token_logprobs.extend(scores.token_logprobs)
    if scores.normalized_score is not None:
        message.normalized_score = scores.normalized_score


def translation_to_pb(result: Answer, manifest: Manifest) -> pb.TranslateResponse:
    """TranslateResponse for one result; attention as a labelled row-major matrix; scores, n-best
    list and alignments where asked for."""
    response = pb.TranslateResponse(
        text=result.text,
        output_tokens=result.output_tokens,
        source_tokens=result.source_tokens,
        model=manifest.name,
        model_version=manifest.version,
        batch_size=result.batch_size,
        alignment=result.alignment,
        word_alignment=result.word_alignment,
    )
    _set_scores(response, result.scores)
    for h in result.hypotheses:
        hypothesis = response.hypotheses.add(text=h.text, output_tokens=h.output_tokens)
        _set_scores(hypothesis, h.scores)
        if h.attention is not None:
            hypothesis.attention.CopyFrom(_matrix(h.attention, h.output_tokens, result.source_tokens))
    if result.attention is not None:
        response.attention.CopyFrom(_matrix(result.attention, result.output_tokens, result.source_tokens))
    for h in result.heads:
        response.attention_heads.append(
            _matrix(
                h.weights,
                h.row_labels,
                h.col_labels,
                mode=_ATTENTION_TO_PB[h.mode],
                layer=h.layer,
                head=h.head,
                reduction=_REDUCTION_TO_PB[h.reduction],
            )
        )
    return response


def _matrix(weights, row_labels, col_labels, **which) -> pb.AttentionMatrix:
    """A labelled row-major AttentionMatrix from (rows, cols) weights."""
    rows, cols = weights.shape
    return pb.AttentionMatrix(rows=rows, cols=cols, weights=weights.ravel().tolist(),
                              row_labels=row_labels, col_labels=col_labels, **which)  # fmt: skip


def caption_to_pb(result: Answer, manifest: Manifest) -> pb.CaptionResponse:
    """CaptionResponse for one result; attention as one grid-shaped map per output word."""
    image = manifest.image
    response = pb.CaptionResponse(
        text=result.text,
        output_tokens=result.output_tokens,
        model=manifest.name,
        model_version=manifest.version,
        batch_size=result.batch_size,
        input_height=image.height,
        input_width=image.width,
    )
    _set_scores(response, result.scores)
    if result.attention is not None:
        response.attention.CopyFrom(
            pb.AttentionMaps(
                steps=len(result.attention),
                grid_height=image.grid_height,
                grid_width=image.grid_width,
                weights=result.attention.ravel().tolist(),  # (T, gh * gw) row-major = (T, gh, gw)
                labels=result.output_tokens,
            )
        )
    return response


def model_info_to_pb(manifest: Manifest, providers: tuple[str, ...], precision: str) -> pb.ModelInfo:
    """ModelInfo from a manifest, its test-split figures, and the providers and precision in use."""
    metrics = {k: float(v) for k, v in manifest.metrics.get("test", {}).items()}
    return pb.ModelInfo(
        name=manifest.name,
        version=manifest.version,
        task=manifest.task,
        architecture=manifest.architecture,
        attention_modes=[_ATTENTION_TO_PB[AttentionMode(m)] for m in manifest.attention_modes],
        metrics=metrics,
        max_source_tokens=manifest.max_source_tokens,
        max_output_tokens=manifest.max_output_tokens,
        execution_providers=list(providers),
        description=manifest.description,
        reads_locale=manifest.reads_locale,
        rpc="Caption" if manifest.image else "Translate",
        precision=precision,
    )
