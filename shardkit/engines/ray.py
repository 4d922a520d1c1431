"""The Ray engine: the same tasks on a Ray cluster (``pip install 'shardkit[ray]'``).

Every node must have shardkit installed (or ship it with a Ray runtime
environment), and the output must be storage all nodes reach: an object store
URL (``s3://...``) or a shared file system.

A cluster with token authentication is reached the way Ray documents: set
``RAY_AUTH_MODE=token`` and the token in ``RAY_AUTH_TOKEN``, in the file named by
``RAY_AUTH_TOKEN_PATH``, or in ``~/.ray/auth_token``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from shardkit.errors import ConfigError, WorkerError


def _call(runner: Callable[[Any], Any], task: Any) -> Any:
    return runner(task)


def _refused_for_auth(exc: BaseException | None, auth_error: type[BaseException]) -> bool:
    """Whether ``exc`` comes from Ray's token authentication: an ``auth_error`` in its chain, or Ray's message for
    a refused token in the text of one (the driver's connection retries keep only that text)."""
    while exc is not None:
        if isinstance(exc, auth_error) or "InvalidAuthToken" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _auth_refused(address: str | None) -> str:
    """The one-line message for a cluster that did not accept this driver (no token, or not its token)."""
    where = address or os.environ.get("RAY_ADDRESS") or "the local cluster"
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return (
            f"the Ray cluster at {where} requires token authentication: set RAY_AUTH_MODE=token and the cluster's "
            "token in RAY_AUTH_TOKEN, in a file named by RAY_AUTH_TOKEN_PATH, or in ~/.ray/auth_token"
        )
    return (
        f"the Ray cluster at {where} did not accept this driver's token: put the cluster's token in RAY_AUTH_TOKEN, "
        "in a file named by RAY_AUTH_TOKEN_PATH, or in ~/.ray/auth_token"
    )


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
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        except (ray.exceptions.AuthenticationError, ConnectionError) as exc:
            if not _refused_for_auth(exc, ray.exceptions.AuthenticationError):
                raise
            raise ConfigError(_auth_refused(address)) from None
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
