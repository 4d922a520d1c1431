"""The build: read -> validate -> images -> render -> write, then the manifest.

The input is cut into tasks of ``samples_per_shard`` consecutive records; a task
writes its shards (``shard-TTTTTT-PPP``, more than one part only when
``max_shard_bytes`` is reached) and then a small result file under
``_progress/``. Shard boundaries therefore follow input order alone, and a
build that stops part-way resumes by skipping the tasks whose result exists.
The manifest is written last, from the task results, so its presence means
the build is complete.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shardkit import __version__
from shardkit.config import BuildConfig, Overlength
from shardkit.errors import OutputError, RecordError
from shardkit.images import ImageRoot, encode_jpeg, load_image
from shardkit.read import RawLine, iter_raw_lines, parse_record, summarize_input
from shardkit.render import Renderer
from shardkit.shards import MANIFEST_NAME, WRITERS, Manifest, Sample, ShardEntry, ShardWriter
from shardkit.shards.index import INDEX_NAME, write_index
from shardkit.shards.manifest import IndexFile
from shardkit.storage import join, open_fs, write_bytes
from shardkit.tokenizer import TokenizerInfo, load_tokenizer

logger = logging.getLogger(__name__)

BUILD_FILE = "build.json"
PROGRESS_DIR = "_progress"
REJECTS_FILE = "rejects.jsonl"
SHARD_STATS_FILE = "shard_stats.jsonl"


class Converter:
    """Turns one raw input line into a :class:`Sample`, or raises :class:`RecordError`."""

    def __init__(self, config: BuildConfig, tokenizer: Any):
        self.config = config
        self.renderer: Renderer = config.family.renderer(tokenizer)
        self.grid = config.grid
        self.root = ImageRoot(config.image_root or Path(config.input).parent)

    def __call__(self, raw: RawLine) -> Sample:
        try:
            return self._convert(raw)
        except RecordError as exc:
            raise exc.at(raw.line) from None

    def _convert(self, raw: RawLine) -> Sample:
        config, grid = self.config, self.grid
        record = parse_record(raw)
        rendered = self.renderer.render(record, config.train_on)
        text_tokens = rendered.num_text_tokens
        if config.overlength is not Overlength.TRUNCATE and text_tokens > config.max_length:
            raise RecordError(
                f"too long: the text alone is {text_tokens} tokens, over max_length {config.max_length}", "too_long"
            )
        refs = [part.image for part in record.images()]
        pictures = [load_image(self.root.resolve(ref), ref, max_pixels=config.max_image_pixels) for ref in refs]
        originals = [(p.height, p.width) for p in pictures]
        full = grid.plan(originals)
        planned = full
        if config.overlength is Overlength.FIT:
            planned = grid.plan(originals, config.max_length - text_tokens)
            if planned is None:
                least = grid.plan(originals, 0) or []
                raise RecordError(
                    f"too long: {text_tokens} text tokens plus its {len(refs)} images at min_pixels "
                    f"({sum(grid.tokens(h, w) for h, w in least) if least else 'many'} tokens) exceed max_length "
                    f"{config.max_length}",
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
                "source": ref,
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
            "meta": record.meta,
            "num_tokens": int(len(input_ids)),
            "num_trained_tokens": trained,
            "images": images_info,
            "fitted": planned != full,
            "truncated_tokens": truncated,
        }
        if record.id is not None:
            info["id"] = record.id
        jpegs = [encode_jpeg(p, size, config.jpeg_quality) for p, size in zip(pictures, planned, strict=True)]
        return Sample(info["key"], info, input_ids, weights, jpegs)


def sample_key(line: int) -> str:
    """The sample's key in its shard: the zero-padded source line."""
    return f"{line:010d}"


@dataclass
class Task:
    """Consecutive input records that become one shard (or a few parts of one)."""

    index: int
    lines: list[RawLine]


@dataclass
class TaskResult:
    """What a finished task wrote; saved under ``_progress/`` so a restart can skip it."""

    index: int
    shards: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    records: int = 0
    images: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    fitted: int = 0
    truncated: int = 0
    seconds: float = 0.0

    @property
    def samples(self) -> int:
        return sum(s["num_samples"] for s in self.shards)


