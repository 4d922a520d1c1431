import hashlib
import io
import json
import os
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from PIL import Image

import shardkit.build as build_module
from shardkit.build import build, build_train_val
from shardkit.config import BuildConfig
from shardkit.dedup import find_duplicates
from shardkit.errors import ConfigError, OutputError, RecordError
from shardkit.images import ImageRoot
from shardkit.inputs import open_input
from shardkit.load import BuildSource
from shardkit.shards import read_manifest
from tests.helpers import (
    FIXTURES,
    IMAGE_BACKENDS,
    conversation,
    image_processor_class,
    qwen3_image_processor,
    write_image,
    write_jsonl,
)


def config(dataset_jsonl, out, **options):
    return BuildConfig.create(input=str(dataset_jsonl), out=str(out), **options)


def rejects(out):
    return [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_seed_layout_with_bad_lines_builds_and_reports_exactly_the_bad_lines(clinical, tmp_path, fmt):
    out = tmp_path / "out"
    manifest = build(config(clinical.jsonl, out, format=fmt, samples_per_shard=4), progress=False)
    found = {r["line"]: r["code"] for r in rejects(out)}
    assert found == clinical.bad_lines
    assert all(r["reason"] for r in rejects(out))
    stored = list(BuildSource(str(out)).samples())
    assert [s.info["line"] for s in stored] == clinical.good_lines
    assert manifest.num_records == len(clinical.good_lines) + len(clinical.bad_lines)
    assert manifest.num_samples == len(stored) and manifest.num_rejected == len(clinical.bad_lines)
    assert manifest.num_images == sum(len(s.images) for s in stored)
    assert manifest.num_tokens == sum(len(s.input_ids) for s in stored)
    assert manifest.num_trained_tokens == sum(int((s.weights > 0).sum()) for s in stored)
    for entry in manifest.shards:
        data = (out / entry.path).read_bytes()
        assert entry.bytes == len(data) and entry.sha256 == hashlib.sha256(data).hexdigest()
    assert manifest.config.model == "qwen2_vl" and manifest.config.train_on == "all_assistant"
    assert len(manifest.config.tokenizer_fingerprint) == 64
    assert (out / "manifest.json").exists() and (out / "_progress").is_dir()  # kept: a rerun re-checks images
    assert not list(out.glob("*.partial"))
    sample = stored[0]
    assert sample.info["meta"]["diagnosis"] and sample.info["key"] == f"{sample.info['line']:010d}"
    assert len(sample.input_ids) == sample.info["num_tokens"] <= 2048
    index = pq.read_table(out / "index.parquet")
    assert index.column("num_tokens").to_pylist() == [len(s.input_ids) for s in stored]
    assert manifest.index.num_rows == len(stored)
    assert manifest.index.sha256 == hashlib.sha256((out / "index.parquet").read_bytes()).hexdigest()
    stats = [json.loads(line) for line in (out / "shard_stats.jsonl").read_text().splitlines()]
    assert [s["path"] for s in stats] == [e.path for e in manifest.shards]


def test_same_input_and_options_give_byte_identical_shards(clinical, tmp_path):
    a = build(config(clinical.jsonl, tmp_path / "a", samples_per_shard=3), progress=False)
    b = build(config(clinical.jsonl, tmp_path / "b", samples_per_shard=3), progress=False)
    assert [(s.path, s.sha256) for s in a.shards] == [(s.path, s.sha256) for s in b.shards]
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()


@pytest.mark.parametrize("backend", IMAGE_BACKENDS)
@pytest.mark.parametrize("model", ["qwen2_vl", "qwen3_vl"])
def test_the_models_image_processor_leaves_stored_images_unchanged(clinical, tmp_path, model, backend):
    processor = image_processor_class(backend)() if model == "qwen2_vl" else qwen3_image_processor(backend)
    out = tmp_path / model
    build(config(clinical.jsonl, out, model=model), progress=False)
    pad = 151655
    checked = 0
    for sample in BuildSource(str(out)).samples():
        for jpeg, image in zip(sample.images, sample.info["images"], strict=True):
            result = processor(images=[Image.open(io.BytesIO(jpeg))], return_tensors="np")
            assert result["image_grid_thw"].tolist() == [image["grid_thw"]]
            start, n = image["token_start"], image["num_tokens"]
            assert n == result["pixel_values"].shape[0] // processor.merge_size**2
            assert (sample.input_ids[start : start + n] == pad).all()
            checked += 1
        assert int((sample.input_ids == pad).sum()) == sum(i["num_tokens"] for i in sample.info["images"])
    assert checked > 10


def long_case(root, *, images=4, side=900, question="What is it?", answer="A rash."):
    names = [f"images/p{i}.jpg" for i in range(images)]
    for i, name in enumerate(names):
        write_image(root / name, side + 7 * i, side, seed=i)
    return conversation(*names, question=question, answer=answer)


def test_overlength_fit_lowers_resolution_on_the_grid(tmp_path):
    data = write_jsonl(tmp_path / "d" / "in.jsonl", [long_case(tmp_path / "d")])
    manifest = build(config(data, tmp_path / "out", max_length=1024), progress=False)
    (sample,) = BuildSource(str(tmp_path / "out")).samples()
    assert manifest.num_fitted == 1 and sample.info["fitted"]
    assert len(sample.input_ids) <= 1024
    for image in sample.info["images"]:
        assert image["width"] % 28 == 0 and image["height"] % 28 == 0
        assert image["width"] * image["height"] >= 3136
        assert image["width"] < image["original_width"]
    full = build(config(data, tmp_path / "full", max_length=8192), progress=False)
    assert full.num_fitted == 0 and full.num_tokens > 2000


def test_overlength_drop_and_text_alone_over_budget_are_rejected(tmp_path):
    root = tmp_path / "d"
    records = [long_case(root), conversation(question="word " * 600, answer="ok")]
    data = write_jsonl(root / "in.jsonl", records)
    build(config(data, tmp_path / "drop", max_length=512, overlength="drop"), progress=False)
    assert [(r["line"], r["code"]) for r in rejects(tmp_path / "drop")] == [(1, "too_long"), (2, "too_long")]
    build(config(data, tmp_path / "fit", max_length=512), progress=False)
    found = rejects(tmp_path / "fit")
    assert [r["line"] for r in found] == [2] and "text alone" in found[0]["reason"]


def test_overlength_truncate_cuts_trailing_text_only(tmp_path):
    root = tmp_path / "d"
    write_image(root / "images" / "a.jpg", 100, 100)
    records = [
        conversation("images/a.jpg", question="short", answer="word " * 400),  # cut inside the answer
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "word " * 400}, {"type": "image", "image": "images/a.jpg"}],
                },
                {"role": "assistant", "content": "ok"},
            ]
        },  # the image sits past the cut
        conversation("images/a.jpg", question="word " * 300, answer="ok"),  # the cut removes the whole answer
    ]
    data = write_jsonl(root / "in.jsonl", records)
    manifest = build(config(data, tmp_path / "out", max_length=256, overlength="truncate"), progress=False)
    (sample,) = BuildSource(str(tmp_path / "out")).samples()
    assert len(sample.input_ids) == 256 and sample.info["truncated_tokens"] > 0 and manifest.num_truncated == 1
    assert sample.weights[-1] > 0 and (sample.input_ids == 151655).sum() == sample.info["images"][0]["num_tokens"]
    found = {r["line"]: r for r in rejects(tmp_path / "out")}
    assert found[2]["code"] == "too_long" and "cut through image tokens" in found[2]["reason"]
    assert found[3]["code"] == "no_target"


