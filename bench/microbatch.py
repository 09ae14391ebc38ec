"""An asyncio micro-batcher with Ray Serve's batching policy, for the in-process baseline.

Like `@serve.batch`: the first waiting request opens a batch, which closes at max_batch_size
requests or after the wait window; the model runs synchronously, and the next batch forms only
after the last one finished.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


class MicroBatcher:
    """Groups concurrent `submit()` calls into calls of `run_batch(list) -> list`."""

    def __init__(self, run_batch: Callable[[list], list], max_batch_size: int, wait_timeout_s: float):
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.wait_timeout_s = wait_timeout_s
        self.queue: asyncio.Queue = asyncio.Queue()
        self.worker: asyncio.Task | None = None

    async def submit(self, item: Any) -> Any:
        """Queues one item and returns its result."""
        if self.worker is None:
            self.worker = asyncio.get_running_loop().create_task(self._loop())
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((item, future))
        return await future

    async def _loop(self) -> None:
        while True:
            batch = [await self.queue.get()]
            deadline = time.monotonic() + self.wait_timeout_s
            while len(batch) < self.max_batch_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except TimeoutError:
                    break
            results = self.run_batch([item for item, _ in batch])
            for (_, future), result in zip(batch, results, strict=True):
                future.set_result(result)

    async def close(self) -> None:
        """Stops the worker task."""
        if self.worker is not None:
            self.worker.cancel()
