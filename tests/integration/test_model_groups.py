"""Model groups: two applications with replicas of their own, reached by `application` metadata,
which the SDK finds by itself."""

from __future__ import annotations

import io
import signal

import grpc
import numpy as np
import pytest
import yaml
from PIL import Image

from attnserve.service.client import Client
from attnserve.v1 import translator_pb2 as pb
from attnserve.v1 import translator_pb2_grpc as pb_grpc
from tests.conftest import BUNDLED_REPOSITORY, ROOT
from tests.integration.conftest import start_service

pytestmark = pytest.mark.integration
GROUPS = {"words": ["g2p-bahdanau"], "images": ["caption-fashion"]}


@pytest.fixture(scope="module")
def grouped_service(tmp_path_factory):
    """`attnserve serve` with one application per group, each holding only its models."""
    base = yaml.safe_load((ROOT / "deploy/serve/attnserve.yaml").read_text())
    (template,) = base["applications"]
    base["applications"] = []
    for prefix, (name, models) in zip(("/", "/images"), GROUPS.items(), strict=True):
        app = {**template, "name": name, "route_prefix": prefix}
        app["args"] = {**template["args"], "models": models, "model_repository": str(BUNDLED_REPOSITORY)}
        base["applications"].append(app)
    config = tmp_path_factory.mktemp("groups") / "groups.yaml"
    config.write_text(yaml.safe_dump(base))
    running = start_service(config)
    yield running
    running.process.send_signal(signal.SIGTERM)
    assert running.process.wait(60) == 0


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((56, 56), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_each_group_is_an_application_with_only_its_models(grouped_service):
    with grpc.insecure_channel(grouped_service.grpc_address) as channel:
        stub = pb_grpc.TranslatorStub(channel)
        for app, models in GROUPS.items():
            listed = stub.ListModels(pb.ListModelsRequest(), timeout=30, metadata=(("application", app),))
            assert [m.name for m in listed.models] == models
        request = pb.TranslateRequest(model="g2p-bahdanau", text="groups")
        with pytest.raises(grpc.RpcError) as info:  # several applications: the metadata is needed
            stub.Translate(request, timeout=30)
        assert info.value.code() is grpc.StatusCode.NOT_FOUND
        assert stub.Translate(request, timeout=30, metadata=(("application", "words"),)).text


def test_the_sdk_finds_each_models_application_itself(grouped_service):
    with Client(grouped_service.grpc_address, timeout_s=30) as client:
        assert client.translate("g2p-bahdanau", "groups").text
        assert client.caption("caption-fashion", _png()).model == "caption-fashion"
        with pytest.raises(grpc.RpcError) as info:
            client.translate("no-such-model", "x")
        assert info.value.code() is grpc.StatusCode.NOT_FOUND
