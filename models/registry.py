"""Tasks by name (the model families are in architectures.py)."""

from __future__ import annotations

from attnserve.models.caption_task import CaptionTask
from attnserve.models.image_captions import ImageCaptionTask
from attnserve.models.parallel_text import ParallelTextTask
from attnserve.models.tasks import DatesTask, G2PTask, TextTask

TASKS = {t.name: t for t in (G2PTask, DatesTask, CaptionTask, ParallelTextTask, ImageCaptionTask)}


def task(name: str, **kwargs) -> TextTask:
    """A task by name.

    Raises:
        ValueError: for an unknown name.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
    return TASKS[name](**kwargs)
