"""Model-ready Qwen2-VL / Qwen2.5-VL / Qwen3-VL batches from samples: collation, M-RoPE positions, packing.

:class:`Collator` turns samples into exactly what
``Qwen2VLForConditionalGeneration`` (and the Qwen2.5-VL, Qwen3-VL and
Qwen3-VL-MoE classes, with the build's grid and normalisation) takes:
``input_ids``, ``attention_mask``, ``labels`` (-100 where the weight is 0 and
on padding), ``pixel_values``, ``image_grid_thw`` and ``mm_token_type_ids``
(transformers 5 needs it for M-RoPE). ``pixel_values`` equal the image
processor's output on the stored images (``Qwen2VLImageProcessor``; for
Qwen3-VL with patch 16 and mean and std 0.5), because those are already on the
grid: the collator only decodes the JPEG, cuts it into patches and normalises.

With ``pixels="uint8"`` the batch carries ``pixel_patches`` instead (one byte
per value, no temporal copy: an eighth of the float32 size), and
:meth:`Collator.to_device` normalises and expands them on the device.

Videos (a build that holds them: ``manifest.video``) add ``pixel_values_videos``
(each video's stored frames, the last repeated to fill an odd count's last
temporal patch, cut into the processor's patches: two frames per temporal
patch), ``video_grid_thw`` and, for Qwen2.5-VL, ``second_per_grid_ts``
(float32); ``mm_token_type_ids`` is 2 on ``<|video_pad|>``. With
``pixels="uint8"`` they travel as ``video_patches`` (a quarter of the float32
size), normalised on the device. A batch with a video also carries its M-RoPE
``position_ids`` (``(3, rows, length)``, or packing's four rows), so that the
model trains on the positions of Qwen's release code whatever transformers is
installed: transformers 5.3 to 5.5 misplace the temporal positions of any Qwen2-VL
or Qwen2.5-VL video, and 5.6 on start the text after such a video at its
spatial extent rather than after its last position (see :func:`mrope_positions`).

Packed batches (a list of sequences, each a list of samples, from a stream with
``pack_tokens``) become rows of whole samples one after another, with no
``attention_mask`` and instead:

- ``position_ids`` of shape ``(4, rows, length)``: row 0 the text positions,
  restarting at 0 with each sample; rows 1-3 each sample's M-RoPE positions
  (temporal, height, width) exactly as ``get_rope_index`` computes them for the
  sample alone. Given ``position_ids``, the model uses them as they are; from
  the restarts in row 0 transformers builds a block-diagonal causal mask
  (eager, sdpa) or finds the sequences for flash-attention (one row a batch);
- ``cu_seq_lens_q``/``cu_seq_lens_k`` and ``max_length_q``/``max_length_k``:
  the samples' boundaries for flash-attention's variable-length kernel, any
  number of rows;
- ``labels`` -100 on each sample's first token, so that no sample is trained to
  predict the next one's start;
- ``use_cache`` False: with a cache, transformers skips the packed-sequence mask.

Padding after the last sample of a row continues that sample's positions: it
comes after every real token, so causal attention never lets a real token see it.

:class:`EmbeddingCollator` makes the batch of samples that hold cached image
embeddings instead of images (no pixels; see :mod:`shardkit.load.embeddings`).
Nothing here reads a build: :mod:`shardkit.load.torch` runs a collator over a stream.
"""

from __future__ import annotations

import io
import math
import mmap
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from shardkit.errors import ConfigError, ShardError
from shardkit.load.augment import Augment
from shardkit.shards import Manifest, Sample
from shardkit.shards.embeddings import EmbeddedSample

IGNORE_INDEX = -100


