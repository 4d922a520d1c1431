"""The build: read -> validate -> images -> render -> write, then the manifest.

The input is cut into tasks of ``samples_per_shard`` consecutive records; a task
writes its shards (``shard-TTTTTT-PPP``, more than one part only when
``max_shard_bytes`` is reached). Tasks run in this process, in a pool of
worker processes or on a Ray cluster (:mod:`shardkit.engines`); shard
boundaries follow input order alone, so the shards are byte-identical whatever
runs them. A finished task is recorded in the build folder
(:mod:`shardkit.shards.folder`), so a build killed at any point resumes by
skipping the recorded tasks; the manifest is written last.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import itertools
import logging
import os
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from shardkit import __version__
from shardkit.config import BuildConfig, BuildRun, Overlength
from shardkit.engines import run_tasks
from shardkit.errors import ConfigError, OutputError, RecordError, ShardkitError
from shardkit.images import ImageRoot, SourceImage, encode_jpeg, image_label
from shardkit.inputs import InputFormat, RawItem, open_input
from shardkit.inputs.base import hash_files
from shardkit.ledger import Ledger, changed_images, file_stamp, record_read
from shardkit.record_checks import check_answers, check_text, max_token_chars, min_tokens, plain_json, text_chars
from shardkit.render import Expanded, Renderer
from shardkit.schema import ImagePart, InlineImage, Record
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
from shardkit.shards.manifest import BuildInfo, SpecialTokens
from shardkit.shards.task import TaskResult, TaskShardWriter
from shardkit.storage import join, open_fs, write_bytes
from shardkit.tokenizer import TokenizerInfo, load_tokenizer
from shardkit.words import counted

logger = logging.getLogger(__name__)


INTERNAL_ERROR = "internal_error"
SPLITS = ("train", "val")


class Converter:
    """Turns one raw input item into a :class:`Sample`, or raises :class:`RecordError`.

    Everything about one record happens here, the sample's JSON included, so
    that any failure is that record's reject with its line. An exception no
    check foresaw (a bug) becomes an ``internal_error`` reject carrying its
    traceback (``detail["traceback"]``); the build reports those loudly.
    """

    def __init__(self, config: BuildConfig, tokenizer: Any):
        self.config = config
        self.input = open_input(config.input, config.input_format, **config.input_options())
        self.renderer: Renderer = config.family.renderer(tokenizer)
        self.grid = config.grid
        self.root = image_root(config, self.input)
        self.token_chars = max_token_chars(tokenizer)

    def __call__(self, raw: RawItem, ledger: Ledger | None = None) -> Sample:
        """The sample of ``raw``; the image files it reads are noted in ``ledger``."""
        try:
            return self._convert(raw, {} if ledger is None else ledger)
        except RecordError as exc:
            raise exc.at(raw.number, raw.source_line) from None
        except RecursionError:
            raise RecordError("nested too deeply to be read", "invalid_json").at(raw.number, raw.source_line) from None
        except Exception as exc:  # a case no check foresaw: a bug, reported with its traceback
            logger.debug("unexpected error on %s %d", self.input.unit_of(raw), raw.number, exc_info=True)
            raise RecordError(
                f"internal error (a bug in shardkit): {type(exc).__name__}: {exc}",
                INTERNAL_ERROR,
                raw.number,
                {"traceback": traceback.format_exc()},
            ) from None

    def _convert(self, raw: RawItem, ledger: Ledger) -> Sample:
        record = self._record(raw)
        meta = plain_json(record.meta)
        self._check_text_length(record)
        rendered = self.renderer.render(record, self.config.train_on)
        self._check_text_tokens(rendered.num_text_tokens)
        refs = [part.image for part in record.images()]
        opened = self._open_images(refs, ledger)
        originals = [(opened[ref].height, opened[ref].width) for ref in refs]
        planned, fitted = self._plan(originals, rendered.num_text_tokens)
        expanded = rendered.expand([self.grid.tokens(h, w) for h, w in planned])
        input_ids, weights = self._cut(expanded)
        trained = int((weights > 0).sum())
        turns = sum(Renderer.trained(record, i, self.config.train_on) for i in range(len(record.messages)))
        if not trained:
            raise RecordError("no training target left: every token has weight 0", "no_target")
        info: dict[str, Any] = {
            "key": sample_key(raw.number),
            "line": raw.number,
            "meta": meta,
            "num_tokens": int(len(input_ids)),
            "num_trained_tokens": trained,
            "num_trained_turns": turns,
            "images": self._images_info(refs, originals, planned, expanded.image_spans),
            "messages": stored_messages(record),
            "fitted": fitted,
            "truncated_tokens": len(expanded.input_ids) - len(input_ids),
        }
        if record.id is not None:
            info["id"] = plain_json(record.id, "id")
        sample = Sample(info["key"], info, input_ids, weights, self._encode(opened, refs, planned))
        sample.info_json  # noqa: B018 -- made here, so a value JSON cannot hold is this record's reject
        return sample

    def _record(self, raw: RawItem) -> Record:
        """The item's validated record, its text and answers checked."""
        if raw.duplicate_of is not None:
            unit = self.input.unit_of(raw)
            raise RecordError(f"duplicate of {unit} {raw.duplicate_of} (same images and text)", "duplicate")
        record = self.input.record(raw)
        check_text(record)
        check_answers(record, self.config.train_on)
        return record

    def _check_text_tokens(self, text_tokens: int) -> None:
        """Reject text alone over max_length, unless it is to be truncated."""
        config = self.config
        if config.overlength is not Overlength.TRUNCATE and text_tokens > config.max_length:
            raise RecordError(
                f"too long: the text alone is {text_tokens} tokens, over max_length {config.max_length}", "too_long"
            )

    def _open_images(self, refs: list[str], ledger: Ledger) -> dict[str, SourceImage]:
        """The record's images by reference: one read and one decode per distinct image."""
        opened: dict[str, SourceImage] = {}
        for ref in refs:
            if ref not in opened:
                opened[ref] = SourceImage(self._read(ref, ledger), ref, max_pixels=self.config.max_image_pixels)
        return opened

    def _plan(self, originals: list[tuple[int, int]], text_tokens: int) -> tuple[list[tuple[int, int]], bool]:
        """The images' sizes on the grid, and whether they were shrunk to fit max_length (``--overlength fit``)."""
        config, grid = self.config, self.grid
        full = grid.plan(originals)
        if config.overlength is not Overlength.FIT:
            return full, False
        planned = grid.plan(originals, config.max_length - text_tokens)
        if planned is None:
            least = sum(grid.tokens(*grid.size(h, w, grid.min_pixels)) for h, w in originals)
            raise RecordError(
                f"too long: {text_tokens} text tokens plus its {len(originals)} images at min_pixels "
                f"({least} tokens) exceed max_length {config.max_length}",
                "too_long",
            )
        return planned, planned != full

    def _cut(self, expanded: Expanded) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and weights within max_length: truncated after the last image (``--overlength truncate``),
        or the record rejected."""
        config = self.config
        input_ids, weights = expanded.input_ids, expanded.weights
        if len(input_ids) <= config.max_length:
            return input_ids, weights
        if config.overlength is Overlength.DROP:
            raise RecordError(
                f"too long: {len(input_ids)} tokens, over max_length {config.max_length} (--overlength drop)",
                "too_long",
            )
        image_end = max((start + n for start, n in expanded.image_spans), default=0)
        if image_end > config.max_length:
            raise RecordError(
                f"too long: {len(input_ids)} tokens, and cutting to max_length {config.max_length} would cut "
                f"through image tokens (they end at {image_end})",
                "too_long",
            )
        return input_ids[: config.max_length], weights[: config.max_length]

    def _images_info(
        self,
        refs: list[str],
        originals: list[tuple[int, int]],
        planned: list[tuple[int, int]],
        spans: list[tuple[int, int]],
    ) -> list[dict[str, Any]]:
        """What the sample's JSON says of each image: source, sizes, grid and where its tokens are."""
        patch = self.config.family.patch_size
        return [
            {
                "source": image_label(ref),
                "original_width": ow,
                "original_height": oh,
                "width": w,
                "height": h,
                "grid_thw": [1, h // patch, w // patch],
                "token_start": start,
                "num_tokens": n,
            }
            for ref, (oh, ow), (h, w), (start, n) in zip(refs, originals, planned, spans, strict=True)
        ]

    def _encode(self, opened: dict[str, SourceImage], refs: list[str], planned: list[tuple[int, int]]) -> list[bytes]:
        """The images as stored JPEGs, each distinct (image, size) encoded once."""
        encoded: dict[tuple[str, tuple[int, int]], bytes] = {}
        for ref, size in zip(refs, planned, strict=True):
            if (ref, size) not in encoded:
                encoded[ref, size] = encode_jpeg(opened[ref].decode(size), size, self.config.jpeg_quality)
        return [encoded[key] for key in zip(refs, planned, strict=True)]

    def _check_text_length(self, record: Record) -> None:
        """Reject text over max_length by a bound on its token count, before tokenizing it."""
        chars = text_chars(record)
        floor = min_tokens(chars, self.token_chars)
        if floor > self.config.max_length:
            note = " (too long to truncate)" if self.config.overlength is Overlength.TRUNCATE else ""
            raise RecordError(
                f"too long: {chars} characters of text are at least {floor} tokens, over max_length "
                f"{self.config.max_length}{note}",
                "too_long",
            )

    def _read(self, ref: str, ledger: Ledger) -> bytes:
        """The image's bytes; a file's size, time and hash are noted in ``ledger``."""
        if "\0" in ref:
            raise RecordError(
                "image path contains a NUL character", "image_missing", detail={"image": image_label(ref)}
            )
        key = stamp = None
        try:
            if self.root.names_file(ref):
                key = self.root.resolve(ref)
                stamp = file_stamp(None if self.root.local else self.root.fs, key, local=self.root.local)
            data = self.root.read(ref)
        except RecordError as exc:
            if key is not None and exc.code == "image_missing":
                record_read(ledger, key, None, None)
            raise
        except (OSError, ValueError, RuntimeError) as exc:  # a symlink loop, a name the OS refuses
            reason = f"image cannot be read: {ref} ({exc})"
            raise RecordError(reason, "image_unreadable", detail={"image": ref}) from None
        if key is not None:
            record_read(ledger, key, stamp, data)
        elif ref.startswith(("http://", "https://")):
            record_read(ledger, ref, {}, data)
        return data


def stored_messages(record: Record) -> list[dict[str, Any]]:
    """The conversation as stored with a sample: text parts as they are, image parts by their index."""
    images = iter(range(len(record.images())))
    return [
        {
            "role": m.role,
            "content": [
                {"type": "image", "index": next(images)}
                if isinstance(p, ImagePart)
                else {"type": "text", "text": p.text}
                for p in m.content
            ],
        }
        for m in record.messages
    ]


def sample_key(line: int) -> str:
    """The sample's key in its shard: the zero-padded source line."""
    return f"{line:010d}"


@dataclass(frozen=True)
class Task:
    """Consecutive input items that become one shard (or a few parts of one)."""

    index: int
    items: list[RawItem]


def image_root(config: BuildConfig, source: InputFormat) -> ImageRoot:
    """Where a build reads images from, with its remote-image settings."""
    return ImageRoot(
        config.image_root or source.image_root(),
        allow_remote=config.allow_remote,
        timeout=config.remote_timeout,
        max_bytes=config.remote_max_bytes,
        max_image_bytes=config.max_image_bytes,
    )


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
    config = convert.config
    result = TaskResult(index=task.index)
    started = time.perf_counter()
    writer = TaskShardWriter(fs, folder, task.index, WRITERS[config.format.value], config.max_shard_bytes)
    with writer:
        for raw in task.items:
            result.records += 1
            try:
                sample = convert(raw, result.read)
            except RecordError as exc:
                if strict:
                    raise
                _reject(result, exc, f"{convert.input.unit_of(raw)} {raw.number}")
                sample = None
            else:
                writer.write(sample)
                result.add(sample)
            if on_record:
                on_record(sample is not None)
        result.shards = writer.close()
    result.seconds = round(time.perf_counter() - started, 3)
    return result


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
    return Converter(config, load_tokenizer(config.tokenizer)[0])


@dataclass(frozen=True)
class TaskRunner:
    """Runs one task wherever the engine puts it (picklable: a worker builds its converter once)."""

    config: BuildConfig
    strict: bool = False

    def __call__(self, task: Task, on_record: Callable[[bool], None] | None = None) -> TaskResult:
        fs, folder = open_fs(self.config.out)
        return run_task(task, converter_for(self.config), fs, folder, strict=self.strict, on_record=on_record)


@dataclass(frozen=True)
class DuplicateScan:
    """What the dedup pass found: ``{number: first number}`` of the records repeating an earlier one, and how
    many records it looked at."""

    duplicates: dict[int, int]
    records: int


def find_duplicates(source: InputFormat, images: ImageRoot, threads: int = 8) -> DuplicateScan:
    """The records whose text and image bytes repeat an earlier record's, in one pass over the input.

    Images are read, not decoded, and each distinct image is read once.
    A record that is itself invalid (it does not parse, an image cannot be
    read) is left for the build to reject; any other error propagates.
    """
    image_digests: dict[str, bytes] = {}

    def image_digest(ref: str) -> bytes:
        if isinstance(ref, InlineImage) or ref.startswith("data:"):  # holds its bytes: not kept in the cache
            return hashlib.sha256(images.read(ref)).digest()
        if ref not in image_digests:
            image_digests[ref] = hashlib.sha256(images.read(ref)).digest()
        return image_digests[ref]

    def key(item: RawItem) -> tuple[int, bytes | None]:
        try:
            record = source.record(item)
            digest = hashlib.sha256()
            for message in record.messages:
                digest.update(message.role.encode() + b"\0")
                for part in message.content:
                    content = image_digest(part.image) if isinstance(part, ImagePart) else part.text.encode()
                    digest.update(content + b"\0")
            return item.number, digest.digest()
        except (RecordError, RecursionError, OSError, ValueError):  # the record's own fault: the build rejects it
            return item.number, None

    first: dict[bytes, int] = {}
    duplicates: dict[int, int] = {}
    records = 0
    with ThreadPoolExecutor(threads) as pool:
        items = source.items()
        while chunk := list(itertools.islice(items, 256)):
            records += len(chunk)
            for line, digest in pool.map(key, chunk):
                if digest is None:
                    continue
                if digest in first:
                    duplicates[line] = first[digest]
                else:
                    first[digest] = line
    logger.info("%d duplicate records found", len(duplicates))
    return DuplicateScan(duplicates, records)


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
        tokenizer, tokenizer_info = load_tokenizer(config.tokenizer)
        identity = _identity(config, scan.sha256, tokenizer_info)
        complete = claim(fs, folder, identity, overwrite=run.overwrite)
        convert = converter_for(config)  # built here, so forked workers share it
        done = _finished_tasks(fs, folder, convert.root, complete)
        if done is None:
            logger.info("%s already holds this complete build; nothing to do", config.out)
            return read_manifest(config.out)
        tasks = _run_tasks(fs, folder, SplitTasks(source, config, scan.duplicates, done), scan, run)
        info = _build_info(identity, tokenizer_info, convert.renderer, tokenizer.pad_token_id)
        return _assemble(fs, folder, config, tasks, info)


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

    runner = TaskRunner(tasks.config, run.strict)
    total = scan.records if run.show_progress else None
    with tqdm(total=total, unit="rec", desc="build", disable=not run.show_progress) as bar:
        progress = ProgressBar(bar)
        tasks.on_skip = progress.skip
        if run.in_process:
            results: Iterable[TaskResult] = (runner(task, progress.record) for task in tasks)
        else:
            results = run_tasks(runner, tasks, engine=run.engine, workers=run.workers, ray_address=run.ray_address)
        for result in results:
            save_result(fs, folder, result)
            if result.traceback is not None:
                log_internal_error(fs, folder, result.traceback)
            if not run.in_process:
                progress.task(result)
    return tasks


def _build_info(identity: dict[str, Any], tokenizer: TokenizerInfo, renderer: Renderer, pad: int | None) -> BuildInfo:
    """What the manifest records of the build: its identity, the tokenizer and its special token ids."""
    special = SpecialTokens(
        image_pad=renderer.image_pad_id,
        vision_start=renderer.ids[renderer.VISION_START],
        vision_end=renderer.ids[renderer.VISION_END],
        pad=pad,
    )
    return BuildInfo.model_validate({**identity, "tokenizer": tokenizer.name, "special_tokens": special})


def _assemble(fs: Any, folder: str, config: BuildConfig, tasks: SplitTasks, info: BuildInfo) -> Manifest:
    """Write the manifest (and rejects, stats, index) from the saved task results, and log the outcome."""
    manifest = assemble(
        fs,
        folder,
        tasks.tasks,
        records=tasks.records,
        format=config.format.value,
        config=info,
        created_by=f"shardkit {__version__}",
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
