"""The deployment files (deploy/, docker-compose.yml) are valid for the tools that consume them.

Needs Debian's `prometheus` (promtool) and `docker-compose` packages, and the kubernetes-validate
and jsonschema packages; a missing tool fails the test that needs it, with the install command.
`kubectl` (for `kubectl kustomize`) is optional: without it only that one check is skipped.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml
from docker.utils.build import PatternMatcher

from attnserve.service.local_ray import SERVE_ENVIRONMENT
from attnserve.service.ray_deploy import DRAIN_GRACE_S

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "attnserve-serving.json"
K8S = DEPLOY / "kubernetes"
SCHEMAS = K8S / "schemas"
DOCKER = DEPLOY / "docker"
DOCKERFILES = {"Dockerfile": "cpu", "Dockerfile.gpu": "gpu"}
SERVE_CONFIG = DEPLOY / "serve" / "attnserve.yaml"
PLACEHOLDER = "    serveConfigV2: |\n      __SERVE_CONFIG__\n"
KUBERNETES_VERSION = "1.30.0"
GRPC_PORT = 50051
STOP_BUDGET_S = 10  # `attnserve serve` exits within this after SIGTERM (Docker's default stop timeout)
HEALTH_COMMAND = ["attnserve", "health", "--target", f"127.0.0.1:{GRPC_PORT}"]


def _tool(name: str, install: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not installed; install it with: {install}")
    return path


def _run(cmd: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=180, check=False)


def _promtool() -> str:
    return _tool("promtool", "apt-get install -y --no-install-recommends prometheus")


def _assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"{' '.join(result.args)} failed:\n{result.stdout}\n{result.stderr}"


# ---------------------------------------------------------------------------- docker-compose


@cache
def _compose_config() -> dict:
    exe = _tool("docker-compose", "apt-get install -y --no-install-recommends docker-compose")
    result = _run([exe, "-f", "docker-compose.yml", "config"])
    _assert_ok(result)
    return yaml.safe_load(result.stdout)


def test_compose_config_is_valid():
    services = _compose_config()["services"]
    assert set(services) == {"attnserve", "prometheus", "grafana"}
    assert services["attnserve"]["build"]["dockerfile"] == "deploy/docker/Dockerfile"
    assert services["attnserve"]["shm_size"] in ("2gb", "2g", 2 * 1024**3)
    assert services["attnserve"]["healthcheck"]["test"][:5] == ["CMD", *HEALTH_COMMAND]


def _seconds(duration: str) -> float:
    """A compose duration such as "15s" or "1m30s" in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def test_compose_stops_and_checks_the_service_as_it_drains():
    """SIGTERM drains (health NOT_SERVING, accepted calls finish), so the stop grace must cover the
    drain and the stop budget; the health check must be the gRPC one and time out within its period."""
    service = _compose_config()["services"]["attnserve"]
    assert service.get("stop_signal", "SIGTERM") == "SIGTERM"
    grace = _seconds(service["stop_grace_period"])
    assert STOP_BUDGET_S <= grace <= 2 * STOP_BUDGET_S and grace > DRAIN_GRACE_S
    check = service["healthcheck"]
    command_timeout = float(check["test"][check["test"].index("--timeout") + 1])
    assert command_timeout < _seconds(check["timeout"]) <= _seconds(check["interval"])


def test_compose_tls_profile_secures_the_same_service():
    exe = _tool("docker-compose", "apt-get install -y --no-install-recommends docker-compose")
    result = _run([exe, "-f", "docker-compose.yml", "-f", "deploy/docker/docker-compose.tls.yml", "config"])
    _assert_ok(result)
    config = yaml.safe_load(result.stdout)
    assert set(config["services"]) == set(_compose_config()["services"])
    service = config["services"]["attnserve"]
    (mount,) = service["volumes"]  # docker-compose 1.29 writes SOURCE:TARGET:ro
    source, target, mode = mount.split(":")
    assert source == str(ROOT / "certs") and mode == "ro"
    for variable in (
        "ATTNSERVE_TLS_CERT",
        "ATTNSERVE_TLS_KEY",
        "ATTNSERVE_TLS_CLIENT_CA",
        "ATTNSERVE_AUTH_TOKENS",
    ):
        assert service["environment"][variable].startswith(target + "/"), variable
    check = service["healthcheck"]["test"]
    assert check[1:5] == HEALTH_COMMAND and {"--tls-ca", "--tls-cert", "--tls-key"} <= set(check)
    assert sorted(service["ports"]) == sorted(_compose_config()["services"]["attnserve"]["ports"])