def test_reserved_tokens_and_extreme_aspect_are_rejected_in_the_build(tmp_path):
    root = tmp_path / "d"
    write_image(root / "images" / "ok.jpg", 64, 64)
    write_image(root / "images" / "thin.png", 4200, 20, fmt="PNG")
    data = write_jsonl(
        root / "in.jsonl",
        [
            conversation("images/ok.jpg", question="inject <|im_end|> here"),
            conversation("images/thin.png"),
            conversation("images/ok.jpg"),
        ],
    )
    manifest = build(config(data, tmp_path / "out"), progress=False)
    assert [(r["line"], r["code"]) for r in rejects(tmp_path / "out")] == [(1, "reserved_token"), (2, "image_aspect")]
    assert manifest.num_samples == 1


def test_max_shard_bytes_splits_a_task_into_parts(clinical, tmp_path):
    manifest = build(
        config(clinical.jsonl, tmp_path / "out", samples_per_shard=100, max_shard_bytes=60_000), progress=False
    )
    names = [s.path for s in manifest.shards]
    assert len(names) > 2 and names == [f"shard-000000-{i:03d}.tar" for i in range(len(names))]
    assert sum(s.num_samples for s in manifest.shards) == len(clinical.good_lines)


def test_strict_stops_at_the_first_rejected_record(clinical, tmp_path):
    with pytest.raises(RecordError) as info:
        build(config(clinical.jsonl, tmp_path / "out"), strict=True, progress=False)
    assert info.value.line == min(clinical.bad_lines)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_output_folder_rules(clinical, tmp_path):
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not a shardkit build"):
        build(config(clinical.jsonl, stranger), progress=False)
    assert (stranger / "notes.txt").read_text() == "mine"

    out = tmp_path / "out"
    build(config(clinical.jsonl, out), progress=False)
    first = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    build(config(clinical.jsonl, out), progress=False)  # already complete: nothing rewritten
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == first
    with pytest.raises(OutputError, match="changed: max_length"):
        build(config(clinical.jsonl, out, max_length=1024), progress=False)
    manifest = build(config(clinical.jsonl, out, max_length=1024), overwrite=True, progress=False)
    assert read_manifest(str(out)).config.max_length == 1024 == manifest.config.max_length


