"""Autoscaling of the serving deployment: the `replica.autoscaling` block, `serve --autoscale`,
the deployment options app_builder gives Ray Serve, and the KubeRay worker groups render-k8s sizes.

Nothing here starts Ray: an Application's deployment config is inspected as built.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import ray
import yaml
from pydantic import ValidationError
from ray.serve.config import AutoscalingConfig

from attnserve.cli.main import main
from attnserve.cli.render_k8s import PROFILES, TEMPLATE, pod_resources, render, size_for_autoscaling
from attnserve.service.app import SHUTDOWN_WAIT_LOOP_S, app_builder
from attnserve.service.config import AppArgs, AutoscalingArgs, LocalOptions, ReplicaArgs, load_serve_config
from tests.conftest import ROOT

SERVE_CONFIG = ROOT / "deploy" / "serve" / "attnserve.yaml"
REPOSITORY = ROOT / "model_repository"

# ---------------------------------------------------------------------------- the config block


def test_defaults_suit_a_fast_engine_queue():
    scaling = AutoscalingArgs()
    assert (scaling.min_replicas, scaling.max_replicas) == (1, 4)
    assert scaling.target_ongoing_requests is None  # the serving defaults' max_batch_size
    assert scaling.upscale_delay_s < scaling.downscale_delay_s
    assert scaling.ray_config(32)["target_ongoing_requests"] == 32
    assert AutoscalingArgs(target_ongoing_requests=8).ray_config(32)["target_ongoing_requests"] == 8
    assert ReplicaArgs().autoscaling is None  # the shipped behaviour: a fixed num_replicas


def test_ray_accepts_every_field_as_given():
    """The block's fields are Ray 2.60's AutoscalingConfig fields, with the same meaning."""
    config = AutoscalingArgs(min_replicas=2, max_replicas=7, upscale_delay_s=3, downscale_delay_s=120)
    ray_config = config.ray_config(16)
    assert set(ray_config) <= set(AutoscalingConfig.model_fields)
    parsed = AutoscalingConfig(**ray_config)
    assert (parsed.min_replicas, parsed.max_replicas, parsed.target_ongoing_requests) == (2, 7, 16)
    assert (parsed.upscale_delay_s, parsed.downscale_delay_s) == (3, 120)


@pytest.mark.parametrize(
    ("replica", "error"),
    [
        ({"num_replicas": 2, "autoscaling": {}}, "num_replicas \\(2\\) or autoscaling, not both"),
        ({"autoscaling": {"min_replicas": 3, "max_replicas": 1}}, "max_replicas \\(1\\) must be at least"),
        ({"autoscaling": {"min_replicas": 0}}, "min_replicas"),  # no scale to zero
        ({"autoscaling": {"target_ongoing_requests": 0}}, "target_ongoing_requests"),
        ({"autoscaling": {"upscale_delay_s": -1}}, "upscale_delay_s"),
        ({"autoscaling": {"max_replica": 4}}, "max_replica"),  # a typo is not ignored
        ({"graceful_shutdown_timeout_s": 0}, "graceful_shutdown_timeout_s"),
    ],
)
def test_bad_replica_blocks_say_what_is_wrong(replica, error):
    with pytest.raises(ValidationError, match=error):
        AppArgs.model_validate({"replica": replica})


def test_num_replicas_left_at_one_goes_with_autoscaling():
    args = AppArgs.model_validate({"replica": {"num_replicas": 1, "autoscaling": {"max_replicas": 3}}})
    assert args.replica.autoscaling.max_replicas == 3


def test_shutdown_grace_must_outlast_every_admitted_call():
    """A stopping replica is killed after graceful_shutdown_timeout_s: that must exceed the longest
    queue wait the engines admit, per model overrides included."""
    AppArgs.model_validate({"replica": {"graceful_shutdown_timeout_s": 2.5}})  # default max_queue_wait_s 2
    with pytest.raises(ValidationError, match="must exceed the longest max_queue_wait_s \\(30\\)"):
        AppArgs.model_validate({"serving": {"models": {"m": {"max_queue_wait_s": 30}}}})
    with pytest.raises(ValidationError, match="graceful_shutdown_timeout_s \\(2\\)"):
        AppArgs.model_validate({"replica": {"graceful_shutdown_timeout_s": 2}})


# ---------------------------------------------------------------------------- --autoscale


def _replica(config) -> ReplicaArgs:
    return AppArgs.model_validate(config.applications[0].args).replica


def test_autoscale_override_replaces_the_files_sizing(tmp_path):
    replica = _replica(load_serve_config(LocalOptions(serve_config=SERVE_CONFIG, autoscale=(2, 6))))
    assert (replica.autoscaling.min_replicas, replica.autoscaling.max_replicas) == (2, 6)
    assert replica.num_replicas == 1
    assert _replica(load_serve_config(LocalOptions(serve_config=SERVE_CONFIG))).autoscaling is None
    raw = yaml.safe_load(SERVE_CONFIG.read_text())
    fixed = raw["applications"][0]
    fixed["args"]["replica"] = {"num_replicas": 3}
    scaled = copy.deepcopy(fixed) | {"name": "b", "route_prefix": "/b"}
    scaled["args"]["replica"] = {"autoscaling": {"max_replicas": 2, "target_ongoing_requests": 8}}
    raw["applications"].append(scaled)
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = load_serve_config(LocalOptions(serve_config=path, autoscale=(2, 5)))
    for app in config.applications:  # every application; the file's other autoscaling settings stay
        replica = AppArgs.model_validate(app.args).replica
        assert replica.num_replicas == 1
        target = 8 if app.name == "b" else None
        assert replica.autoscaling == AutoscalingArgs(
            min_replicas=2, max_replicas=5, target_ongoing_requests=target
        )
    fixed["args"]["replica"]["autoscaling"] = {}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValidationError, match="not both"):
        load_serve_config(LocalOptions(serve_config=path, autoscale=(2, 5)))


def test_serve_passes_autoscale_to_local_options(monkeypatch):
    from attnserve.service import supervisor

    seen: list[LocalOptions] = []
    monkeypatch.setattr(supervisor, "serve_until_signalled", lambda options: seen.append(options) or 0)
    for name in (
        "ATTNSERVE_TLS_CERT",
        "ATTNSERVE_TLS_KEY",
        "ATTNSERVE_TLS_CLIENT_CA",
        "ATTNSERVE_AUTH_TOKENS",
    ):
        monkeypatch.delenv(name, raising=False)
    assert main(["serve", "--autoscale", "2:5", "--serve-config", str(SERVE_CONFIG)]) == 0
    assert main(["serve", "--autoscale", "3:3", "--serve-config", str(SERVE_CONFIG)]) == 0
    assert main(["serve", "--serve-config", str(SERVE_CONFIG)]) == 0
    assert [o.autoscale for o in seen] == [(2, 5), (3, 3), None]


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("3:1", "MAX (1) must be at least MIN (3)"),
        ("a:b", "expected MIN:MAX, two whole numbers such as 1:4, not 'a:b'"),
        ("4", "expected MIN:MAX"),
        ("1.5:3", "expected MIN:MAX"),
        ("0:2", "MIN must be at least 1"),
    ],
)
def test_bad_autoscale_is_a_plain_usage_error(capsys, given, message):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", f"--autoscale={given}", "--serve-config", str(SERVE_CONFIG)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --autoscale: {message}" in err and "Traceback" not in err


def test_an_override_past_the_shutdown_grace_is_refused_at_once():
    with pytest.raises(ValidationError, match="must exceed the longest max_queue_wait_s \\(30\\)"):
        load_serve_config(LocalOptions(serve_config=SERVE_CONFIG, max_queue_wait_s=30))


# ---------------------------------------------------------------------------- app_builder


def _deployment_config(args: dict):
    app = app_builder({"model_repository": str(REPOSITORY), **args})
    return app._bound_deployment._deployment_config


def test_app_builder_passes_autoscaling_instead_of_num_replicas():
    config = _deployment_config(
        {
            "replica": {
                "autoscaling": {"min_replicas": 2, "max_replicas": 6},
                "graceful_shutdown_timeout_s": 15,
            },
            "serving": {"defaults": {"max_batch_size": 24}},
        }
    )
    scaling = config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas) == (2, 6)
    assert scaling.target_ongoing_requests == 24  # the engines' running batch
    assert (scaling.upscale_delay_s, scaling.downscale_delay_s) == (5, 300)
    assert "num_replicas" not in config.user_configured_option_names
    assert "autoscaling_config" in config.user_configured_option_names
    assert config.graceful_shutdown_timeout_s == 15
    assert config.graceful_shutdown_wait_loop_s == SHUTDOWN_WAIT_LOOP_S
    assert not ray.is_initialized()


def test_app_builder_keeps_a_fixed_num_replicas():
    config = _deployment_config({"replica": {"num_replicas": 3}})
    assert config.autoscaling_config is None and config.num_replicas == 3
    assert config.graceful_shutdown_timeout_s == ReplicaArgs().graceful_shutdown_timeout_s


# ---------------------------------------------------------------------------- KubeRay


def _render_with(tmp_path: Path, profile: str, replica: dict) -> dict:
    """The profile's RayService rendered from a copy of its serve config with this replica block."""
    shutil.copytree(ROOT / TEMPLATE.parent, tmp_path / TEMPLATE.parent, dirs_exist_ok=True)
    config = yaml.safe_load((ROOT / PROFILES[profile]).read_text())
    config["applications"][0]["args"]["replica"] = replica
    (tmp_path / PROFILES[profile]).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / PROFILES[profile]).write_text(yaml.safe_dump(config, sort_keys=False))
    return yaml.safe_load(render(profile, tmp_path))