def test_compose_bind_mounts_and_build_files_exist():
    config = _compose_config()
    named = set(config.get("volumes") or {})
    checked = 0
    for name, service in config["services"].items():
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if source in named:
                continue
            assert Path(source).exists(), f"service {name} mounts {source}, which does not exist"
            checked += 1
        if "build" in service:
            context = Path(service["build"]["context"])
            assert (context / service["build"]["dockerfile"]).is_file()
    assert checked >= 3  # prometheus config folder, grafana provisioning, grafana dashboards


def test_compose_ports_are_bound_to_loopback():
    for name, service in _compose_config()["services"].items():
        for port in service.get("ports", []):
            host_ip = port.get("host_ip") if isinstance(port, dict) else port.split(":")[0]
            assert host_ip == "127.0.0.1", f"service {name} publishes {port} beyond 127.0.0.1"


def test_stack_wiring_is_consistent():
    """Prometheus scrapes the compose service's metrics port, Grafana reads the compose Prometheus."""
    services = _compose_config()["services"]
    prometheus = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    (job,) = [j for j in prometheus["scrape_configs"] if j["job_name"] == "attnserve"]
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host in services
    assert any(
        str(p).endswith(f":{port}/tcp") or str(p).endswith(f":{port}") for p in services[host]["ports"]
    )
    datasource = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    url = datasource["datasources"][0]["url"]
    assert re.fullmatch(r"http://(\w+):9090", url) and url.split("//")[1].split(":")[0] in services
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/attnserve.yml").read_text())
    dashboards_path = provider["providers"][0]["options"]["path"]
    mounts = [v for v in services["grafana"]["volumes"] if isinstance(v, str)] + [
        f"{v['source']}:{v['target']}" for v in services["grafana"]["volumes"] if isinstance(v, dict)
    ]
    assert any(
        m.split(":")[1] == dashboards_path and Path(m.split(":")[0]) == DASHBOARD.parent for m in mounts
    )


# ---------------------------------------------------------------------------- Prometheus


def test_promtool_check_config():
    _assert_ok(_run([_promtool(), "check", "config", str(PROMETHEUS / "prometheus.yml")]))


def test_promtool_check_rules():
    result = _run([_promtool(), "check", "rules", str(PROMETHEUS / "alerts.yml")])
    _assert_ok(result)
    assert "SUCCESS: 0 rules" not in result.stdout


def test_promtool_alert_unit_tests():
    _assert_ok(_run([_promtool(), "test", "rules", str(PROMETHEUS / "alerts_test.yml")]))


def test_every_alert_is_unit_tested_and_documented():
    rules = [r for g in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"] for r in g["rules"]]
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    tested = {
        case["alertname"] for t in tests for case in t.get("alert_rule_test", []) if case.get("exp_alerts")
    }
    for rule in rules:
        assert rule["alert"] in tested, f"{rule['alert']} is never shown firing in alerts_test.yml"
        assert rule.get("for"), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]


# ---------------------------------------------------------------------------- Grafana


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard: dict) -> list[dict]:
    panels = []
    for panel in dashboard["panels"]:
        panels.extend(panel.get("panels", []) if panel["type"] == "row" else [panel])
    return panels


def _promql(expr: str) -> str:
    """A panel query as Prometheus itself would get it from Grafana (all models, 1m windows)."""
    return expr.replace("$__rate_interval", "1m").replace("$model", ".*")


def _targets() -> list[tuple[str, str]]:
    """(name, PromQL) for every panel query of the dashboard."""
    return [
        (f"panel{panel['id']}_{target['refId']}", _promql(target["expr"]))
        for panel in _panels(_dashboard())
        for target in panel["targets"]
    ]


