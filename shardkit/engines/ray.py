"""The Ray engine: the same tasks on a Ray cluster (``pip install 'shardkit[ray]'``).

Every node must have shardkit installed (or ship it with a Ray runtime
environment), and the output must be storage all nodes reach: an object store
URL (``s3://...``) or a shared file system.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from shardkit.errors import ConfigError, WorkerError


def _call(runner: Callable[[Any], Any], task: Any) -> Any:
    return runner(task)


def run_ray(
    runner: Callable[[Any], Any], tasks: Iterable[Any], *, address: str | None, max_in_flight: int
) -> Iterator[Any]:
    """Run tasks as Ray tasks on the cluster at ``address`` (None: ``RAY_ADDRESS`` or a local cluster)."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--engine ray needs Ray: pip install 'shardkit[ray]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    remote = ray.remote(num_cpus=1, max_retries=2)(_call)
    runner_ref = ray.put(runner)
    tasks = iter(tasks)
    pending: list[Any] = []
    try:
        while True:
            while len(pending) < max_in_flight and (task := next(tasks, None)) is not None:
                pending.append(remote.remote(runner_ref, task))
            if not pending:
                return
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                yield ray.get(ref)
    except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError) as exc:
        raise WorkerError(
            f"a Ray worker died ({type(exc).__name__}); the finished tasks are kept: run the same command again "
            "to resume"
        ) from None
    except BaseException:
        for ref in pending:
            ray.cancel(ref)
        raise
    finally:
        if started_here:
            ray.shutdown()
