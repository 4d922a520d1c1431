"""The build folder: claimed at the start, resumed after a crash, assembled at the end.

::

    build.json          written first: the identity of the build (options, input and tokenizer hashes)
    _progress/task-N.json   one per finished task: its shards with sample locations, rejects, counts, the
                        image files it read (kept after the build: a rerun re-checks them)
    shard-TTTTTT-PPP.tar    the shards (each published atomically)
    rejects.jsonl, shard_stats.jsonl, index.parquet
    errors.log          only after an internal error (a bug): the first traceback
    manifest.json       written last: the build is complete

Only these files are ever deleted (by ``--overwrite`` or cleanup); anything
else in the folder is left alone. The folder is locked while a build runs.

A task's result file is written after its shards, so a result that exists
names shards that are complete. Assembly streams the result files in task
order, so the memory it needs does not grow with the number of samples.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

from pydantic import ValidationError

from shardkit.errors import OutputError
from shardkit.shards.index import INDEX_NAME, IndexWriter
from shardkit.shards.manifest import MANIFEST_NAME, BuildInfo, IndexFile, Manifest, ShardEntry, VideoSettings
from shardkit.shards.task import SHARD_NAME, TaskRecord, TaskResult
from shardkit.storage import PARTIAL_SUFFIX, atomic_write, is_local, join, write_bytes

logger = logging.getLogger(__name__)

BUILD_FILE = "build.json"
PROGRESS_DIR = "_progress"
REJECTS_FILE = "rejects.jsonl"
SHARD_STATS_FILE = "shard_stats.jsonl"
ERRORS_LOG = "errors.log"
READERS = 16  # threads reading task results
OWN_FILES = (BUILD_FILE, MANIFEST_NAME, INDEX_NAME, REJECTS_FILE, SHARD_STATS_FILE, ERRORS_LOG)
# what a folder holds, by its identity's kind (a build's identity names none)
_KINDS = {"build": "a shardkit build", "image_embeddings": "shardkit image embeddings"}

R = TypeVar("R", bound=TaskRecord)


def claim(
    fs: Any, folder: str, identity: dict[str, Any], *, overwrite: bool, manifest_name: str = MANIFEST_NAME
) -> bool:
    """Make ``folder`` ready for the build ``identity``; True when it already holds it complete (its
    ``manifest_name``: a build's manifest, or an embeddings folder's).

    A new or empty folder is claimed with ``build.json``. A folder holding a
    build with the same identity is resumed (or found complete); a different
    identity is refused unless ``overwrite``; anything else is refused.
    """
    build_file = join(folder, BUILD_FILE)
    if fs.exists(folder) and fs.ls(folder, detail=False):
        if not fs.exists(build_file):
            raise OutputError(f"{folder} exists and is not a shardkit build; choose a new or empty folder")
        with fs.open(build_file, "rb") as f:
            previous = json.loads(f.read()).get("identity", {})
        if (held := previous.get("kind", "build")) != (wanted := identity.get("kind", "build")):
            raise OutputError(
                f"{folder} holds {_KINDS.get(held, held)}, not {_KINDS.get(wanted, wanted)}: --overwrite "
                "replaces only a folder of the same kind; choose another folder"
            )
        if previous == identity and not overwrite:
            return fs.exists(join(folder, manifest_name))
        if previous != identity and not overwrite:
            changed = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
            raise OutputError(
                f"{folder} holds a build made with other options or input (changed: {', '.join(changed)}); "
                "pass --overwrite to replace it, or choose another folder"
            )
        _remove_build(fs, folder, manifest_name)
    fs.makedirs(folder, exist_ok=True)
    write_bytes(fs, build_file, json.dumps({"identity": identity}, sort_keys=True, indent=2).encode())
    return False


def _remove_build(fs: Any, folder: str, manifest_name: str = MANIFEST_NAME) -> None:
    """Delete the files the build in ``folder`` recorded as its own, and nothing else.

    Those are the fixed files (``build.json``, the manifest, ...), the shards
    named in the manifest or in a task's result, the results, and ``.partial``
    files of those names or of a shard's exact name (``shard-000003-000.tar.partial``).
    The manifest goes first and ``build.json`` last, so an interruption leaves
    an incomplete build, never a manifest naming deleted shards.
    """
    own = _own_names(fs, folder, manifest_name)
    present = {_name(e["name"]): e["name"] for e in fs.ls(folder, detail=True) if e["type"] == "file"}
    doomed = [name for name in present if _is_own(name, own) and name != BUILD_FILE]
    for name in sorted(doomed, key=lambda name: name != manifest_name):
        fs.rm_file(present[name])
    if fs.exists(join(folder, PROGRESS_DIR)):
        fs.rm(join(folder, PROGRESS_DIR), recursive=True)
    if BUILD_FILE in present:
        fs.rm_file(present[BUILD_FILE])


def _name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _own_names(fs: Any, folder: str, manifest_name: str = MANIFEST_NAME) -> set[str]:
    """Names of the files the build recorded: the fixed ones, the manifest's shards and the task results' shards."""
    names = {*OWN_FILES, manifest_name}
    manifest = join(folder, manifest_name)
    if fs.exists(manifest):
        try:
            names.update(_name(s["path"]) for s in _read_json(fs, manifest).get("shards", []))
        except (ValueError, KeyError, TypeError, AttributeError):  # a damaged manifest names nothing
            pass
    for result in _all_results(fs, folder, TaskRecord):
        if result is not None:
            names.update(s.path for s in result.shards)
    return names


def _progress_path(folder: str, index: int) -> str:
    return join(folder, PROGRESS_DIR, f"task-{index:06d}.json")


def save_result(fs: Any, folder: str, result: TaskRecord) -> None:
    """Record a finished task (after its shards are published)."""
    write_bytes(fs, _progress_path(folder, result.index), result.to_json())


def _all_results(fs: Any, folder: str, model: type[R]) -> Iterator[R | None]:
    """Every task result in the folder, in task order (None for a file that is not a ``model``)."""
    progress = join(folder, PROGRESS_DIR)
    if not fs.exists(progress):
        return iter(())
    paths = [p for p in fs.ls(progress, detail=False) if _name(p).startswith("task-") and p.endswith(".json")]
    return _read_all(fs, sorted(paths), model)


def check_tasks(fs: Any, folder: str, still_valid: Callable[[R], bool], model: type[R]) -> tuple[set[int], list[R]]:
    """The finished tasks (their ``model`` result exists and their shards are present at their recorded size),
    and the results of those ``still_valid`` refuses (their images changed): these are to be built again.

    A result file this version cannot read is not a finished task: the task is built again and its file replaced.
    """
    fs.invalidate_cache()  # object-store listings are cached; workers wrote since
    sizes = {_name(p["name"]): p["size"] for p in fs.ls(folder, detail=True)}
    done, stale = set(), []
    for result in _all_results(fs, folder, model):
        if result is None or not all(sizes.get(s.path) == s.bytes for s in result.shards):
            continue
        if still_valid(result):
            done.add(result.index)
        else:
            stale.append(result)
    return done, stale


def forget_task(fs: Any, folder: str, result: TaskRecord) -> None:
    """Delete a finished task's result and then its shards, so it is built again (the manifest must be gone)."""
    fs.rm_file(_progress_path(folder, result.index))
    for shard in result.shards:
        path = join(folder, shard.path)
        if fs.exists(path):
            fs.rm_file(path)