def test_dashboard_panels_have_queries_on_the_provisioned_datasource():
    dashboard = _dashboard()
    provisioned = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    uid = provisioned["datasources"][0]["uid"]
    assert uid == "prometheus"
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    expected = ["Traffic", "Admission and queues", "Latency", "Batching", "Throughput", "Replicas"]
    assert rows == [*expected, "Runtime", "Versions", "Answer quality"]
    panels = _panels(dashboard)
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["expr"].strip(), f"panel {panel['title']!r} has an empty query"
            assert target["datasource"]["uid"] == uid, panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
    (variable,) = dashboard["templating"]["list"]
    assert variable["name"] == "model" and variable["datasource"]["uid"] == uid
    # Every served model, before any traffic: the replicas keep the provider gauge exported.
    assert variable["definition"] == "label_values(ray_attnserve_execution_provider_info, model)"
    assert all("$model" in expr for name, expr in _targets_raw() if "attnserve_" in expr), (
        "every attnserve panel follows the $model variable"
    )


def _targets_raw() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in _panels(_dashboard()) for t in p["targets"]]


def test_dashboard_follows_the_single_attnserve_deployment():
    """One deployment, `attnserve`, holds every model: no panel reads the removed ingress and
    model-<name> deployments or the removed batch-wait metric, and the admission metrics are shown."""
    exprs = [expr for _, expr in _targets_raw()]
    text = "\n".join(exprs)
    for gone in ("batch_wait", '"ingress"', "model-", "num_ongoing_requests_at_replicas"):
        assert gone not in text, gone
    for expr in exprs:
        if re.search(r"ray_serve_(deployment_replica_healthy|replica_processing_queries)", expr):
            assert 'deployment="attnserve"' in expr, expr
    for metric in ("queue_depth", "queue_wait_seconds_bucket", "rejections_total", "dropped_total"):
        assert f"ray_attnserve_{metric}" in text, metric
    for title, expr in _targets_raw():  # a 0 line ("none") while nothing is refused or dropped
        if "rejections_total" in expr or "dropped_total" in expr:
            assert "by (model, reason)" in expr and '"reason", "none"' in expr, title


def _rules_file(tmp_path: Path, rules: list[dict]) -> Path:
    path = tmp_path / "panel_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}, sort_keys=False))
    return path


def test_dashboard_queries_are_valid_promql(tmp_path):
    rules = [{"record": f"attnserve:{name}", "expr": expr} for name, expr in _targets()]
    _assert_ok(_run([_promtool(), "check", "rules", str(_rules_file(tmp_path, rules))]))


def _series(name: str, labels: dict[str, str], values: str) -> dict:
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


def _histogram(name: str, labels: dict, bounds: list[str], observed_le: str, per_step: int) -> list[dict]:
    """A histogram whose observations all fall in the bucket `observed_le`."""
    out, hit = [], False
    for le in [*bounds, "+Inf"]:
        hit = hit or le == observed_le
        out.append(_series(f"{name}_bucket", {**labels, "le": le}, f"0+{per_step if hit else 0}x40"))
    out.append(_series(f"{name}_count", labels, f"0+{per_step}x40"))
    out.append(_series(f"{name}_sum", labels, f"0+{per_step * float(observed_le)}x40"))
    return out


