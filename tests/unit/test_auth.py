"""Bearer tokens: the file format, the metadata parsing (fuzzed), reloads, and the servicer's gate."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnserve.core.errors import ErrorCode
from attnserve.service import auth
from attnserve.service.auth import (
    MALFORMED,
    MISSING,
    UNKNOWN,
    TokenFileError,
    TokenStore,
    bearer_token,
    parse_tokens,
)
from attnserve.service.model_set import ModelSet
from attnserve.service.servicer import Servicer
from attnserve.v1 import translator_pb2 as pb

ALICE, BOB = "a1b2c3d4e5f6-alice", "0f9e8d7c6b5a-bob"


def _bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


@pytest.fixture
def store(tmp_path, monkeypatch) -> TokenStore:
    monkeypatch.setattr(auth, "RELOAD_CHECK_S", 0.0)
    path = tmp_path / "tokens"
    path.write_text(f"# callers\nalice:{ALICE}\n\n{BOB}\n")
    return TokenStore(path)


def test_names_and_bare_tokens_are_read_comments_and_blank_lines_skipped(store):
    assert store.check(_bearer(ALICE)).caller == "alice"
    assert store.check(_bearer(BOB)).caller == "line-4"


@pytest.mark.parametrize(
    ("text", "words"),
    [("", "no tokens"), ("# only a comment\n", "no tokens"), ("alice:\n", "line 1"), (":tok\n", "line 1"),
     ("a:tok\nb:tok\n", "already listed"), ("a:two words\n", "line 1")],
)  # fmt: skip
def test_a_bad_token_file_is_refused_with_its_line(text, words):
    with pytest.raises(TokenFileError, match=words):
        parse_tokens(text)


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ([], MISSING),
        ([("x-other", "Bearer " + ALICE)], MISSING),
        ([("authorization", "")], MALFORMED),
        ([("authorization", "Bearer ")], MALFORMED),
        ([("authorization", "Basic " + ALICE)], MALFORMED),
        ([("authorization", ALICE)], MALFORMED),
        ([("authorization", "Bearer " + "x" * 100_000)], MALFORMED),
        ([("authorization", b"Bearer " + ALICE.encode())], MALFORMED),
        (_bearer(ALICE) + _bearer(BOB), MALFORMED),
        (_bearer(ALICE[:-1]), UNKNOWN),
        (_bearer(ALICE + "x"), UNKNOWN),
        (_bearer(ALICE.upper()), UNKNOWN),
    ],
)
def test_every_bad_credential_is_refused_with_its_reason(store, metadata, reason):
    verdict = store.check(metadata)
    assert verdict.caller is None and verdict.reason == reason
    assert verdict.message and ALICE not in verdict.message


def test_the_scheme_is_case_insensitive(store):
    assert store.check([("authorization", f"bearer {ALICE}")]).caller == "alice"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["authorization", "Authorization", "x"]), st.text(max_size=80))))
def test_no_metadata_authenticates_unless_it_carries_a_known_token(tmp_path_factory, metadata):
    path = tmp_path_factory.mktemp("fuzz") / "tokens"
    path.write_text(f"alice:{ALICE}\n")
    verdict = TokenStore(path).check(metadata)
    token, _ = bearer_token(metadata)
    assert (verdict.caller == "alice") == (token == ALICE)


def test_a_rewritten_file_applies_without_a_restart(store):
    assert store.check(_bearer(ALICE)).caller == "alice"
    store.path.write_text(f"bob:{BOB}\ncarol:new-carol-token\n")
    os.utime(store.path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    assert store.check(_bearer(ALICE)).reason == UNKNOWN
    assert store.check(_bearer("new-carol-token")).caller == "carol"


def test_a_broken_new_file_keeps_the_last_good_tokens(store, caplog):
    store.path.write_text("alice:\n")
    assert store.check(_bearer(ALICE)).caller == "alice"
    assert "keeping the previous tokens" in caplog.text and ALICE not in caplog.text


def test_the_servicer_refuses_before_any_work_and_reports_only_the_reason(store, bundled_manifest):
    refused = []
    servicer = Servicer(ModelSet(), tokens=store, refused=lambda rpc, reason: refused.append((rpc, reason)))
    request = pb.TranslateRequest(model="g2p-bahdanau", text="token")
    outcome = asyncio.run(servicer.translate(request, None, _bearer(ALICE[:5])))
    assert outcome.code is ErrorCode.UNAUTHENTICATED and refused == [("Translate", UNKNOWN)]
    outcome = asyncio.run(servicer.list_models(pb.ListModelsRequest(), []))
    assert outcome.code is ErrorCode.UNAUTHENTICATED and refused[-1] == ("ListModels", MISSING)
    outcome = asyncio.run(servicer.list_models(pb.ListModelsRequest(), _bearer(ALICE)))
    assert outcome.code is None
