"""Signals of an answer's quality read from its attention and log-probabilities, for monitoring.

An operator watches their distributions per model: attention spread thin over the source
(high entropy), source tokens the output never attends to (low coverage) and unlikely tokens
(low log-probabilities) show inputs the model was not trained for, drift, or misuse.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COVERED = 0.5  # a source token is covered when the output's attention to it sums to this much


@dataclass(frozen=True)
class AnswerQuality:
    """entropy: mean over output tokens of the attention row's entropy over log(source tokens),
    0 (one source token) to 1 (uniform); coverage: share of source tokens the output attends to
    (its attention to them sums to COVERED or more); mean_logprob: mean natural-log probability of
    the output tokens, None when they were not scored."""

    entropy: float
    coverage: float
    mean_logprob: float | None


def answer_quality(attention: np.ndarray, token_logprobs: np.ndarray | None) -> AnswerQuality | None:
    """The signals of one answer; None for an answer without output tokens or source columns.

    Args:
        attention: (T, S) cross attention, each row a distribution over the source.
        token_logprobs: (T,) log-probabilities of the output tokens, or None.
    """
    steps, sources = attention.shape
    if not steps or not sources:
        return None
    p = np.clip(attention.astype(np.float64), 1e-12, 1.0)  # (T, S)
    entropy = float((-(p * np.log(p)).sum(axis=1)).mean() / np.log(sources)) if sources > 1 else 0.0
    coverage = float((attention.sum(axis=0) >= COVERED).mean())
    mean_logprob = (
        None if token_logprobs is None or not len(token_logprobs) else float(np.mean(token_logprobs))
    )
    return AnswerQuality(entropy, coverage, mean_logprob)
