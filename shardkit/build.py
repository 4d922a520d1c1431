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

from shardkit import __version__
from shardkit.config import BuildConfig, Overlength
from shardkit.engines import run_tasks
from shardkit.errors import ConfigError, OutputError, RecordError, ShardkitError
from shardkit.images import ImageRoot, SourceImage, describe, encode_jpeg
from shardkit.inputs import InputFormat, RawItem, open_input
from shardkit.ledger import Ledger, changed_images, file_stamp, record_read
from shardkit.record_checks import check_answers, check_text, max_token_chars, min_tokens, plain_json, text_chars
from shardkit.render import Renderer
from shardkit.schema import ImagePart, Record
from shardkit.shards import WRITERS, Manifest, Sample, ShardWriter, read_manifest
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
from shardkit.storage import join, open_fs, write_bytes
from shardkit.tokenizer import TokenizerInfo, load_tokenizer

logger = logging.getLogger(__name__)


INTERNAL_ERROR = "internal_error"


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
            raise exc.at(raw.line, raw.source_line) from None
        except RecursionError:
            raise RecordError("nested too deeply to be read", "invalid_json").at(raw.line, raw.source_line) from None
        except Exception as exc:  # a case no check foresaw: a bug, reported with its traceback
            logger.debug("unexpected error on %s %d", self.input.unit, raw.line, exc_info=True)
            raise RecordError(
                f"internal error (a bug in shardkit): {type(exc).__name__}: {exc}",
                INTERNAL_ERROR,
                raw.line,
                {"traceback": traceback.format_exc()},
            ) from None

    def _convert(self, raw: RawItem, ledger: Ledger) -> Sample:
        config, grid = self.config, self.grid
        if raw.duplicate_of is not None:
            raise RecordError(f"duplicate of {self.input.unit} {raw.duplicate_of} (same images and text)", "duplicate")
        record = self.input.record(raw)
        check_text(record)
        check_answers(record, config.train_on)
        meta = plain_json(record.meta)
        self._check_text_length(record)
        rendered = self.renderer.render(record, config.train_on)
        text_tokens = rendered.num_text_tokens
        if config.overlength is not Overlength.TRUNCATE and text_tokens > config.max_length:
            raise RecordError(
                f"too long: the text alone is {text_tokens} tokens, over max_length {config.max_length}", "too_long"
            )
        refs = [part.image for part in record.images()]
        opened: dict[str, SourceImage] = {}  # one read and one decode per distinct image of the record
        for ref in refs:
            if ref not in opened:
                opened[ref] = SourceImage(self._read(ref, ledger), ref, max_pixels=config.max_image_pixels)
        sources = [opened[ref] for ref in refs]
        originals = [(source.height, source.width) for source in sources]
        full = grid.plan(originals)
        planned = full
        if config.overlength is Overlength.FIT:
            planned = grid.plan(originals, config.max_length - text_tokens)
            if planned is None:
                least = sum(grid.tokens(*grid.size(h, w, grid.min_pixels)) for h, w in originals)
                raise RecordError(
                    f"too long: {text_tokens} text tokens plus its {len(refs)} images at min_pixels "
                    f"({least} tokens) exceed max_length {config.max_length}",
                    "too_long",
                )
        image_tokens = [grid.tokens(h, w) for h, w in planned]
        expanded = rendered.expand(image_tokens)
        input_ids, weights = expanded.input_ids, expanded.weights
        truncated = 0
        if len(input_ids) > config.max_length:
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
            truncated = len(input_ids) - config.max_length
            input_ids, weights = input_ids[: config.max_length], weights[: config.max_length]
        trained = int((weights > 0).sum())
        if not trained:
            raise RecordError("no training target left: every token has weight 0", "no_target")
        family = config.family
        images_info = [
            {
                "source": describe(ref),
                "original_width": ow,
                "original_height": oh,
                "width": w,
                "height": h,
                "grid_thw": [1, h // family.patch_size, w // family.patch_size],
                "token_start": start,
                "num_tokens": n,
            }
            for ref, (oh, ow), (h, w), (start, n) in zip(refs, originals, planned, expanded.image_spans, strict=True)
        ]
        info: dict[str, Any] = {
            "key": sample_key(raw.line),
            "line": raw.line,
            "meta": meta,
            "num_tokens": int(len(input_ids)),
            "num_trained_tokens": trained,
            "images": images_info,
            "messages": stored_messages(record),
            "fitted": planned != full,
            "truncated_tokens": truncated,
        }
        if record.id is not None:
            info["id"] = plain_json(record.id, "id")
        encoded: dict[tuple[str, tuple[int, int]], bytes] = {}
        for ref, size in zip(refs, planned, strict=True):
            if (ref, size) not in encoded:
                encoded[ref, size] = encode_jpeg(opened[ref].decode(size), size, config.jpeg_quality)
        jpegs = [encoded[key] for key in zip(refs, planned, strict=True)]
        sample = Sample(info["key"], info, input_ids, weights, jpegs)
        sample.info_json  # noqa: B018 -- made here, so a value JSON cannot hold is this record's reject
        return sample

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
            raise RecordError("image path contains a NUL character", "image_missing", detail={"image": describe(ref)})
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


@dataclass
class Task:
    """Consecutive input records that become one shard (or a few parts of one)."""

    index: int
    lines: list[RawItem]


def _new_result(index: int) -> dict[str, Any]:
    """What a finished task reports (JSON): its shards with sample locations, rejects, counts, the image files it
    read (``read``, a :data:`~shardkit.ledger.Ledger`) and the first internal error's traceback, if any."""
    keys = ("records", "images", "tokens", "trained_tokens", "fitted", "truncated")
    return {"index": index, "shards": [], "rejects": [], **dict.fromkeys(keys, 0), "seconds": 0.0, "read": {}}


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
) -> dict[str, Any]:
    """Convert a task's records and write its shard parts; rejected records are collected, not fatal."""
    config = convert.config
    writer_cls: type[ShardWriter] = WRITERS[config.format.value]
    result = _new_result(task.index)
    started = time.perf_counter()
    writer: ShardWriter | None = None
    part_bytes = 0
    part_tokens: list[int] = []

    def close() -> None:
        assert writer is not None
        written = writer.close()
        result["shards"].append(
            {
                "path": written.path.rsplit("/", 1)[-1],
                "num_samples": written.num_samples,
                "num_tokens": sum(part_tokens),
                "bytes": written.bytes,
                "sha256": written.sha256,
                "locations": written.locations,
                "tokens": part_tokens,
            }
        )

    try:
        for raw in task.lines:
            result["records"] += 1
            try:
                sample = convert(raw, result["read"])
            except RecordError as exc:
                if strict:
                    raise
                reject = exc.to_json()
                if (trace := reject.pop("traceback", None)) and "traceback" not in result:
                    result["traceback"] = f"{convert.input.unit} {raw.line}:\n{trace}"
                result["rejects"].append(reject)
                if on_record:
                    on_record(False)
                continue
            size = sample.payload_bytes
            if writer is not None and part_bytes + size > config.max_shard_bytes:
                close()
                writer = None
            if writer is None:
                name = f"shard-{task.index:06d}-{len(result['shards']):03d}{writer_cls.suffix}"
                writer = writer_cls(fs, join(folder, name))
                part_bytes, part_tokens = 0, []
            writer.write(sample)
            part_bytes += size
            part_tokens.append(len(sample.input_ids))
            result["images"] += len(sample.images)
            result["tokens"] += len(sample.input_ids)
            result["trained_tokens"] += sample.info["num_trained_tokens"]
            result["fitted"] += bool(sample.info["fitted"])
            result["truncated"] += bool(sample.info["truncated_tokens"])
            if on_record:
                on_record(True)
        if writer is not None:
            close()
            writer = None
    except BaseException as exc:
        if writer is not None:
            writer.abort(exc)
        raise
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result