def iter_tasks(path: str, records_per_task: int) -> Iterator[Task]:
    """Cut the input into tasks of ``records_per_task`` non-blank lines, streaming."""
    batch: list[RawLine] = []
    index = 0
    for raw in iter_raw_lines(path):
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
    writer_cls: type[ShardWriter] = WRITERS[config.format.value]
    result = TaskResult(task.index)
    started = time.perf_counter()
    writer: ShardWriter | None = None
    part_bytes = 0
    part_tokens: list[int] = []

    def close() -> None:
        assert writer is not None
        written = writer.close()
        result.shards.append(
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
            result.records += 1
            try:
                sample = convert(raw)
            except RecordError as exc:
                if strict:
                    raise
                result.rejects.append(exc.to_json())
                if on_record:
                    on_record(False)
                continue
            size = sample.payload_bytes
            if writer is not None and part_bytes + size > config.max_shard_bytes:
                close()
                writer = None
            if writer is None:
                name = f"shard-{task.index:06d}-{len(result.shards):03d}{writer_cls.suffix}"
                writer = writer_cls(fs, join(folder, name))
                part_bytes, part_tokens = 0, []
            writer.write(sample)
            part_bytes += size
            part_tokens.append(len(sample.input_ids))
            result.images += len(sample.images)
            result.tokens += len(sample.input_ids)
            result.trained_tokens += sample.info["num_trained_tokens"]
            result.fitted += bool(sample.info["fitted"])
            result.truncated += bool(sample.info["truncated_tokens"])
            if on_record:
                on_record(True)
        if writer is not None:
            close()
            writer = None
    except BaseException as exc:
        if writer is not None:
            writer.abort(exc)
        raise
    result.seconds = round(time.perf_counter() - started, 3)
    return result


def _progress_path(folder: str, index: int) -> str:
    return join(folder, PROGRESS_DIR, f"task-{index:06d}.json")


def _load_result(fs: Any, folder: str, index: int) -> TaskResult | None:
    path = _progress_path(folder, index)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        result = TaskResult(**json.loads(f.read()))
    for shard in result.shards:  # a result is trusted only while all its shards are there, whole
        shard_path = join(folder, shard["path"])
        if not fs.exists(shard_path) or fs.size(shard_path) != shard["bytes"]:
            return None
    return result


def _identity(config: BuildConfig, input_sha256: str, tokenizer: TokenizerInfo) -> dict[str, Any]:
    return {
        **config.identity(),
        "input_sha256": input_sha256,
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "family": config.family.describe(),
    }


def prepare_output(fs: Any, folder: str, identity: dict[str, Any], *, overwrite: bool) -> bool:
    """Make ``folder`` ready for this build; True when it already holds the complete build.

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


def build(
    config: BuildConfig,
    *,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
) -> Manifest:
    """Build shards and the manifest from ``config.input`` into ``config.out``.

    Rejected records are written to ``rejects.jsonl`` and do not stop the
    build unless ``strict``, where the first one raises :class:`RecordError`.
    ``progress``: show a progress bar (None: when stderr is a terminal).
    """
    from tqdm import tqdm

    fs, folder = open_fs(config.out)
    summary = summarize_input(config.input)
    tokenizer, tokenizer_info = load_tokenizer(config.tokenizer)
    identity = _identity(config, summary.sha256, tokenizer_info)
    if prepare_output(fs, folder, identity, overwrite=overwrite):
        logger.info("%s already holds this complete build; nothing to do", config.out)
        from shardkit.shards import read_manifest

        return read_manifest(config.out)
    convert = Converter(config, tokenizer)
    results: list[TaskResult] = []
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

        for task in iter_tasks(config.input, config.samples_per_shard):
            result = _load_result(fs, folder, task.index)
            if result is None:
                result = run_task(task, convert, fs, folder, strict=strict, on_record=on_record)
                write_bytes(fs, _progress_path(folder, task.index), json.dumps(asdict(result)).encode())
            else:
                bar.update(len(task.lines))
            results.append(result)
    renderer = convert.renderer
    special_tokens = {
        "image_pad": renderer.image_pad_id,
        "vision_start": renderer.ids[renderer.VISION_START],
        "vision_end": renderer.ids[renderer.VISION_END],
        "pad": tokenizer.pad_token_id,
    }
    return _finish(fs, folder, config, tokenizer_info, special_tokens, summary.records, results)


def _finish(
    fs: Any,
    folder: str,
    config: BuildConfig,
    tokenizer: TokenizerInfo,
    special_tokens: dict[str, int | None],
    records: int,
    results: list[TaskResult],
) -> Manifest:
    rejects = [r for result in results for r in result.rejects]
    write_bytes(fs, join(folder, REJECTS_FILE), b"".join(json.dumps(r).encode() + b"\n" for r in rejects))
    shards = [shard for result in results for shard in result.shards]
    index = write_index(fs, folder, shards)
    stats = [
        {
            **{k: v for k, v in shard.items() if k in ShardEntry.model_fields},
            "task": result.index,
            "task_records": result.records,
            "task_rejects": len(result.rejects),
            "task_seconds": result.seconds,
        }
        for result in results
        for shard in result.shards
    ]
    write_bytes(fs, join(folder, SHARD_STATS_FILE), b"".join(json.dumps(s).encode() + b"\n" for s in stats))
    manifest = Manifest(
        format=config.format.value,
        num_records=records,
        num_samples=sum(r.samples for r in results),
        num_images=sum(r.images for r in results),
        num_tokens=sum(r.tokens for r in results),
        num_trained_tokens=sum(r.trained_tokens for r in results),
        num_rejected=len(rejects),
        num_fitted=sum(r.fitted for r in results),
        num_truncated=sum(r.truncated for r in results),
        rejects_by_code=dict(sorted(Counter(r["code"] for r in rejects).items())),
        shards=[ShardEntry(**{k: v for k, v in shard.items() if k in ShardEntry.model_fields}) for shard in shards],
        index=IndexFile(**index),
        config={
            **config.identity(),
            "family": config.family.describe(),
            "tokenizer": tokenizer.name,
            "tokenizer_fingerprint": tokenizer.fingerprint,
            "special_tokens": special_tokens,
        },
        created_by=f"shardkit {__version__}",
    )
    manifest.write(fs, folder)
    if fs.exists(join(folder, PROGRESS_DIR)):
        fs.rm(join(folder, PROGRESS_DIR), recursive=True)
    logger.info(
        "built %d samples in %d shards (%d rejected) into %s",
        manifest.num_samples,
        len(manifest.shards),
        manifest.num_rejected,
        config.out,
    )
    return manifest