def test_an_interrupted_build_resumes_and_keeps_finished_shards(clinical, tmp_path, monkeypatch):
    reference = build(config(clinical.jsonl, tmp_path / "ref", samples_per_shard=3), progress=False)
    out = tmp_path / "out"
    real_run_task = build_module.run_task
    calls = 0

    def crash_on_third(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt
        return real_run_task(*args, **kwargs)

    monkeypatch.setattr(build_module, "run_task", crash_on_third)
    with pytest.raises(KeyboardInterrupt):  # in this process, where run_task is patched
        build(config(clinical.jsonl, out, samples_per_shard=3), progress=False, workers=1)
    monkeypatch.setattr(build_module, "run_task", real_run_task)
    assert not (out / "manifest.json").exists()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    assert len(kept) == 2
    resumed = build(config(clinical.jsonl, out, samples_per_shard=3), progress=False)
    assert {p: (out / p).stat().st_mtime_ns for p in kept} == kept
    assert [(s.path, s.sha256) for s in resumed.shards] == [(s.path, s.sha256) for s in reference.shards]


# ms-swift's documented PPO/GRPO record (Custom-dataset.md): it ends with a user turn, a prompt to generate from
GRPO_RECORD = {
    "messages": [
        {"role": "system", "content": "You are a useful and harmless math calculator"},
        {"role": "user", "content": "What is 1 + 1?"},
        {"role": "assistant", "content": "It equals 2"},
        {"role": "user", "content": "What about adding 1?"},
    ]
}
THREE_TURNS = {
    "messages": [
        {"role": "user", "content": [{"type": "image", "image": "a.jpg"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A test pattern of soft colours."},
        {"role": "user", "content": "Which colour covers most of it?"},
        {"role": "assistant", "content": "Mostly a muted blue, with some green."},
        {"role": "user", "content": "Is it a photograph?"},
        {"role": "assistant", "content": "No, it is generated."},
    ]
}


def test_every_assistant_turn_is_trained_by_default_and_a_prompt_only_record_has_no_answer(tmp_path, tokenizer):
    """The trainers these files come from (LLaMA-Factory, ms-swift, Qwen's finetune, 2U1, tinker-cookbook's chat SFT)
    train every assistant turn; last_assistant stays an option. A record whose last message is a user turn is
    refused as no_answer (never trained on the answer in its middle), whatever --train-on says."""
    write_image(tmp_path / "a.jpg", 64, 48)
    data = write_jsonl(tmp_path / "in.jsonl", [THREE_TURNS, GRPO_RECORD])
    answers = [m["content"] + "<|im_end|>" for m in THREE_TURNS["messages"] if m["role"] == "assistant"]
    for train_on, trained, turns in [(None, answers, 3), ("last_assistant", answers[-1:], 1)]:
        options = {} if train_on is None else {"train_on": train_on}
        manifest = build(config(data, tmp_path / str(train_on), **options), progress=False)
        (sample,) = BuildSource(str(tmp_path / str(train_on))).samples()
        weighted = sample.input_ids[sample.weights > 0].tolist()
        assert weighted == tokenizer.encode("".join(trained), add_special_tokens=False)
        assert manifest.config.train_on == (train_on or "all_assistant")
        assert sample.info["num_trained_turns"] == manifest.num_trained_turns == turns
        (reject,) = rejects(tmp_path / str(train_on))
        assert (reject["line"], reject["code"]) == (2, "no_answer")
        assert reject["reason"].startswith("the last message is a user turn that no answer follows")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"model": "llava"}, "unknown model family 'llava'"),
        ({"min_pixels": 10**7}, "larger than max_pixels"),
        ({"max_length": 8}, "max_length"),
        ({"train_on": "everything"}, "train_on"),
        ({"format": "zip"}, "format"),
    ],
)
def test_bad_options_are_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        BuildConfig.create(input="in.jsonl", out="out", **options)


def test_qwen3_defaults_use_its_grid():
    c = BuildConfig.create(input="in.jsonl", out="out", model="qwen3_vl")
    assert (c.grid.factor, c.min_pixels, c.max_pixels) == (32, 65536, 1310720)


def test_a_sample_that_cannot_fit_even_at_min_pixels_says_how_many_tokens_it_needs(tmp_path):
    root = tmp_path / "d"
    data = write_jsonl(root / "in.jsonl", [long_case(root, images=2, side=700)])
    build(config(data, tmp_path / "out", max_length=300, min_pixels=448 * 448), progress=False)
    (reject,) = rejects(tmp_path / "out")
    assert reject["code"] == "too_long" and "(512 tokens)" in reject["reason"]  # 2 images of 16 x 16 cells


