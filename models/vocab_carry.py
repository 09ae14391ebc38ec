"""Continues training with a changed source vocabulary: embedding rows are carried over by token."""

from __future__ import annotations

import unicodedata

import torch
from torch import nn

from attnserve.core.vocab import Vocab

SOURCE_ROWS = "src_embed.weight"  # every family's source embedding, (V_src, E)


def _counterpart(token: str, vocab: Vocab) -> str | None:
    """A token of `vocab` that reads as `token`: its upper case, or its NFKC form."""
    for other in (token.upper(), unicodedata.normalize("NFKC", token)):
        if other != token and other in vocab:
            return other
    return None


@torch.no_grad()
def carry_source_vocab(start: nn.Module, start_vocab: Vocab, model: nn.Module, vocab: Vocab) -> list[str]:
    """Loads `start`'s weights into `model`, whose source vocabulary is `vocab` instead.

    A token in both keeps its embedding row. A new token starts from the row of the old token it
    folds from (its upper case, or its NFKC form) where there is one, else from the mean row.

    Args:
        start: the trained model, with source vocabulary `start_vocab`.
        start_vocab: its source vocabulary.
        model: a model of the same family and config but for the source vocabulary size.
        vocab: the new source vocabulary.

    Returns:
        The tokens that started from the mean row.
    """
    state = start.state_dict()
    old = state[SOURCE_ROWS]  # (V_old, E)
    rows = old.mean(0, keepdim=True).repeat(len(vocab), 1)  # (V_new, E)
    unmatched = []
    for i, token in enumerate(vocab.tokens):
        source = token if token in start_vocab else _counterpart(token, start_vocab)
        if source is None:
            unmatched.append(token)
        else:
            rows[i] = old[start_vocab.index[source]]
    model.load_state_dict({**state, SOURCE_ROWS: rows})
    return unmatched
