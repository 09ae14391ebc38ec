"""The real service over a real gRPC socket: translate, attention, shared batches, errors, metrics.

The last test stops the service with SIGTERM and checks that nothing is left running.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from attnserve.service.client import Client, attention_array
from attnserve.v1 import translator_pb2 as pb
from attnserve.v1 import translator_pb2_grpc as pb_grpc
from tests.helpers import answers
from tests.integration.conftest import served_translator

pytestmark = pytest.mark.integration
MODEL = "g2p-bahdanau"
LEAK_MARKERS = ("Traceback", "ray.", "Ray", "pid=", 'File "', "\x1b[", "Exception")


@pytest.fixture(scope="module")
def client(service):
    with Client(service.grpc_address, timeout_s=60) as c:
        yield c


def _request(text: str, model: str = MODEL, attention: bool = False) -> pb.TranslateRequest:
    mode = pb.ATTENTION_MODE_CROSS if attention else pb.ATTENTION_MODE_NONE
    return pb.TranslateRequest(model=model, text=text, options=pb.TranslateOptions(attention=mode))


def test_translate_without_attention(client, bundled_manifest):
    response = client.translate(MODEL, "Attention")
    assert response.text and response.text == " ".join(response.output_tokens)
    assert set(response.output_tokens) <= set(bundled_manifest.target_vocab.tokens[3:])
    assert list(response.source_tokens) == list("attention")
    assert (response.model, response.model_version) == (MODEL, bundled_manifest.version)
    assert not response.HasField("attention")


def test_translate_with_attention(client):
    response = client.translate(MODEL, "serving", attention=True)
    matrix = response.attention
    assert (matrix.rows, matrix.cols) == (len(response.output_tokens), len("serving"))
    assert list(matrix.row_labels) == list(response.output_tokens)
    assert list(matrix.col_labels) == list("serving")
    weights = attention_array(matrix)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-4)
    assert (weights >= 0).all()


def test_same_answer_as_the_runtime_in_process(client, bundled_manifest):
    from attnserve.core.requests import AttentionMode

    words = ["pronunciation", "zyzzyva", "o'connor", "tensor"]
    local = served_translator(bundled_manifest)
    expected = answers(local, [local.codec.prepare(w, AttentionMode.NONE) for w in words])
    for word, want in zip(words, expected, strict=True):
        assert tuple(client.translate(MODEL, word).output_tokens) == want.output_tokens


def test_beam_search_over_grpc_matches_the_runtime(client, bundled_manifest):
    from attnserve.core.requests import AttentionMode

    local = served_translator(bundled_manifest)
    for word in ("colonel", "pneumonia"):
        want = answers(local, [local.codec.prepare(word, AttentionMode.CROSS, beam_size=5)])[0]
        got = client.translate(MODEL, word, attention=True, beam_size=5)
        assert tuple(got.output_tokens) == want.output_tokens
        assert got.attention.rows == len(want.output_tokens)
    with pytest.raises(grpc.RpcError) as info:
        client.translate(MODEL, "cat", beam_size=64)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "beam_size must be between 1 and 16" in info.value.details()


def test_concurrent_requests_share_batches(client):
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"] * 3
    futures = [client.stub.Translate.future(_request(w), timeout=60) for w in words]
    sizes = [f.result().batch_size for f in futures]
    assert max(sizes) > 1, sizes


def test_a_bad_request_does_not_fail_the_good_ones_in_its_batch(client):
    texts = ["good", "bad text!", "words", "", "attention", "x" * 100]
    futures = [client.stub.Translate.future(_request(t), timeout=60) for t in texts]
    futures.append(client.stub.Translate.future(_request("fine", model="no-such-model"), timeout=60))
    outcomes = []
    for f in futures:
        try:
            outcomes.append(("OK", f.result().text))
        except grpc.RpcError as e:
            outcomes.append((e.code().name, e.details()))
    codes = [c for c, _ in outcomes]
    assert codes == [
        "OK",
        "INVALID_ARGUMENT",
        "OK",
        "INVALID_ARGUMENT",
        "OK",
        "INVALID_ARGUMENT",
        "NOT_FOUND",
    ]
    assert "cannot read ' ', '!'" in outcomes[1][1]
    assert "text is empty" in outcomes[3][1]
    assert "at most 32" in outcomes[5][1]
    assert "served models: " in outcomes[6][1] and "g2p-bahdanau" in outcomes[6][1]
    for code, details in outcomes:
        if code != "OK":
            assert not any(marker in details for marker in LEAK_MARKERS), details


def test_translate_stream_sends_tokens_then_the_response(client):
    chunks = list(client.translate_stream(MODEL, "streaming", attention=True))
    *tokens, last = chunks
    response = last.response
    assert [c.token for c in tokens] == list(response.output_tokens) and response.text
    weights = attention_array(response.attention)
    for row, chunk in zip(weights, tokens, strict=True):
        np.testing.assert_allclose(chunk.attention, row, atol=1e-6)
    assert response.output_tokens == client.translate(MODEL, "streaming").output_tokens


def test_a_cancelled_stream_ends_and_the_service_answers_on(client):
    stream = client.translate_stream(MODEL, "supercalifragilistic")
    first = next(stream)
    assert first.token
    stream.cancel()
    with pytest.raises(grpc.RpcError) as info:
        list(stream)
    assert info.value.code() is grpc.StatusCode.CANCELLED
    assert client.translate(MODEL, "after").text


def test_a_bad_stream_gets_a_status_and_a_plain_message(client):
    with pytest.raises(grpc.RpcError) as info:
        list(client.translate_stream(MODEL, "no way!"))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "cannot read" in info.value.details()
    assert not any(marker in info.value.details() for marker in LEAK_MARKERS)


def test_unknown_attention_mode_is_invalid_argument(client):
    request = pb.TranslateRequest(model=MODEL, text="cat", options=pb.TranslateOptions(attention=42))
    with pytest.raises(grpc.RpcError) as info:
        client.stub.Translate(request, timeout=30)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown attention mode 42" in info.value.details()


def test_scores_n_best_and_alignment_over_the_socket(client, bundled_manifest):
    from attnserve.core.requests import AttentionMode

    plain = client.translate(MODEL, "alignment", beam_size=4)
    assert not plain.HasField("score") and not plain.token_logprobs and not plain.hypotheses
    assert plain.alignment == ""  # nothing asked, nothing sent
    asked = dict(scores=True, num_hypotheses=3, alignment=pb.ALIGNMENT_MODE_HARD)
    response = client.translate(MODEL, "alignment", attention=True, beam_size=4, **asked)
    assert response.text == plain.text  # asking for more does not change the answer
    assert len(response.token_logprobs) == len(response.output_tokens)
    assert all(p <= 0 for p in response.token_logprobs)
    assert response.score <= sum(response.token_logprobs) + 1e-5  # and </s>'s log-prob
    best = response.hypotheses[0]
    assert (best.text, best.score) == (response.text, response.score)
    scores = [h.score for h in response.hypotheses]
    assert scores == sorted(scores, reverse=True)
    assert len({h.text for h in response.hypotheses}) == len(response.hypotheses) >= 2
    weights = attention_array(response.attention)
    pairs = [tuple(map(int, p.split("-"))) for p in response.alignment.split()]
    assert pairs == [(int(s), t) for t, s in enumerate(weights.argmax(axis=1))]  # HARD: its argmax
    local = served_translator(bundled_manifest)  # the same scores as the engine in process
    request = local.codec.prepare("alignment", AttentionMode.NONE, beam_size=4, scores=True)
    want = answers(local, [request])[0].scores
    assert response.score == pytest.approx(want.score, abs=1e-5)
    np.testing.assert_allclose(response.token_logprobs, want.token_logprobs, atol=1e-5)


def test_streamed_chunks_carry_text_and_log_probs(client):
    chunks = list(client.translate_stream(MODEL, "streaming", scores=True))
    tokens, last = chunks[:-1], chunks[-1].response
    assert "".join(c.text for c in tokens) == last.text
    assert [c.token_logprob for c in tokens] == pytest.approx(list(last.token_logprobs), abs=1e-6)
    assert not any(c.HasField("token_logprob") for c in client.translate_stream(MODEL, "streaming"))


@pytest.mark.parametrize(
    "options, message",
    [
        (pb.TranslateOptions(num_hypotheses=3, beam_size=2), "num_hypotheses 3 is more than beam_size 2"),
        (pb.TranslateOptions(alignment=7), "unknown alignment mode 7"),
        (
            pb.TranslateOptions(alignment=pb.ALIGNMENT_MODE_SOFT, alignment_threshold=1.5),
            "alignment_threshold",
        ),
    ],
)
def test_bad_answer_options_are_invalid_argument(client, options, message):
    with pytest.raises(grpc.RpcError) as info:
        client.stub.Translate(pb.TranslateRequest(model=MODEL, text="cat", options=options), timeout=30)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


def test_list_models_reports_figures_and_providers(client, bundled_manifest):
    (info,) = [m for m in client.list_models().models if m.name == MODEL]
    assert info.name == MODEL and info.architecture == "bahdanau-gru" and info.task == "g2p"
    assert list(info.execution_providers) == ["CPUExecutionProvider"]
    assert info.precision == served_translator(bundled_manifest).model.precision
    assert list(info.attention_modes) == [pb.ATTENTION_MODE_CROSS]
    assert info.metrics["wer"] == pytest.approx(bundled_manifest.metrics["test"]["wer"])


def test_cli_translate_prints_phonemes_and_attention(service):
    cli = [str(Path(sys.executable).with_name("attnserve")), "translate", "--target", service.grpc_address]
    out = subprocess.run(
        [*cli, "--model", MODEL, "attention", "--attention"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    lines = out.splitlines()
    assert lines[0] and all(tok.isupper() for tok in lines[0].split())
    header = next(i for i, line in enumerate(lines) if line.split() == list("attention"))
    assert len(lines) - header - 1 == len(lines[0].split())  # one row per phoneme
    bad = subprocess.run([*cli, "--model", MODEL, "no way"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr
    streamed = subprocess.run(
        [*cli, "--model", MODEL, "attention", "--stream"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.splitlines()
    assert streamed[0].split() == lines[0].split() and streamed[-1] == lines[0]


def _scrape(url: str) -> dict[str, list]:
    """Samples by metric family (histograms under their base name, counters without _total)."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_metrics_endpoint_exposes_request_batch_and_token_metrics(client, service):
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda w: client.translate(MODEL, w), ["metrics", "scrape", "prometheus"] * 4))
    with pytest.raises(grpc.RpcError):  # refused at admission: counted as a rejection for "deadline"
        client.stub.Translate(_request("late"), timeout=30, metadata=(("attnserve-timeout-ms", "0"),))
    wanted = {
        "ray_attnserve_request_latency_seconds": {"model", "version", "rpc", "code"},
        "ray_attnserve_request_errors_total": {"model", "version", "rpc", "code"},
        "ray_attnserve_queue_wait_seconds": {"model", "version"},
        "ray_attnserve_queue_depth": {"model", "version"},
        "ray_attnserve_rejections_total": {"model", "version", "reason"},
        "ray_attnserve_batch_size": {"model", "version"},
        "ray_attnserve_output_tokens_total": {"model", "version"},
        "ray_attnserve_execution_provider_info": {"model", "version", "provider"},
        "ray_serve_num_grpc_requests_total": set(),
    }
    deadline, families = time.monotonic() + 90, {}
    while time.monotonic() < deadline:  # Ray pushes a replica's metrics every few seconds
        families = _scrape(service.metrics_url)
        # Earlier tests (a burst) may have made every family already: wait for this test's codes.
        codes = {s.labels.get("code") for s in families.get("ray_attnserve_request_latency_seconds", [])}
        if (
            all(name.removesuffix("_total") in families for name in wanted)
            and {"OK", "INVALID_ARGUMENT", "NOT_FOUND"} <= codes
            and _multi_request_batches(families)
        ):
            break
        time.sleep(2)
    for name, labels in wanted.items():
        samples = families.get(name.removesuffix("_total"))
        assert samples, f"{name} missing from {service.metrics_url}"
        assert labels <= set(samples[0].labels), (name, samples[0].labels)
    latency = families["ray_attnserve_request_latency_seconds"]
    codes = {s.labels["code"] for s in latency}
    assert {"OK", "INVALID_ARGUMENT", "NOT_FOUND"} <= codes, codes
    assert {MODEL, "_unknown"} <= {s.labels["model"] for s in latency if s.labels["rpc"] == "Translate"}
    providers = families["ray_attnserve_execution_provider_info"]
    assert {(s.labels["provider"], s.value) for s in providers} == {("CPUExecutionProvider", 1.0)}
    assert _multi_request_batches(families) > 0, "some batches held more than one request"


