"""Serving must not need torch, and the serve config files must be valid and overridable."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from attnserve.service.config import AppArgs, LocalOptions, ServingConfig, load_serve_config

ROOT = Path(__file__).resolve().parents[2]
SERVE_CONFIGS = sorted((ROOT / "deploy" / "serve").glob("*.yaml"))


def test_service_modules_do_not_import_torch():
    code = (
        "import sys, pkgutil, importlib, attnserve.service as s\n"
        "for m in pkgutil.walk_packages(s.__path__, 'attnserve.service.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]\n"
        "assert not bad, bad[:5]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_shipped_serve_configs_validate(path):
    config = load_serve_config(LocalOptions(serve_config=path))
    (app,) = config.applications
    args = AppArgs.model_validate(app.args)
    assert Path(args.model_repository).is_absolute()
    assert app.import_path == "attnserve.service.app:app_builder"
    (deployment,) = app.deployments
    assert deployment.name == "attnserve"
    serving = ServingConfig.model_validate(deployment.user_config)
    for name in serving.models:  # every per-model override is a valid setting
        serving.for_model(name)


def test_overrides_apply_to_every_model_and_to_the_live_user_config(tmp_path):
    options = LocalOptions(
        serve_config=ROOT / "deploy/serve/attnserve.yaml", grpc_port=6001, http_port=6002,
        model_repository=Path("elsewhere"), max_batch_size=4, max_queue_wait_s=0.5,
    )  # fmt: skip
    config = load_serve_config(options)
    assert config.grpc_options.port == 6001 and config.http_options.port == 6002
    args = AppArgs.model_validate(config.applications[0].args)
    assert args.model_repository == str(Path("elsewhere").resolve())
    (deployment,) = config.applications[0].deployments
    for serving in (args.serving, ServingConfig.model_validate(deployment.user_config)):
        for model in ("g2p-bahdanau", "caption-fashion"):  # the file overrides caption-fashion
            settings = serving.for_model(model)
            assert (settings.max_batch_size, settings.max_queue_wait_s) == (4, 0.5)


def test_per_model_settings_override_the_defaults():
    serving = ServingConfig.model_validate(
        {"defaults": {"max_batch_size": 8, "max_queue_wait_s": 1.5}, "models": {"a": {"max_batch_size": 2}}}
    )
    assert (serving.for_model("a").max_batch_size, serving.for_model("a").max_queue_wait_s) == (2, 1.5)
    assert serving.for_model("b").max_batch_size == 8
    with pytest.raises(ValidationError, match="max_batch_size"):
        ServingConfig.model_validate({"models": {"a": {"max_batch_size": 0}}}).for_model("a")


APP = "applications: [{name: a, import_path: attnserve.service.app:app_builder, args: %s}]"


@pytest.mark.parametrize(
    ("yaml_text", "error"),
    [
        (APP % "{modelrepo: x}", "modelrepo"),
        (APP % "{serving: {defaults: {max_batch_size: 0}}}", "max_batch_size"),
        (APP % "{serving: {defaults: {max_queue_wait_s: 0}}}", "max_queue_wait_s"),
        ("grpc_options: {port: not-a-port}\napplications: []", "port"),
    ],
)
def test_bad_serve_configs_say_what_is_wrong(tmp_path, yaml_text, error):
    path = tmp_path / "serve.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ValidationError, match=error):
        load_serve_config(LocalOptions(serve_config=path))


def test_unreadable_serve_config_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cannot read serve config"):
        load_serve_config(LocalOptions(serve_config=tmp_path / "missing.yaml"))


def test_a_local_service_gets_ports_and_haproxy_files_of_its_own(monkeypatch):
    from attnserve.service import local_ray

    names = [n for pair in local_ray.LOCAL_PORTS for n in pair if n] + [
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", "RAY_SERVE_HAPROXY_SOCKET_PATH",
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE", "RAY_SERVE_HAPROXY_SERVER_STATE_FILE",
        "RAY_SERVE_HAPROXY_BINARY_PATH", local_ray.worker_setup.SETUP_HOOK_ENV, *local_ray.SERVE_ENVIRONMENT,
    ]  # fmt: skip
    for name in names:
        monkeypatch.setenv(name, "")  # undone after the test
        monkeypatch.delenv(name)
    monkeypatch.setenv("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "12345")  # one already set is left alone
    local_ray.set_local_environment()
    assert os.environ["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"] == "12345"
    low, high = (int(os.environ[n]) for n in local_ray.LOCAL_PORTS[0])
    assert high - low == local_ray.PORT_BLOCK - 1 and high < 30000  # not Ray's shared defaults
    ports = [int(os.environ[low]) for low, _ in local_ray.LOCAL_PORTS]
    assert len(set(ports)) == len(ports)
    socket_path = Path(os.environ["RAY_SERVE_HAPROXY_SOCKET_PATH"])
    assert len(str(socket_path.parent)) + 1 + 56 + 1 + len(socket_path.name) <= 97  # + Ray's node id
    assert all(os.environ[k] == v for k, v in local_ray.SERVE_ENVIRONMENT.items())
    # Start-up answers UNAVAILABLE: HAProxy runs through attnserve-haproxy (service/tls_front.py),
    # and Serve's fallback proxy is changed by the workers' setup hook (service/worker_setup.py).
    assert Path(os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"]).name == "attnserve-haproxy"
    assert os.environ[local_ray.worker_setup.SETUP_HOOK_ENV] == local_ray.worker_setup.SETUP_HOOK
