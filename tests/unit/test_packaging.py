"""Serving must not need torch, and configuration errors must be clear."""

import subprocess
import sys

import pytest

from attnserve.service.config import BatchingConfig, ServeConfig


def test_service_modules_do_not_import_torch():
    code = (
        "import sys, pkgutil, importlib, attnserve.service as s\n"
        "for m in pkgutil.walk_packages(s.__path__, 'attnserve.service.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]\n"
        "assert not bad, bad[:5]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_serve_config_from_yaml_with_overrides(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(
        "grpc_port: 6000\nbatching: {max_batch_size: 8, batch_wait_timeout_s: 0.002}\n"
        "runtime: {providers: [CPUExecutionProvider], intra_op_threads: 1}\n"
    )
    cfg = ServeConfig.load(path, grpc_port=7000, metrics_port=None)
    assert cfg.grpc_port == 7000 and cfg.metrics_port == ServeConfig().metrics_port
    assert cfg.batching == BatchingConfig(8, 0.002)
    assert cfg.runtime.providers == ("CPUExecutionProvider",) and cfg.runtime.intra_op_threads == 1


def test_serve_config_rejects_unknown_and_bad_values(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("grpc_prot: 6000\n")
    with pytest.raises(ValueError, match="unknown serve settings"):
        ServeConfig.load(path)
    with pytest.raises(ValueError, match="max_batch_size"):
        BatchingConfig(max_batch_size=0)
