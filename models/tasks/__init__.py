"""Tasks by name, one module each (the model families are in models/architectures.py)."""

from __future__ import annotations

from attnserve.models.tasks.base import TextTask
from attnserve.models.tasks.caption import CaptionTask
from attnserve.models.tasks.dates import DatesTask
from attnserve.models.tasks.g2p import G2PTask
from attnserve.models.tasks.image_captions import ImageCaptionTask
from attnserve.models.tasks.parallel_text import ParallelTextTask

TASKS = {t.name: t for t in (G2PTask, DatesTask, CaptionTask, ParallelTextTask, ImageCaptionTask)}


def task(name: str, **kwargs) -> TextTask:
    """A task by name.

    Raises:
        ValueError: for an unknown name.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
    return TASKS[name](**kwargs)
