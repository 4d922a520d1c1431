"""The local engine: tasks in this process, or in a pool of worker processes on this machine."""

from __future__ import annotations

import itertools
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from shardkit.errors import WorkerError


def available_cores() -> int:
    """Cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def run_local(runner: Callable[[Any], Any], tasks: Iterable[Any], workers: int) -> Iterator[Any]:
    """Run tasks with ``workers`` processes (1, or a single task: in this process), at most ``2 * workers`` in
    flight.

    Worker processes are forked where the platform allows it, so whatever the
    runner prepared in this process (the tokenizer) is shared, not reloaded.
    A worker that dies (killed, out of memory) stops the run with :class:`WorkerError`;
    the tasks finished before are kept.
    """
    tasks = iter(tasks)
    first = list(itertools.islice(tasks, 2))
    if workers <= 1 or len(first) < 2:  # no process started for one task
        yield from map(runner, itertools.chain(first, tasks))
        return
    tasks = itertools.chain(first, tasks)
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pending: set[Future] = set()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
        try:
            while True:
                while len(pending) < 2 * workers and (task := next(tasks, None)) is not None:
                    pending.add(pool.submit(runner, task))
                if not pending:
                    return
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()
        except BrokenProcessPool:
            raise WorkerError(
                "a build worker process died (killed, or out of memory?); the finished tasks are kept: run the "
                "same command again to resume (with fewer --workers if memory is short)"
            ) from None
        except BaseException:
            for future in pending:
                future.cancel()
            raise