def image_patches(
    image: bytes | Image.Image, patch_size: int, merge_size: int, out: np.ndarray | None = None
) -> np.ndarray:
    """A stored image (JPEG bytes, or decoded) as uint8 patches ``(num_patches, 3, patch, patch)``, processor order.

    ``out``, if given, is a C-contiguous buffer of that shape to write the patches into (no extra copy).
    """
    if isinstance(image, bytes):
        image = Image.open(io.BytesIO(image))
    array = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    height, width, _ = array.shape
    p, m = patch_size, merge_size
    grid_h, grid_w = height // p, width // p
    x = array.reshape(grid_h // m, m, p, grid_w // m, m, p, 3)
    x = x.transpose(0, 3, 1, 4, 6, 2, 5)  # (rows/m, cols/m, m, m, channel, p, p)
    if out is None:
        out = np.empty((grid_h * grid_w, 3, p, p), dtype=np.uint8)
    out.reshape(x.shape)[...] = x
    return out


def expand_patches(
    patches: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    temporal_patch_size: int = 2,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 patches ``(n, channels, ...)`` -> the processor's ``pixel_values``: rescale, normalise, repeat the frame
    in time (``temporal_patch_size`` times; a video's patches, which hold their frames, take 1).

    Runs wherever ``patches`` lives (on the GPU, it costs almost nothing). Each
    value is ``x / (255 std) - mean / std`` in float32 (a multiply, then an add),
    the first frame computed and copied to the others. On the CPU this goes
    through :data:`CHUNK_PATCHES` patches at a time, so that each pass after the
    first reads what is still in the cache: the output is written once, at
    memory speed (4x faster than whole-array passes for a batch of 28,000
    patches); the values are the same to the bit.
    """
    n, channels, *frame = patches.shape
    scales = [1 / (255 * s) for s in std]
    biases = [-m / s for m, s in zip(mean, std, strict=True)]
    out = _output((n, channels, temporal_patch_size, *frame), patches.device)
    if patches.device.type == "cpu":
        _normalise_on_cpu(patches.numpy(), out.numpy(), scales, biases)
    else:
        scale = torch.tensor(scales, device=patches.device).view(1, channels, 1, 1)
        bias = torch.tensor(biases, device=patches.device).view(1, channels, 1, 1)
        first = out[:, :, 0]
        first.copy_(patches)
        first.mul_(scale).add_(bias)
        out[:, :, 1:].copy_(first.unsqueeze(2))
    return out.view(n, -1).to(dtype)


#: patches normalised at a time on the CPU: about a megabyte of float32 a frame, within the cache
CHUNK_PATCHES = 512


def _normalise_on_cpu(patches: np.ndarray, out: np.ndarray, scales: list[float], biases: list[float]) -> None:
    """``out`` ``(n, channels, frames, p, p)`` = each frame of ``patches`` ``(n, channels, p, p)`` times ``scales``
    plus ``biases`` (per channel, float32), a chunk of patches at a time."""
    n, channels, frames = out.shape[:3]
    src = patches.reshape(n, channels, -1)
    dst = out.reshape(n, channels, frames, -1)
    scale = np.asarray(scales, dtype=np.float32).reshape(1, channels, 1)
    bias = np.asarray(biases, dtype=np.float32).reshape(1, channels, 1)

    def normalise(start: int) -> None:
        chunk = slice(start, start + CHUNK_PATCHES)
        first = dst[chunk, :, 0]
        np.multiply(src[chunk], scale, out=first)
        np.add(first, bias, out=first)
        for frame in range(1, frames):
            dst[chunk, :, frame] = first

    parallel_map(normalise, range(0, n, CHUNK_PATCHES))


def parallel_map(function: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """``function`` over ``items``, in order, on as many threads as torch's intra-op count (every core in the main
    process, 1 in a DataLoader worker: then in this thread). Pillow's decoders and numpy's loops release the GIL,
    so a batch's images decode, and its pixels normalise, on every core a process without workers has. The threads
    end with the call (a fraction of a millisecond to start), so none is left for a later fork to copy."""
    threads = min(torch.get_num_threads(), len(items))
    if threads <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(threads, thread_name_prefix="shardkit-collate") as pool:
        return list(pool.map(function, items))


def _output(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """An uninitialised float32 tensor: in a DataLoader worker, in shared memory; otherwise on the CPU, when large,
    in memory the kernel may back with 2 MiB pages (:func:`_huge_page_tensor`).

    A tensor a worker returns is copied into shared memory to reach the main
    process; writing the pixels there in the first place saves that copy, a
    third of the cost of a float32 batch.
    """
    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)
    count = math.prod(shape)
    if device.type != "cpu":
        return torch.empty(shape, dtype=torch.float32, device=device)
    if new_shared is not None and torch.utils.data.get_worker_info() is not None:
        return torch.empty(0, dtype=torch.float32).set_(new_shared(count * 4), 0, shape)
    if count * 4 >= HUGE_PAGES_FROM:
        return _huge_page_tensor(count).view(shape)
    return torch.empty(shape, dtype=torch.float32)


#: float32 outputs from this size on are allocated by :func:`_huge_page_tensor`
HUGE_PAGES_FROM = 8 << 20
_HUGE_PAGE = 2 << 20


def _huge_page_tensor(count: int) -> torch.Tensor:
    """``count`` uninitialised float32 values in a fresh anonymous mapping, 2 MiB-aligned and advised
    ``MADV_HUGEPAGE`` where the platform has it (Linux with transparent huge pages set to ``madvise`` or ``always``).

    A fresh float32 batch of a hundred megabytes is written into pages the kernel maps on first touch: with 4 KiB
    pages that is tens of thousands of page faults, about as long as computing the values (measured: 75 ms of
    the 180 ms a 28,000-patch batch takes); with 2 MiB pages, a few dozen. The mapping is unmapped when the tensor
    is freed.
    """
    size = count * 4
    buffer = mmap.mmap(-1, size + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    address = np.frombuffer(buffer, dtype=np.uint8, count=1).ctypes.data
    offset = -address % _HUGE_PAGE
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buffer.madvise(mmap.MADV_HUGEPAGE, offset, size)
        except (OSError, ValueError):  # a kernel without transparent huge pages: ordinary pages
            pass
    return torch.frombuffer(buffer, dtype=torch.float32, count=count, offset=offset)


def vision_runs(
    images: Sequence[dict[str, Any]],
    videos: Sequence[dict[str, Any]] = (),
    tokens_per_second: float | None = None,
) -> list[tuple[int, int, tuple[int, int, int], float]]:
    """A sample's runs of vision tokens in token order: ``(start, count, grid_thw, temporal step)`` each.

    An image is one run of grid ``(1, H, W)``. A Qwen2-VL / Qwen2.5-VL video is one run of its grid, its temporal
    patches ``tokens_per_second * second_per_grid_t`` positions apart (Qwen2.5-VL, computed in float32 as
    transformers does) or one (Qwen2-VL); a Qwen3-VL video is one run of ``(1, H, W)`` per temporal patch (its
    timestamps are text between them), as ``get_rope_index`` splits it.
    """
    runs = [(image["token_start"], image["num_tokens"], tuple(image["grid_thw"]), 1.0) for image in images]
    for video in videos:
        t, h, w = video["grid_thw"]
        if len(video["spans"]) > 1 or video.get("timestamps"):
            runs += [(start, count, (1, h, w), 1.0) for start, count in video["spans"]]
            continue
        step = 1.0
        if tokens_per_second is not None and video.get("second_per_grid_t") is not None:
            step = float(np.float32(tokens_per_second) * np.float32(video["second_per_grid_t"]))
        (start, count), *_ = video["spans"]
        runs.append((start, count, (t, h, w), step))
    return sorted(runs)


def mrope_positions(
    length: int,
    images: Sequence[dict[str, Any]],
    merge_size: int,
    videos: Sequence[dict[str, Any]] = (),
    tokens_per_second: float | None = None,
) -> np.ndarray:
    """A sample's M-RoPE position ids ``(3, length)`` (temporal, height, width), as the model computes them.

    ``images`` and ``videos`` are the sample's ``info["images"]`` and ``info["videos"]`` (see :func:`vision_runs`).
    Text tokens count up on all three axes. A run of grid ``(T, H, W)`` sits at ``(s + floor(t * step), s + i,
    s + j)`` for its temporal patch ``t`` and merged cell ``(i, j)`` in that order, ``s`` the current position;
    the text after it continues from its largest position plus one, as Qwen's release code (and transformers up
    to 5.2, and vLLM) place it. For an image, every Qwen3-VL video and a Qwen2/2.5-VL video whose temporal reach
    is below its grid's longer side that is ``s`` plus that side, ``get_rope_index``'s rule in transformers 5.6 and
    later; a longer Qwen2/2.5-VL video there gets the release rule, which those versions differ from (the README's
    "Video positions").
    """
    out = np.empty((3, length), dtype=np.int64)
    position = cursor = 0
    for start, count, (t, h, w), step in vision_runs(images, videos, tokens_per_second):
        out[:, cursor:start] = position + np.arange(start - cursor)
        position += start - cursor
        h, w = h // merge_size, w // merge_size
        if t * h * w != count:
            raise ValueError(f"a vision run of grid {[t, h * merge_size, w * merge_size]} has {count} tokens, "
                             f"expected {t * h * w}")  # fmt: skip
        temporal = (np.arange(t, dtype=np.float32) * np.float32(step)).astype(np.int64)
        tt, hh, ww = np.meshgrid(temporal, np.arange(h), np.arange(w), indexing="ij")
        out[:, start : start + count] = position + np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)])
        position += max(int(temporal[-1]), h - 1, w - 1) + 1
        cursor = start + count
    out[:, cursor:] = position + np.arange(length - cursor)
    return out


def video_patches(frames: Sequence[bytes], grid_thw: Sequence[int], patch_size: int, merge_size: int) -> np.ndarray:
    """A stored video (its JPEG frames) as uint8 patches ``(T * N, 3, 2, patch, patch)``, the processor's order:
    temporal patch ``t`` holds frames ``2t`` and ``2t + 1`` (the last frame repeated to fill an odd count), each cut
    as :func:`image_patches` cuts an image; the frames decode on torch's intra-op threads (:func:`parallel_map`)."""
    t, gh, gw = grid_thw
    if len(frames) not in (2 * t - 1, 2 * t):
        raise ShardError(f"a video of grid {list(grid_thw)} holds {len(frames)} frames, not {2 * t - 1} or {2 * t}")
    n = gh * gw
    out = np.empty((t, n, 3, 2, patch_size, patch_size), dtype=np.uint8)

    def cut(i: int) -> None:
        out[i // 2, :, :, i % 2] = image_patches(frames[i], patch_size, merge_size)

    parallel_map(cut, range(len(frames)))
    if len(frames) % 2:
        out[-1, :, :, 1] = out[-1, :, :, 0]
    return out.reshape(t * n, 3, 2, patch_size, patch_size)


def normalise_video_patches(
    patches: torch.Tensor, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 video patches ``(M, 3, 2, p, p)`` -> the processor's ``pixel_values_videos`` ``(M, 3 * 2 * p * p)``:
    ``x / (255 std) - mean / std``, wherever ``patches`` lives (:func:`expand_patches`, their frames already in
    them)."""
    m, channels, frames, p, _ = patches.shape
    return expand_patches(patches.reshape(m, channels, frames * p, p), mean, std, temporal_patch_size=1, dtype=dtype)


def _transformers_needs_token_types() -> bool:
    """Whether the installed transformers is 5 or later (read from its metadata: importing it takes seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return int(version("transformers").split(".")[0]) >= 5
    except PackageNotFoundError:
        return True


class Collator:
    """Samples of a build of any family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL: :meth:`for_build` takes the grid,
    normalisation and token ids from its manifest) -> a model-ready batch (right-padded).

    With ``augment``, each image is changed at random before it is cut into
    patches, as drawn for the sample, the image and :attr:`epoch` (which
    :class:`~shardkit.load.torch.TorchLoader` sets; see :mod:`shardkit.load.augment`); rotation
    leaves the normalisation mean, zero after normalising, in the corners, and is refused for samples with
    grounding boxes. Video frames are not augmented.
    """

    def __init__(
        self,
        *,
        patch_size: int,
        merge_size: int,
        temporal_patch_size: int,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        image_token_id: int,
        pad_token_id: int,
        pixels: Literal["float32", "uint8"] = "float32",
        mm_token_type_ids: bool | None = None,
        augment: Augment | None = None,
        video_token_id: int | None = None,
        tokens_per_second: float | None = None,
    ):
        if pixels not in ("float32", "uint8"):
            raise ValueError(f"pixels must be 'float32' or 'uint8', got {pixels!r}")
        self.patch_size, self.merge_size, self.temporal_patch_size = patch_size, merge_size, temporal_patch_size
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.image_token_id, self.pad_token_id = image_token_id, pad_token_id
        self.pixels = pixels
        self.mm_token_type_ids = _transformers_needs_token_types() if mm_token_type_ids is None else mm_token_type_ids
        self.augment = augment
        self.video_token_id, self.tokens_per_second = video_token_id, tokens_per_second
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose augmentation the next batches get."""
        self.epoch = epoch

    @classmethod
    def for_build(cls, manifest: Manifest, **options: Any) -> Collator:
        """A collator with the grid, normalisation and token ids recorded in ``manifest``; :class:`ConfigError` for
        an ``augment`` that rotates a build with grounding boxes."""
        if options.get("augment") is not None:
            options["augment"].check_boxes(manifest.num_grounded, "the build")
        family, tokens = manifest.config.family, manifest.config.special_tokens
        defaults: dict[str, Any] = {
            "patch_size": family.patch_size,
            "merge_size": family.merge_size,
            "temporal_patch_size": family.temporal_patch_size,
            "image_mean": family.image_mean,
            "image_std": family.image_std,
            "image_token_id": tokens.image_pad,
            # padding is masked out of attention and loss: without a pad token, any id but the image pad serves
            "pad_token_id": tokens.vision_end if tokens.pad is None else tokens.pad,
        }
        if manifest.video is not None:
            defaults |= {
                "video_token_id": manifest.video.video_pad,
                "tokens_per_second": manifest.video.tokens_per_second,
            }
        return cls(**{**defaults, **options})

    def __call__(self, samples: Sequence[Sample] | Sequence[Sequence[Sample]]) -> dict[str, Any]:
        """A batch of samples (one row each), or of packed sequences (one row each, see the module doc)."""
        if not isinstance(samples[0], Sample):
            return self._packed(samples)  # type: ignore[arg-type]
        longest = max(len(s.input_ids) for s in samples)
        input_ids = torch.full((len(samples), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), longest), dtype=torch.long)
        labels = torch.full((len(samples), longest), IGNORE_INDEX, dtype=torch.long)
        for row, sample in enumerate(samples):
            n = len(sample.input_ids)
            input_ids[row, :n], labels[row, :n] = _ids_and_labels(sample)
            attention_mask[row, :n] = 1
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if self.mm_token_type_ids:
            batch["mm_token_type_ids"] = self._token_types(input_ids) * attention_mask
        if any(sample.videos for sample in samples):
            batch["position_ids"] = self._positions(samples, longest)
        return self._add_videos(self._add_images(batch, samples), samples)

    def _token_types(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``mm_token_type_ids``: 1 on ``<|image_pad|>``, 2 on ``<|video_pad|>``, 0 elsewhere."""
        types = (input_ids == self.image_token_id).to(torch.long)
        if self.video_token_id is not None:
            types += 2 * (input_ids == self.video_token_id).to(torch.long)
        return types

    def sample_positions(self, sample: Sample) -> np.ndarray:
        """One sample's M-RoPE positions ``(3, tokens)`` (:func:`mrope_positions`)."""
        info = sample.info
        n = len(sample.input_ids)
        return mrope_positions(n, info["images"], self.merge_size, info.get("videos", ()), self.tokens_per_second)

    def _positions(self, samples: Sequence[Sample], length: int) -> torch.Tensor:
        """``(3, rows, length)`` M-RoPE positions of right-padded rows, zero on padding (as the model computes)."""
        out = np.zeros((3, len(samples), length), dtype=np.int64)
        for row, sample in enumerate(samples):
            out[:, row, : len(sample.input_ids)] = self.sample_positions(sample)
        return torch.from_numpy(out)

    def _packed(self, sequences: Sequence[Sequence[Sample]]) -> dict[str, Any]:
        longest = max(sum(len(s.input_ids) for s in sequence) for sequence in sequences)
        rows = len(sequences)
        input_ids = torch.full((rows, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((rows, longest), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.empty((4, rows, longest), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            start = 0
            for sample in sequence:
                n = len(sample.input_ids)
                end = start + n
                input_ids[row, start:end], labels[row, start:end] = _ids_and_labels(sample)
                labels[row, start] = IGNORE_INDEX
                position_ids[0, row, start:end] = torch.arange(n)
                position_ids[1:, row, start:end] = torch.from_numpy(self.sample_positions(sample))
                start = end
            padding = torch.arange(1, longest - start + 1)
            position_ids[:, row, start:] = position_ids[:, row, start - 1 : start] + padding
        starts = torch.nonzero(position_ids[0].reshape(-1) == 0).view(-1).to(torch.int32)
        cu_seq_lens = torch.cat([starts, torch.tensor([rows * longest], dtype=torch.int32)])
        max_length = int(cu_seq_lens.diff().max())
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            "cu_seq_lens_q": cu_seq_lens,
            "cu_seq_lens_k": cu_seq_lens.clone(),
            "max_length_q": max_length,
            "max_length_k": max_length,
            "use_cache": False,
        }
        samples = [s for sequence in sequences for s in sequence]
        return self._add_videos(self._add_images(batch, samples), samples)

    def _add_images(self, batch: dict[str, Any], samples: Sequence[Sample]) -> dict[str, Any]:
        """Add the samples' images, in token order, to ``batch``."""
        grids = [info["grid_thw"] for sample in samples for info in sample.info["images"]]
        if not grids:
            return batch
        p = self.patch_size
        counts = [t * h * w for t, h, w in grids]
        buffer = np.empty((sum(counts), 3, p, p), dtype=np.uint8)  # every image's patches, written in place
        slots = iter(np.split(buffer, np.cumsum(counts)[:-1]))
        fill = tuple(round(255 * m) for m in self.image_mean)
        jobs = []
        for sample in samples:
            if len(sample.images) != len(sample.info["images"]):
                raise ShardError(f"sample {sample.key} holds {len(sample.images)} images, its metadata describes "
                                 f"{len(sample.info['images'])}")  # fmt: skip
            if self.augment is not None:
                found = sample.info.get("text_boxes", {}).get("found", 0)
                self.augment.check_boxes(len(sample.info.get("boxes", ())) + found, f"sample {sample.key}")
            jobs += [(jpeg, sample.key, index, next(slots)) for index, jpeg in enumerate(sample.images)]

        def patches(job: tuple[bytes, str, int, np.ndarray]) -> None:
            jpeg, key, index, slot = job
            image: bytes | Image.Image = jpeg
            if self.augment is not None:
                decoded = Image.open(io.BytesIO(jpeg)).convert("RGB")
                image = self.augment(decoded, epoch=self.epoch, key=key, index=index, fill=fill)
            image_patches(image, p, self.merge_size, out=slot)

        parallel_map(patches, jobs)  # each image into its own slot: any order gives the same buffer
        uint8 = torch.from_numpy(buffer)
        if self.pixels == "uint8":
            batch["pixel_patches"] = uint8
        else:
            batch["pixel_values"] = expand_patches(uint8, self.image_mean, self.image_std, self.temporal_patch_size)
        batch["image_grid_thw"] = torch.as_tensor(grids, dtype=torch.long)
        return batch

    def _add_videos(self, batch: dict[str, Any], samples: Sequence[Sample]) -> dict[str, Any]:
        """Add the samples' videos, in token order: their patches, grids and (Qwen2.5-VL) seconds per grid step."""
        videos = [(info, frames) for s in samples for info, frames in _videos_of(s)]
        if not videos:
            return batch
        uint8 = torch.from_numpy(
            np.concatenate([video_patches(frames, info["grid_thw"], self.patch_size, self.merge_size)
                            for info, frames in videos])
        )  # fmt: skip
        if self.pixels == "uint8":
            batch["video_patches"] = uint8
        else:
            batch["pixel_values_videos"] = normalise_video_patches(uint8, self.image_mean, self.image_std)
        batch["video_grid_thw"] = torch.as_tensor([info["grid_thw"] for info, _ in videos], dtype=torch.long)
        if self.tokens_per_second is not None:
            spg = [info["second_per_grid_t"] for info, _ in videos]
            batch["second_per_grid_ts"] = torch.as_tensor(np.asarray(spg, dtype=np.float32))
        return batch

    def count(self, batch: dict[str, Any]) -> tuple[int, int]:
        """``(samples, tokens)`` of a collated batch, padding left out."""
        if "attention_mask" in batch:
            return int(batch["input_ids"].shape[0]), int(batch["attention_mask"].sum())
        samples = len(batch["cu_seq_lens_q"]) - 1
        return samples, int((batch["input_ids"] != self.pad_token_id).sum())

    def to_device(
        self, batch: dict[str, Any], device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> dict[str, Any]:
        """Move a batch to ``device``; uint8 ``pixel_patches`` become ``pixel_values`` there."""
        out = moved({k: v for k, v in batch.items() if k not in ("pixel_patches", "video_patches")}, device)
        if "pixel_patches" in batch:
            patches = batch["pixel_patches"].to(device, non_blocking=True)
            out["pixel_values"] = expand_patches(
                patches, self.image_mean, self.image_std, self.temporal_patch_size, dtype
            )
        elif "pixel_values" in out:
            out["pixel_values"] = out["pixel_values"].to(dtype)
        if "video_patches" in batch:
            patches = batch["video_patches"].to(device, non_blocking=True)
            out["pixel_values_videos"] = normalise_video_patches(patches, self.image_mean, self.image_std, dtype)
        elif "pixel_values_videos" in out:
            out["pixel_values_videos"] = out["pixel_values_videos"].to(dtype)
        return out


def moved(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """A batch with its tensors on ``device`` (copied without waiting where the device allows it)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _videos_of(sample: Sample) -> list[tuple[dict[str, Any], list[bytes]]]:
    """A sample's videos: each one's JSON with its stored frames; :class:`ShardError` when they do not match."""
    infos = sample.info.get("videos", [])
    if len(sample.videos) != len(infos):
        raise ShardError(f"sample {sample.key} holds {len(sample.videos)} videos, its metadata describes {len(infos)}")
    for info, frames in zip(infos, sample.videos, strict=True):
        if len(frames) != len(info["frame_indices"]):
            raise ShardError(f"sample {sample.key}: a video holds {len(frames)} frames, its metadata "
                             f"{len(info['frame_indices'])}")  # fmt: skip
    return list(zip(infos, sample.videos, strict=True))


def _ids_and_labels(sample: Sample) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.from_numpy(sample.input_ids.astype(np.int64))
    return ids, torch.where(torch.from_numpy(sample.weights > 0), ids, IGNORE_INDEX)


class EmbeddingCollator(Collator):
    """Samples with cached image embeddings (:class:`~shardkit.load.embeddings.EmbeddedSource`) -> a batch without
    pixels: ``input_ids``, ``attention_mask`` (plain and token-budget batches), ``labels``, ``image_embeds`` (every
    image's embeddings in token order) and the M-RoPE ``position_ids`` the model would compute from the pixels
    (``(3, rows, length)``, zero on padding, as ``get_rope_index`` gives them; packed batches keep their
    ``(4, rows, length)`` positions and flash-attention boundaries). :meth:`model_inputs` turns such a batch into
    the model's keyword arguments: ``inputs_embeds`` (the token embeddings with the cached image embeddings
    scattered at the ``<|image_pad|>`` positions) and ``position_ids``, so the vision tower is not run."""

    def __call__(self, samples: Sequence[Sample] | Sequence[Sequence[Sample]]) -> dict[str, Any]:
        batch = super().__call__(samples)
        batch.pop("mm_token_type_ids", None)
        count = batch["image_embeds"].shape[0] if "image_embeds" in batch else 0
        if (tokens := int((batch["input_ids"] == self.image_token_id).sum())) != count:  # on the CPU, in the worker
            raise ShardError(f"the batch has {tokens} image tokens and {count} cached image embeddings")
        if "attention_mask" in batch:
            batch["position_ids"] = self._positions(samples, batch["input_ids"].shape[1])  # type: ignore[arg-type]
        return batch

    def _add_images(self, batch: dict[str, Any], samples: Sequence[Sample]) -> dict[str, Any]:
        """Add every image's cached embeddings, in token order, as ``image_embeds``."""
        from safetensors.torch import load

        embeds = []
        for sample in samples:
            if not isinstance(sample, EmbeddedSample):
                raise ConfigError(
                    "EmbeddingCollator needs samples with cached embeddings: read them through EmbeddedSource"
                )
            tensors = load(sample.features)
            for i, image in enumerate(sample.info["images"]):
                tensor = tensors.get(f"{i}.embeds")
                if tensor is None or tensor.shape[0] != image["num_tokens"]:
                    found = "none" if tensor is None else f"{tensor.shape[0]} tokens"
                    raise ShardError(f"sample {sample.key} image {i}: cached embeddings ({found}) do not match its "
                                     f"{image['num_tokens']} image tokens")  # fmt: skip
                embeds.append(tensor)
        if embeds:
            batch["image_embeds"] = torch.cat(embeds)
        return batch

    def model_inputs(self, model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        """A batch (on the model's device) -> the model's keyword arguments: ``inputs_embeds`` with the cached image
        embeddings at the image pads, instead of ``input_ids``."""
        out = dict(batch)
        input_ids = out.pop("input_ids")
        image_embeds = out.pop("image_embeds", None)
        embeds = model.get_input_embeddings()(input_ids)
        mask = input_ids == self.image_token_id  # as many as image_embeds' rows: checked when collated
        if image_embeds is not None:
            image_embeds = image_embeds.to(embeds.device, embeds.dtype)
            embeds = embeds.masked_scatter(mask.unsqueeze(-1).expand_as(embeds), image_embeds)
        out["inputs_embeds"] = embeds
        return out
