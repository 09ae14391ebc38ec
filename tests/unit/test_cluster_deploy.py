"""`attnserve serve --address` onto a Ray cluster: an ingress on every node, whatever the file says."""

from __future__ import annotations

import pytest
import yaml
from ray.serve.config import ProxyLocation

from attnserve.service.config import LocalOptions, load_serve_config
from attnserve.service.ray_deploy import on_every_node
from tests.conftest import ROOT


@pytest.mark.parametrize("location", ["HeadOnly", "Disabled", "EveryNode", None])
def test_a_cluster_gets_an_ingress_on_every_node_and_nothing_else_changes(tmp_path, location):
    raw = yaml.safe_load((ROOT / "deploy/serve/attnserve.yaml").read_text())
    raw.pop("proxy_location")
    if location:
        raw["proxy_location"] = location
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(raw))
    config = load_serve_config(LocalOptions(serve_config=tmp_path / "serve.yaml"))
    deployed = on_every_node(config)
    assert deployed.proxy_location == ProxyLocation.EveryNode
    assert deployed.model_dump(exclude={"proxy_location"}) == config.model_dump(exclude={"proxy_location"})
