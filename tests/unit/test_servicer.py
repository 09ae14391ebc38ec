"""The rpcs over engines, without Ray or a socket: every outcome is a response or a plain status."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnserve.core.engine import Engine, EngineConfig
from attnserve.core.errors import ErrorCode
from attnserve.core.model_runner import ModelRunner
from attnserve.service.grpc_services import Undecodable, _tolerant
from attnserve.service.model_set import ModelSet
from attnserve.service.servicer import Servicer
from attnserve.v1 import translator_pb2 as pb

MODEL = "g2p-bahdanau"


@pytest.fixture(scope="module")
def servicer(bundled_manifest):
    engine = Engine(ModelRunner(bundled_manifest), EngineConfig(max_batch_size=8))
    recorded = []
    yield Servicer(ModelSet.of({MODEL: engine}), lambda *call: recorded.append(call)), recorded
    engine.close()


def _translate(servicer, text: str, model: str = MODEL, time_remaining=None):
    request = pb.TranslateRequest(model=model, text=text)
    return asyncio.run(servicer.translate(request, time_remaining))


def test_a_good_call_is_answered_and_recorded(servicer):
    s, recorded = servicer
    outcome = _translate(s, "servicer")
    assert outcome.code is None and outcome.response.text and outcome.response.model == MODEL
    assert recorded[-1][:4] == ("Translate", MODEL, "1", "OK")


@pytest.mark.parametrize(
    ("text", "model", "code", "words"),
    [
        ("", MODEL, ErrorCode.INVALID_ARGUMENT, "text is empty"),
        ("cat", "nope", ErrorCode.NOT_FOUND, "served models: g2p-bahdanau"),
    ],
)
def test_bad_calls_get_a_status_and_a_plain_message(servicer, text, model, code, words):
    s, recorded = servicer
    outcome = _translate(s, text, model)
    assert outcome.code is code and words in outcome.message and outcome.response is None
    assert recorded[-1][1] == ("_unknown" if model == "nope" else MODEL)  # no client text in labels


def test_a_deadline_already_gone_is_refused(servicer):
    s, _ = servicer
    assert _translate(s, "late", time_remaining=0.0).code is ErrorCode.DEADLINE_EXCEEDED


def test_a_draining_servicer_refuses_new_calls_as_unavailable(bundled_manifest):
    engine = Engine(ModelRunner(bundled_manifest))
    s = Servicer(ModelSet.of({MODEL: engine}))
    s.serving = False
    outcome = _translate(s, "drain")
    engine.close()
    assert outcome.code is ErrorCode.UNAVAILABLE and "shutting down" in outcome.message


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=64))
def test_any_request_bytes_parse_or_become_invalid_argument(servicer, data):
    s, _ = servicer
    parse = _tolerant(pb.TranslateRequest.FromString, "attnserve.v1.Translator/Translate request")
    request = parse(data)
    if isinstance(request, Undecodable):
        outcome = asyncio.run(s.translate(request, None))
        assert outcome.code is ErrorCode.INVALID_ARGUMENT and f"({len(data)} bytes)" in outcome.message
    else:
        assert isinstance(request, pb.TranslateRequest)


async def _stream(servicer, request, take: int | None = None):
    outcomes = []
    stream = servicer.translate_stream(request, None)
    async for outcome in stream:
        outcomes.append(outcome)
        if take is not None and len(outcomes) == take:
            await stream.aclose()  # the client went away
            break
    return outcomes


def test_a_stream_sends_each_token_with_its_attention_then_the_response(servicer):
    s, recorded = servicer
    options = pb.TranslateOptions(attention=pb.ATTENTION_MODE_CROSS)
    outcomes = asyncio.run(_stream(s, pb.TranslateRequest(model=MODEL, text="streaming", options=options)))
    assert all(o.code is None for o in outcomes)
    *tokens, last = [o.response for o in outcomes]
    final = last.response
    assert [t.token for t in tokens] == list(final.output_tokens) and final.text
    cols = final.attention.cols
    assert [list(t.attention) for t in tokens] == [
        list(final.attention.weights[r * cols : (r + 1) * cols]) for r in range(final.attention.rows)
    ]
    assert recorded[-1][:4] == ("TranslateStream", MODEL, "1", "OK")


def test_a_bad_stream_is_one_status(servicer):
    s, _ = servicer
    (outcome,) = asyncio.run(_stream(s, pb.TranslateRequest(model=MODEL, text="")))
    assert outcome.code is ErrorCode.INVALID_ARGUMENT and "text is empty" in outcome.message


def test_a_stream_whose_client_goes_away_is_recorded_cancelled_and_leaves_the_engine(servicer):
    s, recorded = servicer
    engine = s.models.route(MODEL)
    outcomes = asyncio.run(_stream(s, pb.TranslateRequest(model=MODEL, text="abracadabra"), take=1))
    assert len(outcomes) == 1 and outcomes[0].response.token
    assert recorded[-1][3] == "CANCELLED"
    for _ in range(200):
        if not engine.busy:
            break
        asyncio.run(asyncio.sleep(0.01))
    assert not engine.busy
