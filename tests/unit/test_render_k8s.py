"""The KubeRay manifests are generated from the serve config files and kept current."""

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from attnserve.cli.render_k8s import IMAGE_MODEL_REPOSITORY, PROFILES, output_path, render, requests_gpu
from attnserve.service.config import AppArgs
from tests.conftest import ROOT


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_committed_manifest_is_the_rendered_one(profile):
    path = output_path(profile, ROOT)
    assert path.read_text() == render(profile, ROOT), f"{path} is stale: run `attnserve render-k8s`"


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_serve_config_v2_is_the_profile_with_image_paths(profile):
    manifest = yaml.safe_load(render(profile, ROOT))
    assert manifest["kind"] == "RayService"
    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    source = yaml.safe_load((ROOT / PROFILES[profile]).read_text())
    assert embedded["grpc_options"] == {**source["grpc_options"], "enable_reflection": False}  # tokens on
    assert embedded["applications"][0]["deployments"] == source["applications"][0]["deployments"]
    config = ServeDeploySchema.model_validate(embedded)
    assert AppArgs.model_validate(config.applications[0].args).model_repository == IMAGE_MODEL_REPOSITORY
    groups = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    gpu_groups = [g for g in groups if requests_gpu(g)]
    assert gpu_groups, "the RayService has a GPU worker group"
    if profile == "cpu":
        assert all(g["replicas"] == 0 for g in gpu_groups)
    else:
        assert all(g["replicas"] >= 1 for g in gpu_groups)


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_grpc_ports_and_probes_follow_the_serve_config(profile):
    """HAProxy binds the serve config's gRPC port on every Ray pod: the container port named "grpc"
    (service-grpc.yaml's target) and the workers' gRPC readiness probes must use that port."""
    text = render(profile, ROOT)
    assert "&id" not in text and "*id" not in text, "no YAML anchors in a manifest people read"
    manifest = yaml.safe_load(text)
    port = yaml.safe_load(manifest["spec"]["serveConfigV2"])["grpc_options"]["port"]
    cluster = manifest["spec"]["rayClusterConfig"]
    probed = 0
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        (container,) = group["template"]["spec"]["containers"]
        assert {"name": "grpc", "containerPort": port} in container["ports"]
        if "readinessProbe" in container:  # grpc.health.v1 over TLS: the kubelet's gRPC probe has no TLS
            command = container["readinessProbe"]["exec"]["command"]
            assert command[:4] == ["attnserve", "health", "--target", f"127.0.0.1:{port}"]
            assert "--tls-ca" in command
            probed += 1
    assert probed == len(cluster["workerGroupSpecs"])


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_ray_container_reads_tls_and_tokens_from_the_secrets(profile):
    cluster = yaml.safe_load(render(profile, ROOT))["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        spec = group["template"]["spec"]
        (container,) = spec["containers"]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["RAY_SERVE_HAPROXY_BINARY_PATH"].endswith("/attnserve-haproxy")
        secrets = {v["name"]: v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert secrets == {"tls": "attnserve-tls", "tokens": "attnserve-tokens"}
        for variable, volume in (("ATTNSERVE_TLS_CERT", "tls"), ("ATTNSERVE_TLS_KEY", "tls"),
                                 ("ATTNSERVE_AUTH_TOKENS", "tokens")):  # fmt: skip
            assert env[variable].startswith(mounts[volume] + "/"), variable
        assert not any("subPath" in m for m in container["volumeMounts"])  # subPath mounts never update
