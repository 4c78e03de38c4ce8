"""Dynamic batching: the images of concurrent requests classified together, as Triton and TorchServe do it.

A request hands its decoded images to the batcher and waits. The batcher takes the first waiting request, then
keeps taking requests for up to `window_s` or until `max_images` images are gathered, classifies them in one call
(in a worker thread, off the event loop) and hands each request its rows. It waits only while other requests are
in flight (`in_flight`: received and not yet answered): a lone client pays no window. One batch runs at a time:
on a CPU the classifier already uses every core, and the next batch gathers while this one runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import numpy as np


@dataclass
class _Waiting:
    images: np.ndarray
    answer: asyncio.Future[np.ndarray] = field(repr=False)


class Batcher:
    def __init__(
        self,
        classify: Callable[[np.ndarray], np.ndarray],
        max_images: int,
        window_s: float,
        batch_sizes: Callable[[int], None] = lambda images: None,
        in_flight: Callable[[], int] = lambda: 0,
    ):
        self.classify, self.max_images, self.window_s = classify, max_images, window_s
        self.in_flight = in_flight
        self.batch_sizes = batch_sizes  # told each batch's image count (for /metrics)
        # The queue and its consumer belong to the event loop that made them: a test client may run each
        # request on a loop of its own, and then the batcher starts anew on it.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[_Waiting] = asyncio.Queue()
        self._consumer: asyncio.Task[None] | None = None

    async def classify_batched(self, images: np.ndarray) -> np.ndarray:
        loop = asyncio.get_running_loop()
        if loop is not self._loop or self._consumer is None or self._consumer.done():
            self._loop, self._queue = loop, asyncio.Queue()
            self._consumer = loop.create_task(self._consume())
        waiting = _Waiting(images, loop.create_future())
        await self._queue.put(waiting)
        return await waiting.answer

    async def _consume(self) -> None:
        while True:
            batch = [await self._queue.get()]
            count, deadline = len(batch[0].images), time.monotonic() + self.window_s
            while (
                count < self.max_images
                and (self._queue.qsize() or self.in_flight() > len(batch))
                and (left := deadline - time.monotonic()) > 0
            ):
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), left))
                except TimeoutError:
                    break
                count += len(batch[-1].images)
            await self._run(batch)

    async def _run(self, batch: list[_Waiting]) -> None:
        images = np.concatenate([waiting.images for waiting in batch])
        self.batch_sizes(len(images))
        try:
            probabilities = await anyio.to_thread.run_sync(self.classify, images)
        except Exception as error:  # handed to every request of the batch, which answers 500
            for waiting in batch:
                if not waiting.answer.done():
                    waiting.answer.set_exception(error)
            return
        start = 0
        for waiting in batch:
            if not waiting.answer.done():  # a client that went away cancelled its wait
                waiting.answer.set_result(probabilities[start : start + len(waiting.images)])
            start += len(waiting.images)
