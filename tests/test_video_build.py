"""Videos through the whole path, on clips PyAV writes here: records in every form that takes video, built for
Qwen2-VL, Qwen2.5-VL and Qwen3-VL in tar and Parquet; tokens, grids and pixels against transformers' processors;
M-RoPE positions against ``get_rope_index`` and Qwen's release rule; batches through tiny random models, packed
losses equal alone, a tiny model trains; --overlength; rejects; show, stats; what refuses videos (Tinker, the
embeddings cache, the LLaMA-Factory export, a missing PyAV).

The processor parity tests need torchvision (transformers' video processors): they run in .venv-newest.
"""

from __future__ import annotations

import importlib.util
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shardkit.build import build
from shardkit.config import BuildConfig
from shardkit.errors import ConfigError
from shardkit.load import ShardStream
from shardkit.load.batch import Collator
from shardkit.load.source import BuildSource
from shardkit.shards import read_manifest
from shardkit.testing import tiny_qwen2_vl_config, tiny_qwen3_vl_config
from shardkit.video import frame_list_meta, probe
from tests.helpers import FIXTURES, video_grid, write_audio, write_clip, write_image, write_jsonl

av = pytest.importorskip("av", reason="PyAV is the video extra: pip install 'shardkit[video]'")

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl_hf"]
IMAGE_PAD, VIDEO_PAD = 151655, 151656
MAX_LENGTH = 4096
FRAMES = [f"frames/f{i}.png" for i in range(5)]


def user(*parts):
    return {"role": "user", "content": list(parts)}


def text(value):
    return {"type": "text", "text": value}


def answer(value):
    return {"role": "assistant", "content": value}


