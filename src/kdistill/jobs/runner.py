"""Running many independent jobs: a bounded thread pool, or fixed-size batches.

:func:`run_concurrent` keeps at most ``concurrency`` calls of ``work`` in flight (one per job, in threads)
and hands each result to ``on_result`` in the calling thread, in completion order, so the caller writes
records and updates progress without locks of its own. ``on_result`` returning true stops the run: no
further job is started, the ones in flight are finished and handed over. On an exception (including
``KeyboardInterrupt``) the pool is shut down without waiting for the calls in flight; their jobs are
simply redone by the next, resumed run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any, TypeVar

__all__ = ["in_batches", "run_concurrent"]

J = TypeVar("J")


def run_concurrent(jobs: Sequence[J], work: Callable[[J], Any], on_result: Callable[[J, Any], Any],
                   concurrency: int, name: str = "job") -> None:
    """``on_result(job, work(job))`` for every job (see the module docstring); an exception raised by
    ``work`` is raised here, from its ``future.result()``. ``name`` prefixes the worker threads' names."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if not jobs:
        return
    pending = iter(jobs)
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=name)
    in_flight: dict = {}

    def submit() -> None:
        job = next(pending, None)
        if job is not None:
            in_flight[pool.submit(work, job)] = job

    finished = False
    try:
        for _ in range(concurrency):
            submit()
        stop = False
        while in_flight:
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in done:
                job = in_flight.pop(future)
                if on_result(job, future.result()):
                    stop = True
                if not stop:
                    submit()
        finished = True
    finally:
        pool.shutdown(wait=finished, cancel_futures=True)


def in_batches(items: Sequence[J], size: int) -> Iterator[list[J]]:
    """Consecutive slices of ``items`` of ``size`` (the last one may be shorter)."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    for start in range(0, len(items), size):
        yield list(items[start:start + size])
