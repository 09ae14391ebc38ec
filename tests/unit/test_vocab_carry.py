"""Continuing with a changed source vocabulary: rows follow their tokens, the rest is untouched."""

import torch

from attnserve.core.vocab import Vocab
from attnserve.models.architectures import architecture
from attnserve.models.vocab_carry import carry_source_vocab

CONFIG = dict(tgt_vocab_size=7, embed_size=8, hidden_size=6)


def _model(vocab: Vocab):
    arch = architecture("luong-gru")
    torch.manual_seed(len(vocab))
    return arch.model_cls(arch.config_cls(src_vocab_size=len(vocab), **CONFIG))


def test_rows_follow_their_tokens_and_new_ones_start_from_what_they_fold_from():
    old_vocab = Vocab.build([["a", "b", "M", "Ａ"]])
    new_vocab = Vocab.build([["b", "a", "m", "x"]])  # "m" folds from "M"; "x" is new
    start, model = _model(old_vocab), _model(new_vocab)
    unmatched = carry_source_vocab(start, old_vocab, model, new_vocab)
    old_rows, rows = start.src_embed.weight, model.src_embed.weight
    for token, source in (("a", "a"), ("b", "b"), ("m", "M"), ("<s>", "<s>")):
        torch.testing.assert_close(rows[new_vocab.index[token]], old_rows[old_vocab.index[source]])
    assert unmatched == ["x"]
    torch.testing.assert_close(rows[new_vocab.index["x"]], old_rows.mean(0))
    for name, value in start.state_dict().items():
        if name != "src_embed.weight":
            torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0)
