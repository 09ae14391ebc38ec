"""Model versions on the command line and in the client SDK: `--version` reaches the request,
`--poll-repository` reaches LocalOptions and the serve config, `attnserve models` shows every
version with its state. No server and no Ray: the client's stub is replaced by a recording one."""

from __future__ import annotations

import inspect
import json
from typing import ClassVar

import pytest

from attnserve.cli.main import build_parser, main
from attnserve.service import client as client_module
from attnserve.service.client import Client, caption_request, text_request
from attnserve.service.config import LocalOptions, ServingConfig, load_serve_config
from attnserve.v1 import translator_pb2 as pb
from tests.conftest import ROOT

SERVE_CONFIG = ROOT / "deploy" / "serve" / "attnserve.yaml"


class RecordingStub:
    """Stands in for TranslatorStub: keeps each request and answers as version `version or 1`."""

    requests: ClassVar[list] = []
    listed = pb.ListModelsResponse()

    def __init__(self, channel):
        pass

    @staticmethod
    def _version(request) -> str:
        return request.version or "1"

    def Translate(self, request, timeout=None, metadata=None):
        RecordingStub.requests.append(request)
        return pb.TranslateResponse(text="T", model=request.model, model_version=self._version(request))

    def TranslateStream(self, request, timeout=None, metadata=None):
        RecordingStub.requests.append(request)
        last = pb.TranslateResponse(text="T", model=request.model, model_version=self._version(request))
        return iter([pb.TranslateChunk(token="T"), pb.TranslateChunk(response=last)])

    def Caption(self, request, timeout=None, metadata=None):
        RecordingStub.requests.append(request)
        return pb.CaptionResponse(text="C", model=request.model, model_version=self._version(request))

    def ListModels(self, request, timeout=None, metadata=None):
        return RecordingStub.listed


@pytest.fixture
def stub(monkeypatch):
    """Every Client the CLI opens talks to a RecordingStub; no connection is made."""
    monkeypatch.setattr(client_module.pb_grpc, "TranslatorStub", RecordingStub)
    monkeypatch.setattr(RecordingStub, "requests", [])
    return RecordingStub


def test_translate_and_caption_parse_version():
    parse = build_parser().parse_args
    assert parse(["translate", "--model", "m", "hello"]).version == ""
    assert parse(["translate", "--model", "m", "--version", "2", "hello"]).version == "2"
    assert parse(["translate", "--model", "m", "--stream", "--version", "3", "x"]).version == "3"
    assert parse(["caption", "--model", "c", "scene.png"]).version == ""
    assert parse(["caption", "--model", "c", "--version", "7", "scene.png"]).version == "7"
    with pytest.raises(SystemExit):  # versions are chosen per call, not for a listing
        parse(["models", "--version", "2"])


def test_serve_parses_poll_repository():
    parse = build_parser().parse_args
    assert parse(["serve"]).poll_repository is None
    assert parse(["serve", "--poll-repository", "5"]).poll_repository == 5.0
    assert parse(["serve", "--poll-repository", "0"]).poll_repository == 0.0
    with pytest.raises(SystemExit):
        parse(["serve", "--poll-repository", "often"])


def test_serve_passes_poll_repository_to_local_options(monkeypatch):
    from attnserve.service import supervisor

    seen: list[LocalOptions] = []
    monkeypatch.setattr(supervisor, "serve_until_signalled", lambda options: seen.append(options) or 0)
    for name in ("CERT", "KEY", "CLIENT_CA"):  # no TLS or tokens from the environment
        monkeypatch.delenv(f"ATTNSERVE_TLS_{name}", raising=False)
    monkeypatch.delenv("ATTNSERVE_AUTH_TOKENS", raising=False)
    assert main(["serve", "--poll-repository", "2.5", "--serve-config", str(SERVE_CONFIG)]) == 0
    assert main(["serve", "--serve-config", str(SERVE_CONFIG)]) == 0
    assert [o.poll_repository_s for o in seen] == [2.5, None]


