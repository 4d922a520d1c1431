"""The build directs the stages; each stage lives in its own module. In the order they run:

1. open the input (:mod:`shardkit.inputs`), hash and count it and, with ``dedup``, find its duplicate records
   (:mod:`shardkit.dedup`), once for both splits of a train/val build;
2. claim the build folder (:mod:`shardkit.shards.folder`): a new build, or a resumed one whose finished tasks
   still stand (their image files unchanged);
3. cut the input into tasks of ``samples_per_shard`` consecutive records (the other split's records skipped) and
   run them (:mod:`shardkit.engines`: this process, a pool of worker processes or a Ray cluster); a task converts
   each record (:mod:`shardkit.convert`: read, check, render, images) and writes its shards
   (``shard-TTTTTT-PPP``, more than one part only when ``max_shard_bytes`` is reached), rejects collected. An
   input of fewer tasks than workers is converted in slices of its tasks on the workers, each task written here
   from its slices' samples in order (:func:`plan_slices`);
4. assemble the manifest, the rejects, the index and the statistics from the saved task results, the manifest
   last.

Shard boundaries follow input order alone, so the shards are byte-identical whatever runs them. A finished task
is recorded in the build folder, so a build killed at any point resumes by skipping the recorded tasks.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from shardkit import __version__
from shardkit.config import BuildConfig, BuildRun
from shardkit.convert import INTERNAL_ERROR, Converter, image_root
from shardkit.dedup import DuplicateScan, find_duplicates
from shardkit.engines import run_tasks
from shardkit.errors import ConfigError, OutputError, RecordError, ShardkitError
from shardkit.images import ImageRoot
from shardkit.inputs import InputFormat, RawItem, open_input
from shardkit.inputs.base import hash_files
from shardkit.ledger import Ledger, changed_images
from shardkit.render import Renderer
from shardkit.shards import WRITERS, Manifest, Sample, read_manifest
from shardkit.shards.folder import (
    ERRORS_LOG,
    assemble,
    check_tasks,
    claim,
    forget_task,
    lock,
    save_result,
    unclaim_manifest,
)
from shardkit.shards.manifest import BuildInfo, SpecialTokens, VideoSettings
from shardkit.shards.task import TaskResult, TaskShardWriter
from shardkit.storage import join, open_fs, write_bytes
from shardkit.tokenizer import TokenizerInfo, load_fast_tokenizer
from shardkit.words import counted

logger = logging.getLogger(__name__)

SPLITS = ("train", "val")


@dataclass(frozen=True)
class Task:
    """Consecutive input items that become one shard (or a few parts of one)."""

    index: int
    items: list[RawItem]


def split_of(item: RawItem, val_fraction: float) -> str:
    """``"val"`` or ``"train"``, from a hash of the item's content: a record stays on its side as the input grows."""
    return "val" if int.from_bytes(item.digest()[:8], "big") / 2**64 < val_fraction else "train"


def iter_tasks(items: Iterable[RawItem], records_per_task: int) -> Iterator[Task]:
    """Cut the items into tasks of ``records_per_task``, streaming."""
    batch: list[RawItem] = []
    index = 0
    for raw in items:
        batch.append(raw)
        if len(batch) == records_per_task:
            yield Task(index, batch)
            index, batch = index + 1, []
    if batch:
        yield Task(index, batch)


def run_task(
    task: Task,
    convert: Converter,
    fs: Any,
    folder: str,
    *,
    strict: bool = False,
    on_record: Callable[[bool], None] | None = None,
) -> TaskResult:
    """Convert a task's records and write its shard parts; rejected records are collected, not fatal."""
    result = TaskResult(index=task.index)
    started = time.perf_counter()
    write_task(result, task.items, _converted(task.items, convert, result.read), convert, fs, folder, strict, on_record)
    result.seconds = round(time.perf_counter() - started, 3)
    return result


def _converted(items: Iterable[RawItem], convert: Converter, ledger: Ledger) -> Iterator[Sample | RecordError]:
    """Each item's sample, or the :class:`RecordError` that rejects it, in order; images read noted in ``ledger``."""
    for raw in items:
        try:
            yield convert(raw, ledger)
        except RecordError as exc:
            yield exc


