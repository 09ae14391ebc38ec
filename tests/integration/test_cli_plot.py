"""`attnserve translate/caption --plot` against the running service: the pictures are written.

The file sorts before test_grpc_service.py, whose last test stops the session's service."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import ROOT

pytestmark = pytest.mark.integration
SCENE = ROOT / "examples" / "byom" / "fashion-scenes" / "images" / "scene-001.png"


def _cli(service, *args: str) -> str:
    exe = str(Path(sys.executable).with_name("attnserve"))
    done = subprocess.run(
        [exe, *args, "--target", service.grpc_address],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.parametrize(
    ("args", "min_width"),
    [
        (["translate", "--model", "dates-luong", "--locale", "ko", "2024년 3월 7일 목요일"], 400),
        (["translate", "--model", "g2p-transformer", "knight"], 200),
        (["caption", "--model", "caption-fashion", str(SCENE)], 600),
    ],
    ids=["korean-date", "word", "caption"],
)
def test_plot_writes_the_attention_picture(service, tmp_path, args, min_width):
    picture = tmp_path / "attention.png"
    out = _cli(service, *args, "--plot", str(picture))
    assert f"attention picture: {picture}" in out
    width, height = Image.open(picture).size
    assert width >= min_width and height >= 150