def _groups(manifest: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]}


def _sizes(group: dict) -> tuple[int, int, int]:
    return group["replicas"], group["minReplicas"], group["maxReplicas"]


def test_rendered_cpu_workers_agree_with_serve_replicas(tmp_path):
    from tests.unit.test_deploy_files import _check_rayservice

    template = yaml.safe_load((ROOT / TEMPLATE).read_text().replace("__SERVE_CONFIG__", "{}"))
    cpu_pod = _groups(template)["cpu-workers"]
    assert pod_resources(cpu_pod) == (2.0, 0.0)  # the Ray container's 2 CPUs (limit = request)
    manifest = _render_with(
        tmp_path, "cpu", {"num_cpus": 1, "autoscaling": {"min_replicas": 3, "max_replicas": 9}}
    )
    _check_rayservice(manifest)  # still valid for KubeRay's CRD and Kubernetes' pod schema
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    groups = _groups(manifest)
    assert _sizes(groups["cpu-workers"]) == (2, 2, 5)  # two 1-CPU replicas a pod: 3 -> 2 pods, 9 -> 5
    assert _sizes(groups["gpu-workers"])[:2] == (0, 0)  # the CPU profile runs no GPU pod
    serve = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert serve["applications"][0]["args"]["replica"]["autoscaling"]["max_replicas"] == 9
    half = _render_with(
        tmp_path, "cpu", {"num_cpus": 0.5, "autoscaling": {"min_replicas": 1, "max_replicas": 8}}
    )
    assert _sizes(_groups(half)["cpu-workers"]) == (1, 1, 2)


