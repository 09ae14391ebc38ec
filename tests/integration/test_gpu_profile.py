"""A GPU profile must fail loudly on a host that cannot run it, never serve on CPU quietly."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import BUNDLED_REPOSITORY, ROOT
from tests.integration.conftest import free_port

pytestmark = pytest.mark.integration
ATTNSERVE = str(Path(sys.executable).with_name("attnserve"))


def _serve(config: Path) -> subprocess.CompletedProcess:
    cmd = [
        ATTNSERVE, "serve", "--serve-config", str(config), "--repository", str(BUNDLED_REPOSITORY),
        "--grpc-port", str(free_port()), "--http-port", str(free_port()), "--metrics-port", str(free_port()),
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=400)


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this host has a GPU")
def test_gpu_profile_refuses_a_host_without_gpus():
    path = ROOT / "deploy/serve/attnserve-gpu.yaml"
    wanted = yaml.safe_load(path.read_text())["applications"][0]["args"]["replica"]["num_gpus"]
    result = _serve(path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"asks for {wanted:g} GPU per" in result.stderr
    assert "attnserve is up" not in result.stdout


def test_required_cuda_provider_missing_fails_the_deploy(tmp_path):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    config = yaml.safe_load((ROOT / "deploy/serve/attnserve-gpu.yaml").read_text())
    config["applications"][0]["args"]["replica"]["num_gpus"] = 0  # schedulable here
    path = tmp_path / "cuda-without-gpu.yaml"
    path.write_text(yaml.safe_dump(config))
    result = _serve(path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "failed to deploy" in result.stderr
    assert "CUDAExecutionProvider is required" in result.stderr
