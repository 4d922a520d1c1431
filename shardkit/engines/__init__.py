"""Where build tasks run: in this process or a local process pool (``local``), or on a Ray cluster (``ray``).

An engine takes a picklable task runner and an iterator of tasks and yields
their results as they finish, in any order; it keeps only a bounded number of
tasks in flight, so the input streams through. The shards do not depend on
the engine or the number of workers: a task's output depends on its records
alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from shardkit.errors import ConfigError

ENGINES = ("local", "ray")


def run_tasks(
    runner: Callable[[Any], Any],
    tasks: Iterable[Any],
    *,
    engine: str = "local",
    workers: int = 1,
    ray_address: str | None = None,
) -> Iterator[Any]:
    """Results of ``runner(task)`` for every task, as they finish."""
    if engine == "local":
        from shardkit.engines.local import run_local

        return run_local(runner, tasks, workers)
    if engine == "ray":
        from shardkit.engines.ray import run_ray

        return run_ray(runner, tasks, address=ray_address, max_in_flight=2 * max(workers, 1))
    raise ConfigError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