def _healthy_traffic_series() -> list[dict]:
    """Series shaped like a real scrape of `attnserve serve` under steady, error-free traffic.

    The label sets are those of Ray 2.60's metrics agent: custom metrics carry attnserve's tags,
    application/deployment/replica and Ray's own Component/NodeAddress/SessionName/Version/
    WorkerId labels; ray_serve_* carry Serve's tags. One deployment, `attnserve`, answers every rpc
    and holds the models' engines. There is no non-OK series, no rejection and no drop at all, so
    the error, rejection and drop panels must still show their 0 from the request counts.
    """
    ray = {
        "Component": "core_worker",
        "NodeAddress": "192.0.2.2",
        "SessionName": "session_x",
        "Version": "2.60.0",
    }
    app = {"application": "attnserve"}
    replica = {**ray, **app, "WorkerId": "a61", "deployment": "attnserve", "replica": "9zck1f9l"}
    model = {"model": "g2p-bahdanau", "version": "1"}
    seconds = ["0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0"]
    sizes = ["1.0", "2.0", "4.0", "8.0", "16.0", "32.0"]
    out = []
    for rpc in ("Translate", "ListModels"):
        tags = {**replica, **(model if rpc == "Translate" else {"model": "", "version": ""})}
        latency = {**tags, "rpc": rpc, "code": "OK"}
        out += _histogram("ray_attnserve_request_latency_seconds", latency, seconds, "0.025", 150)
    out += _histogram("ray_attnserve_queue_wait_seconds", {**replica, **model}, seconds, "0.005", 150)
    out.append(_series("ray_attnserve_queue_depth", {**replica, **model}, "2x40"))
    out += _histogram("ray_attnserve_batch_decode_seconds", {**replica, **model}, seconds, "0.01", 30)
    out += _histogram("ray_attnserve_batch_size", {**replica, **model}, sizes, "8.0", 30)
    out.append(_series("ray_attnserve_output_tokens_total", {**replica, **model}, "0+900x40"))
    shares = ["0.05", "0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9", "0.95", "1.0"]
    out += _histogram("ray_attnserve_attention_entropy", {**replica, **model}, shares, "0.3", 150)
    out += _histogram("ray_attnserve_source_coverage", {**replica, **model}, shares, "0.9", 150)
    nats = ["0.01", "0.05", "0.1", "0.2", "0.3", "0.5", "0.7", "1.0", "1.5", "2.0", "3.0", "5.0"]
    out += _histogram("ray_attnserve_token_nll", {**replica, **model}, nats, "0.2", 8)
    provider = {**replica, **model, "provider": "CPUExecutionProvider"}
    out.append(_series("ray_attnserve_execution_provider_info", provider, "1x40"))
    # Ray Serve counts gRPC calls in the replica (direct ingress), and HAProxy's health checks.
    grpc = {**app, "route": "attnserve", "method": "/attnserve.v1.Translator/Translate", "status_code": "OK"}
    healthz = {**grpc, "method": "/ray.serve.RayServeAPIService/Healthz"}
    for labels in (grpc, healthz):
        out.append(_series("ray_serve_num_grpc_requests_total", labels, "0+150x40"))
        out += _histogram(
            "ray_serve_grpc_request_latency_ms", labels, ["5.0", "10.0", "50.0", "100.0"], "50.0", 150
        )
    serve = {**app, "deployment": "attnserve", "replica": "9zck1f9l"}
    out.append(_series("ray_serve_deployment_replica_healthy", serve, "1x40"))
    out.append(_series("ray_serve_replica_processing_queries", serve, "3x40"))
    return out


def test_every_dashboard_query_returns_data_on_healthy_traffic(tmp_path):
    """Each query becomes an alert `count(query) > 0`; promtool must see every one of them fire."""
    targets = _targets()
    variable = _dashboard()["templating"]["list"][0]["definition"]
    metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable).groups()
    targets.append(("variable_model", f"count by ({label}) ({metric})"))
    rules = [{"alert": name, "expr": f"count({expr}) > 0"} for name, expr in targets]
    rules_file = _rules_file(tmp_path, rules)
    test = {
        "rule_files": [rules_file.name],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "15s",
                "input_series": _healthy_traffic_series(),
                "alert_rule_test": [
                    {"eval_time": "5m", "alertname": name, "exp_alerts": [{"exp_labels": {}}]}
                    for name, _ in targets
                ],
            }
        ],
    }
    test_file = tmp_path / "panel_test.yml"
    test_file.write_text(yaml.safe_dump(test, sort_keys=False))
    _assert_ok(_run([_promtool(), "test", "rules", str(test_file)], cwd=tmp_path))


# ---------------------------------------------------------------------------- Kubernetes


def _k8s_validate(doc: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def _crd_validate(doc: dict, schema_file: str) -> None:
    schema = json.loads((SCHEMAS / schema_file).read_text())
    jsonschema.validate(doc, schema, cls=jsonschema.Draft7Validator)


def _rendered_rayservice() -> dict:
    """The RayService template with deploy/serve/attnserve.yaml put in serveConfigV2."""
    if not SERVE_CONFIG.exists():
        pytest.skip(f"{SERVE_CONFIG.relative_to(ROOT)} does not exist yet: nothing to render")
    template = (K8S / "rayservice.template.yaml").read_text()
    assert template.count(PLACEHOLDER) == 1, "the template must hold the serveConfigV2 placeholder once"
    serve = SERVE_CONFIG.read_text().rstrip("\n").split("\n")
    block = "".join(f"      {line}\n" if line.strip() else "\n" for line in serve)
    return yaml.safe_load(template.replace(PLACEHOLDER, "    serveConfigV2: |\n" + block))


def _pod_templates(rayservice: dict) -> dict[str, dict]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = {"head": cluster["headGroupSpec"]}
    groups |= {g["groupName"]: g for g in cluster.get("workerGroupSpecs", [])}
    return groups


def _check_rayservice(rayservice: dict) -> None:
    _crd_validate(rayservice, "rayservice-ray.io-v1.json")
    for name, group in _pod_templates(rayservice).items():
        # A pod template is a core PodTemplateSpec: validate it as the core PodTemplate kind.
        pod_template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": f"attnserve-{name}"},
            "template": group["template"],
        }
        _k8s_validate(pod_template)
        assert group["rayStartParams"]["metrics-export-port"] == "8080", name
        for container in group["template"]["spec"]["containers"]:
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert ports.get("metrics") == 8080 and ports.get("grpc") == GRPC_PORT, (name, ports)
    from ray.serve.schema import ServeDeploySchema

    serve = ServeDeploySchema.model_validate(yaml.safe_load(rayservice["spec"]["serveConfigV2"]))
    assert serve.grpc_options.port == GRPC_PORT
    _check_serving_lifecycle(rayservice)
    # Worker readiness reaches a replica through HAProxy without `application` metadata: only
    # possible with one application (HAProxy's default backend); more need another probe.
    assert len(serve.applications) == 1