_CONVERTERS: dict[str, Converter] = {}


@dataclass(frozen=True)
class TaskRunner:
    """Runs one task wherever the engine puts it; the converter is built once per process."""

    config: BuildConfig
    strict: bool = False

    def converter(self) -> Converter:
        key = self.config.model_dump_json()
        if key not in _CONVERTERS:
            _CONVERTERS[key] = Converter(self.config, load_tokenizer(self.config.tokenizer)[0])
        return _CONVERTERS[key]

    def __call__(self, task: Task, on_record: Callable[[bool], None] | None = None) -> dict[str, Any]:
        fs, folder = open_fs(self.config.out)
        return run_task(task, self.converter(), fs, folder, strict=self.strict, on_record=on_record)


def _absolute_paths(config: BuildConfig) -> dict[str, str]:
    paths = {"input": config.input, "out": config.out, "image_root": config.image_root}
    return {k: os.path.abspath(v) for k, v in paths.items() if v and "://" not in v}


def build_train_val(config: BuildConfig, **options: Any) -> dict[str, Manifest]:
    """Build ``OUT/train`` and ``OUT/val`` from one input, split by ``config.val_fraction`` (see :func:`split_of`)."""
    if config.val_fraction is None:
        raise ConfigError("build_train_val needs val_fraction")
    return {
        split: build(config.model_copy(update={"out": join(config.out, split), "split": split}), **options)
        for split in ("train", "val")
    }


