"""Your own parallel text: reading, splitting, subword tokenisation and BLEU scoring."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnserve.core.subwords import Subwords
from attnserve.core.vocab import SPECIALS
from attnserve.models.tasks.parallel_text import ParallelTextTask, read_pairs, split_pairs, train_subwords
from tests.conftest import BYOM_TEXT, ROOT
from tests.helpers import answers

DDTP = ROOT / "models" / "data" / "ddtp-en-fr.tsv.xz"


@pytest.fixture(scope="module")
def subword_task() -> ParallelTextTask:
    return ParallelTextTask(BYOM_TEXT, tokens="subwords", vocab_size=500)


def test_subword_training_is_repeatable_and_ids_match_the_vocabulary(subword_task):
    again = ParallelTextTask(BYOM_TEXT, tokens="subwords", vocab_size=500)
    assert again.subwords.model == subword_task.subwords.model  # export rebuilds the tokenizer
    src, tgt = subword_task.vocabularies()
    assert src == tgt and src.tokens[: len(SPECIALS)] == SPECIALS and src.tokens[3] == "<unk>"
    assert len(src) <= 500


words = st.text(st.characters(blacklist_categories=("Z", "C")), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(st.lists(words, min_size=1, max_size=8))
def test_any_text_is_spelled_by_known_pieces_and_decodes_back(subword_task, parts):
    text = " ".join(parts)
    pieces = subword_task.subwords.encode(text)
    vocab = subword_task.vocabularies()[0]
    assert all(p in vocab for p in pieces)  # byte fallback: no input is unreadable
    assert subword_task.subwords.decode(pieces) == text


def test_a_vocabulary_too_small_for_the_bytes_and_characters_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot train 200 subwords"):
        train_subwords(["un deux trois", "quatre cinq"], 200)


def test_held_out_splits_have_that_many_sources_and_do_not_depend_on_line_order(tmp_path):
    lines = [line for line in BYOM_TEXT.read_text("utf-8").splitlines() if line and not line.startswith("#")]
    shuffled = tmp_path / "shuffled.tsv"
    random.Random(1).shuffle(lines)
    shuffled.write_text("\n".join(lines) + "\n", "utf-8")
    first = split_pairs(read_pairs(BYOM_TEXT), 50, BYOM_TEXT)
    second = split_pairs(read_pairs(shuffled), 50, shuffled)
    for split in ("train", "dev", "test"):
        assert sorted(s for s, _ in first[split]) == sorted(s for s, _ in second[split])
    assert len(first["test"]) == len(first["dev"]) == 50
    sources = [{s for s, _ in first[split]} for split in ("train", "dev", "test")]
    assert not (sources[0] & sources[1] or sources[0] & sources[2] or sources[1] & sources[2])


def test_bleu_rewards_the_references_and_not_empty_output(tmp_path):
    import lzma

    with lzma.open(DDTP, "rt", encoding="utf-8") as f:
        sentences = [next(f) for _ in range(300)]
    (tmp_path / "ddtp.tsv").write_text("".join(sentences), "utf-8")
    task = ParallelTextTask(tmp_path / "ddtp.tsv", tokens="subwords", vocab_size=800, held_out=40)
    examples = task.examples("test")
    perfect = task.score([list(e.references[0]) for e in examples], examples)
    empty = task.score([[] for _ in examples], examples)
    assert perfect["bleu"] == pytest.approx(100) and perfect["chrf"] == pytest.approx(100)
    assert empty["bleu"] == 0 and empty["examples"] == len(examples)


def test_a_malformed_line_names_its_file_and_line(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("# comment\nhello\tbonjour\nno tab here\n", "utf-8")
    with pytest.raises(ValueError, match=r"bad.tsv:3: expected 'source<TAB>target'"):
        read_pairs(bad)


def test_the_subword_tokenizer_is_a_file_of_the_exported_entry(tiny_subword_entry):
    from attnserve.core.manifest import Manifest, ManifestError
    from attnserve.core.subwords import MODEL_FILE

    manifest = Manifest.load(tiny_subword_entry)
    assert manifest.tokenizer == "sentencepiece" and MODEL_FILE in manifest.files
    assert Subwords((tiny_subword_entry / MODEL_FILE).read_bytes()).pieces == manifest.source_vocab.tokens
    tokenizer = tiny_subword_entry / MODEL_FILE
    original = tokenizer.read_bytes()
    try:
        tokenizer.write_bytes(original + b"\0")
        with pytest.raises(ManifestError, match=r"subwords\.model: sha256"):
            Manifest.load(tiny_subword_entry)
    finally:
        tokenizer.write_bytes(original)


@pytest.fixture(scope="module")
def subword_translator(tiny_subword_entry):
    from attnserve.core.manifest import Manifest
    from attnserve.core.model_runner import ModelRunner

    return ModelRunner(Manifest.load(tiny_subword_entry))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_served_subword_model_reads_any_text_or_refuses_it_clearly(subword_translator, text):
    from attnserve.core.errors import ErrorCode, RequestError
    from attnserve.core.requests import AttentionMode

    try:
        request = subword_translator.codec.prepare(text, AttentionMode.CROSS)
    except RequestError as e:
        assert e.code is ErrorCode.INVALID_ARGUMENT and ("empty" in e.message or "at most" in e.message)
        return
    assert all(t in subword_translator.manifest.source_vocab for t in request.source_tokens)


def test_served_subword_model_detokenizes_and_labels_attention_with_pieces(subword_translator):
    from attnserve.core.requests import AttentionMode

    texts = ["New Caledonia", "Portuguese (Brazil)", "Ünïcode 🙂"]
    prepared = [subword_translator.codec.prepare(t, AttentionMode.CROSS, max_output_tokens=12) for t in texts]
    results = answers(subword_translator, prepared)
    for text, request, result in zip(texts, prepared, results, strict=True):
        assert result.source_tokens == subword_translator.codec.subwords.encode(text)
        assert result.text == subword_translator.codec.subwords.decode(result.output_tokens)
        assert result.attention.shape == (len(result.output_tokens), len(request.source_tokens))


def test_a_subword_stream_joins_into_the_text_and_aligns_words(subword_translator):
    from attnserve.core.alignment import AlignmentMode, word_indexes
    from attnserve.core.engine import Engine, EngineConfig
    from attnserve.core.requests import AttentionMode

    codec = subword_translator.codec
    with Engine(subword_translator, EngineConfig(max_batch_size=4)) as engine:
        for text in ["New Caledonia", "Ünïcode 🙂", "Portuguese (Brazil)"]:
            request = codec.prepare(text, AttentionMode.NONE, 12, alignment=AlignmentMode.HARD)
            streamed = []
            result = engine.submit(request, on_token=streamed.append).result(60)
            assert "".join(t.text for t in streamed) == result.text  # text as it arrives, not pieces
            pairs = [tuple(map(int, p.split("-"))) for p in result.alignment.split()]
            assert [t for _, t in pairs] == list(range(len(result.output_tokens)))
            words = [tuple(map(int, p.split("-"))) for p in result.word_alignment.split()]
            src, out = word_indexes(result.source_tokens), word_indexes(result.output_tokens)
            assert {(src[s], out[t]) for s, t in pairs} == set(words)