def test_poll_repository_override_reaches_args_and_user_config():
    config = load_serve_config(LocalOptions(serve_config=SERVE_CONFIG, poll_repository_s=5.0))
    (app,) = config.applications
    (deployment,) = app.deployments
    user_config = ServingConfig.model_validate(deployment.user_config)
    assert ServingConfig.model_validate(app.args["serving"]).poll_repository_s == 5.0
    assert user_config.poll_repository_s == 5.0
    assert user_config.defaults.max_batch_size == 32  # the file's other settings stay
    unset = load_serve_config(LocalOptions(serve_config=SERVE_CONFIG)).applications[0]
    assert ServingConfig.model_validate(unset.deployments[0].user_config).poll_repository_s == 0.0


def test_request_builders_set_version_and_keep_positional_arguments():
    request = text_request("m", "text", True, 10, 4, 0.6, "de_DE")
    assert (request.locale, request.version, request.options.beam_size) == ("de_DE", "", 4)
    assert request.options.attention == pb.ATTENTION_MODE_CROSS
    assert text_request("m", "text", version="2").version == "2"
    image = caption_request("c", b"png", True, 5, 2, 0.0)
    assert (image.image, image.version, image.options.max_output_tokens) == (b"png", "", 5)
    assert caption_request("c", b"png", version="3").version == "3"


@pytest.mark.parametrize("method", ["translate", "translate_stream", "caption"])
def test_client_methods_take_version_last(method):
    """Positional callers from before versions (and scores) keep working: `version` is the last
    positional parameter, and what came after it is keyword-only."""
    parameters = list(inspect.signature(getattr(Client, method)).parameters.values())
    positional = [p for p in parameters if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    assert positional[-1].name == "version" and positional[-1].default == ""
    assert all(p.default is not inspect.Parameter.empty for p in parameters[len(positional) :])


def test_client_sends_version(stub):
    with Client("127.0.0.1:1") as client:
        assert client.translate("m", "a", False, 0, 0, 0.0, "de_DE").model_version == "1"
        assert client.translate("m", "a", version="2").model_version == "2"
        chunks = list(client.translate_stream("m", "a", version="3"))
        assert chunks[-1].response.model_version == "3"
        assert client.caption("c", b"png", version="4").model_version == "4"
        assert client.caption("c", b"png", True, 0, 0, 0.0).model_version == "1"
    assert [r.version for r in stub.requests] == ["", "2", "3", "4", ""]
    assert stub.requests[0].locale == "de_DE"


def test_cli_translate_and_caption_send_version(stub, tmp_path, capsys):
    image = tmp_path / "scene.png"
    image.write_bytes(b"not decoded here")
    assert main(["translate", "--model", "m", "--version", "2", "--locale", "fr_FR", "a"]) == 0
    assert main(["translate", "--model", "m", "--stream", "--version", "3", "b"]) == 0
    assert main(["translate", "--model", "m", "c"]) == 0
    assert main(["caption", "--model", "cap", "--version", "4", str(image)]) == 0
    assert [(r.model, r.version) for r in stub.requests] == [("m", "2"), ("m", "3"), ("m", ""), ("cap", "4")]
    assert stub.requests[0].locale == "fr_FR"
    assert stub.requests[3].image == b"not decoded here"
    assert "T" in capsys.readouterr().out


def test_cli_models_lists_every_version_with_state_and_default_share(stub, capsys, monkeypatch):
    infos = [
        pb.ModelInfo(name="m", version="1", state="READY", default_share=0.0),
        pb.ModelInfo(name="m", version="2", state="READY", default_share=1.0),
        pb.ModelInfo(name="m", version="3", state="LOADING"),
    ]
    monkeypatch.setattr(RecordingStub, "listed", pb.ListModelsResponse(models=infos))
    assert main(["models"]) == 0
    listed = json.loads(capsys.readouterr().out)["models"]
    got = [(m["name"], m["version"], m["state"], m["defaultShare"]) for m in listed]
    assert got == [("m", "1", "READY", 0.0), ("m", "2", "READY", 1.0), ("m", "3", "LOADING", 0.0)]
    fields = [f.json_name for f in pb.ModelInfo.DESCRIPTOR.fields]
    assert list(listed[0]) == fields  # every field, zeros included, in the .proto's order