def find_duplicates(source: InputFormat, images: ImageRoot, threads: int = 8) -> dict[int, int]:
    """``{line: first line}`` of records whose text and image bytes repeat an earlier record's.

    A pass over the input before the build (images are read, not decoded); records
    that fail to parse or read are left for the build to reject.
    """

    def key(item: RawItem) -> tuple[int, bytes | None]:
        try:
            record = source.record(item)
            digest = hashlib.sha256()
            for message in record.messages:
                digest.update(message.role.encode() + b"\0")
                for part in message.content:
                    content = (
                        hashlib.sha256(images.read(part.image)).digest()
                        if isinstance(part, ImagePart)
                        else part.text.encode()
                    )
                    digest.update(content + b"\0")
            return item.line, digest.digest()
        except Exception:  # an invalid record: the build rejects it with its reason
            return item.line, None

    first: dict[bytes, int] = {}
    duplicates: dict[int, int] = {}
    with ThreadPoolExecutor(threads) as pool:
        items = source.items()
        while chunk := list(itertools.islice(items, 256)):
            for line, digest in pool.map(key, chunk):
                if digest is None:
                    continue
                if digest in first:
                    duplicates[line] = first[digest]
                else:
                    first[digest] = line
    logger.info("%d duplicate records found", len(duplicates))
    return duplicates


def _identity(config: BuildConfig, input_sha256: str, tokenizer: TokenizerInfo) -> dict[str, Any]:
    """What decides a build's bytes: options, input, tokenizer, image folder (recorded, and compared on reuse)."""
    return {
        **config.identity(),
        "input_sha256": input_sha256,
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "family": config.family.describe(),
        "image_root": config.image_root
        and (config.image_root if "://" in config.image_root else os.path.abspath(config.image_root)),
    }


def build(
    config: BuildConfig,
    *,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
    workers: int = 1,
    engine: str = "local",
    ray_address: str | None = None,
) -> Manifest:
    """Build shards and the manifest from ``config.input`` into ``config.out``.

    Rejected records are written to ``rejects.jsonl`` and do not stop the
    build unless ``strict``, where the first one raises :class:`RecordError`.
    ``workers`` processes (``engine="local"``) or Ray tasks (``engine="ray"``)
    convert the tasks. ``progress``: show a progress bar (None: when stderr is
    a terminal).
    """

    if config.val_fraction is not None and config.split is None:
        raise ConfigError("a build with val_fraction makes one split at a time: use build_train_val")
    if engine != "local":  # remote workers do not share this process's working directory
        config = config.model_copy(update=_absolute_paths(config))
    with fatal_os_errors():
        source = open_input(config.input, config.input_format, **config.input_options())
        config = config.model_copy(update={"input_format": source.name})  # workers need not detect it again
        fs, folder = open_fs(config.out)
        with lock(fs, folder):
            return _build_locked(
                config,
                source,
                fs,
                folder,
                strict=strict,
                overwrite=overwrite,
                progress=progress,
                workers=workers,
                engine=engine,
                ray_address=ray_address,
            )


