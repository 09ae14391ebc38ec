"""The KubeRay RayJob that runs `attnserve batch` on Kubernetes is valid and runs what the image holds."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from attnserve.cli.main import build_parser
from tests.conftest import ROOT

K8S = ROOT / "deploy" / "kubernetes"
RAYJOB = K8S / "rayjob-batch.yaml"
SCHEMA = K8S / "schemas" / "rayjob-ray.io-v1.json"
KUBERNETES_VERSION = "1.30.0"
IMAGE_ROOT = Path("/opt/attnserve")  # the image's working directory (deploy/docker/Dockerfile)


def _rayjob() -> dict:
    return yaml.safe_load(RAYJOB.read_text())


def _groups(rayjob: dict) -> dict[str, dict]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    return {"head": cluster["headGroupSpec"]} | {g["groupName"]: g for g in cluster["workerGroupSpecs"]}


def test_rayjob_validates_against_the_crd_and_kubernetes_schemas():
    import kubernetes_validate

    rayjob = _rayjob()
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(rayjob, schema, cls=jsonschema.Draft7Validator)
    for name, group in _groups(rayjob).items():
        pod_template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": f"attnserve-batch-{name}"},
            "template": group["template"],
        }
        kubernetes_validate.validate(pod_template, KUBERNETES_VERSION, strict=True)


def test_rayjob_schema_rejects_typos_and_unknown_modes():
    rayjob = _rayjob()
    typo, mode = copy.deepcopy(rayjob), copy.deepcopy(rayjob)
    typo["spec"]["shutdownAfterJobFinish"] = True
    mode["spec"]["submissionMode"] = "KubeMode"
    schema = json.loads(SCHEMA.read_text())
    for doc in (typo, mode):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(doc, schema, cls=jsonschema.Draft7Validator)


def test_entrypoint_is_a_batch_command_on_what_the_image_holds():
    rayjob = _rayjob()
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[0] == "attnserve"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "batch" and args.address is None  # KubeRay sets RAY_ADDRESS
    assert (ROOT / "model_repository" / args.model).is_dir()
    assert args.repository == IMAGE_ROOT / "model_repository"
    dockerfile = (ROOT / "deploy" / "docker" / "Dockerfile").read_text()
    assert re.search(r"COPY model_repository/ /opt/attnserve/model_repository/", dockerfile)
    assert re.search(r"COPY deploy/serve/ /opt/attnserve/serve/", dockerfile)
    assert (ROOT / "deploy" / "serve" / args.serve_config.name).is_file()
    # one actor per worker CPU: the head (num-cpus 0) runs only the driver
    groups = _groups(rayjob)
    assert groups["head"]["rayStartParams"]["num-cpus"] == "0"
    worker_cpus = sum(
        int(g["replicas"]) * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
        for name, g in groups.items()
        if name != "head"
    )
    assert args.actors * args.cpus_per_actor == worker_cpus
    for group in groups.values():  # input and output are on one volume every node mounts
        mounts = {m["mountPath"] for m in group["template"]["spec"]["containers"][0]["volumeMounts"]}
        assert "/data" in mounts
    assert str(args.input).startswith("/data/") and str(args.output).startswith("/data/")


def test_rayjob_runs_the_service_image_and_ray_version():
    rayjob = _rayjob()
    service = yaml.safe_load((K8S / "rayservice.template.yaml").read_text().replace("__SERVE_CONFIG__", ""))
    pin = re.search(r'"ray\[[a-z,]+\]==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert (
        rayjob["spec"]["rayClusterSpec"]["rayVersion"]
        == pin
        == service["spec"]["rayClusterConfig"]["rayVersion"]
    )
    for group in _groups(rayjob).values():
        (container,) = group["template"]["spec"]["containers"]
        assert container["image"] == "attnserve:latest"
        assert group["template"]["spec"]["securityContext"]["runAsUser"] == 10001