def write_task(
    result: TaskResult,
    items: list[RawItem],
    outcomes: Iterable[Sample | RecordError],
    convert: Converter,
    fs: Any,
    folder: str,
    strict: bool,
    on_record: Callable[[bool], None] | None = None,
) -> None:
    """Write the samples of a task's ``outcomes`` (one per item, in order) into its shard parts, the rejects and
    counts into ``result``. The parts depend on the sample sequence alone, wherever the samples were made."""
    config = convert.config
    writer = TaskShardWriter(fs, folder, result.index, WRITERS[config.format.value], config.max_shard_bytes)
    with writer:
        for raw, outcome in zip(items, outcomes, strict=True):
            result.records += 1
            if isinstance(outcome, RecordError):
                if strict:
                    raise outcome
                _reject(result, outcome, f"{convert.input.unit_of(raw)} {raw.number}")
            else:
                writer.write(outcome)
                result.add(outcome)
            if on_record:
                on_record(not isinstance(outcome, RecordError))
        result.shards = writer.close()


def _reject(result: TaskResult, exc: RecordError, where: str) -> None:
    """Add a rejected record to ``result``; the first internal error's traceback is kept, ``where`` named."""
    reject = exc.to_json()
    if (trace := reject.pop("traceback", None)) and result.traceback is None:
        result.traceback = f"{where}:\n{trace}"
    result.rejects.append(reject)


@functools.lru_cache(maxsize=1)
def converter_for(config: BuildConfig) -> Converter:
    """The converter of ``config``, built once per process for the build being run (forked workers inherit the
    one the build made before starting them)."""
    return Converter(config, load_fast_tokenizer(config.tokenizer_name)[0])


@dataclass(frozen=True)
class TaskRunner:
    """Runs one task wherever the engine puts it (picklable: a worker builds its converter once)."""

    config: BuildConfig
    strict: bool = False

    def __call__(self, task: Task, on_record: Callable[[bool], None] | None = None) -> TaskResult:
        fs, folder = open_fs(self.config.out)
        return run_task(task, converter_for(self.config), fs, folder, strict=self.strict, on_record=on_record)


@dataclass(frozen=True)
class Slice:
    """Consecutive records of one task, converted apart from the rest of it (see :func:`plan_slices`)."""

    task: int
    index: int
    items: list[RawItem]


@dataclass
class Converted:
    """A slice's records converted: a sample or the error rejecting it, one per record, and the images read."""

    task: int
    index: int
    outcomes: list[Sample | RecordError]
    read: Ledger
    seconds: float


@dataclass(frozen=True)
class SliceRunner:
    """Converts one slice wherever the engine puts it; its task's shards are written where the slices meet."""

    config: BuildConfig

    def __call__(self, piece: Slice) -> Converted:
        started, read = time.perf_counter(), {}
        outcomes = list(_converted(piece.items, converter_for(self.config), read))
        return Converted(piece.task, piece.index, outcomes, read, time.perf_counter() - started)