def unclaim_manifest(fs: Any, folder: str) -> None:
    """Delete the manifest: the build becomes incomplete, so its stale tasks can be redone."""
    if fs.exists(join(folder, MANIFEST_NAME)):
        fs.rm_file(join(folder, MANIFEST_NAME))


@contextmanager
def lock(fs: Any, folder: str) -> Iterator[None]:
    """Hold the build folder for this process (an exclusive ``flock`` on the local folder itself).

    A second build into the same folder at the same time is refused with
    :class:`OutputError`. Object stores have no such lock; there, run one
    build per prefix.
    """
    if not is_local(fs):
        yield
        return
    os.makedirs(folder, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(
                f"{folder} is being written by another shardkit build right now; wait for it to finish "
                "(then run the same command to complete or reuse it), or choose another folder"
            ) from None
        yield
    finally:
        os.close(fd)


def _read_json(fs: Any, path: str) -> dict[str, Any]:
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


def _read_result(fs: Any, path: str, model: type[R]) -> R | None:
    """The task result at ``path``; None (logged) when it is not a valid ``model``."""
    with fs.open(path, "rb") as f:
        data = f.read()
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        logger.warning("%s is not a task result this version reads (%s)", path, exc.errors()[0]["msg"])
        return None


def _read_all(fs: Any, paths: list[str], model: type[R]) -> Iterator[R | None]:
    """The results at ``paths``, in order, read a window at a time by a few threads (object stores are slow
    one request at a time, and a large build has a hundred thousand of them)."""
    with ThreadPoolExecutor(READERS) as pool:
        for start in range(0, len(paths), 4 * READERS):
            yield from pool.map(lambda path: _read_result(fs, path, model), paths[start : start + 4 * READERS])


def task_results(fs: Any, folder: str, tasks: int, model: type[R]) -> Iterator[R]:
    """The saved results of tasks ``0 .. tasks - 1``, in order; :class:`OutputError` naming an unreadable one."""
    for index, result in enumerate(_read_all(fs, [_progress_path(folder, i) for i in range(tasks)], model)):
        if result is None:
            raise OutputError(f"{_progress_path(folder, index)} is not a valid task result; run the build again")
        yield result


def assemble(
    fs: Any,
    folder: str,
    tasks: int,
    *,
    records: int,
    format: str,
    config: BuildInfo,
    created_by: str,
    video: VideoSettings | None = None,
) -> Manifest:
    """Write rejects, shard stats, the index and, last, the manifest, from the results of ``tasks`` tasks;
    ``video``, the build's video settings, is recorded where the build holds videos."""
    counts: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    entries: list[ShardEntry] = []
    with (
        atomic_write(fs, join(folder, REJECTS_FILE)) as rejects,
        atomic_write(fs, join(folder, SHARD_STATS_FILE)) as stats,
        atomic_write(fs, join(folder, INDEX_NAME)) as index_file,
    ):
        index = IndexWriter(index_file)
        for result in task_results(fs, folder, tasks, TaskResult):
            for reject in result.rejects:
                rejects.write(json.dumps(reject).encode() + b"\n")
                codes[reject["code"]] += 1
            for shard in result.shards:
                entry = shard.entry()
                index.add(len(entries), shard.locations, shard.tokens)
                entries.append(entry)
                task = {"task": result.index, "task_records": result.records, "task_rejects": len(result.rejects)}
                stats.write(json.dumps({**entry.model_dump(), **task, "task_seconds": result.seconds}).encode() + b"\n")
            counts.update(
                images=result.images,
                videos=result.videos,
                video_frames=result.video_frames,
                tokens=result.tokens,
                trained_tokens=result.trained_tokens,
                trained_turns=result.trained_turns,
                fitted=result.fitted,
                truncated=result.truncated,
                boxes=result.boxes,
                points=result.points,
                text_boxes=result.text_boxes,
            )
        index_entry = index.close()
    manifest = Manifest(
        format=format,
        num_records=records,
        num_samples=sum(e.num_samples for e in entries),
        num_images=counts["images"],
        num_tokens=counts["tokens"],
        num_trained_tokens=counts["trained_tokens"],
        num_trained_turns=counts["trained_turns"],
        num_rejected=sum(codes.values()),
        num_fitted=counts["fitted"],
        num_truncated=counts["truncated"],
        num_boxes=counts["boxes"],
        num_points=counts["points"],
        num_text_boxes=counts["text_boxes"],
        rejects_by_code=dict(sorted(codes.items())),
        shards=entries,
        index=IndexFile(**index_entry),
        config=config,
        created_by=created_by,
        num_videos=counts["videos"],
        num_video_frames=counts["video_frames"],
        video=video if counts["videos"] else None,
    )
    manifest.write(fs, folder)
    cleanup(fs, folder)
    return manifest


def cleanup(fs: Any, folder: str) -> None:
    """Remove what a killed run left half-written: ``.partial`` files of the build's own names.

    The task results stay (``_progress/``): a rerun re-checks the images they
    record (:mod:`shardkit.ledger`).
    """
    fs.invalidate_cache()
    entries = fs.ls(folder, detail=True)
    partial = [e["name"] for e in entries if e["type"] == "file" and e["name"].endswith(PARTIAL_SUFFIX)]
    own = _own_names(fs, folder) if partial else set()
    for path in partial:
        if _is_own(_name(path), own):
            fs.rm_file(path)


def _is_own(name: str, own: set[str]) -> bool:
    """Whether the file ``name`` is the build's: a recorded name, or a ``.partial`` of one or of a shard's name."""
    base = name.removesuffix(PARTIAL_SUFFIX)
    return name in own or (name != base and (base in own or SHARD_NAME.fullmatch(base) is not None))