def test_train_val_with_dedup_scans_the_input_once_for_both_splits(clinical, tmp_path, monkeypatch):
    lines = clinical.jsonl.read_bytes().splitlines(keepends=True)
    data = tmp_path / "in.jsonl"
    data.write_bytes(b"".join(lines + lines[:4]))  # four repeats
    scans = []
    real = build_module.find_duplicates

    def counted(*args, **kwargs):
        scans.append(real(*args, **kwargs))
        return scans[-1]

    monkeypatch.setattr(build_module, "find_duplicates", counted)
    options = {"image_root": str(clinical.root), "dedup": True, "val_fraction": 0.3, "split": "train"}
    manifests = build_train_val(config(data, tmp_path / "out", **options), progress=False)
    records = len(clinical.good_lines) + len(clinical.bad_lines) + 4
    assert len(scans) == 1 and scans[0].records == records
    assert sum(m.num_records for m in manifests.values()) == records
    assert scans[0].duplicates == {len(lines) + 1 + i: 1 + i for i in range(4)}  # lines 1-4 again, at the end
    assert sum(m.rejects_by_code.get("duplicate", 0) for m in manifests.values()) == 4


def test_dedup_leaves_a_bad_record_to_the_build_but_a_bug_propagates(clinical, tmp_path, monkeypatch):
    source = open_input(str(clinical.jsonl))
    scan = find_duplicates(source, ImageRoot(str(clinical.root)))
    assert scan.records == len(clinical.good_lines) + len(clinical.bad_lines)

    def broken(item):
        raise KeyError("a bug")

    monkeypatch.setattr(source, "record", broken)
    with pytest.raises(KeyError, match="a bug"):
        find_duplicates(source, ImageRoot(str(clinical.root)))


def test_a_task_result_this_version_cannot_read_is_built_again(clinical, tmp_path, caplog):
    out = tmp_path / "out"
    reference = build(config(clinical.jsonl, out, samples_per_shard=3), progress=False)
    (out / "manifest.json").unlink()
    result = out / "_progress" / "task-000001.json"
    saved = json.loads(result.read_text())
    assert {"index", "shards", "rejects", "records", "read", "seconds"} <= set(saved)  # the JSON as before
    result.write_text(json.dumps({**saved, "shards": "not a list"}))
    with caplog.at_level("WARNING"):
        again = build(config(clinical.jsonl, out, samples_per_shard=3), progress=False)
    assert "task-000001.json is not a task result this version reads" in caplog.text
    assert json.loads(result.read_text()) == {**saved, "seconds": json.loads(result.read_text())["seconds"]}
    assert again.shards == reference.shards


IMPORTED = """
import sys
from shardkit.cli import main
code = main(sys.argv[1:])
print(" ".join(sorted(m for m in ("transformers", "torch", "pandas") if m in sys.modules)))
sys.exit(code)
"""


@pytest.mark.parametrize("command", ["build", "validate"])
def test_build_and_validate_import_neither_transformers_nor_torch_once_the_tokenizer_is_cached(tmp_path, command):
    """The start-up a command-line build pays: its tokenizer read from the cache folder (made there by the first
    process that needed it), nothing of transformers, torch or pandas imported (seconds, on a small input)."""
    shutil.copytree(FIXTURES / "golden", tmp_path / "data")
    args = ["-q", command, str(tmp_path / "data" / "records.jsonl")]
    if command == "build":
        args += ["--out", str(tmp_path / "out"), "--overwrite"]
    imported = []
    for _ in range(2):  # the first may make the cache entry, the second reads it
        run = subprocess.run([sys.executable, "-c", IMPORTED, *args], capture_output=True, text=True, env=os.environ)
        assert run.returncode == 0, run.stderr[-2000:]
        imported.append(run.stdout.splitlines()[-1] if run.stdout.strip() else "")
    assert imported[1] == "", f"imported: {imported[1]}"


def test_slices_cover_each_task_in_order_about_two_a_worker():
    from shardkit.build import Task, plan_slices
    from shardkit.inputs import RawItem

    def task(index, n):
        return Task(index, [RawItem(number=index * 100 + i, data=b"") for i in range(n)])

    for tasks, workers, expected in [([task(0, 24)], 2, 4), ([task(0, 24)], 3, 6), ([task(0, 5), task(1, 3)], 3, 6),
                                     ([task(0, 2)], 4, 2), ([task(0, 24)], 16, 24)]:  # fmt: skip
        slices = plan_slices(tasks, workers)
        assert len(slices) == expected
        for t in tasks:
            mine = [s for s in slices if s.task == t.index]
            assert [s.index for s in mine] == list(range(len(mine)))
            assert [item for s in mine for item in s.items] == t.items
