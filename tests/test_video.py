"""shardkit.video on clips PyAV writes here: metadata, exact frames, the processors' frame plans, budgets, errors.

The parity tests run transformers' own ``Qwen2VLVideoProcessor`` / ``Qwen3VLVideoProcessor`` (and the
``Qwen2_5_VLProcessor`` / ``Qwen3VLProcessor`` text) on the same clips; they need torchvision (.venv-newest).
"""

from __future__ import annotations

import fractions
import importlib.util
import io
import sys
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from shardkit.errors import ConfigError, RecordError
from shardkit.families import get_family
from shardkit.images import encode_jpeg
from shardkit.video import (
    VideoGrid,
    VideoMeta,
    decode_frames,
    frame_list_meta,
    probe,
    smart_resize_clip,
)
from tests.helpers import pattern, video_grid, write_audio, write_clip

av = pytest.importorskip("av", reason="PyAV is the video extra: pip install 'shardkit[video]'")

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


VFR_PTS = [0, 100, 200, 300, 600, 700, 1000, 1050, 1100, 1500]
# name -> (file, frames, rate, height, width, codec, pix_fmt)
CLIPS = {
    "2s_10fps": ("a.mp4", 20, 10, 96, 128, "mpeg4", "yuv420p"),
    "45f_30fps": ("b.mp4", 45, 30, 60, 80, "mpeg4", "yuv420p"),
    "7f_25fps": ("c.mp4", 7, 25, 32, 32, "mpeg4", "yuv420p"),
    "5.5s_10fps": ("d.mp4", 55, 10, 36, 52, "mpeg4", "yuv420p"),  # Qwen3: 11 frames, an odd count
    "10s_6fps": ("e.mp4", 60, 6, 24, 40, "mpeg4", "yuv420p"),
    "ntsc_h264": ("f.mp4", 30, fractions.Fraction(24000, 1001), 48, 64, "libx264", "yuv420p"),  # B-frames
    "lossless_mkv": ("g.mkv", 20, 10, 48, 64, "ffv1", "bgr0"),  # Matroska records no frame count
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    paths = {name: write_clip(folder / file, *spec) for name, (file, *spec) in CLIPS.items()}
    paths["fit"] = write_clip(folder / "fit.mp4", 40, 10, 96, 128)
    paths["vfr"] = write_clip(folder / "vfr.mp4", 10, 10, 48, 64, "libx264", pts_ms=VFR_PTS)
    return paths


def decode_all(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


# --- metadata and frames


@pytest.mark.parametrize("name", list(CLIPS))
def test_probe_reads_the_written_clip(clips, name):
    _, frames, rate, height, width, *_ = CLIPS[name]
    meta = probe(clips[name])
    assert (meta.frames, meta.height, meta.width) == (frames, height, width)
    assert meta.fps == pytest.approx(float(rate))
    assert meta.duration == pytest.approx(frames / float(rate), abs=0.05)
    assert meta.frames == len(decode_all(clips[name])) and not meta.frame_list


def test_probe_counts_the_frames_matroska_does_not_record(clips):
    with av.open(str(clips["lossless_mkv"])) as container:
        assert container.streams.video[0].frames == 0  # the header has no count: probe counts the packets
    assert probe(clips["lossless_mkv"]).frames == 20
    assert probe(clips["lossless_mkv"].read_bytes(), ref="g.mkv") == probe(clips["lossless_mkv"])


def test_decode_gives_exactly_the_frames_asked_for(clips):
    """Lossless ffv1: the decoded frames are the written ones, pixel for pixel, at their presentation times."""
    frames = list(decode_frames(clips["lossless_mkv"], [13, 0, 6, 19, 6]))
    assert [f.index for f in frames] == [0, 6, 6, 13, 19]
    for f in frames:
        assert np.array_equal(f.rgb, pattern(f.index, 48, 64))
        assert f.time == pytest.approx(f.index / 10)


def test_decode_matches_a_full_decode_with_b_frames(clips):
    everything = decode_all(clips["ntsc_h264"])
    plan = video_grid("qwen3_vl").plan(probe(clips["ntsc_h264"]))
    frames = list(decode_frames(clips["ntsc_h264"], plan.indices))
    assert [f.index for f in frames] == list(plan.indices) == [0, 10, 19, 29]
    assert all(np.array_equal(f.rgb, everything[f.index]) for f in frames)


def test_decode_stops_after_the_last_index_and_is_lazy(clips):
    frames = decode_frames(clips["45f_30fps"], [2, 3])
    assert next(frames).index == 2
    assert [f.index for f in frames] == [3]
    assert list(decode_frames(clips["45f_30fps"], [])) == []


def test_variable_frame_rate_times(clips):
    """Every processor times frame i as i / average rate; the decoded frame carries its true time beside it."""
    meta = probe(clips["vfr"])
    assert meta.frames == 10 and meta.fps == pytest.approx(200 / 27)
    plan = video_grid("qwen3_vl").plan(meta)
    frames = list(decode_frames(clips["vfr"], plan.indices))
    assert [f.time for f in frames] == pytest.approx([VFR_PTS[i] / 1000 for i in plan.indices])
    assert plan.times == pytest.approx([i * 27 / 200 for i in plan.indices])


# --- the frame plan, with the numbers transformers gives (measured in research-27)


def test_plans_on_known_clips(clips):
    meta = probe(clips["2s_10fps"])
    q25 = video_grid("qwen2_5_vl").plan(meta)
    assert (q25.indices, q25.grid, q25.tokens, q25.second_per_grid_t) == ((0, 5, 10, 15), (2, 20, 28), 280, 1.0)
    assert q25.times == (0.0, 0.5, 1.0, 1.5) and q25.size == (280, 392) and q25.timestamps == ()
    q2 = video_grid("qwen2_vl").plan(meta)
    assert q2.second_per_grid_t is None and (q2.indices, q2.grid) == (q25.indices, q25.grid)
    q3 = video_grid("qwen3_vl").plan(meta)
    assert (q3.indices, q3.grid, q3.tokens) == ((0, 6, 13, 19), (2, 6, 8), 24)
    assert q3.timestamps == ("<0.3 seconds>", "<1.6 seconds>") and q3.second_per_grid_t is None
    q3_class = VideoGrid("qwen3_vl", 16, 131072, 786432).plan(meta)  # the processor class's own bounds
    assert q3_class.grid == (2, 10, 14)

    spg = [video_grid("qwen2_5_vl").plan(probe(clips[n])).second_per_grid_t for n in ("45f_30fps", "7f_25fps")]
    assert spg == pytest.approx([0.75, 0.14])
    odd = video_grid("qwen3_vl").plan(probe(clips["5.5s_10fps"]))
    assert odd.frames == 11 and odd.grid[0] == 6 and len(odd.timestamps) == 6


def test_fps_and_max_frames_options(clips):
    meta = probe(clips["10s_6fps"])
    assert video_grid("qwen2_vl").plan(meta).frames == 20
    assert video_grid("qwen2_vl", max_frames=6).plan(meta).frames == 6
    assert video_grid("qwen3_vl", max_frames=7).plan(meta).frames == 7
    assert video_grid("qwen3_vl", fps=1).plan(meta).indices == (0, 7, 13, 20, 26, 33, 39, 46, 52, 59)
    assert video_grid("qwen2_vl", fps=0.2).plan(meta).frames == 4  # min_frames


def test_qwen2_indices_equal_torch_arange():
    """Qwen2VLVideoProcessor's ``torch.arange(0, total, total / n).int()``, float32 included, over many clips."""
    torch = pytest.importorskip("torch")
    grid = VideoGrid("qwen2_vl", 14, 3136, 602112, min_frames=2)
    checked = 0
    for total in range(3, 400, 3):
        meta = frame_list_meta([(56, 56)] * total)  # n of its frames: the processor's rule for a frame count
        for n in range(2, min(total - 1, 120) + 1, 2):
            plan = grid.plan(meta, max_frames=n)
            expected = [i for i in torch.arange(0, total, total / n).int().tolist() if i < total]
            assert list(plan.indices) == expected, (total, n)
            checked += 1
    assert checked > 4000
    # where total / step rounds above n, torch adds an index equal to total: transformers then fails, we leave it out
    assert torch.arange(0, 17, 17 / 14).int().tolist()[-1] == 17
    assert len(grid.plan(VideoMeta(17, 17 / 7, 7.0, 56, 56)).indices) == 14


def test_qwen3_sizes_are_stable_under_the_processor_rule():
    """The processor on the stored frames keeps their size, also where its own first size would move again."""
    grid = video_grid("qwen3_vl")
    rng = np.random.default_rng(0)
    for _ in range(3000):
        height = int(rng.integers(20, 2400))
        width = int(height * rng.choice([4 / 3, 16 / 9, 1, 9 / 16, 21 / 9]))
        n = int(rng.integers(2, 200))
        plan = grid.plan(VideoMeta(n, 2.0, n / 2, height, width))
        assert plan.frames == n
        assert smart_resize_clip(n, *plan.size, 32, grid.min_pixels, grid.max_pixels) == plan.size
    # 3 frames of 4K: the processor gives 2144x3840, and 2144x3872 when run again on that
    plan = grid.plan(VideoMeta(3, 2.0, 1.5, 2160, 3840))
    assert smart_resize_clip(3, 2160, 3840, 32, 4096, 25165824) == (2144, 3840) and plan.size == (2144, 3872)


def test_frame_list():
    """ms-swift's list of frame images: every frame kept at the given (or default 2) fps, never sampled again."""
    meta = frame_list_meta([(40, 56)] * 5)
    assert (meta.frames, meta.fps, meta.duration, meta.frame_list) == (5, 2.0, 2.5, True)
    q3 = video_grid("qwen3_vl").plan(meta)
    assert q3.indices == (0, 1, 2, 3, 4) and q3.grid[0] == 3
    assert q3.timestamps == ("<0.2 seconds>", "<1.2 seconds>", "<2.0 seconds>")
    q25 = video_grid("qwen2_5_vl").plan(meta)
    assert q25.frames == 5 and q25.grid[0] == 3 and q25.second_per_grid_t == 1.0
    assert video_grid("qwen2_5_vl").plan(frame_list_meta([(40, 56)] * 5, fps=4)).second_per_grid_t == 0.5
    capped = video_grid("qwen2_vl", max_frames=3).plan(meta)
    assert capped.indices == (0, 2) and capped.frames == 2  # Qwen2: an even count when frames are dropped
    assert video_grid("qwen3_vl", max_frames=3).plan(meta).indices == (0, 2, 4)


# --- token budgets


def area(size: tuple[int, int]) -> int:
    return size[0] * size[1]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_fit_qwen2_lowers_frames_then_resolution(family):
    grid = video_grid(family)
    meta = VideoMeta(60, 6.0, 10.0, 480, 640)
    full = grid.plan(meta)
    per_patch = full.tokens // full.grid[0]
    assert full.grid[0] == 10 and grid.fit(meta, full.tokens) == full
    fewer = grid.fit(meta, full.tokens // 2 + 1)
    assert fewer.size == full.size and fewer.grid[0] == 5 and fewer.indices == grid.plan(meta, max_frames=10).indices
    smaller = grid.fit(meta, per_patch // 2)
    assert smaller.frames == 2 and area(smaller.size) < area(full.size) and smaller.tokens <= per_patch // 2
    assert grid.fit(meta, 100) is None  # two frames at min_pixels (128 tokens) do not fit


def test_fit_qwen3_lowers_the_clip_budget_then_frames():
    grid = VideoGrid("qwen3_vl", 16, 4096, 200000)
    meta = VideoMeta(60, 6.0, 10.0, 480, 640)
    full = grid.plan(meta)
    assert full.frames == 20
    # fewer frames alone do not lower the tokens under a budget over the clip: each frame is made larger
    assert grid.plan(meta, max_frames=10).tokens >= full.tokens * 0.9
    lower = grid.fit(meta, full.tokens // 2)
    assert lower.frames == 20 and lower.tokens <= full.tokens // 2 and area(lower.size) < area(full.size)
    tiny = grid.fit(meta, 3)
    assert tiny.tokens <= 3 and tiny.frames < 20
    assert smart_resize_clip(tiny.frames, *tiny.size, 32, grid.min_pixels, grid.max_pixels) == tiny.size
    assert grid.fit(meta, 0) is None


# --- errors


def test_unreadable_files(tmp_path, clips):
    for data in (b"", b"not a video at all" * 100, clips["2s_10fps"].read_bytes()[:400]):
        with pytest.raises(RecordError) as caught:
            probe(data, ref="x.mp4")
        assert caught.value.code == "video_unreadable" and caught.value.detail == {"video": "x.mp4"}
    with pytest.raises(RecordError) as caught:
        probe(tmp_path / "missing.mp4")
    assert caught.value.code == "video_missing"


def test_no_video_stream(tmp_path):
    path = write_audio(tmp_path / "audio.wav")
    with pytest.raises(RecordError) as caught:
        probe(path)
    assert caught.value.code == "video_no_stream"


def test_too_short_and_truncated(tmp_path, clips):
    one = write_clip(tmp_path / "one.mp4", 1, 10, 32, 32)
    meta = probe(one)
    for family in FAMILIES:
        with pytest.raises(RecordError) as caught:
            video_grid(family).plan(meta)
        assert caught.value.code == "video_too_short"
    with pytest.raises(RecordError) as caught:
        video_grid("qwen3_vl").plan(frame_list_meta([(32, 32)]))
    assert caught.value.code == "video_too_short"
    with pytest.raises(RecordError) as caught:
        list(decode_frames(clips["7f_25fps"], [3, 9]))
    assert caught.value.code == "video_truncated" and caught.value.detail["frames_decoded"] == 7


def test_frame_list_and_settings_errors():
    with pytest.raises(RecordError) as caught:
        frame_list_meta([(40, 56), (40, 56), (56, 40)])
    assert caught.value.code == "video_frame_sizes"
    with pytest.raises(RecordError) as caught:
        video_grid("qwen2_vl").plan(VideoMeta(8, 2.0, 4.0, 2, 500))
    assert caught.value.code == "video_aspect"
    for bad in (dict(fps=-1.0), dict(max_frames=1), dict(min_pixels=10**7, max_pixels=10**6)):
        with pytest.raises(ConfigError):
            video_grid("qwen3_vl", **bad)
    assert get_family("qwen3_5").video_grid is None  # a family that takes no video has no rule
    with pytest.raises(ConfigError, match="unknown model family 'llava'"):
        video_grid("llava")


def test_missing_pyav_names_the_extra(monkeypatch, clips):
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(ConfigError, match=r"pip install 'shardkit\[video\]'"):
        probe(clips["2s_10fps"])
    assert video_grid("qwen3_vl").plan(frame_list_meta([(32, 32)] * 4)).frames == 4  # planning needs no PyAV


# --- parity with transformers' processors (torchvision: .venv-newest)


@pytest.fixture(scope="module")
def processors():
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed: transformers' video processors are compared in .venv-newest")
    import transformers

    return transformers


def video_processor(transformers, grid: VideoGrid):
    """transformers' video processor of ``grid``'s family with ``grid``'s settings (frames limits in __init__: Qwen3
    reads them from there only)."""
    cls = transformers.Qwen3VLVideoProcessor if grid.processor == "qwen3_vl" else transformers.Qwen2VLVideoProcessor
    extra = {"cap_pixels_per_frame": False} if hasattr(cls, "cap_pixels_per_frame") else {}
    return cls(
        patch_size=grid.patch_size,
        merge_size=grid.merge_size,
        temporal_patch_size=grid.temporal_patch_size,
        size={"shortest_edge": grid.min_pixels, "longest_edge": grid.max_pixels},
        min_frames=grid.min_frames,
        max_frames=grid.max_frames,
        **extra,
    )


def processor_call(vp, frames, metadata, grid: VideoGrid, sample: bool):
    """``vp`` on one video: (frame indices, video_grid_thw row, the output); sampling at ``grid.fps`` if ``sample``."""
    sampling = {"do_sample_frames": True, "fps": grid.fps} if sample else {"do_sample_frames": False}
    out = vp(videos=[frames], video_metadata=[metadata], return_metadata=True, return_tensors="pt", **sampling)
    indices = [int(i) for i in out["video_metadata"][0].frames_indices]
    return indices, tuple(out["video_grid_thw"][0].tolist()), out


def stored(frames: np.ndarray, plan) -> np.ndarray:
    """The build's stored frames: the planned ones, resized and kept as JPEG, decoded back."""
    jpegs = [encode_jpeg(Image.fromarray(frames[i]), plan.size, 95) for i in plan.indices]
    return np.stack([np.asarray(Image.open(io.BytesIO(jpeg))) for jpeg in jpegs])


def full_processor(transformers, grid: VideoGrid, tokenizer):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    images = Qwen2VLImageProcessorPil(patch_size=grid.patch_size)
    cls = {"qwen2_vl": transformers.Qwen2VLProcessor, "qwen2_5_vl": transformers.Qwen2_5_VLProcessor}
    cls = cls.get(grid.processor, transformers.Qwen3VLProcessor)
    return cls(image_processor=images, video_processor=video_processor(transformers, grid), tokenizer=tokenizer)


def expected_text(plan) -> str:
    """The text our renderer will write for ``plan`` (Qwen3: a timestamp and block per temporal patch)."""
    per_patch = plan.tokens // plan.grid[0]
    if plan.timestamps:
        block = "<|vision_start|>" + "<|video_pad|>" * per_patch + "<|vision_end|>"
        return "".join(stamp + block for stamp in plan.timestamps)
    return "<|vision_start|>" + "<|video_pad|>" * plan.tokens + "<|vision_end|>"


PARITY_CLIPS = ["2s_10fps", "45f_30fps", "7f_25fps", "5.5s_10fps", "ntsc_h264", "lossless_mkv", "vfr"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", PARITY_CLIPS)
def test_plan_equals_the_video_processor(processors, clips, family, name):
    """On the raw clip: the processor's sampled indices and grid; on the stored frames (resized, JPEG) fed back with
    their indices: the same grid, so the processor keeps the stored size."""
    meta = probe(clips[name])
    frames = decode_all(clips[name])
    for grid in (video_grid(family), video_grid(family, fps=3.0, max_frames=6)):
        plan = grid.plan(meta)
        vp = video_processor(processors, grid)
        metadata = {"total_num_frames": meta.frames, "fps": meta.fps}
        indices, thw, _ = processor_call(vp, frames, metadata, grid, sample=True)
        assert (indices, thw) == (list(plan.indices), plan.grid)
        assert plan.tokens == np.prod(thw) // grid.merge_size**2
        again = {**metadata, "frames_indices": list(plan.indices)}
        assert processor_call(vp, stored(frames, plan), again, grid, sample=False)[1] == plan.grid


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["2s_10fps", "45f_30fps", "5.5s_10fps", "vfr"])
def test_tokens_timestamps_and_second_per_grid_equal_the_processor(processors, clips, tokenizer, family, name):
    """The processor's text expansion (input_ids), Qwen2.5-VL's second_per_grid_ts and Qwen3-VL's ``<t seconds>``
    equal the plan's, from the raw clip and from the stored frames."""
    meta = probe(clips[name])
    frames = decode_all(clips[name])
    grid = video_grid(family)
    plan = grid.plan(meta)
    proc = full_processor(processors, grid, tokenizer)
    text = "Look: <|vision_start|><|video_pad|><|vision_end|> What happens?"
    want = tokenizer(text.replace("<|vision_start|><|video_pad|><|vision_end|>", expected_text(plan)))["input_ids"]
    metadata = {"total_num_frames": meta.frames, "fps": meta.fps}
    runs = [
        ([frames], metadata, {"do_sample_frames": True, "fps": grid.fps}),
        ([stored(frames, plan)], {**metadata, "frames_indices": list(plan.indices)}, {"do_sample_frames": False}),
    ]
    for videos, md, sampling in runs:
        out = proc(text=[text], videos=videos, video_metadata=[md], return_tensors="pt", **sampling)
        assert out["input_ids"][0].tolist() == want
        assert tuple(out["video_grid_thw"][0].tolist()) == plan.grid
        if plan.second_per_grid_t is None:
            assert "second_per_grid_ts" not in out
        else:
            assert float(np.float32(out["second_per_grid_ts"][0])) == np.float32(plan.second_per_grid_t)


@pytest.mark.parametrize("family", FAMILIES)
def test_frame_list_equals_the_processor(processors, tokenizer, family):
    """Frame images with their fps as metadata (transformers refuses to sample a list): all kept, same grid/text."""
    frames = np.stack([pattern(i, 40, 56) for i in range(5)])
    meta = frame_list_meta([(40, 56)] * 5)
    grid = video_grid(family)
    plan = grid.plan(meta)
    metadata = {"total_num_frames": 5, "fps": 2.0, "frames_indices": list(range(5))}
    proc = full_processor(processors, grid, tokenizer)
    text = "<|vision_start|><|video_pad|><|vision_end|>"
    out = proc(
        text=[text], videos=[list(frames)], video_metadata=[metadata], do_sample_frames=False, return_tensors="pt"
    )
    assert out["input_ids"][0].tolist() == tokenizer(expected_text(plan))["input_ids"]
    assert tuple(out["video_grid_thw"][0].tolist()) == plan.grid


@pytest.mark.parametrize("family", FAMILIES)
def test_fitted_plans_are_what_the_processor_gives_at_those_limits(processors, clips, family):
    """A plan lowered to a budget is the processor's own plan at the lowered limits, and stays put when stored."""
    meta = probe(clips["fit"])
    frames = decode_all(clips["fit"])
    grid = video_grid(family, min_pixels=None if family == "qwen3_vl" else 3136)
    full = grid.plan(meta)
    assert full.grid[0] == 4
    metadata = {"total_num_frames": meta.frames, "fps": meta.fps}
    for budget in (full.tokens // 2, full.tokens // full.grid[0] // 2):
        plan = grid.fit(meta, budget)
        assert plan.tokens <= budget
        again = {**metadata, "frames_indices": list(plan.indices)}
        assert (
            processor_call(video_processor(processors, grid), stored(frames, plan), again, grid, False)[1] == plan.grid
        )
        if grid.processor != "qwen3_vl" and plan.size == full.size:  # frames lowered: the processor's max_frames
            limited = video_processor(processors, replace(grid, min_frames=2, max_frames=plan.frames))
            assert processor_call(limited, frames, metadata, grid, sample=True)[0] == list(plan.indices)


def test_smart_resize_clip_equals_transformers(processors):
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

    rng = np.random.default_rng(1)
    for _ in range(3000):
        n, height, width = int(rng.integers(2, 100)), int(rng.integers(8, 3000)), int(rng.integers(8, 3000))
        if max(height, width) > 150 * min(height, width):
            continue
        for lo, hi in ((4096, 25165824), (131072, 786432)):
            assert smart_resize_clip(n, height, width, 32, lo, hi) == smart_resize(n, height, width, 2, 32, lo, hi)
