"""The build folder: claimed at the start, resumed after a crash, assembled at the end.

::

    build.json          written first: the identity of the build (options, input and tokenizer hashes)
    _progress/task-N.json   one per finished task: its shards with sample locations, rejects, counts
    shard-TTTTTT-PPP.tar    the shards (each published atomically)
    rejects.jsonl, shard_stats.jsonl, index.parquet
    manifest.json       written last: the build is complete

A task's result file is written after its shards, so a result that exists
names shards that are complete. Assembly streams the result files in task
order, so the memory it needs does not grow with the number of samples.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from shardkit.errors import OutputError
from shardkit.shards.index import INDEX_NAME, IndexWriter
from shardkit.shards.manifest import MANIFEST_NAME, IndexFile, Manifest, ShardEntry
from shardkit.storage import PARTIAL_SUFFIX, atomic_write, join, write_bytes

BUILD_FILE = "build.json"
PROGRESS_DIR = "_progress"
REJECTS_FILE = "rejects.jsonl"
SHARD_STATS_FILE = "shard_stats.jsonl"
READERS = 16  # threads reading task results


def claim(fs: Any, folder: str, identity: dict[str, Any], *, overwrite: bool) -> bool:
    """Make ``folder`` ready for the build ``identity``; True when it already holds it complete.

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
        if previous == identity and not overwrite:
            return fs.exists(join(folder, MANIFEST_NAME))
        if previous != identity and not overwrite:
            changed = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
            raise OutputError(
                f"{folder} holds a build made with other options or input (changed: {', '.join(changed)}); "
                "pass --overwrite to replace it, or choose another folder"
            )
        _remove_build(fs, folder)
    fs.makedirs(folder, exist_ok=True)
    write_bytes(fs, build_file, json.dumps({"identity": identity}, sort_keys=True, indent=2).encode())
    return False


def _remove_build(fs: Any, folder: str) -> None:
    """Delete the files a shardkit build writes (and nothing else)."""
    for path in fs.ls(folder, detail=False):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name == PROGRESS_DIR:
            fs.rm(path, recursive=True)
        elif name.startswith("shard-") or name in (
            MANIFEST_NAME,
            INDEX_NAME,
            REJECTS_FILE,
            SHARD_STATS_FILE,
            BUILD_FILE,
        ):
            fs.rm(path)


def _progress_path(folder: str, index: int) -> str:
    return join(folder, PROGRESS_DIR, f"task-{index:06d}.json")


def save_result(fs: Any, folder: str, result: dict[str, Any]) -> None:
    """Record a finished task (after its shards are published)."""
    write_bytes(fs, _progress_path(folder, result["index"]), json.dumps(result).encode())


def finished_tasks(fs: Any, folder: str) -> set[int]:
    """Tasks whose result exists and whose shards are all present at their recorded size."""
    fs.invalidate_cache()  # object-store listings are cached; workers wrote since
    sizes = {p["name"].rstrip("/").rsplit("/", 1)[-1]: p["size"] for p in fs.ls(folder, detail=True)}
    progress = join(folder, PROGRESS_DIR)
    if not fs.exists(progress):
        return set()
    paths = [p for p in fs.ls(progress, detail=False) if p.rstrip("/").rsplit("/", 1)[-1].startswith("task-")]
    return {
        result["index"]
        for result in _read_all(fs, sorted(paths))
        if all(sizes.get(s["path"]) == s["bytes"] for s in result["shards"])
    }


def _read_json(fs: Any, path: str) -> dict[str, Any]:
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


def _read_all(fs: Any, paths: list[str]) -> Iterator[dict[str, Any]]:
    """The JSON files at ``paths``, in order, read a window at a time by a few threads (object stores are slow
    one request at a time, and a large build has a hundred thousand of them)."""
    with ThreadPoolExecutor(READERS) as pool:
        for start in range(0, len(paths), 4 * READERS):
            yield from pool.map(lambda path: _read_json(fs, path), paths[start : start + 4 * READERS])


def task_results(fs: Any, folder: str, tasks: int) -> Iterator[dict[str, Any]]:
    """The saved results of tasks ``0 .. tasks - 1``, in order."""
    return _read_all(fs, [_progress_path(folder, index) for index in range(tasks)])


def assemble(
    fs: Any, folder: str, tasks: int, *, records: int, format: str, config: dict[str, Any], created_by: str
) -> Manifest:
    """Write rejects, shard stats, the index and, last, the manifest, from the results of ``tasks`` tasks."""
    counts: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    entries: list[ShardEntry] = []
    with (
        atomic_write(fs, join(folder, REJECTS_FILE)) as rejects,
        atomic_write(fs, join(folder, SHARD_STATS_FILE)) as stats,
        atomic_write(fs, join(folder, INDEX_NAME)) as index_file,
    ):
        index = IndexWriter(index_file)
        for result in task_results(fs, folder, tasks):
            for reject in result["rejects"]:
                rejects.write(json.dumps(reject).encode() + b"\n")
                codes[reject["code"]] += 1
            for shard in result["shards"]:
                entry = ShardEntry(**{k: v for k, v in shard.items() if k in ShardEntry.model_fields})
                index.add(len(entries), shard["locations"], shard["tokens"])
                entries.append(entry)
                task = {
                    "task": result["index"],
                    "task_records": result["records"],
                    "task_rejects": len(result["rejects"]),
                }
                stats.write(
                    json.dumps({**entry.model_dump(), **task, "task_seconds": result["seconds"]}).encode() + b"\n"
                )
            counts.update({k: result[k] for k in ("images", "tokens", "trained_tokens", "fitted", "truncated")})
        index_entry = index.close()
    manifest = Manifest(
        format=format,
        num_records=records,
        num_samples=sum(e.num_samples for e in entries),
        num_images=counts["images"],
        num_tokens=counts["tokens"],
        num_trained_tokens=counts["trained_tokens"],
        num_rejected=sum(codes.values()),
        num_fitted=counts["fitted"],
        num_truncated=counts["truncated"],
        rejects_by_code=dict(sorted(codes.items())),
        shards=entries,
        index=IndexFile(**index_entry),
        config=config,
        created_by=created_by,
    )
    manifest.write(fs, folder)
    cleanup(fs, folder)
    return manifest


def cleanup(fs: Any, folder: str) -> None:
    """Remove the progress records and any partial file a killed run left behind."""
    fs.invalidate_cache()
    if fs.exists(join(folder, PROGRESS_DIR)):
        fs.rm(join(folder, PROGRESS_DIR), recursive=True)
    for path in fs.ls(folder, detail=False):
        if path.endswith(PARTIAL_SUFFIX):
            fs.rm(path)
