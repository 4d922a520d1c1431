"""Videos: a clip's metadata and frames (PyAV), and the frames, size and tokens the Qwen-VL video processors give it.

A build decodes each clip once: :func:`probe` reads its metadata, a :class:`VideoGrid` plans which frames to keep and
the size to store them at (:meth:`VideoGrid.plan`, or :meth:`VideoGrid.fit` under a token budget), and
:func:`decode_frames` decodes exactly those frames in one pass. A clip given as a list of frame images (ms-swift's and
LLaMA-Factory's form) has no file to probe: :func:`frame_list_meta` describes it, and every frame is kept. A
:class:`Clip` is one video of a record, opened either way; :meth:`Clip.stored_frames` gives the JPEG frames a shard
stores.

The rules are transformers' (5.25), family by family:

- Qwen2-VL and Qwen2.5-VL (``Qwen2VLVideoProcessor`` with ``do_sample_frames=True, fps=...``): an even number of
  frames at ``fps`` per second of video, within min/max frames, at the indices ``arange(0, total, total / n)``
  truncated; every frame is sized on its own by the image rule (:class:`~shardkit.images.grid.Grid`), with no budget
  over the clip. Qwen2.5-VL also takes ``second_per_grid_ts`` (temporal patch / sampled fps).
- Qwen3-VL (``Qwen3VLVideoProcessor``): ``fps`` per second, at least ``min_frames``, at ``linspace(0, total - 1, n)``
  rounded (the count may be odd: the last frame then fills the last temporal patch); the pixel budget is over all
  frames together. ``Qwen3VLProcessor`` writes ``<t seconds>`` (the mean time of each temporal patch's frames, one
  decimal) before each temporal patch. qwen-vl-utils caps the pixels per frame instead; shardkit follows transformers.

The default bounds are a choice, recorded by the caller: the checkpoints of Qwen2-VL and Qwen2.5-VL ship no video
settings (transformers then falls back to the image bounds and keeps every frame), so they get the video processor's
own per-frame bounds, 128 to 768 tokens (= qwen-vl-utils'); Qwen3-VL gets its checkpoint's, 4096 to 25165824 pixels
over the clip. Frame times are ``index / fps`` with the stream's average frame rate, as every processor counts them,
also for a variable frame rate (the decoded :class:`Frame` carries the true presentation time beside it).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
from PIL import Image

from shardkit.errors import ConfigError, RecordError
from shardkit.images.decode import SourceImage
from shardkit.images.encode import encode_jpeg
from shardkit.images.grid import MAX_ASPECT_RATIO, Grid

DEFAULT_FPS = 2.0  # frames sampled per second of video, and the rate of a frame list that gives none
MIN_FRAMES = 4
MAX_FRAMES = 768

Processor = Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]

#: Qwen2.5-VL's ``vision_config.tokens_per_second`` in its published checkpoints (the config class's default is 4):
#: a temporal patch's position step is this times its ``second_per_grid_t``
QWEN2_5_VL_TOKENS_PER_SECOND = 2

Source = str | os.PathLike | bytes


@dataclass(frozen=True)
class VideoMeta:
    """What a clip is: its frame count, frame rate (as the processors take it), duration and frame size."""

    frames: int
    fps: float
    duration: float  # seconds
    height: int
    width: int
    frame_list: bool = False  # frames already sampled (a list of images): kept, not sampled again


@dataclass(frozen=True)
class VideoPlan:
    """The frames of a clip a processor keeps, the size it resizes them to, and what the model then sees."""

    indices: tuple[int, ...]  # source frames kept, in order (not padded to the temporal patch)
    times: tuple[float, ...]  # their times in seconds, index / fps
    size: tuple[int, int]  # (height, width) of every stored frame, on the grid
    grid: tuple[int, int, int]  # video_grid_thw: temporal patches, patch rows, patch columns
    tokens: int  # <|video_pad|> tokens of the clip
    second_per_grid_t: float | None = None  # Qwen2.5-VL's second_per_grid_ts entry, else None
    timestamps: tuple[str, ...] = ()  # Qwen3-VL: the text before each temporal patch, e.g. "<0.3 seconds>"

    @property
    def frames(self) -> int:
        """Frames stored (the last temporal patch repeats the last one when the count is odd)."""
        return len(self.indices)


@dataclass(frozen=True, eq=False)
class Frame:
    """One decoded frame: its index in presentation order, its presentation time and its RGB pixels."""

    index: int
    time: float | None  # seconds from the stream's timestamps; None when the stream has none
    rgb: np.ndarray = field(repr=False)  # (height, width, 3) uint8


@dataclass(frozen=True)
class VideoGrid:
    """How a family's video processor samples and sizes a clip (each family's at its processor's defaults:
    :attr:`Family.video_grid <shardkit.families.base.Family.video_grid>`; :meth:`with_options` sets a build's).

    ``min_pixels``/``max_pixels`` bound each frame for Qwen2-VL and Qwen2.5-VL, the frames together for Qwen3-VL.
    Qwen3-VL's processor reads ``min_frames``/``max_frames`` from its settings, never from a call.
    """

    processor: Processor
    patch_size: int
    min_pixels: int
    max_pixels: int
    fps: float = DEFAULT_FPS
    min_frames: int = MIN_FRAMES
    max_frames: int = MAX_FRAMES
    merge_size: int = 2
    temporal_patch_size: int = 2

    def __post_init__(self) -> None:
        if self.processor not in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
            raise ConfigError(f"no video rule for processor {self.processor!r}")
        if not self.fps > 0:
            raise ConfigError(f"the video fps must be positive, not {self.fps}")
        if not self.temporal_patch_size <= self.min_frames <= self.max_frames:
            raise ConfigError(
                f"video frames: need {self.temporal_patch_size} <= min_frames ({self.min_frames}) <= max_frames "
                f"({self.max_frames})"
            )
        Grid(self.factor, self.min_pixels, self.max_pixels)  # raises on bad bounds

    def with_options(
        self,
        *,
        fps: float | None = None,
        max_frames: int | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ) -> VideoGrid:
        """This rule with ``--video-fps``/``--video-max-frames``-style overrides (None: this rule's own)."""
        max_frames = max_frames or self.max_frames
        return replace(
            self,
            fps=fps or self.fps,
            min_frames=min(self.min_frames, max_frames),
            max_frames=max_frames,
            min_pixels=min_pixels or self.min_pixels,
            max_pixels=max_pixels or self.max_pixels,
        )

    @property
    def factor(self) -> int:
        """Frame sides are multiples of this (one token covers factor x factor pixels of each of 2 frames)."""
        return self.patch_size * self.merge_size

    @property
    def pixels_over(self) -> Literal["frame", "clip"]:
        """What ``min_pixels``/``max_pixels`` bound: each frame (Qwen2/2.5), or the clip's frames together (Qwen3)."""
        return "clip" if self.processor == "qwen3_vl" else "frame"

    @property
    def tokens_per_second(self) -> float | None:
        """The temporal position step per second of video (Qwen2.5-VL's published config); None where there is none."""
        return QWEN2_5_VL_TOKENS_PER_SECOND if self.processor == "qwen2_5_vl" else None

    def plan(self, meta: VideoMeta, *, max_frames: int | None = None, max_pixels: int | None = None) -> VideoPlan:
        """The processor's frames, size, grid and tokens for ``meta``; ``max_frames``/``max_pixels`` lower the limits.

        A frame list keeps all its frames (up to ``max_frames``, then taken evenly by the family's rule for a
        frame count). ``max_pixels`` caps a frame (Qwen2/2.5) or the clip (Qwen3); the size chosen is one the
        processor, given the stored frames, keeps as it is. Raises :class:`RecordError` ``video_too_short`` for a
        clip of fewer than 2 frames and ``video_aspect`` for one Qwen refuses.
        """
        if meta.frames < self.temporal_patch_size:
            raise RecordError(
                f"video has {meta.frames} frame(s); a video needs at least {self.temporal_patch_size}",
                "video_too_short",
                detail={"frames": meta.frames},
            )
        if max(meta.height, meta.width) > MAX_ASPECT_RATIO * min(meta.height, meta.width):
            raise RecordError(
                f"video is {meta.width}x{meta.height}, an aspect ratio over {MAX_ASPECT_RATIO}:1, which Qwen's video "
                "processor refuses",
                "video_aspect",
            )
        indices = self._indices(meta, min(max_frames or self.max_frames, self.max_frames))
        n = len(indices)
        cap = min(max_pixels or self.max_pixels, self.max_pixels)
        if self.processor == "qwen3_vl":
            height, width = self._clip_size(n, meta.height, meta.width, cap)
        else:
            try:
                height, width = Grid(self.factor, self.min_pixels, self.max_pixels).size(meta.height, meta.width, cap)
            except RecordError as exc:  # Grid's words are about an image
                raise RecordError(f"video frames: {exc.reason}", "video_aspect") from None
        t = -(-n // self.temporal_patch_size)
        grid = (t, height // self.patch_size, width // self.patch_size)
        times = tuple(i / meta.fps for i in indices)
        spg = None
        if self.processor == "qwen2_5_vl":  # transformers: temporal_patch_size / metadata.sampled_fps
            spg = self.temporal_patch_size / (n / meta.frames * meta.fps)
        stamps = _timestamps(indices, meta.fps, self.temporal_patch_size) if self.processor == "qwen3_vl" else ()
        tokens = t * (height // self.factor) * (width // self.factor)
        return VideoPlan(indices, times, (height, width), grid, tokens, spg, stamps)

    def fit(self, meta: VideoMeta, budget: int) -> VideoPlan | None:
        """The plan of ``meta`` with at most ``budget`` video tokens, keeping as much as it can; None if none fits.

        Qwen2-VL / Qwen2.5-VL lower the frames first (each temporal patch costs the same), then the resolution of the
        last two. Under Qwen3-VL's budget over the whole clip fewer frames are each made larger, for about the same
        tokens, so it lowers that budget first, then the frames (and gives the budget back as far as they allow).
        """
        full = self.plan(meta)
        if full.tokens <= budget:
            return full

        def fits(max_frames: int | None, max_pixels: int | None) -> bool:
            return self.plan(meta, max_frames=max_frames, max_pixels=max_pixels).tokens <= budget

        lo_pixels = self.min_pixels
        if self.processor == "qwen3_vl":
            frames: int | None = full.frames
            pixels = _largest(lo_pixels, self.max_pixels, lambda p: fits(frames, p))
            if pixels is None:
                # tokens are not monotonic in frames here (min_pixels enlarges few frames): the most that fit
                frames = next((f for f in range(full.frames - 1, 1, -1) if fits(f, lo_pixels)), None)
                if frames is None:
                    return None
                pixels = _largest(lo_pixels, self.max_pixels, lambda p: fits(frames, p))
        else:
            step = self.temporal_patch_size
            patches = _largest(1, full.grid[0], lambda k: fits(k * step, None))
            frames = (patches or 1) * step
            pixels = None if patches else _largest(lo_pixels, self.max_pixels, lambda p: fits(frames, p))
            if patches is None and pixels is None:
                return None
        return self.plan(meta, max_frames=frames, max_pixels=pixels)

    def _indices(self, meta: VideoMeta, max_frames: int) -> tuple[int, ...]:
        """The source frames the processor samples: at ``fps``, or a frame list's all, up to ``max_frames``."""
        total, tp = meta.frames, self.temporal_patch_size
        qwen3 = self.processor == "qwen3_vl"
        if meta.frame_list:
            if total <= max_frames:
                return tuple(range(total))
            n = max_frames if qwen3 else max_frames // tp * tp  # Qwen2's num_frames is rounded to the patch
        elif qwen3:  # Qwen3VLVideoProcessor.sample_frames
            n = min(max(int(total / meta.fps * self.fps), self.min_frames), max_frames, total)
        else:  # Qwen2VLVideoProcessor.sample_frames with fps
            top = math.floor(min(max_frames, total) / tp) * tp
            n = math.floor(min(max(total / meta.fps * self.fps, self.min_frames), top, total) / tp) * tp
        if qwen3:
            return tuple(int(i) for i in np.linspace(0, total - 1, n).round().astype(int))
        return _arange_indices(total, n)

    def _clip_size(self, n: int, height: int, width: int, cap: int) -> tuple[int, int]:
        """Qwen3-VL's size for ``n`` frames of ``height x width`` within ``cap`` pixels over the clip, made stable.

        Stable: the processor, run on ``n`` frames of the returned size, keeps it. Its own size is not always: it
        shrinks by ``n`` frames but checks ``n`` rounded to the temporal patch, so for n = 3, 7, 11, ... (rounded
        up) a large frame can come back a cell larger (n=11, 1778x1471: 1632x1344, then 1664x1344, then stable).
        The size is then the one the processor settles on (one more step, on every size tried).
        """
        f, lo, hi, tp = self.factor, self.min_pixels, self.max_pixels, self.temporal_patch_size
        size = smart_resize_clip(n, height, width, f, min(lo, cap), cap, tp)
        for _ in range(4):
            again = smart_resize_clip(n, *size, f, lo, hi, tp)
            if again == size:
                return size
            size = again
        raise RecordError(
            f"video {width}x{height} with {n} frames: Qwen3-VL's video processor finds no stable size for it",
            "video_aspect",
        )


def smart_resize_clip(
    frames: int, height: int, width: int, factor: int, min_pixels: int, max_pixels: int, temporal_factor: int = 2
) -> tuple[int, int]:
    """The size Qwen3-VL's video processor resizes ``frames`` frames of ``height x width`` to (transformers 5.25).

    Like the image rule (:func:`~shardkit.images.grid.smart_resize`), but the bounds are over the frames
    together (the frame count rounded to the temporal patch), and frames under one cell are first scaled up.
    """
    if frames < temporal_factor:
        raise ValueError(f"{frames} frame(s), fewer than the temporal patch ({temporal_factor})")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _arange_indices(total: int, n: int) -> tuple[int, ...]:
    """``torch.arange(0, total, total / n).int()`` exactly (a float32 result of double arithmetic, truncated).

    Where ``total / step`` rounds just above ``n`` torch adds an index equal to ``total``, which transformers then
    fails on (IndexError); it is left out here.
    """
    step = total / n
    values = np.float32(np.arange(math.ceil(total / step), dtype=np.float64) * step).astype(np.int64)
    return tuple(int(i) for i in values if i < total)


def _timestamps(indices: Sequence[int], fps: float, temporal_patch_size: int) -> tuple[str, ...]:
    """Qwen3VLProcessor's text before each temporal patch: the mean time of its first and last frame, one decimal."""
    padded = list(indices) + [indices[-1]] * (-len(indices) % temporal_patch_size)
    times = [i / fps for i in padded]
    step = temporal_patch_size
    return tuple(f"<{(times[k] + times[k + step - 1]) / 2:.1f} seconds>" for k in range(0, len(times), step))


def _largest(lo: int, hi: int, ok: Any) -> int | None:
    """The largest value in ``lo..hi`` for which ``ok`` holds (true up to some value, false beyond); None if none."""
    if not ok(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


@dataclass(frozen=True, eq=False)
class Clip:
    """One video of a record, opened: its label (where it came from), its metadata and what gives its frames, the
    clip's bytes (``data``) or, for a video given as a list of frame images, those images (``frames``)."""

    label: str
    meta: VideoMeta
    data: bytes | None = field(default=None, repr=False)
    frames: tuple[SourceImage, ...] = field(default=(), repr=False)

    def stored_frames(self, plan: VideoPlan, quality: int) -> tuple[list[bytes], list[float | None]]:
        """The planned frames resized to the plan's size (bicubic) as JPEGs, and each one's decoded presentation time
        (None for frame images); a clip is decoded once, one frame in memory at a time."""
        jpegs: list[bytes] = []
        times: list[float | None] = []
        if self.data is None:
            for index in plan.indices:
                jpegs.append(encode_jpeg(self.frames[index].decode(plan.size), plan.size, quality))
                times.append(None)
            return jpegs, times
        for frame in decode_frames(self.data, plan.indices, ref=self.label):
            jpegs.append(encode_jpeg(Image.fromarray(frame.rgb), plan.size, quality))
            times.append(frame.time)
        return jpegs, times


def frame_list_meta(sizes: Sequence[tuple[int, int]], fps: float | None = None) -> VideoMeta:
    """A clip given as frame images of ``sizes`` ((height, width) each), ``fps`` frames a second (default 2).

    Raises :class:`RecordError` ``video_frame_sizes`` when the frames differ in size (a processor stacks them).
    """
    fps = fps or DEFAULT_FPS
    if not fps > 0:
        raise RecordError(f"a video's fps must be positive, not {fps}", "video_fps")
    if len(set(sizes)) > 1:
        shown = ", ".join(f"{w}x{h}" for h, w in sorted(set(sizes))[:4])
        raise RecordError(f"the frames of a video differ in size ({shown})", "video_frame_sizes")
    height, width = sizes[0] if sizes else (0, 0)
    return VideoMeta(len(sizes), float(fps), len(sizes) / fps, height, width, frame_list=True)


def probe(source: Source, *, ref: str | None = None) -> VideoMeta:
    """The metadata of a clip (a path, or its bytes) without decoding it.

    Frames: the stream's count, else its packets counted (Matroska and WebM record none). Frame rate: the stream's
    average rate, as the processors read it, then the guessed and base rates, then frames / duration.
    """
    av = _av()
    with _opened(source, ref) as (container, stream, detail):
        frames = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
        duration = None
        if stream.duration and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        elif container.duration:
            duration = container.duration / av.time_base
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else (frames / duration if duration else 0.0)
        height, width = stream.codec_context.height, stream.codec_context.width
        if not (fps > 0 and height > 0 and width > 0):
            raise RecordError(
                f"video has no frame rate or frame size: {detail['video']}", "video_unreadable", detail=detail
            )
        return VideoMeta(frames, fps, duration or frames / fps, height, width)


def decode_frames(source: Source, indices: Sequence[int], *, ref: str | None = None) -> Iterator[Frame]:
    """The frames at ``indices`` (ordinals in presentation order), in index order, decoded in one pass.

    Frames are yielded as they are decoded and nothing else is kept, so memory stays at one frame whatever the
    clip. Raises :class:`RecordError` ``video_truncated`` when the stream ends before the last index.
    """
    wanted = sorted(indices)
    if not wanted:
        return
    with _opened(source, ref) as (container, stream, detail):
        stream.thread_type = "AUTO"
        k = decoded = 0
        for frame in container.decode(stream):
            index, decoded = decoded, decoded + 1
            if index < wanted[k]:
                continue
            rgb = frame.to_ndarray(format="rgb24")
            time = None if frame.time is None else float(frame.time)
            while k < len(wanted) and wanted[k] == index:
                yield Frame(index, time, rgb)
                k += 1
            if k == len(wanted):
                return
        raise RecordError(
            f"video ends after {decoded} frame(s), before frame {wanted[k]}: {detail['video']}",
            "video_truncated",
            detail={**detail, "frames_decoded": decoded},
        )


def _av() -> Any:
    try:
        import av
    except ImportError:
        raise ConfigError("videos need PyAV: pip install 'shardkit[video]'") from None
    return av


@contextmanager
def _opened(source: Source, ref: str | None) -> Iterator[tuple[Any, Any, dict[str, str]]]:
    """The open container, its video stream and the error detail; FFmpeg's errors become :class:`RecordError`."""
    av = _av()
    is_bytes = isinstance(source, bytes | bytearray | memoryview)
    label = ref or ("<video bytes>" if is_bytes else os.fspath(source))
    detail = {"video": str(label)}
    try:
        container = av.open(io.BytesIO(source) if is_bytes else os.fspath(source))
    except FileNotFoundError:
        raise RecordError(f"video not found: {label}", "video_missing", detail=detail) from None
    except (av.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise RecordError(
            f"video cannot be decoded: {label} ({_ffmpeg_reason(exc)})", "video_unreadable", detail=detail
        ) from None
    try:
        streams = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
        if not streams:
            raise RecordError(f"file has no video stream: {label}", "video_no_stream", detail=detail)
        yield container, streams[0], detail
    except av.FFmpegError as exc:
        raise RecordError(
            f"video cannot be decoded: {label} ({_ffmpeg_reason(exc)})", "video_unreadable", detail=detail
        ) from None
    finally:
        container.close()


def _ffmpeg_reason(exc: BaseException) -> str:
    """FFmpeg's words for an error (``Invalid data found when processing input``), without its number and file."""
    return getattr(exc, "strerror", None) or str(exc)


__all__ = [
    "DEFAULT_FPS",
    "Clip",
    "Frame",
    "VideoGrid",
    "VideoMeta",
    "VideoPlan",
    "decode_frames",
    "frame_list_meta",
    "probe",
    "smart_resize_clip",
]
