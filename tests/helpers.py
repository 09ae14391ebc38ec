"""What several test modules share: answers to prepared requests as the engine serves them."""

from __future__ import annotations

from attnserve.core.engine import Engine, answer_all
from attnserve.core.errors import RequestError
from attnserve.core.model_runner import ModelRunner
from attnserve.core.requests import Answer, PreparedRequest
from attnserve.core.scheduler import EngineConfig

# Submitted together, the requests join one running batch: the idle engine waits this long for them.
TOGETHER = EngineConfig(max_batch_size=1024, batch_wait_s=0.05)


def answers(runner: ModelRunner, requests: list[PreparedRequest]) -> list[Answer | RequestError]:
    """Each request's answer, or its error, from an engine over `runner` that decodes them together."""
    with Engine(runner, TOGETHER) as engine:
        return list(answer_all(engine, requests))