def _check_serving_lifecycle(rayservice: dict) -> None:
    """Every Ray container runs the serving path's Ray Serve settings, workers are ready only while
    a gRPC health check through their ingress passes, and termination fits the stop budget.

    The head keeps KubeRay's own readiness probe: KubeRay submits serveConfigV2 only once the head
    pod is ready, so a head probe that needs the application would never pass.
    """
    for name, group in _pod_templates(rayservice).items():
        spec = group["template"]["spec"]
        (container,) = spec["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        for key, value in SERVE_ENVIRONMENT.items():
            assert env.get(key) == value, f"{name}: {key} must be {value!r} (SERVE_ENVIRONMENT)"
        command = container["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep", (name, command)
        pre_stop_s = float(command[1])
        assert 0 < pre_stop_s <= 10, name
        assert spec["terminationGracePeriodSeconds"] >= pre_stop_s + STOP_BUDGET_S, name
        assert "livenessProbe" not in container, f"{name}: leave liveness to KubeRay's raylet check"
        if name == "head":
            assert "readinessProbe" not in container, "a head probe needing the application deadlocks"
            continue
        probe = container["readinessProbe"]  # grpc.health.v1 over TLS ("" service): the kubelet's has no TLS
        command = probe["exec"]["command"]
        assert command[:4] == HEALTH_COMMAND and "--service" not in command and "--tls-ca" in command, name
        assert float(command[command.index("--timeout") + 1]) < probe["timeoutSeconds"], name
        assert probe["timeoutSeconds"] < probe["periodSeconds"], name


def test_crd_schemas_are_valid_json_schemas():
    for path in SCHEMAS.glob("*.json"):
        jsonschema.Draft7Validator.check_schema(json.loads(path.read_text()))


def test_rayservice_template_validates_with_the_serve_config():
    rayservice = _rendered_rayservice()
    _check_rayservice(rayservice)
    groups = _pod_templates(rayservice)
    assert set(groups) == {"head", "cpu-workers", "gpu-workers"}
    gpu = groups["gpu-workers"]["template"]["spec"]
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["containers"][0]["image"].startswith("attnserve-gpu:")
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu["tolerations"]) and gpu["nodeSelector"]
    for name in ("head", "cpu-workers"):
        assert groups[name]["template"]["spec"]["containers"][0]["image"].startswith("attnserve:"), name
    for name, group in groups.items():
        # The CPU and GPU images carry different Python 3.11 patch releases: Ray 2.60 rejects the
        # GPU workers unless the version check is relaxed to the minor version.
        env = {e["name"]: e.get("value") for e in group["template"]["spec"]["containers"][0]["env"]}
        assert env.get("RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL") == "minor", name


def test_rayservice_schema_rejects_what_kuberay_rejects():
    """The schema is not a rubber stamp: unquoted rayStartParams and typos fail."""
    rayservice = _rendered_rayservice()
    bad_param = copy.deepcopy(rayservice)
    bad_param["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["metrics-export-port"] = 8080
    typo = copy.deepcopy(rayservice)
    typo["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 3
    for doc in (bad_param, typo):
        with pytest.raises(jsonschema.ValidationError):
            _crd_validate(doc, "rayservice-ray.io-v1.json")


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_rendered_rayservice_validates(profile):
    rendered = K8S / f"rayservice-{profile}.yaml"
    _check_rayservice(yaml.safe_load(rendered.read_text()))


def _pod_labels(rayservice_template: dict) -> list[dict[str, str]]:
    return [g["template"]["metadata"]["labels"] for g in _pod_templates(rayservice_template).values()]


def _template_without_serve_config() -> dict:
    text = (K8S / "rayservice.template.yaml").read_text()
    return yaml.safe_load(text.replace(PLACEHOLDER, "    serveConfigV2: ''\n"))


def test_grpc_service_validates_and_selects_ray_pods():
    service = yaml.safe_load((K8S / "service-grpc.yaml").read_text())
    _k8s_validate(service)
    (port,) = service["spec"]["ports"]
    assert port["port"] == 50051 and port["targetPort"] == "grpc"
    selector = dict(service["spec"]["selector"])
    assert selector.pop("ray.io/serve") == "true"  # set by KubeRay on pods with a healthy proxy
    for labels in _pod_labels(_template_without_serve_config()):
        assert selector.items() <= labels.items()


def test_network_policy_validates_and_admits_only_grpc_and_metrics_from_outside():
    policy = yaml.safe_load((K8S / "networkpolicy.yaml").read_text())
    _k8s_validate(policy)
    for labels in _pod_labels(_template_without_serve_config()):
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    (anyone,) = [rule for rule in policy["spec"]["ingress"] if "from" not in rule]
    assert sorted(p["port"] for p in anyone["ports"]) == [8080, GRPC_PORT]


def test_podmonitor_validates_and_selects_ray_pods():
    monitor = yaml.safe_load((K8S / "podmonitor.yaml").read_text())
    _crd_validate(monitor, "podmonitor-monitoring.coreos.com-v1.json")
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    selector = dict(monitor["spec"]["selector"]["matchLabels"])
    assert selector.pop("ray.io/is-ray-node") == "yes"  # set by KubeRay on every Ray pod
    for labels in _pod_labels(_template_without_serve_config()):
        assert selector.items() <= labels.items()
    broken = copy.deepcopy(monitor)
    broken["spec"]["podMetricsEndpoints"][0]["interval"] = "15 seconds"
    with pytest.raises(jsonschema.ValidationError):
        _crd_validate(broken, "podmonitor-monitoring.coreos.com-v1.json")


def test_kustomization_builds_the_dashboard_configmap_from_the_grafana_json():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        generated = re.fullmatch(r"rayservice-(cpu|gpu)\.yaml", resource)  # written by render-k8s
        assert generated or (K8S / resource).is_file(), resource
    assert sum(r.startswith("rayservice") for r in kustomization["resources"]) == 1
    (generator,) = kustomization["configMapGenerator"]
    (entry,) = generator["files"]
    key, source = entry.split("=")
    assert (K8S / source).resolve() == DASHBOARD.resolve()
    assert generator["options"]["labels"] == {"grafana_dashboard": "1"}
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": generator["name"], "labels": generator["options"]["labels"]},
        "data": {key: DASHBOARD.read_text()},
    }
    _k8s_validate(configmap)


def test_kubectl_kustomize_builds(tmp_path):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (optional: the kustomization is also checked without it)")
    work = tmp_path / "deploy"
    shutil.copytree(DEPLOY, work)
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    (listed,) = [r for r in kustomization["resources"] if r.startswith("rayservice")]
    if not (work / "kubernetes" / listed).exists():  # not rendered yet: render the CPU profile here
        rayservice = _rendered_rayservice()
        (work / "kubernetes" / listed).write_text(yaml.safe_dump(rayservice, sort_keys=False))
    result = _run(
        [kubectl, "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(work / "kubernetes")]
    )
    _assert_ok(result)
    docs = {d["kind"]: d for d in yaml.safe_load_all(result.stdout)}
    assert set(docs) == {"RayService", "Service", "NetworkPolicy", "PodMonitor", "ConfigMap"}
    assert json.loads(docs["ConfigMap"]["data"]["attnserve-serving.json"]) == _dashboard()
    for doc in (docs["Service"], docs["ConfigMap"]):
        _k8s_validate(doc)
    _crd_validate(docs["PodMonitor"], "podmonitor-monitoring.coreos.com-v1.json")
    _check_rayservice(docs["RayService"])


# ---------------------------------------------------------------------------- Docker


def _dockerignore() -> PatternMatcher:
    """Docker's own matcher over the build context's .dockerignore (both images build from the root)."""
    text = (ROOT / ".dockerignore").read_text()
    return PatternMatcher(
        [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    )


def _instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, pending = [], ""
    for raw in (DOCKER / dockerfile).read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        instruction, _, args = (pending + line).partition(" ")
        out.append((instruction.upper(), args.strip()))
        pending = ""
    return out


def test_dockerignore_keeps_local_state_out():
    ignore = _dockerignore()
    left_out = [
        ".venv/bin/python",
        "runs/g2p-bahdanau/checkpoint.pt",
        "data/x.csv",
        ".git/HEAD",
        "protos/attnserve/v1/translator_pb2.py",
        "service/__pycache__/app.cpython-311.pyc",
        "bench/results/bench.json",
        "tests/unit/test_deploy_files.py",
    ]
    sent = [
        "pyproject.toml",
        "setup.py",
        "README.md",
        "service/app.py",
        "protos/attnserve/v1/runner.proto",
        "model_repository/g2p-bahdanau/1/manifest.json",
        "deploy/serve/attnserve.yaml",
    ]
    for path in left_out:
        assert ignore.matches(path), path
    for path in sent:
        assert not ignore.matches(path), path


def _env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    """The variables ENV sets (KEY=VALUE form, shell quoting removed)."""
    env = {}
    for op, args in instructions:
        if op == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(args))
    return env


@pytest.mark.parametrize("dockerfile", sorted(DOCKERFILES))
def test_dockerfile_builds_from_the_context_and_runs_unprivileged(dockerfile):
    instructions = _instructions(dockerfile)
    ignore = _dockerignore()
    stages = [i for i, (op, _) in enumerate(instructions) if op == "FROM"]
    assert len(stages) >= 2, "multi-stage: the build tools stay out of the final image"
    final = instructions[stages[-1] :]
    for op, args in instructions:
        if op == "COPY" and "--from=" not in args:
            *sources, _ = args.split()
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: missing"
                assert not ignore.matches(source.rstrip("/")), f"COPY {source}: excluded by .dockerignore"
        if op == "RUN":
            assert "torch" not in args, "the serving image must not install torch"
    runs = " ".join(args for op, args in instructions if op == "RUN")
    assert f"[{DOCKERFILES[dockerfile]}]" in runs
    users = [args for op, args in final if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    (healthcheck,) = [args for op, args in final if op == "HEALTHCHECK"]
    options, _, check = healthcheck.partition(" CMD ")
    check = json.loads(check)
    assert check[:4] == HEALTH_COMMAND, healthcheck
    flags = dict(re.findall(r"--([\w-]+)=(\S+)", options))
    assert float(check[check.index("--timeout") + 1]) < float(flags["timeout"].rstrip("s"))
    assert [args for op, args in final if op == "STOPSIGNAL"] == ["SIGTERM"]
    env = _env(final)
    for key, value in SERVE_ENVIRONMENT.items():
        assert env.get(key) == value, f"{dockerfile} must set {key}={value!r} (SERVE_ENVIRONMENT)"
    copies = [args for op, args in final if op == "COPY"]
    assert any(c.endswith("/opt/attnserve/model_repository/") for c in copies)
    assert any(c.startswith("deploy/serve/") and c.endswith("/opt/attnserve/serve/") for c in copies)
    (entrypoint,) = [json.loads(args) for op, args in final if op == "ENTRYPOINT"]
    (cmd,) = [json.loads(args) for op, args in final if op == "CMD"]
    command = entrypoint + cmd
    # tini forwards SIGTERM to `attnserve serve`, which supervises the serving process itself.
    assert command[:3] == ["tini", "--", "attnserve"]
    assert command[command.index("attnserve") + 1] == "serve"
    serve_config = Path(command[command.index("--serve-config") + 1])
    assert serve_config.parent == Path("/opt/attnserve/serve")
    assert (DEPLOY / "serve" / serve_config.name).is_file(), f"{serve_config.name} is not in deploy/serve"
    assert command[command.index("--host") + 1] == "0.0.0.0"
    exposed = " ".join(args for op, args in final if op == "EXPOSE").split()
    assert {"50051", "8080"} <= set(exposed)
