"""Every Grafana panel's query returns series from a real Prometheus scraping the real service.

Prometheus (Debian's package) runs with the shipped config and alert rules, its scrape target
pointed at the test's attnserve; traffic with good and bad requests flows while the queries are
polled through Prometheus's HTTP API. The traffic includes calls whose deadline (the SDK's
`attnserve-timeout-ms` metadata) is already over, refused at admission (a rejection, reason
"deadline"), and calls given 1 ms, which the engine admits and then drops from its queue (a drop):
so the admission panels show real series, not only their "none" zero lines.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml

from attnserve.service.client import TIMEOUT_METADATA, Client
from attnserve.v1 import translator_pb2 as pb
from tests.conftest import ROOT
from tests.integration.conftest import free_port

pytestmark = pytest.mark.integration
DASHBOARDS = sorted((ROOT / "deploy/grafana/dashboards").glob("*.json"))
QUERY_TIMEOUT_S = 150


def panel_queries(path: Path) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel, with Grafana's variables filled in."""
    queries = []
    for panel in json.loads(path.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", "1m").replace("$model", ".*")
            queries.append((panel["title"], expr))
    return queries


def metric_queries(queries: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """A `count(metric)` for every metric the panels read: each must really be exported, also where
    a panel falls back to a 0 line without it."""
    names = sorted({name for _, expr in queries for name in re.findall(r"\bray_\w+", expr)})
    return [(f"metric {name}", f"count({name})") for name in names]


def _api(base: str, path: str, **params) -> dict:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}"
    return json.load(urllib.request.urlopen(url, timeout=10))


@pytest.fixture
def prometheus(service, tmp_path):
    """Prometheus with the shipped config and rules, scraping the test service every second."""
    binary = shutil.which("prometheus")
    assert binary, "Debian's prometheus package is required (the project's CI setup installs it)"
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    config["global"] |= {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(ROOT / "deploy/prometheus" / f) for f in config["rule_files"]]
    metrics = urllib.parse.urlparse(service.metrics_url)
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "attnserve"]
    job["static_configs"][0]["targets"] = [metrics.netloc]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{base}/-/ready", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"prometheus did not start: {proc.stderr.read() if proc.poll() is not None else ''}"
                )
            time.sleep(0.5)
    yield base
    proc.terminate()
    proc.wait(30)


def _traffic(address: str, stop: threading.Event) -> None:
    """Good requests (a third asking for scores), bad ones, an unknown model and hopeless deadlines,
    until told to stop."""
    with Client(address, timeout_s=30) as client:
        i = 0
        while not stop.is_set():
            for model, text in (("g2p-bahdanau", f"word{'s' * (i % 5)}"), ("g2p-bahdanau", "bad!"),
                                ("no-such-model", "x"), ("g2p-bahdanau", "prometheus")):  # fmt: skip
                with contextlib.suppress(grpc.RpcError):
                    client.translate(model, text, attention=i % 2 == 0, scores=i % 3 == 0)
            client.list_models()
            # 0 ms left: refused at admission; 1 ms: admitted, then dropped before decoding (once
            # the engine has measured that a batch takes longer).
            for budget_ms in ("0", "1"):
                request = pb.TranslateRequest(model="g2p-bahdanau", text="deadline")
                with contextlib.suppress(grpc.RpcError):
                    client.stub.Translate(request, timeout=30, metadata=((TIMEOUT_METADATA, budget_ms),))
            i += 1
            time.sleep(0.05)


@pytest.mark.parametrize("dashboard", DASHBOARDS, ids=lambda p: p.stem)
def test_every_panel_query_returns_series(service, prometheus, dashboard):
    queries = panel_queries(dashboard)
    assert len(queries) >= 10
    queries += metric_queries(queries)
    stop = threading.Event()
    sender = threading.Thread(target=_traffic, args=(service.grpc_address, stop), daemon=True)
    sender.start()
    try:
        pending = dict(enumerate(queries))
        deadline = time.monotonic() + QUERY_TIMEOUT_S
        while pending and time.monotonic() < deadline:
            for i, (_, expr) in list(pending.items()):
                answer = _api(prometheus, "/api/v1/query", query=expr)
                assert answer["status"] == "success", (expr, answer)
                if answer["data"]["result"]:
                    del pending[i]
            time.sleep(2)
    finally:
        stop.set()
        sender.join(30)
    assert not pending, "panels whose query returned no series:\n" + "\n".join(
        f"- {title}: {expr}" for title, expr in pending.values()
    )


def test_alert_rules_load_into_prometheus(prometheus):
    groups = _api(prometheus, "/api/v1/rules")["data"]["groups"]
    alerts = {rule["name"] for group in groups for rule in group["rules"] if rule["type"] == "alerting"}
    source = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    expected = {rule["alert"] for group in source["groups"] for rule in group["rules"] if "alert" in rule}
    assert expected and alerts == expected