def test_rendered_gpu_workers_agree_with_serve_replicas(tmp_path):
    from tests.unit.test_deploy_files import _check_rayservice

    replica = {"num_cpus": 1, "num_gpus": 1, "autoscaling": {"min_replicas": 2, "max_replicas": 3}}
    manifest = _render_with(tmp_path, "gpu", replica)
    _check_rayservice(manifest)
    groups = _groups(manifest)
    assert _sizes(groups["gpu-workers"]) == (2, 2, 3)  # one GPU a pod, one GPU a replica
    template = yaml.safe_load((ROOT / TEMPLATE).read_text().replace("__SERVE_CONFIG__", "{}"))
    assert _sizes(groups["cpu-workers"]) == _sizes(_groups(template)["cpu-workers"])


def test_without_autoscaling_the_template_sizes_stay(tmp_path):
    fixed = _render_with(tmp_path, "cpu", {"num_replicas": 1, "num_cpus": 1})
    template = yaml.safe_load((ROOT / TEMPLATE).read_text().replace("__SERVE_CONFIG__", "{}"))
    assert _sizes(_groups(fixed)["cpu-workers"]) == _sizes(_groups(template)["cpu-workers"])


def test_a_replica_bigger_than_a_pod_fails_the_render(tmp_path):
    with pytest.raises(ValueError, match="asks for 3 CPUs and 0 GPUs, more than a cpu-workers pod has"):
        _render_with(tmp_path, "cpu", {"num_cpus": 3, "autoscaling": {}})


def test_applications_sharing_a_group_add_up():
    cluster = copy.deepcopy(yaml.safe_load((ROOT / TEMPLATE).read_text().replace("__SERVE_CONFIG__", "{}")))
    cluster = cluster["spec"]["rayClusterConfig"]
    apps = [
        {
            "name": "a",
            "args": {"replica": {"num_cpus": 1, "autoscaling": {"min_replicas": 1, "max_replicas": 4}}},
        },
        {"name": "b", "args": {"replica": {"num_cpus": 0.5, "num_replicas": 2}}},  # fixed: 2 of 4 a pod
    ]
    assert size_for_autoscaling(cluster, apps) == {"cpu-workers"}
    assert _sizes(_groups({"spec": {"rayClusterConfig": cluster}})["cpu-workers"]) == (2, 2, 3)
    assert size_for_autoscaling(cluster, [apps[1]]) == set()  # nothing autoscales: left alone
