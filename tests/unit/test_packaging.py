"""Serving must not need torch, and the serve config files must be valid and overridable."""

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from attnserve.service.config import AppArgs, BatchingConfig, LocalOptions, load_serve_config

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
    for deployment in app.deployments:
        if isinstance(deployment.user_config, dict):
            BatchingConfig.model_validate(deployment.user_config)


def test_overrides_apply_and_replace_per_model_batching(tmp_path):
    options = LocalOptions(
        serve_config=ROOT / "deploy/serve/attnserve.yaml", grpc_port=6001, http_port=6002,
        model_repository=Path("elsewhere"), max_batch_size=4,
    )  # fmt: skip
    config = load_serve_config(options)
    assert config.grpc_options.port == 6001 and config.http_options.port == 6002
    args = AppArgs.model_validate(config.applications[0].args)
    assert args.model_repository == str(Path("elsewhere").resolve())
    assert args.model_defaults.batching.max_batch_size == 4
    assert all(
        "user_config" not in d.model_dump(exclude_unset=True) for d in config.applications[0].deployments
    )


APP = "applications: [{name: a, import_path: attnserve.service.app:app_builder, args: %s}]"


@pytest.mark.parametrize(
    ("yaml_text", "error"),
    [
        (APP % "{modelrepo: x}", "modelrepo"),
        (APP % "{model_defaults: {batching: {max_batch_size: 0}}}", "max_batch_size"),
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