# one JSONL of every form that takes video; lines 7-10 are rejected
RECORDS = [
    {"messages": [user({"type": "image", "image": "images/cat.jpg"}, {"type": "video", "video": "clips/a.mp4"},
                       text("What happens in the clip?")), answer("A ramp moves right.")]},
    {"messages": [{"role": "user", "content": "<image>Look at this.<video>Why is it funny?"},
                  answer("It is not.")], "images": ["images/dog.png"], "videos": ["clips/b.mp4"]},
    {"id": "3", "video": "clips/d.mp4", "conversations": [{"from": "human", "value": "<video>\nDescribe the video."},
                                                         {"from": "gpt", "value": "Colours shift."}]},
    {"messages": [{"role": "user", "content": "<video>What moves?"}, answer("The ramp.")], "videos": [FRAMES]},
    {"messages": [user({"type": "video", "video": "clips/a.mp4"}, text("First clip?")), answer("A ramp."),
                  user(text("And now this:"), {"type": "video", "video": "clips/b.mp4"}), answer("Another.")]},
    {"messages": [{"role": "user", "content": "<video>How long is it?"}, answer("Fifteen seconds.")],
     "videos": ["clips/long.mp4"]},
    {"messages": [{"role": "user", "content": "<video>?"}, answer("x")], "videos": ["clips/bad.mp4"]},
    {"messages": [{"role": "user", "content": "<video>?"}, answer("x")], "videos": ["clips/audio.wav"]},
    {"messages": [{"role": "user", "content": "<video>?"}, answer("x")], "videos": ["clips/one.mp4"]},
    {"messages": [{"role": "user", "content": "<video>?"}, answer("x")], "videos": ["clips/missing.mp4"]},
]  # fmt: skip
REJECTED = {7: "video_unreadable", 8: "video_no_stream", 9: "video_too_short", 10: "video_missing"}
# the clips each sample's videos come from, in order (None: the frame list)
SOURCES = {1: ["a.mp4"], 2: ["b.mp4"], 3: ["d.mp4"], 4: [None], 5: ["a.mp4", "b.mp4"], 6: ["long.mp4"]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The records' folder: images, clips written by PyAV (and a broken one, an audio file, a one-frame clip), a
    list of frame images."""
    root = tmp_path_factory.mktemp("video-data")
    write_image(root / "images" / "cat.jpg", 120, 90)
    write_image(root / "images" / "dog.png", 64, 80, fmt="PNG", seed=1)
    write_clip(root / "clips" / "a.mp4", 20, 10, 96, 128)  # 2 s
    write_clip(root / "clips" / "b.mp4", 45, 30, 60, 80)
    write_clip(root / "clips" / "d.mp4", 55, 10, 36, 52)  # Qwen3-VL samples 11 frames: the last one repeated
    write_clip(root / "clips" / "long.mp4", 30, 2, 32, 32)  # 15 s: its temporal reach passes its grid's side
    write_clip(root / "clips" / "one.mp4", 1, 10, 32, 32)
    (root / "clips" / "bad.mp4").write_bytes(b"not a video at all" * 50)
    write_audio(root / "clips" / "audio.wav")
    for i, path in enumerate(FRAMES):
        (root / path).parent.mkdir(exist_ok=True)
        Image.fromarray(np.roll(np.asarray(Image.open(root / "images" / "cat.jpg").resize((56, 40))), 3 * i, 1)).save(
            root / path
        )
    return write_jsonl(root / "records.jsonl", RECORDS)


@pytest.fixture(scope="module")
def builds(data, make_build) -> dict[str, str]:
    """``{family: folder}`` of tar builds, and ``parquet`` (Qwen2.5-VL in Parquet)."""
    out = {family: make_build(data, model=family, max_length=MAX_LENGTH) for family in FAMILIES}
    out["parquet"] = make_build(data, model="qwen2_5_vl", max_length=MAX_LENGTH, format="parquet")
    return out


def samples_of(folder) -> dict[int, object]:
    return {s.info["line"]: s for s in BuildSource(str(folder)).samples()}


def rejects(folder) -> dict[int, dict]:
    lines = (Path(folder) / "rejects.jsonl").read_text().splitlines()
    return {row["line"]: row for row in map(json.loads, lines)}


def decoded(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


def meta_of(data, source):
    if source is None:
        return frame_list_meta([Image.open(data.parent / f).size[::-1] for f in FRAMES])
    return probe(data.parent / "clips" / source)


# --- the build ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_every_form_builds_its_videos_and_the_broken_ones_are_rejected(builds, data, family):
    folder = builds[family]
    manifest = read_manifest(folder)
    assert {line: row["code"] for line, row in rejects(folder).items()} == REJECTED
    assert rejects(folder)[7]["reason"].startswith("video cannot be decoded: clips/bad.mp4 (Invalid data")
    assert rejects(folder)[10]["reason"] == "video not found: clips/missing.mp4"
    samples = samples_of(folder)
    assert sorted(samples) == list(SOURCES)
    grid = video_grid(family)
    settings = manifest.video
    assert (settings.processor, settings.fps, settings.max_frames, settings.min_pixels, settings.max_pixels) == (
        grid.processor, 2.0, 768, grid.min_pixels, grid.max_pixels)  # fmt: skip
    assert settings.pixels_over == ("clip" if family == "qwen3_vl_hf" else "frame") and settings.video_pad == VIDEO_PAD
    assert settings.tokens_per_second == (2 if family == "qwen2_5_vl" else None)
    assert manifest.num_videos == 7 and manifest.num_images == 2
    assert manifest.num_video_frames == sum(len(f) for s in samples.values() for f in s.videos)
    for line, sources in SOURCES.items():
        sample = samples[line]
        assert len(sample.videos) == len(sample.info["videos"]) == len(sources)
        pads = int(np.count_nonzero(sample.input_ids == VIDEO_PAD))
        assert pads == sum(v["num_tokens"] for v in sample.info["videos"])
        for video, frames, source in zip(sample.info["videos"], sample.videos, sources, strict=True):
            meta = meta_of(data, source)
            plan = grid.plan(meta)
            assert video["frame_indices"] == list(plan.indices) and len(frames) == plan.frames
            assert video["frame_times"] == pytest.approx([i / meta.fps for i in plan.indices])
            assert (video["height"], video["width"]) == plan.size and video["grid_thw"] == list(plan.grid)
            assert all(decoded(f).shape == (*plan.size, 3) for f in frames)
            assert video["timestamps"] == list(plan.timestamps) and video["frame_list"] == (source is None)
            assert video["second_per_grid_t"] == plan.second_per_grid_t
            assert video["source"] == (f"clips/{source}" if source else f"{FRAMES[0]} ... {FRAMES[-1]} (5 frames)")
            blocks = max(1, len(plan.timestamps))
            assert len(video["spans"]) == blocks and sum(n for _, n in video["spans"]) == plan.tokens
            for start, count in video["spans"]:
                assert (sample.input_ids[start : start + count] == VIDEO_PAD).all()
                assert sample.input_ids[start - 1] == 151652 and sample.input_ids[start + count] == 151653
            if source is None:
                assert video["decoded_times"] == [None] * 5
            else:  # as decoded: the stream's presentation times, here index / fps
                assert video["decoded_times"] == pytest.approx(video["frame_times"], abs=1e-6)
    assert samples[5].stored.messages[2]["content"][1] == {"type": "video", "index": 1}


def test_a_clip_is_stored_as_its_sampled_frames_resized(builds, data):
    """The stored frames are the source frames the plan names, resized to its size: near the frames decoded here."""
    sample = samples_of(builds["qwen2_5_vl"])[1]
    (video,), (frames,) = sample.info["videos"], sample.videos
    with av.open(str(data.parent / "clips" / "a.mp4")) as container:
        source = [f.to_image() for f in container.decode(video=0)]
    for index, jpeg in zip(video["frame_indices"], frames, strict=True):
        expected = np.asarray(source[index].resize((video["width"], video["height"]), Image.Resampling.BICUBIC))
        assert np.abs(decoded(jpeg).astype(int) - expected).mean() < 3  # JPEG's loss only
    others = [np.abs(decoded(frames[0]).astype(int) - decoded(f)).mean() for f in frames[1:]]
    assert min(others) > 10  # and they are different frames


def test_parquet_holds_what_tar_holds(builds):
    tar, parquet = samples_of(builds["qwen2_5_vl"]), samples_of(builds["parquet"])
    assert sorted(tar) == sorted(parquet)
    for line, sample in tar.items():
        other = parquet[line]
        assert other.info == sample.info and other.videos == sample.videos and other.images == sample.images
        assert other.input_ids.tolist() == sample.input_ids.tolist()
    import pyarrow.parquet as pq

    manifest = read_manifest(builds["parquet"])
    schema = pq.read_schema(f"{builds['parquet']}/{manifest.shards[0].path}")
    assert str(schema.field("videos").type) == "list<element: list<element: binary>>"


def test_an_image_only_part_keeps_its_columns_and_a_video_starts_a_new_part(tmp_path, data):
    """A Parquet part begun without videos is closed at the first sample with one, so image-only shards keep
    their bytes; the samples stay in input order."""
    image_only = {"messages": [user(text("Look.")), answer("A dog.")], "images": ["images/dog.png"]}
    records = [image_only, RECORDS[0], RECORDS[3]]
    path = write_jsonl(data.parent / "mixed.jsonl", records)
    manifest = build(BuildConfig.create(input=str(path), out=str(tmp_path / "b"), format="parquet"), progress=False)
    import pyarrow.parquet as pq

    names = [pq.read_schema(tmp_path / "b" / s.path).names for s in manifest.shards]
    assert [("videos" in n) for n in names] == [False, True] and [s.num_samples for s in manifest.shards] == [1, 2]
    assert [s.info["line"] for s in BuildSource(str(tmp_path / "b")).samples()] == [1, 2, 3]


def test_video_options_enter_the_identity_only_when_given(tmp_path, data):
    config = BuildConfig.create(input=str(data), out=str(tmp_path / "a"))
    assert "video_fps" not in config.identity() and "video_max_frames" not in config.identity()
    fewer = BuildConfig.create(input=str(data), out=str(tmp_path / "b"), video_fps=1.0, video_max_frames=4)
    assert fewer.identity()["video_fps"] == 1.0 and fewer.video_grid.max_frames == 4
    manifest = build(fewer, progress=False)
    assert manifest.video.fps == 1.0 and manifest.video.max_frames == 4
    sample = samples_of(tmp_path / "b")[3]  # 5.5 s: 5 frames at 1 fps, 4 at most, an even count for Qwen2-VL
    assert sample.info["videos"][0]["frame_indices"] == [0, 13, 27, 41]
    assert config.model_copy(update={"video_fps": 1.0}).identity() != config.identity()


# --- inputs ----------------------------------------------------------------------------------


def read_one(tmp_path, record, form="auto"):
    """The validated record of one JSON line in ``form``, or its RecordError."""
    from shardkit.inputs import RawItem, open_input

    path = write_jsonl(tmp_path / "one.jsonl", [record])
    return open_input(str(path), form).record(RawItem(1, json.dumps(record).encode()))


def kinds(record) -> list[str]:
    return [part.type for part in record.messages[0].content]


def test_placeholders_lists_and_refusals_of_videos_in_each_form(tmp_path):
    from shardkit.errors import RecordError

    q = [{"role": "user", "content": "<image>What?"}, answer("x")]
    # media without a placeholder go before the first user text, images before videos (LLaMA-Factory's rule)
    assert kinds(read_one(tmp_path, {"messages": q, "images": ["a.jpg"], "videos": ["v.mp4"]})) == [
        "video", "image", "text"]  # fmt: skip
    plain = [{"role": "user", "content": "What?"}, answer("x")]
    assert kinds(read_one(tmp_path, {"messages": plain, "images": ["a.jpg"], "videos": ["v.mp4"]})) == [
        "image", "video", "text"]  # fmt: skip
    llava = {"video": "v.mp4", "conversations": [{"from": "human", "value": "<video>\nDescribe."},
                                                {"from": "gpt", "value": "x"}]}  # fmt: skip
    record = read_one(tmp_path, llava)
    assert kinds(record) == ["video", "text"] and record.messages[0].content[1].text == "Describe."
    swift_frames = {"messages": [{"role": "user", "content": "<video>Moves?"}, answer("x")],
                    "videos": [[{"path": "f0.png"}, "f1.png"]]}  # fmt: skip
    assert read_one(tmp_path, swift_frames).videos()[0].frames == ["f0.png", "f1.png"]
    qwen_frames = {"messages": [user({"type": "video", "video": ["f0.png", "f1.png"], "fps": 4}), answer("x")]}
    assert read_one(tmp_path, qwen_frames).videos()[0].fps == 4
    refused = [
        ({"messages": [{"role": "user", "content": "<video><video>Why?"}, answer("x")], "videos": ["v.mp4"]},
         "invalid_record", "2 <video> placeholders but 1 videos"),
        ({"messages": [user({"type": "video", "video": "v.mp4", "fps": 4}), answer("x")]}, "invalid_record",
         "'fps' gives the rate of a list of frames"),
        ({"messages": [user(text("Why?")), {"role": "assistant", "content": [{"type": "video", "video": "v.mp4"}]}]},
         "invalid_record", "videos belong in user messages"),
        ({"messages": [user({"type": "video_url", "video_url": {"url": "v.mp4"}}), answer("x")]},
         "video_not_supported", 'give a video as {"type": "video", "video": path}'),
        ({"query": "<video>Why?", "response": "x", "videos": ["v.mp4"]}, "video_not_supported",
         "videos are read in the qwen"),
        ({"prompt": "<video>Why?", "completion": "x", "videos": ["v.mp4"]}, "video_not_supported",
         "videos are read in the qwen"),
        ({"messages": [{"role": "user", "content": "<audio>Why?"}, answer("x")], "audios": ["a.wav"]},
         "audio_not_supported", "never audio"),
    ]  # fmt: skip
    for record, code, reason in refused:
        with pytest.raises(RecordError) as caught:
            read_one(tmp_path, record)
        assert (caught.value.code, reason in caught.value.reason) == (code, True), caught.value.reason


def test_dedup_compares_the_videos_bytes(tmp_path, data):
    record = RECORDS[1]
    other = {**record, "videos": ["clips/a.mp4"]}  # the same text and image, another clip
    path = write_jsonl(data.parent / "dedup.jsonl", [record, record, other])
    manifest = build(BuildConfig.create(input=str(path), out=str(tmp_path / "d"), dedup=True), progress=False)
    assert manifest.rejects_by_code == {"duplicate": 1} and manifest.num_videos == 2


def test_the_qwen3_5_families_refuse_videos_and_build_the_rest(tmp_path, data):
    image_only = {
        "messages": [{"role": "user", "content": "<image>Look."}, answer("A dog.")],
        "images": ["images/dog.png"],
    }
    path = write_jsonl(data.parent / "qwen3_5.jsonl", [RECORDS[1], image_only])
    config = BuildConfig.create(input=str(path), out=str(tmp_path / "q"), model="qwen3_5")
    manifest = build(config, progress=False, workers=1)
    assert manifest.rejects_by_code == {"video_not_supported": 1} and manifest.num_samples == 1
    assert "qwen3_5 family takes none" in rejects(tmp_path / "q")[1]["reason"]


def test_a_changed_clip_builds_its_task_again(tmp_path, data):
    folder = tmp_path / "in"
    write_clip(folder / "clip.mp4", 20, 10, 48, 64)
    path = one_clip(folder, "clip.mp4", "resume.jsonl")
    config = BuildConfig.create(input=str(path), out=str(tmp_path / "b"))
    before = build(config, progress=False)
    write_clip(folder / "clip.mp4", 30, 10, 48, 64)  # 3 s now
    after = build(config, progress=False)
    assert before.sha256 != after.sha256
    (video,) = samples_of(tmp_path / "b")[1].info["videos"]
    assert video["source_frames"] == 30 and video["duration"] == pytest.approx(3.0)


# --- tokens and pixels against transformers ----------------------------------------------------


TEMPLATES = {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_vl", "qwen3_vl_hf": "qwen3_vl"}


def hf_messages(sample) -> list[dict]:
    """The sample's conversation as a chat template takes it (image and video parts as ``{"type": ...}``)."""
    out = []
    for message in sample.info["messages"]:
        parts = [{"type": p["type"]} if p["type"] != "text" else p for p in message["content"]]
        out.append({"role": message["role"], "content": parts})
    return out


def block_text(video: dict) -> str:
    """What a processor writes for a video: a timestamp and block per temporal patch (Qwen3-VL), or one block."""
    per = "<|vision_start|>" + "<|video_pad|>" * (video["num_tokens"] // len(video["spans"])) + "<|vision_end|>"
    return "".join(stamp + per for stamp in video["timestamps"]) or per


@pytest.mark.parametrize("family", FAMILIES)
def test_tokens_equal_the_chat_template_with_each_video_expanded(builds, tokenizer, family):
    """The published chat template's text, each image and video written as its processor writes it, tokenized at
    once: the sample's tokens (Qwen3-VL's timestamps merge with the text before them, as in ``this:<``)."""
    template = (FIXTURES / f"{TEMPLATES[family]}_chat_template.jinja").read_text()
    for line, sample in samples_of(builds[family]).items():
        prompt = tokenizer.apply_chat_template(hf_messages(sample), chat_template=template, tokenize=False)
        pieces = prompt.split("<|vision_start|><|video_pad|><|vision_end|>")
        videos = sample.info["videos"]
        assert len(pieces) == len(videos) + 1
        prompt = pieces[0] + "".join(block_text(v) + piece for v, piece in zip(videos, pieces[1:], strict=True))
        for image in sample.info["images"]:
            prompt = prompt.replace("<|image_pad|>", "<|IMAGE|>" * image["num_tokens"], 1)
        expected = tokenizer(prompt.replace("<|IMAGE|>", "<|image_pad|>"))["input_ids"]
        assert sample.input_ids.tolist() == expected, line
    if family == "qwen3_vl_hf":
        sample = samples_of(builds[family])[5]
        assert ":<" in tokenizer.convert_ids_to_tokens(sample.input_ids.tolist())


def test_tinkers_qwen3_vl_format_writes_videos_as_the_template_does(builds, data, make_build, tokenizer):
    """The qwen3_vl format (Tinker's, for local training: Tinker takes no video) writes each video's timestamps and
    blocks as qwen3_vl_hf does; the texts differ only as the two formats do (the template's last newline)."""
    tinker = samples_of(make_build(data, model="qwen3_vl", max_length=MAX_LENGTH))
    for line, sample in samples_of(builds["qwen3_vl_hf"]).items():
        ours = tinker[line]
        assert tokenizer.decode(ours.input_ids.tolist()) + "\n" == tokenizer.decode(sample.input_ids.tolist())
        assert [v["spans"] for v in ours.info["videos"]] == [v["spans"] for v in sample.info["videos"]]


@pytest.fixture(scope="module")
def transformers_with_videos():
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed: transformers' video processors are compared in .venv-newest")
    import transformers

    return transformers


def full_processor(transformers, family, tokenizer):
    """transformers' processor of ``family`` with the build's image and video settings."""
    from tests.helpers import image_processor_class, qwen3_image_processor
    from tests.test_video import video_processor

    grid = video_grid(family)
    images = qwen3_image_processor() if family == "qwen3_vl_hf" else image_processor_class()(patch_size=14)
    cls = {"qwen2_vl": transformers.Qwen2VLProcessor, "qwen2_5_vl": transformers.Qwen2_5_VLProcessor}.get(
        family, transformers.Qwen3VLProcessor
    )
    return cls(image_processor=images, video_processor=video_processor(transformers, grid), tokenizer=tokenizer)


def processor_inputs(sample, template, tokenizer, raw=None):
    """The processor's arguments for ``sample``: its text from the template, its stored images, and its videos as
    stored (their indices as metadata), or, with ``raw`` (the sample's clips, decoded), the clips whole, to sample."""
    prompt = tokenizer.apply_chat_template(hf_messages(sample), chat_template=template, tokenize=False)
    images = [Image.open(io.BytesIO(jpeg)).convert("RGB") for jpeg in sample.images] or None
    videos, metadata = [], []
    for k, (video, frames) in enumerate(zip(sample.info["videos"], sample.videos, strict=True)):
        info = {"total_num_frames": video["source_frames"], "fps": video["source_fps"]}
        if raw is None or video["frame_list"]:
            videos.append(np.stack([decoded(f) for f in frames]))
            metadata.append({**info, "frames_indices": video["frame_indices"]})
        else:
            videos.append(raw[k])
            metadata.append(info)  # no indices: the processor samples the clip
    return {"text": [prompt], "images": images, "videos": videos, "video_metadata": metadata}


def decode_clip(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_the_processor_on_the_stored_frames_and_on_the_raw_clips(
    builds, data, tokenizer, transformers_with_videos, family
):
    """The processor given the stored frames (with their indices) gives the sample's tokens, token types, grids,
    second_per_grid_ts and the collator's pixel_values_videos; given each whole clip to sample itself at 2 fps, the
    same tokens and grids: decoding once at build is what the processor would do every epoch."""
    processor = full_processor(transformers_with_videos, family, tokenizer)
    template = (FIXTURES / f"{TEMPLATES[family]}_chat_template.jinja").read_text()
    stream = ShardStream(builds[family], batch_size=1, shuffle=False)
    collate = Collator.for_build(stream.source.manifest)
    for (sample,) in stream:
        batch = collate([sample])
        out = processor(**processor_inputs(sample, template, tokenizer), do_sample_frames=False, return_tensors="pt")
        assert batch["input_ids"][0].tolist() == out["input_ids"][0].tolist()
        assert torch.equal(batch["mm_token_type_ids"], out["mm_token_type_ids"])
        assert torch.equal(batch["video_grid_thw"], out["video_grid_thw"])
        assert torch.allclose(batch["pixel_values_videos"], out["pixel_values_videos"], atol=1e-5)
        if family == "qwen2_5_vl":
            assert torch.equal(batch["second_per_grid_ts"], out["second_per_grid_ts"].to(torch.float32))
        else:
            assert "second_per_grid_ts" not in batch
        if None in SOURCES[sample.info["line"]]:
            continue  # frame images are never sampled again (transformers refuses to, or would sample them anew)
        clips = [decode_clip(data.parent / "clips" / s) for s in SOURCES[sample.info["line"]]]
        raw = processor(**processor_inputs(sample, template, tokenizer, raw=clips), do_sample_frames=True, fps=2.0,
                        return_tensors="pt")  # fmt: skip
        assert raw["input_ids"][0].tolist() == out["input_ids"][0].tolist()
        assert torch.equal(raw["video_grid_thw"], out["video_grid_thw"])


def test_uint8_video_patches_normalise_on_the_device_to_the_same_values(builds):
    stream = ShardStream(builds["qwen3_vl_hf"], batch_size=4, shuffle=False)
    samples = next(iter(stream))
    floats = Collator.for_build(stream.source.manifest)(samples)
    small = Collator.for_build(stream.source.manifest, pixels="uint8")
    batch = small(samples)
    assert batch["video_patches"].dtype == torch.uint8 and "pixel_values_videos" not in batch
    patches, values = batch["video_patches"], floats["pixel_values_videos"]
    assert patches.numel() == values.numel() and patches.element_size() * 4 == values.element_size()
    moved = small.to_device(batch, "cpu")
    assert torch.equal(moved["pixel_values_videos"], floats["pixel_values_videos"]) and "video_patches" not in moved


# --- M-RoPE positions ------------------------------------------------------------------------


def release_positions(ids, image_grids, video_grids, spg, tps, qwen3, merge=2) -> np.ndarray:
    """M-RoPE positions by the rule of Qwen's release code (transformers up to 5.2 and vLLM keep it), written here
    from the token ids alone: text counts on from the largest position so far plus one; a run of pad tokens is its
    grid from there, temporal patch t at ``floor(t * second_per_grid_t * tokens_per_second)`` (float32) for a
    Qwen2.5-VL video, t for another, and each temporal patch of a Qwen3-VL video its own run of grid (1, H, W)."""
    runs = {IMAGE_PAD: iter([(1, h, w, None) for _, h, w in image_grids])}
    blocks = []
    for (t, h, w), s in zip(video_grids, spg or [None] * len(video_grids), strict=True):
        blocks += [(1, h, w, None)] * t if qwen3 else [(t, h, w, s)]
    runs[VIDEO_PAD] = iter(blocks)
    out = np.zeros((3, len(ids)), dtype=np.int64)
    i = following = 0
    while i < len(ids):
        token = int(ids[i])
        if token not in runs:
            out[:, i] = following
            following, i = following + 1, i + 1
            continue
        t, h, w, s = next(runs[token])
        h, w = h // merge, w // merge
        assert (np.asarray(ids[i : i + t * h * w]) == token).all()
        for k in range(t * h * w):
            step = k // (h * w)
            temporal = step if s is None else int(np.float32(np.float32(step) * np.float32(s)) * np.float32(tps))
            out[:, i + k] = following + np.array([temporal, (k // w) % h, k % w])
        following = int(out[:, i : i + t * h * w].max()) + 1
        i += t * h * w
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_positions_follow_qwens_release_rule(builds, family):
    stream = ShardStream(builds[family], batch_size=1, shuffle=False)
    collate = Collator.for_build(stream.source.manifest)
    for (sample,) in stream:
        videos = sample.info["videos"]
        spg = [v["second_per_grid_t"] for v in videos] if family == "qwen2_5_vl" else None
        images = [i["grid_thw"] for i in sample.info["images"]]
        expected = release_positions(sample.input_ids, images, [v["grid_thw"] for v in videos], spg, 2,
                                     family == "qwen3_vl_hf")  # fmt: skip
        assert np.array_equal(collate.sample_positions(sample), expected), sample.key
        batch = collate([sample])  # a batch with a video carries its positions
        assert torch.equal(batch["position_ids"][:, 0], torch.from_numpy(expected))


def transformers_version() -> tuple[int, int]:
    import transformers

    return tuple(int(x) for x in transformers.__version__.split(".")[:2])


def rope_model(family):
    if family == "qwen3_vl_hf":
        from transformers import Qwen3VLForConditionalGeneration

        return Qwen3VLForConditionalGeneration(tiny_qwen3_vl_config())
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    cls = Qwen2VLForConditionalGeneration if family == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration
    return cls(tiny_qwen2_vl_config(family))


@pytest.mark.parametrize("family", FAMILIES)
def test_positions_equal_get_rope_index(builds, family):
    """Equal to the installed transformers' ``get_rope_index`` wherever it follows the release rule: images,
    Qwen3-VL videos, and Qwen2/2.5-VL videos whose temporal reach stays under their grid's longer side. Past it
    (the 15 s clip) transformers 5.6 on start the text after the video at the grid's side: the positions differ
    there, by one constant, and nowhere else."""
    if family != "qwen3_vl_hf" and (5, 3) <= transformers_version() < (5, 6):
        pytest.skip("transformers 5.3 to 5.5 misplace every Qwen2-VL / Qwen2.5-VL video's temporal and height "
                    "positions (huggingface/transformers#45381): compared in .venv-newest")  # fmt: skip
    model = rope_model(family).model
    stream = ShardStream(builds[family], batch_size=1, shuffle=False)
    collate = Collator.for_build(stream.source.manifest)
    differed = []
    for (sample,) in stream:
        batch = collate([sample])
        extra = {"second_per_grid_ts": batch["second_per_grid_ts"]} if family == "qwen2_5_vl" else {}
        theirs, _ = model.get_rope_index(
            batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
            image_grid_thw=batch.get("image_grid_thw"), video_grid_thw=batch["video_grid_thw"], **extra,
        )  # fmt: skip
        ours = torch.from_numpy(collate.sample_positions(sample))
        if torch.equal(ours, theirs[:, 0]):
            continue
        differed.append(sample.info["line"])
        (video,) = sample.info["videos"]
        end = video["token_start"] + video["num_tokens"]
        assert torch.equal(ours[:, :end], theirs[:, 0, :end])
        shift = ours[:, end:] - theirs[:, 0, end:]
        t, h, w = video["grid_thw"]
        reach = int(ours[0, end - 1] - ours[1, video["token_start"]])  # the video's last temporal position
        assert (shift == reach + 1 - max(h, w) // 2).all() and reach + 1 > max(h, w) // 2
    assert differed == ([] if family == "qwen3_vl_hf" else [6])


# --- models ----------------------------------------------------------------------------------


def tiny_model(family, attn="sdpa"):
    torch.manual_seed(0)
    if family == "qwen3_vl_hf":
        from transformers import Qwen3VLForConditionalGeneration

        model = Qwen3VLForConditionalGeneration(tiny_qwen3_vl_config(initializer_range=0.2))
    else:
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

        cls = Qwen2VLForConditionalGeneration if family == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration
        model = cls(tiny_qwen2_vl_config(family, initializer_range=0.2))
    model.set_attn_implementation(attn)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_a_tiny_model_runs_forward_and_backward_on_images_and_videos(builds, family):
    model = tiny_model(family)
    stream = ShardStream(builds[family], batch_size=3, shuffle=False)
    collate = Collator.for_build(stream.source.manifest)
    batch = collate(next(iter(stream)))
    assert batch["position_ids"].shape == (3, *batch["input_ids"].shape)
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.model.visual.patch_embed.proj.weight.grad.abs().sum() > 0


def packed_sequences(folder, pack_tokens):
    stream = ShardStream(folder, pack_tokens=pack_tokens, sequences_per_batch=2, seed=0)
    return next(iter(stream)), Collator.for_build(stream.source.manifest)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.slow
def test_packed_losses_equal_each_sample_alone(builds, family):
    from tests.test_load_torch import per_sample_losses, spans

    model = tiny_model(family)
    sequences, collate = packed_sequences(builds[family], 2600)
    batch = collate(sequences)
    assert len(spans(sequences)) > 2 and batch["video_grid_thw"].shape[0] >= 3
    for row, start, sample in spans(sequences):
        n = len(sample.input_ids)
        positions = torch.from_numpy(collate.sample_positions(sample))
        assert torch.equal(batch["position_ids"][1:, row, start : start + n], positions)
    with torch.no_grad():
        packed = per_sample_losses(model(**batch).logits, batch["labels"], sequences)
        alone = [float(model(**collate([s])).loss) for _, _, s in spans(sequences)]
    assert packed == pytest.approx(alone, abs=1e-4)


def test_a_mix_of_an_image_build_and_a_video_build_collates_its_videos(builds, make_build, small_dataset):
    from shardkit.load.mix import MixStream

    images = make_build(small_dataset.jsonl, model="qwen2_5_vl", samples_per_shard=8)
    stream = MixStream([images, builds["qwen2_5_vl"]], batch_size=64, seed=0)
    assert stream.source.manifest.video is not None
    collate = Collator.for_build(stream.source.manifest)
    batch = collate(next(iter(stream)))
    assert (batch["mm_token_type_ids"] == 2).sum() == (batch["input_ids"] == VIDEO_PAD).sum() > 0
    assert batch["second_per_grid_ts"].shape[0] == batch["video_grid_thw"].shape[0]


def test_token_budgets_and_packing_count_video_tokens(builds):
    """The index's token counts hold the video tokens, so budgets and packing plan whole samples with them."""
    source = BuildSource(builds["qwen2_5_vl"])
    for sample_id, sample in enumerate(source.samples()):
        assert int(source.index.num_tokens[sample_id]) == len(sample.input_ids) == sample.info["num_tokens"]
    stream = ShardStream(builds["qwen2_5_vl"], max_tokens=2600, seed=0)
    for batch in stream:
        assert max(len(s.input_ids) for s in batch) * len(batch) <= 2600 or len(batch) == 1
    sequences, _ = packed_sequences(builds["qwen2_5_vl"], 2600)
    assert all(sum(len(s.input_ids) for s in sequence) <= 2600 for sequence in sequences)


# --- --overlength ----------------------------------------------------------------------------


def one_clip(folder, clip, name="fit.jsonl", question="What happens?"):
    return write_jsonl(folder / name, [{"messages": [user({"type": "video", "video": clip}, text(question)),
                                                      answer("A ramp moves.")]}])  # fmt: skip


@pytest.fixture(scope="module")
def fit_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    write_clip(root / "long.mp4", 60, 6, 240, 320)  # 10 s
    return root


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl_hf"])
def test_fit_lowers_frames_then_resolution_before_it_drops(tmp_path, fit_data, family):
    path = one_clip(fit_data, "long.mp4")
    full = build(BuildConfig.create(input=str(path), out=str(tmp_path / "full"), model=family, max_length=8192),
                 progress=False)  # fmt: skip
    (video,) = samples_of(tmp_path / "full")[1].info["videos"]
    budget = full.num_tokens // 2
    fitted = build(BuildConfig.create(input=str(path), out=str(tmp_path / "fit"), model=family, max_length=budget),
                   progress=False)  # fmt: skip
    assert fitted.num_fitted == 1 and fitted.num_tokens <= budget
    sample = samples_of(tmp_path / "fit")[1]
    (lowered,) = sample.info["videos"]
    assert sample.info["fitted"] and lowered["num_tokens"] < video["num_tokens"]
    if family == "qwen2_5_vl":  # fewer frames, the same size
        assert len(lowered["frame_indices"]) < len(video["frame_indices"])
        assert (lowered["width"], lowered["height"]) == (video["width"], video["height"])
    else:  # Qwen3-VL budgets the clip: the same frames, smaller
        assert lowered["frame_indices"] == video["frame_indices"] and lowered["width"] < video["width"]
        assert len(lowered["timestamps"]) == len(video["timestamps"])
    plan = video_grid(family).fit(probe(fit_data / "long.mp4"), lowered["num_tokens"])
    assert lowered["frame_indices"] == list(plan.indices) and lowered["grid_thw"] == list(plan.grid)
    dropped = build(BuildConfig.create(input=str(path), out=str(tmp_path / "drop"), model=family, max_length=budget,
                                       overlength="drop"), progress=False)  # fmt: skip
    assert dropped.rejects_by_code == {"too_long": 1}
    tiny = build(BuildConfig.create(input=str(path), out=str(tmp_path / "tiny"), model=family, max_length=32),
                 progress=False)  # fmt: skip
    assert tiny.rejects_by_code == {"too_long": 1}


def test_truncation_never_cuts_through_video_tokens(tmp_path, fit_data):
    path = one_clip(fit_data, "long.mp4", "trunc.jsonl")
    full = build(BuildConfig.create(input=str(path), out=str(tmp_path / "full"), max_length=8192), progress=False)
    cut = build(BuildConfig.create(input=str(path), out=str(tmp_path / "cut"), max_length=full.num_tokens - 20,
                                   overlength="truncate"), progress=False)  # fmt: skip
    assert cut.rejects_by_code == {"too_long": 1}
    assert "would cut through video tokens" in rejects(tmp_path / "cut")[1]["reason"]


# --- training --------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_tiny_qwen3_vl_trains_on_a_video_build(tmp_path_factory, make_build, tiny_tokenizer):
    from tests.test_qwen3_vl import falls, random_qwen3_vl, run

    root = tmp_path_factory.mktemp("video-train")
    records = []
    for i in range(8):
        write_clip(root / f"c{i}.mp4", 8, 4, 32, 32)  # 2 s: 4 frames, 2 temporal patches of 1 token each
        records.append({"messages": [user({"type": "video", "video": f"c{i}.mp4"}, text(f"Clip {i}?")),
                                     answer(f"Case {i} ramps.")]})  # fmt: skip
    folder = make_build(write_jsonl(root / "clips.jsonl", records), model="qwen3_vl_hf", samples_per_shard=4,
                        tokenizer=tiny_tokenizer)  # fmt: skip
    assert read_manifest(folder).num_videos == 8
    model = tmp_path_factory.mktemp("tiny-qwen3-video")
    random_qwen3_vl(tokenizer=tiny_tokenizer).save_pretrained(model)
    _, history = run(tmp_path_factory.mktemp("train"), folder, str(model), max_steps=30)
    assert falls(history)


# --- show, stats -------------------------------------------------------------------------------


def test_show_has_a_strip_of_each_videos_frames_with_their_times(builds):
    from shardkit.show import make_page, show_text

    page = make_page(builds["qwen3_vl_hf"], keys=[f"{3:010d}"]).html
    (video,) = samples_of(builds["qwen3_vl_hf"])[3].info["videos"]
    assert page.count('alt="video 1 frame ') == len(video["frame_indices"]) == 11
    for index, time in zip(video["frame_indices"], video["frame_times"], strict=True):
        assert f"{time:.2f} s · frame {index}" in page
    assert "timestamps: &lt;0.2 seconds&gt;" in page and 'data-video="1"' in page
    assert page.count('class="chip" data-video="1"') == len(video["spans"]) == 6
    text = show_text(builds["qwen3_vl_hf"], color=False, keys=[f"{3:010d}"])
    assert "<video 1 · 1/6 · " in text and "<|video_pad|>" not in text


def test_stats_report_frames_and_tokens_per_clip(builds):
    from shardkit.stats import build_stats, format_stats

    stats = build_stats(builds["qwen2_5_vl"])
    videos = [v for s in samples_of(builds["qwen2_5_vl"]).values() for v in s.info["videos"]]
    assert stats["videos"] == len(videos) == 7
    assert stats["frames_per_video"]["max"] == max(len(v["frame_indices"]) for v in videos)
    assert stats["tokens_per_video"]["min"] == min(v["num_tokens"] for v in videos)
    assert stats["video_seconds"]["max"] == 15
    report = format_stats(stats)
    assert "Videos:                7 (" in report and "Video tokens a second:" in report


# --- what refuses videos -----------------------------------------------------------------------


def test_tinker_refuses_a_video_build(builds):
    pytest.importorskip("tinker", reason="the Tinker SDK (.venv)")
    from shardkit.load.tinker import DatumBatches, sample_to_datum

    with pytest.raises(ConfigError, match="holds 6 videos|holds 7 videos") as caught:
        DatumBatches(ShardStream(builds["qwen3_vl_hf"], batch_size=2))
    assert "Tinker takes no video" in str(caught.value)
    with pytest.raises(ConfigError, match="has a video"):
        sample_to_datum(samples_of(builds["qwen3_vl_hf"])[1])


def test_the_embeddings_cache_and_the_export_refuse_videos(tmp_path, builds):
    from shardkit.embed import EmbedConfig
    from shardkit.embed.run import embed
    from shardkit.export import export_llamafactory

    with pytest.raises(ConfigError, match="the image embeddings cache holds images only"):
        embed(EmbedConfig.create(build=builds["qwen2_vl"], model=str(tmp_path / "none"), out=str(tmp_path / "e")))
    summary = export_llamafactory(builds["qwen2_vl"], str(tmp_path / "lf"), name="v")
    assert summary.samples == 0 and {s["code"] for s in summary.skipped} == {"llamafactory_video"}


def test_without_pyav_a_video_build_stops_with_one_line(tmp_path, data, monkeypatch, capsys):
    from shardkit.cli import main

    monkeypatch.setitem(sys.modules, "av", None)
    code = main(["build", str(data), "--out", str(tmp_path / "b"), "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert err == "shardkit: error: videos need PyAV: pip install 'shardkit[video]'"