def plan_slices(tasks: list[Task], workers: int) -> list[Slice]:
    """``tasks``, too few to keep ``workers`` busy, cut into about ``2 * workers`` slices of consecutive records
    (two a worker, so that slices of unequal cost even out). Only the conversion is cut: each task's shards are
    still written from its samples in order, so the bytes do not depend on the slices."""
    per_task = -(-2 * workers // max(len(tasks), 1))
    out = []
    for task in tasks:
        size = -(-len(task.items) // per_task)
        out += [Slice(task.index, i, task.items[start : start + size])
                for i, start in enumerate(range(0, len(task.items), size))]  # fmt: skip
    return out


class InputScan:
    """What a build learns of its input before converting it, each looked up at most once (the two splits of a
    train/val build share one scan): the sha256 of its files, its record count and, with ``--dedup``, its
    duplicates (counted and found in the same pass)."""

    def __init__(self, source: InputFormat, config: BuildConfig):
        self.source = source
        self.images = image_root(config, source) if config.dedup else None

    @functools.cached_property
    def sha256(self) -> str:
        return hash_files(self.source.files())

    @functools.cached_property
    def _dedup(self) -> DuplicateScan | None:
        return None if self.images is None else find_duplicates(self.source, self.images)

    @functools.cached_property
    def records(self) -> int:
        return self.source.count() if self._dedup is None else self._dedup.records

    @property
    def duplicates(self) -> dict[int, int]:
        return {} if self._dedup is None else self._dedup.duplicates


def _absolute_paths(config: BuildConfig) -> dict[str, str]:
    paths = {"input": config.input, "out": config.out, "image_root": config.image_root}
    return {k: os.path.abspath(v) for k, v in paths.items() if v and "://" not in v}


def _identity(config: BuildConfig, input_sha256: str, tokenizer: TokenizerInfo) -> dict[str, Any]:
    """What decides a build's bytes: options, input, tokenizer, image folder (recorded, and compared on reuse)."""
    return {
        **config.identity(),
        "input_sha256": input_sha256,
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "family": config.family.manifest_entry(),
        "image_root": config.image_root
        and (config.image_root if "://" in config.image_root else os.path.abspath(config.image_root)),
    }


def build(config: BuildConfig, **options: Any) -> Manifest:
    """Build shards and the manifest from ``config.input`` into ``config.out``.

    Rejected records are written to ``rejects.jsonl`` and do not stop the
    build unless ``strict``, where the first one raises :class:`RecordError`.
    ``options`` are the fields of :class:`~shardkit.config.BuildRun` (how the
    build runs; the command line's defaults): ``workers`` processes (default:
    all cores) with ``engine="local"``, or Ray tasks with ``engine="ray"``;
    ``progress`` shows a progress bar (None: when stderr is a terminal).
    """
    if config.val_fraction is not None and config.split is None:
        raise ConfigError("a build with val_fraction makes one split at a time: use build_train_val")
    run = BuildRun.create(**options)
    with fatal_os_errors():
        config, source = _open(config, run)
        return _build_split(config, source, InputScan(source, config), run)


def build_train_val(config: BuildConfig, **options: Any) -> dict[str, Manifest]:
    """Build ``OUT/train`` and ``OUT/val`` from one input, split by ``config.val_fraction`` (see :func:`split_of`);
    ``options`` are :func:`build`'s. The input is hashed, counted and deduplicated once for both."""
    if config.val_fraction is None:
        raise ConfigError("build_train_val needs val_fraction")
    run = BuildRun.create(**options)
    with fatal_os_errors():
        config, source = _open(config, run)
        scan = InputScan(source, config)
        splits = {split: config.model_copy(update={"out": join(config.out, split), "split": split}) for split in SPLITS}
        return {split: _build_split(splits[split], source, scan, run) for split in SPLITS}


def _open(config: BuildConfig, run: BuildRun) -> tuple[BuildConfig, InputFormat]:
    """The input, and the config with its detected form (workers need not detect it again) and, for remote
    workers, absolute paths (they do not share this process's working directory)."""
    if run.engine != "local":
        config = config.model_copy(update=_absolute_paths(config))
    source = open_input(config.input, config.input_format, **config.input_options())
    return config.model_copy(update={"input_format": source.name}), source


def _build_split(config: BuildConfig, source: InputFormat, scan: InputScan, run: BuildRun) -> Manifest:
    """One build (one split of a train/val build) into ``config.out``, holding its folder's lock."""
    fs, folder = open_fs(config.out)
    with lock(fs, folder):
        tokenizer, tokenizer_info = load_fast_tokenizer(config.tokenizer_name)
        identity = _identity(config, scan.sha256, tokenizer_info)
        complete = claim(fs, folder, identity, overwrite=run.overwrite)
        convert = converter_for(config)  # built here, so forked workers share it
        done = _finished_tasks(fs, folder, convert.root, complete)
        if done is None:
            logger.info("%s already holds this complete build; nothing to do", config.out)
            return read_manifest(config.out)
        tasks = _run_tasks(fs, folder, SplitTasks(source, config, scan.duplicates, done), scan, run)
        info = _build_info(identity, tokenizer_info, convert.renderer, tokenizer.pad_token_id)
        return _assemble(fs, folder, config, tasks, info, _video_settings(convert))


def _finished_tasks(fs: Any, folder: str, root: ImageRoot, complete: bool) -> set[int] | None:
    """The tasks finished by an earlier run that still stand (None: the build is complete and stands); the
    others' results and shards are removed, to be built again."""
    done, stale = check_tasks(fs, folder, lambda result: _still_valid(result, root), TaskResult)
    if complete and not stale:
        return None
    if stale:
        logger.info("%d finished tasks are built again (images changed, or an internal error)", len(stale))
        unclaim_manifest(fs, folder)
        for result in stale:
            forget_task(fs, folder, result)
    return done


class SplitTasks:
    """The tasks of one build, cut from the input as it streams (skipping the other split's records and the
    tasks already done); ``records`` and ``tasks`` count the build's records and tasks as it goes, and
    ``on_skip(n)`` is told of the ``n`` records skipped at a time."""

    def __init__(self, source: InputFormat, config: BuildConfig, duplicates: dict[int, int], done: set[int]):
        self.source, self.config, self.duplicates, self.done = source, config, duplicates, done
        self.records = self.tasks = 0
        self.on_skip: Callable[[int], None] = lambda n: None

    def _items(self) -> Iterator[RawItem]:
        val_fraction, split = self.config.val_fraction, self.config.split
        for item in self.source.items():
            if val_fraction is not None and split_of(item, val_fraction) != split:
                self.on_skip(1)
                continue
            self.records += 1
            yield replace(item, duplicate_of=self.duplicates.get(item.number))

    def __iter__(self) -> Iterator[Task]:
        for task in iter_tasks(self._items(), self.config.samples_per_shard):
            self.tasks = task.index + 1
            if task.index in self.done:
                self.on_skip(len(task.items))
            else:
                yield task


class ProgressBar:
    """The build's progress bar: records done (converted or skipped), with the rejects so far."""

    def __init__(self, bar: Any):
        self.bar = bar
        self.rejected = 0

    def record(self, ok: bool) -> None:
        """One record converted (``ok``) or rejected."""
        self.rejected += not ok
        self.bar.update(1)
        if not ok:
            self.bar.set_postfix(rejected=self.rejected, refresh=False)

    def task(self, result: TaskResult) -> None:
        """A task converted elsewhere."""
        self.rejected += len(result.rejects)
        self.bar.update(result.records)
        self.bar.set_postfix(rejected=self.rejected, refresh=False)

    def skip(self, records: int) -> None:
        """Records passed over (the other split's, or in a task already done)."""
        self.bar.update(records)


def _run_tasks(fs: Any, folder: str, tasks: SplitTasks, scan: InputScan, run: BuildRun) -> SplitTasks:
    """Convert and save every task left to do, with a progress bar; ``tasks``, run through."""
    from tqdm import tqdm

    total = scan.records if run.show_progress else None
    with tqdm(total=total, unit="rec", desc="build", disable=not run.show_progress) as bar:
        progress = ProgressBar(bar)
        tasks.on_skip = progress.skip
        for result in _results(fs, folder, tasks, run, progress):
            save_result(fs, folder, result)
            if result.traceback is not None:
                log_internal_error(fs, folder, result.traceback)
            if not run.in_process:
                progress.task(result)
    return tasks


def _results(fs: Any, folder: str, tasks: SplitTasks, run: BuildRun, progress: ProgressBar) -> Iterator[TaskResult]:
    """The results of the tasks, as they finish. With one local worker, each task in this process; with fewer
    tasks than workers (a small input), their slices (:func:`plan_slices`) on the workers, each task written here
    once its slices are back; otherwise whole tasks on the workers."""
    runner = TaskRunner(tasks.config, run.strict)
    if run.in_process:
        yield from (runner(task, progress.record) for task in tasks)
        return
    engine = {"engine": run.engine, "workers": run.workers, "ray_address": run.ray_address}
    stream = iter(tasks)
    first = list(itertools.islice(stream, run.workers))
    if len(first) == run.workers:
        yield from run_tasks(runner, itertools.chain(first, stream), **engine)
        return
    by_index = {task.index: task for task in first}
    parts: dict[int, dict[int, Converted]] = {index: {} for index in by_index}
    slices = plan_slices(first, run.workers)
    count = {index: sum(piece.task == index for piece in slices) for index in by_index}
    convert = converter_for(tasks.config)
    for converted in run_tasks(SliceRunner(tasks.config), slices, **engine):
        got = parts[converted.task]
        got[converted.index] = converted
        if len(got) == count[converted.task]:
            yield _write_slices(by_index.pop(converted.task), [got[i] for i in sorted(got)], convert, fs, folder, run)


def _write_slices(
    task: Task, converted: list[Converted], convert: Converter, fs: Any, folder: str, run: BuildRun
) -> TaskResult:
    """Write a task's shards from its converted slices, in order: the bytes :func:`run_task` would write."""
    result = TaskResult(index=task.index)
    started = time.perf_counter()
    for part in converted:
        result.read.update(part.read)
    outcomes = (outcome for part in converted for outcome in part.outcomes)
    write_task(result, task.items, outcomes, convert, fs, folder, run.strict)
    result.seconds = round(time.perf_counter() - started + sum(part.seconds for part in converted), 3)
    return result


def _build_info(identity: dict[str, Any], tokenizer: TokenizerInfo, renderer: Renderer, pad: int | None) -> BuildInfo:
    """What the manifest records of the build: its identity, the tokenizer and its special token ids."""
    special = SpecialTokens(
        image_pad=renderer.ids["image_pad"],
        vision_start=renderer.ids["vision_start"],
        vision_end=renderer.ids["vision_end"],
        pad=pad,
    )
    return BuildInfo.model_validate({**identity, "tokenizer": tokenizer.name, "special_tokens": special})


def _video_settings(convert: Converter) -> VideoSettings | None:
    """How the build samples and sizes videos (its converter's rule), as its manifest records them where it holds
    any."""
    grid = convert.video_grid
    if grid is None:
        return None
    return VideoSettings(
        processor=grid.processor,
        fps=grid.fps,
        min_frames=grid.min_frames,
        max_frames=grid.max_frames,
        min_pixels=grid.min_pixels,
        max_pixels=grid.max_pixels,
        pixels_over=grid.pixels_over,
        tokens_per_second=grid.tokens_per_second,
        video_pad=convert.renderer.ids["video_pad"],
    )


def _assemble(
    fs: Any, folder: str, config: BuildConfig, tasks: SplitTasks, info: BuildInfo, video: VideoSettings | None
) -> Manifest:
    """Write the manifest (and rejects, stats, index) from the saved task results, and log the outcome."""
    manifest = assemble(
        fs,
        folder,
        tasks.tasks,
        records=tasks.records,
        format=config.format.value,
        config=info,
        created_by=f"shardkit {__version__}",
        video=video,
    )
    logger.info(
        "built %s in %s (%d rejected) into %s",
        counted(manifest.num_samples, "sample"),
        counted(len(manifest.shards), "shard"),
        manifest.num_rejected,
        config.out,
    )
    if internal := manifest.rejects_by_code.get(INTERNAL_ERROR):
        logger.error(
            "%d records met an internal error (a bug in shardkit); the first traceback is in %s",
            internal,
            join(config.out, ERRORS_LOG),
        )
    return manifest


def _still_valid(result: TaskResult, root: ImageRoot) -> bool:
    """Whether a finished task still stands: no internal error, and the image files it read unchanged."""
    if result.traceback is not None:
        return False
    changed = changed_images(root.fs, result.read, local=root.local)
    if changed:
        logger.info("task %d is built again: %s changed", result.index, changed[0])
    return not changed


def log_internal_error(fs: Any, folder: str, trace: str) -> None:
    """Write the first internal error's traceback to ``errors.log`` (kept if one is there from this build)."""
    path = join(folder, ERRORS_LOG)
    if not fs.exists(path):
        write_bytes(fs, path, f"shardkit {__version__}: internal error (a bug) on {trace}".encode())


@contextmanager
def fatal_os_errors() -> Iterator[None]:
    """Turn an operating-system error (disk full, read-only folder, a file gone) into one plain
    :class:`OutputError` naming the file; a rerun of the same command resumes."""
    try:
        yield
    except ShardkitError:
        raise
    except OSError as exc:
        hint = ""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            hint = "; free space and run the same command again: finished shards are kept"
        elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            hint = "; choose a folder you can write to"
        raise OutputError(f"{os_error_text(exc)}{hint}") from exc


def os_error_text(exc: OSError) -> str:
    """An OS error as a plain phrase with the file it concerns: ``No space left on device: /out/shard-...``."""
    return f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else str(exc)
