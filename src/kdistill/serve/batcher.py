"""Concurrent requests batched into one forward: an asyncio queue of items and one worker that collects them.

The worker takes the first waiting item, then keeps collecting for up to `wait_s` seconds, or until the batch
holds `max_batch_size` items or one more would make it cost more than `max_batch_tokens` (cost = items x the
longest item, what a right-padded batch holds; an item over the budget on its own still runs, alone). It runs
`run_batch(items) -> results` in one worker thread, so the event loop keeps accepting requests meanwhile, and
hands each caller its own result. While a batch runs, new items queue up and form the next one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

__all__ = ["Batcher"]

logger = logging.getLogger(__name__)


@dataclass
class _Pending:
    item: Any
    length: int
    future: asyncio.Future


class Batcher:
    """Queue items from concurrent requests; run them in batches through `run_batch` in one worker thread."""

    def __init__(self, run_batch: Callable[[list], list], *, max_batch_size: int = 32, max_batch_tokens: int = 16384,
                 wait_s: float = 0.005):
        if max_batch_size < 1 or max_batch_tokens < 1 or wait_s < 0:
            raise ValueError("max_batch_size and max_batch_tokens must be >= 1 and wait_s >= 0")
        self.run_batch = run_batch
        self.max_batch_size, self.max_batch_tokens, self.wait_s = max_batch_size, max_batch_tokens, wait_s
        self.batches = 0  # batches run (one forward each)
        self.items = 0  # items answered in them
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._held: _Pending | None = None  # the item that did not fit the last batch: first of the next

    async def submit(self, items: Sequence, lengths: Sequence[int]) -> list:
        """The results of `items` (each with its token length), in order; raises what `run_batch` raised."""
        self._ensure_worker()
        loop = asyncio.get_running_loop()
        pending = [_Pending(item, length, loop.create_future()) for item, length in zip(items, lengths)]
        for p in pending:
            self._queue.put_nowait(p)
        return list(await asyncio.gather(*(p.future for p in pending)))

    def _ensure_worker(self) -> None:
        loop = asyncio.get_running_loop()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdistill-serve")
        if self._task is None or self._task.done() or self._loop is not loop:
            self._loop, self._queue, self._held = loop, asyncio.Queue(), None
            self._task = loop.create_task(self._work())

    async def close(self) -> None:
        """Stop the worker (pending callers are cancelled) and its thread; a later `submit` starts them again."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            batch = [p for p in batch if not p.future.done()]  # callers that went away
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self._executor, self.run_batch, [p.item for p in batch])
            except asyncio.CancelledError:
                for p in batch:
                    p.future.cancel()
                raise
            except Exception as exc:  # one failed batch fails its callers, never the worker
                logger.exception("batch of %d failed", len(batch))
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            self.batches += 1
            self.items += len(batch)
            for p, result in zip(batch, results):
                if not p.future.done():
                    p.future.set_result(result)

    async def _collect(self) -> list[_Pending]:
        first = self._held or await self._queue.get()
        self._held = None
        batch, longest = [first], first.length
        deadline = asyncio.get_running_loop().time() + self.wait_s
        while len(batch) < self.max_batch_size:
            try:
                nxt = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                try:
                    nxt = await asyncio.wait_for(self._queue.get(), left)
                except asyncio.TimeoutError:
                    break
            if max(longest, nxt.length) * (len(batch) + 1) > self.max_batch_tokens:
                self._held = nxt
                break
            batch.append(nxt)
            longest = max(longest, nxt.length)
        return batch
