"""One record's conversion: a raw input item -> a :class:`~shardkit.shards.Sample`, or its reject.

:class:`Converter` reads the record in its input form, checks it
(:mod:`shardkit.record_checks`), opens its videos and plans their frames
(:mod:`shardkit.video`: a clip is probed, not decoded, here), renders and
tokenizes its chat in the family's format, opens its images and plans their
sizes on the grid (fitting ``max_length`` with ``--overlength fit``: the
videos' frames, then their resolution, then the images'), cuts to
``max_length``, encodes the images as JPEGs and decodes each clip once for
the frames it keeps. A record with grounding boxes (objects, placeholders, or a
family's box syntax in its text) has its images opened first, and its texts
written for their stored sizes (:class:`BoxWriter`) before it is rendered.
``build`` and ``validate`` both convert through it, so they reject the same
records for the same reasons.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Sequence
from typing import Any

import numpy as np

from shardkit.boxes import (
    BBOX,
    REF_OBJECT,
    Grounded,
    ImageSize,
    box_spans,
    ground,
    mentions_boxes,
    parse_objects,
    stored_boxes,
)
from shardkit.config import BuildConfig, Overlength
from shardkit.errors import ConfigError, RecordError
from shardkit.images import ImageRoot, SourceImage, encode_jpeg, image_label
from shardkit.inputs import InputFormat, RawItem, open_input
from shardkit.ledger import Ledger, file_stamp, record_read
from shardkit.record_checks import check_answers, check_text, max_token_chars, min_tokens, plain_json, text_chars
from shardkit.render import Expanded, Rendered, Renderer, targets
from shardkit.schema import ImagePart, Record, TextPart, VideoPart
from shardkit.shards import Sample
from shardkit.video import Clip, VideoGrid, VideoPlan, frame_list_meta, probe

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
        self.video_grid = config.video_grid
        self.root = image_root(config, self.input)
        self.token_chars = max_token_chars(tokenizer)

    def __call__(self, raw: RawItem, ledger: Ledger | None = None) -> Sample:
        """The sample of ``raw``; the image files it reads are noted in ``ledger``."""
        try:
            return self._convert(raw, {} if ledger is None else ledger)
        except RecordError as exc:
            raise exc.at(raw.number, raw.source_line) from None
        except ConfigError:  # the build's own (PyAV missing for a video): stops the build with its one line
            raise
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
        clips = self._open_videos(record.videos(), ledger)
        plans = [self._video_grid().plan(clip.meta) for clip in clips]
        refs = [part.image for part in record.images()]
        grounded = record.objects is not None or mentions_boxes(record_texts(record))
        if not grounded:  # rendered first: a record's text is checked before its images are read
            rendered = self.renderer.render(record, self.config.train_on, plans)
            self._check_text_tokens(rendered.num_text_tokens)
        opened = self._open_images(refs, ledger)
        originals = [(opened[ref].height, opened[ref].width) for ref in refs]
        boxes = BoxWriter(self, record, [opened[ref] for ref in refs]) if grounded else None
        if boxes is not None:  # written for the full sizes: a bound of the text's tokens for the plan
            record, rendered = boxes.render(self.grid.plan(originals), plans)
            self._check_text_tokens(rendered.num_text_tokens)
        if clips:
            planned, plans, rendered, fitted = self._plan_with_videos(record, originals, clips, plans, rendered)
        else:
            planned, fitted = self._plan(originals, rendered.num_text_tokens)
        if boxes is not None and fitted:  # absolute coordinates follow the planned sizes (digits, tokens, only fall)
            record, rendered = boxes.render(planned, plans)
        blocks = [tokens for plan in plans for tokens in _blocks(plan)]
        expanded = rendered.expand([self.grid.tokens(h, w) for h, w in planned], blocks)
        input_ids, weights = self._cut(expanded)
        if boxes is not None and len(input_ids) < len(expanded.input_ids):
            boxes.check_cut(expanded, len(input_ids))
        trained = int((weights > 0).sum())
        turns = sum(targets(record, self.config.train_on))
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
        if boxes is not None:
            boxes.record(info)
        videos: list[list[bytes]] = []
        if clips:
            quality = self.config.jpeg_quality
            stored = [clip.stored_frames(plan, quality) for clip, plan in zip(clips, plans, strict=True)]
            videos = [frames for frames, _ in stored]
            times = [decoded for _, decoded in stored]
            info["videos"] = self._videos_info(clips, plans, times, expanded.video_spans)
        sample = Sample(info["key"], info, input_ids, weights, self._encode(opened, refs, planned), videos)
        sample.info_json  # noqa: B018 -- made here, so a value JSON cannot hold is this record's reject
        return sample

    def _video_grid(self) -> VideoGrid:
        """The family's video rule; ``video_not_supported`` where the family takes no video."""
        if self.video_grid is None:
            raise RecordError(
                f"the record has a video, and the {self.config.family.name} family takes none", "video_not_supported"
            )
        return self.video_grid

    def _open_videos(self, parts: list[VideoPart], ledger: Ledger) -> list[Clip]:
        """The record's videos, opened (a clip read and probed, a frame list's images opened), none decoded."""
        if parts:
            self._video_grid()
        clips = []
        for part in parts:
            if part.frames is None:
                data = self._read_video(part.video, ledger)  # type: ignore[arg-type]
                label = image_label(part.video)  # type: ignore[arg-type]
                clips.append(Clip(label, probe(data, ref=label), data=data))
                continue
            opened = self._open_images(part.frames, ledger)
            frames = tuple(opened[ref] for ref in part.frames)
            meta = frame_list_meta([(f.height, f.width) for f in frames], part.fps)
            label = f"{image_label(part.frames[0])} ... {image_label(part.frames[-1])} ({len(frames)} frames)"
            clips.append(Clip(label, meta, frames=frames))
        return clips

    def _read_video(self, ref: str, ledger: Ledger) -> bytes:
        """A clip's bytes, read as an image's are (inside the root, a regular file, within --max-image-bytes); the
        reasons say video."""
        try:
            return self._read(ref, ledger)
        except RecordError as exc:
            code = exc.code.replace("image_", "video_", 1) if exc.code.startswith("image_") else exc.code
            reason = exc.reason.replace("image", "video", 1).replace("download images", "download videos")
            detail = {("video" if k == "image" else k): v for k, v in (exc.detail or {}).items()}
            raise RecordError(reason, code, detail=detail) from None

    def _plan_with_videos(
        self,
        record: Record,
        originals: list[tuple[int, int]],
        clips: list[Clip],
        plans: list[VideoPlan],
        rendered: Rendered,
    ) -> tuple[list[tuple[int, int]], list[VideoPlan], Rendered, bool]:
        """Image sizes, video plans and the rendering of a sample with videos; under ``--overlength fit`` lowered
        until it fits ``max_length``: the videos first (frames, then resolution; :meth:`VideoGrid.fit`) with the
        images at their full size, else with the images at their least, which then take back what the videos
        leave. Qwen3-VL's timestamps are text that changes with the frames: the chat is rendered again, and a
        budget the new text overruns is lowered by that much."""
        config, grid, video_grid = self.config, self.grid, self._video_grid()
        full = grid.plan(originals)
        full_tokens = sum(grid.tokens(h, w) for h, w in full)
        if config.overlength is not Overlength.FIT:
            return full, plans, rendered, False
        if rendered.num_text_tokens + full_tokens + _tokens(plans) <= config.max_length:
            return full, plans, rendered, False
        least = [grid.size(h, w, grid.min_pixels) for h, w in originals]
        least_tokens = sum(grid.tokens(h, w) for h, w in least)
        text = rendered.num_text_tokens
        for _ in range(4):
            budget = config.max_length - text
            fitted = None
            for image_tokens in (full_tokens, least_tokens):
                fitted = _fit_videos(video_grid, [c.meta for c in clips], plans, budget - image_tokens)
                if fitted is not None:
                    break
            if fitted is None:
                break
            images = full if image_tokens == full_tokens else grid.plan(originals, budget - _tokens(fitted))
            if images is None:  # pragma: no cover -- the least sizes fit by the choice above
                break
            again = self.renderer.render(record, config.train_on, fitted)
            total = again.num_text_tokens + sum(grid.tokens(h, w) for h, w in images) + _tokens(fitted)
            if total <= config.max_length:
                return images, fitted, again, True
            text += total - config.max_length  # the new timestamps are longer: take it off the budget
        raise RecordError(
            f"too long: {rendered.num_text_tokens} text tokens plus its {len(originals)} images at min_pixels "
            f"({least_tokens} tokens) and {len(clips)} videos at their least (2 frames at min_pixels) exceed "
            f"max_length {config.max_length}",
            "too_long",
        )

    def _videos_info(
        self,
        clips: list[Clip],
        plans: list[VideoPlan],
        decoded_times: list[list[float | None]],
        spans: list[tuple[int, int]],
    ) -> list[dict[str, Any]]:
        """What the sample's JSON says of each video (:class:`~shardkit.shards.base.StoredVideo`)."""
        out = []
        blocks = iter(spans)
        for clip, plan, times in zip(clips, plans, decoded_times, strict=True):
            meta = clip.meta
            own = [list(next(blocks)) for _ in _blocks(plan)]
            spg = plan.second_per_grid_t
            out.append(
                {
                    "source": clip.label,
                    "frame_list": meta.frame_list,
                    "source_frames": meta.frames,
                    "source_fps": float(meta.fps),
                    "duration": float(meta.duration),
                    "original_width": meta.width,
                    "original_height": meta.height,
                    "width": plan.size[1],
                    "height": plan.size[0],
                    "frame_indices": list(plan.indices),
                    "frame_times": [float(t) for t in plan.times],
                    "decoded_times": times,
                    "grid_thw": list(plan.grid),
                    "second_per_grid_t": None if spg is None else float(spg),
                    "timestamps": list(plan.timestamps),
                    "spans": own,
                    "token_start": own[0][0],
                    "num_tokens": plan.tokens,
                }
            )
        return out

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
        image_end = max((start + n for start, n in expanded.image_spans + expanded.video_spans), default=0)
        if image_end > config.max_length:
            media = "video" if any(s + n == image_end for s, n in expanded.video_spans) else "image"
            raise RecordError(
                f"too long: {len(input_ids)} tokens, and cutting to max_length {config.max_length} would cut "
                f"through {media} tokens (they end at {image_end})",
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


class BoxWriter:
    """A record's grounding (:mod:`shardkit.boxes`) for one conversion: its objects parsed once, then its texts
    written for each size its images are given (the full size bounds the tokens ``--overlength fit`` plans with;
    the planned size is what is stored), and what the sample's JSON records of it.

    Refused: objects or placeholders for a family that takes no boxes (``boxes_not_supported``).
    """

    def __init__(self, convert: Converter, record: Record, images: list[SourceImage]):
        config = convert.config
        self.convert, self.original, self.images = convert, record, images
        self.style = config.boxes
        self.texts = record_texts(record)
        self.names = record_text_names(record)
        if self.style is None:
            if record.objects is not None or any(p in t for t in self.texts for p in (BBOX, REF_OBJECT)):
                raise RecordError(
                    f"the record has grounding boxes, and the family {config.family.name} takes none",
                    "boxes_not_supported",
                )
            self.grounding = None
        else:
            self.grounding = parse_objects(record.objects, self.texts, len(images))
        self.grounded: Grounded | None = None
        self.sizes: list[ImageSize] = []

    def render(self, planned: list[tuple[int, int]], videos: Sequence[VideoPlan] = ()) -> tuple[Record, Rendered]:
        """The record with its texts written for the images at ``planned`` (height, width) sizes, and its render
        (with its videos' plans, whose timestamps are text)."""
        if self.style is None or self.grounding is None:
            return self.original, self.convert.renderer.render(self.original, self.convert.config.train_on, videos)
        self.sizes = [
            ImageSize(image.width, image.height, w, h, image.orientation)
            for image, (h, w) in zip(self.images, planned, strict=True)
        ]
        config = self.convert.config
        self.grounded = ground(
            self.texts,
            self.grounding,
            self.sizes,
            self.style,
            boxes_in=config.box_orientation,
            refuse=config.text_boxes == "refuse",
            names=self.names,
        )
        record = with_texts(self.original, self.grounded.texts)
        return record, self.convert.renderer.render(record, config.train_on, videos)

    @property
    def active(self) -> bool:
        """Whether the record has boxes or points, as objects or in its text."""
        return self.grounded is not None and bool(self.grounded.written or self.grounded.text_boxes)

    def check_cut(self, expanded: Expanded, kept: int) -> None:
        """``box_truncated`` when ``--overlength truncate`` cut through a written box, point or ref: the text after
        the last image is decoded whole and as kept, and the cut must fall outside every box's span."""
        if not self.active:
            return
        start = max((s + n for s, n in expanded.image_spans), default=0)
        decode = self.convert.renderer.backend.decode
        ids = [int(i) for i in expanded.input_ids[start:]]
        text = decode(ids, skip_special_tokens=False)
        cut = len(decode(ids[: kept - start], skip_special_tokens=False))
        for begin, end in box_spans(text):
            if begin < cut < end:
                raise RecordError(
                    f"too long: cutting to max_length {self.convert.config.max_length} (--overlength truncate) would "
                    f"cut through {text[begin:end]!r}",
                    "box_truncated",
                )

    def record(self, info: dict[str, Any]) -> None:
        """Add to the sample's JSON, when the record has boxes: its objects as given, each shape's original and
        written coordinates (:func:`~shardkit.boxes.stored_boxes`), how many boxes its text held and how many of
        those were rescaled, and each image's EXIF orientation where it is not 1."""
        if not self.active:
            return
        assert self.grounded is not None and self.grounding is not None and self.style is not None
        if self.original.objects is not None:
            info["objects"] = plain_json(self.original.objects, "objects")
        info["boxes"] = stored_boxes(self.grounding, self.grounded.written, self.style.scale)
        info["text_boxes"] = {"found": self.grounded.text_boxes, "rescaled": self.grounded.rescaled}
        for image, size in zip(info["images"], self.sizes, strict=True):
            if size.orientation != 1:
                image["orientation"] = size.orientation


def record_texts(record: Record) -> list[str]:
    """The record's text parts, in conversation order."""
    return [p.text for m in record.messages for p in m.content if isinstance(p, TextPart)]


def record_text_names(record: Record) -> list[str]:
    """How errors name each of :func:`record_texts`: ``messages[i]``."""
    return [f"messages[{i}]" for i, m in enumerate(record.messages) for p in m.content if isinstance(p, TextPart)]


def with_texts(record: Record, texts: list[str]) -> Record:
    """``record`` with its text parts replaced by ``texts``, in order (the record unchanged when they are equal)."""
    if texts == record_texts(record):
        return record
    new = iter(texts)
    messages = [
        m.model_copy(
            update={
                "content": [
                    p.model_copy(update={"text": next(new)}) if isinstance(p, TextPart) else p for p in m.content
                ]
            }  # fmt: skip
        )
        for m in record.messages
    ]
    return record.model_copy(update={"messages": messages})


def stored_messages(record: Record) -> list[dict[str, Any]]:
    """The conversation as stored with a sample: text parts as they are, image (video) parts by their index."""
    images = iter(range(len(record.images())))
    videos = iter(range(len(record.videos())))
    return [
        {
            "role": m.role,
            "content": [
                {"type": "image", "index": next(images)}
                if isinstance(p, ImagePart)
                else {"type": "video", "index": next(videos)}
                if isinstance(p, VideoPart)
                else {"type": "text", "text": p.text}
                for p in m.content
            ],
        }
        for m in record.messages
    ]


def _blocks(plan: VideoPlan) -> list[int]:
    """The ``<|video_pad|>`` tokens of each of a video's blocks: one block, or one per temporal patch (Qwen3-VL)."""
    if not plan.timestamps:
        return [plan.tokens]
    return [plan.tokens // len(plan.timestamps)] * len(plan.timestamps)


def _tokens(plans: list[VideoPlan]) -> int:
    return sum(plan.tokens for plan in plans)


def _fit_videos(grid: VideoGrid, metas: list[Any], plans: list[VideoPlan], budget: int) -> list[VideoPlan] | None:
    """The videos' plans within ``budget`` tokens together, each given its share by its full size (the plan as it
    is where it fits); None when one cannot fit its share."""
    full = _tokens(plans)
    if full <= budget:
        return plans
    if budget <= 0:
        return None
    fitted = []
    for meta, plan in zip(metas, plans, strict=True):
        share = budget * plan.tokens // full
        lowered = grid.fit(meta, share)
        if lowered is None:
            return None
        fitted.append(lowered)
    return fitted


def sample_key(line: int) -> str:
    """The sample's key in its shard: the zero-padded source line."""
    return f"{line:010d}"


def image_root(config: BuildConfig, source: InputFormat) -> ImageRoot:
    """Where a build reads images from, with its remote-image settings."""
    return ImageRoot(
        config.image_root or source.image_root(),
        allow_remote=config.allow_remote,
        timeout=config.remote_timeout,
        max_bytes=config.remote_max_bytes,
        max_image_bytes=config.max_image_bytes,
    )