def _build_locked(
    config: BuildConfig,
    source: InputFormat,
    fs: Any,
    folder: str,
    *,
    strict: bool,
    overwrite: bool,
    progress: bool | None,
    workers: int,
    engine: str,
    ray_address: str | None,
) -> Manifest:
    from tqdm import tqdm

    summary = source.summary()
    tokenizer, tokenizer_info = load_tokenizer(config.tokenizer)
    identity = _identity(config, summary.sha256, tokenizer_info)
    complete = claim(fs, folder, identity, overwrite=overwrite)
    runner = TaskRunner(config, strict)
    convert = runner.converter()  # built here, so forked workers share it
    renderer = convert.renderer
    done, stale = check_tasks(fs, folder, lambda result: _still_valid(result, convert.root))
    if complete and not stale:
        logger.info("%s already holds this complete build; nothing to do", config.out)
        return read_manifest(config.out)
    if stale:
        logger.info("%d finished tasks are built again (images changed, or an internal error)", len(stale))
        unclaim_manifest(fs, folder)
        for result in stale:
            forget_task(fs, folder, result)
    duplicates = find_duplicates(source, image_root(config, source)) if config.dedup else {}
    tasks = records = 0

    with tqdm(
        total=summary.records, unit="rec", desc="build", disable=None if progress is None else not progress
    ) as bar:
        rejected = 0

        def on_record(ok: bool) -> None:
            nonlocal rejected
            rejected += not ok
            bar.update(1)
            if not ok:
                bar.set_postfix(rejected=rejected, refresh=False)

        def mine() -> Iterator[RawItem]:
            nonlocal records
            for item in source.items():
                if config.val_fraction is not None and split_of(item, config.val_fraction) != config.split:
                    bar.update(1)  # the other split's
                    continue
                records += 1
                yield replace(item, duplicate_of=duplicates.get(item.line))

        def todo() -> Iterator[Task]:
            nonlocal tasks
            for task in iter_tasks(mine(), config.samples_per_shard):
                tasks = task.index + 1
                if task.index in done:
                    bar.update(len(task.lines))
                else:
                    yield task

        if workers <= 1 and engine == "local":
            results = (runner(task, on_record) for task in todo())
        else:
            results = run_tasks(runner, todo(), engine=engine, workers=workers, ray_address=ray_address)
        for result in results:
            save_result(fs, folder, result)
            if "traceback" in result:
                log_internal_error(fs, folder, result["traceback"])
            if workers > 1 or engine != "local":
                rejected += len(result["rejects"])
                bar.update(result["records"])
                bar.set_postfix(rejected=rejected, refresh=False)

    special_tokens = {
        "image_pad": renderer.image_pad_id,
        "vision_start": renderer.ids[renderer.VISION_START],
        "vision_end": renderer.ids[renderer.VISION_END],
        "pad": tokenizer.pad_token_id,
    }
    manifest = assemble(
        fs,
        folder,
        tasks,
        records=records,
        format=config.format.value,
        config={**identity, "tokenizer": tokenizer_info.name, "special_tokens": special_tokens},
        created_by=f"shardkit {__version__}",
    )
    logger.info(
        "built %d samples in %d shards (%d rejected) into %s",
        manifest.num_samples,
        len(manifest.shards),
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


def _still_valid(result: dict[str, Any], root: ImageRoot) -> bool:
    """Whether a finished task still stands: no internal error, and the image files it read unchanged."""
    if "traceback" in result:
        return False
    changed = changed_images(root.fs, result.get("read", {}), local=root.local)
    if changed:
        logger.info("task %d is built again: %s changed", result["index"], changed[0])
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