def _multi_request_batches(families: dict[str, list]) -> float:
    """Batches of more than one request: the +Inf bucket minus the le=1 bucket, over all series."""
    buckets = [s for s in families.get("ray_attnserve_batch_size", []) if s.name.endswith("_bucket")]
    return sum(s.value for s in buckets if s.labels["le"] == "+Inf") - sum(
        s.value for s in buckets if s.labels["le"] == "1.0"
    )


def test_sigterm_to_the_group_drains_accepted_calls_then_exits_and_leaves_no_process(service):
    """SIGTERM to the service's process group under load: health turns NOT_SERVING, calls in
    flight finish, new ones are refused with UNAVAILABLE, exit 0, nothing left running."""
    children = service.descendants()
    haproxy = [c for c in children if _alive(c) and "haproxy" in c.name()]
    assert children and haproxy, "Ray and HAProxy run in child processes of the service"
    stop = threading.Event()
    outcomes: list[tuple[float, str, str]] = []  # (started, code, details)
    health_seen: list[int] = []

    def caller() -> None:
        with grpc.insecure_channel(service.grpc_address) as ch:
            stub = pb_grpc.TranslatorStub(ch)
            while not stop.is_set():
                started = time.monotonic()
                try:
                    stub.Translate(_request("draining", model="en-fr-transformer"), timeout=30)
                    outcomes.append((started, "OK", ""))
                except grpc.RpcError as e:
                    outcomes.append((started, e.code().name, e.details() or ""))
                    time.sleep(0.05)

    def watcher() -> None:
        with grpc.insecure_channel(service.grpc_address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            while not stop.is_set():
                with contextlib.suppress(grpc.RpcError):
                    health_seen.append(health.Check(health_pb2.HealthCheckRequest(), timeout=2).status)
                time.sleep(0.05)

    threads = [threading.Thread(target=caller) for _ in range(16)] + [threading.Thread(target=watcher)]
    for t in threads:
        t.start()
    time.sleep(3)
    signalled = time.monotonic()
    os.killpg(service.process.pid, signal.SIGTERM)
    code = service.process.wait(60)
    took = time.monotonic() - signalled
    stop.set()
    for t in threads:
        t.join()
    assert code == 0, "".join(list(service.lines)[-30:])
    assert took < 15, f"exit took {took:.1f} s"
    counts = collections.Counter(c for _, c, _ in outcomes)
    print(f"SIGTERM to the group: exit {code} after {took:.1f} s; {counts}")
    before = [(c, d) for started, c, d in outcomes if started < signalled]
    assert ("OK", "") in before
    # A call already sent when the signal came is answered, or refused by the service itself:
    # none is cut off. Calls sent later may also find the port closing (UNAVAILABLE).
    lost = [(c, d) for c, d in before if c != "OK" and not (c == "UNAVAILABLE" and "shutting down" in d)]
    assert not lost, f"calls in flight at SIGTERM lost: {lost[:5]}"
    assert {c for _, c, _ in outcomes} <= {"OK", "UNAVAILABLE"}, counts
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert serving in health_seen and not_serving in health_seen[health_seen.index(serving) :]
    deadline = time.monotonic() + 30
    while any(_alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(1)
    left = [f"{c.pid} {c.name()}" for c in children if _alive(c)]
    assert not left, f"processes left behind: {left}"


def _alive(process) -> bool:
    try:
        return process.is_running() and process.status() != "zombie"
    except Exception:
        return False
