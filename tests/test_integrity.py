"""Build integrity: every record's failure is its reject, bugs are loud, reruns see changed images,
only the build's own files are deleted, validate judges as build does."""

import decimal
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import shardkit.build as build_module
import shardkit.convert as convert_module
from shardkit.build import build
from shardkit.cli import main
from shardkit.config import BuildConfig
from shardkit.load import BuildSource
from shardkit.record_checks import NFC_SHRINK, max_token_chars, min_tokens
from shardkit.validate import validate
from tests.helpers import conversation, write_image, write_jsonl


def config(data, out, **options):
    return BuildConfig.create(input=str(data), out=str(out), **options)


def rejects(out):
    return [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]


def strict_json(text):
    """Parse JSON as the standard defines it: NaN and Infinity are not JSON."""

    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def sharegpt(answer="A cat.", **extra):
    record = {
        "messages": [{"role": "user", "content": "<image>What is it?"}, {"role": "assistant", "content": answer}],
        "images": ["a.jpg"],
        **extra,
    }
    return json.dumps(record).encode()


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_values_json_cannot_hold_are_that_records_reject_or_null(tmp_path, fmt):
    write_image(tmp_path / "d" / "a.jpg", 64, 64)
    lines = [
        sharegpt(note="\udc80"),  # a lone surrogate in an extra field: json.dumps writes it as \udc80
        sharegpt(score=float("nan"), high=float("inf")),  # json.dumps writes NaN and Infinity
        sharegpt(answer=""),
        sharegpt(answer="<image>"),  # no image left for the placeholder count to pass: a plain reject
        sharegpt(label="ok"),
    ]
    assert b"\\udc80" in lines[0] and b"NaN" in lines[1]
    data = write_jsonl(tmp_path / "d" / "in.jsonl", lines)
    out = tmp_path / "out"
    keep = ("note", "score", "high", "label")  # extra keys are kept in meta only when named (--keep-keys)
    manifest = build(config(data, out, format=fmt, input_format="sharegpt", keep_keys=keep), progress=False)
    found = {r["line"]: r for r in rejects(out)}
    assert found[1]["code"] == "invalid_text" and "meta.note" in found[1]["reason"]
    assert found[3]["code"] == "empty_answer"
    assert set(found) == {1, 3, 4} and manifest.num_samples == 2
    if fmt == "parquet":
        (shard,) = out.glob("shard-*.parquet")
        stored = [strict_json(text) for text in pq.read_table(shard).column("json").to_pylist()]
    else:
        stored = [strict_json(s.info_json) for s in BuildSource(str(out)).samples()]
    assert stored[0]["meta"] == {"score": None, "high": None}
    assert stored[1]["meta"] == {"label": "ok"}
    report = validate(str(data), input_format="sharegpt", keep_keys=keep)
    assert [(p["line"], p["code"], p["reason"]) for p in report.problems] == [
        (r["line"], r["code"], r["reason"]) for r in rejects(out)
    ]


def test_decimal_and_binary_labels_in_parquet(tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(png, format="PNG")
    folder = tmp_path / "hf"
    folder.mkdir()
    images = pa.array([png.getvalue()] * 2, pa.binary())
    pq.write_table(
        pa.table({"image": images, "label": pa.array([decimal.Decimal("1.25"), None], pa.decimal128(5, 2))}),
        folder / "decimal.parquet",
    )
    pq.write_table(
        pa.table({"image": images[:1], "label": pa.array([b"\x00\xff"], pa.binary())}), tmp_path / "b.parquet"
    )
    manifest = build(config(folder / "decimal.parquet", tmp_path / "dec"), progress=False)
    (sample,) = BuildSource(str(tmp_path / "dec")).samples()
    assert strict_json(sample.info_json)["meta"] == {"row": 1, "label": 1.25} and manifest.num_rejected == 1
    build(config(tmp_path / "b.parquet", tmp_path / "bin"), progress=False)
    ((reject,),) = [rejects(tmp_path / "bin")]
    # a binary label cannot be the answer: that record's reject, named, and the build goes on
    assert reject["code"] == "invalid_record" and "binary" in reject["reason"] and reject["line"] == 1


def test_an_internal_error_finishes_the_build_then_fails_loudly_with_a_log(tmp_path, monkeypatch, capsys):
    write_image(tmp_path / "d" / "a.jpg", 64, 64)
    write_image(tmp_path / "d" / "b.jpg", 64, 64, seed=1)
    data = write_jsonl(
        tmp_path / "d" / "in.jsonl", [conversation("a.jpg"), conversation("b.jpg"), conversation("a.jpg")]
    )
    real = convert_module.encode_jpeg

    def buggy(image, size, quality):  # a regression that hits one image
        if image.getpixel((0, 0)) == Image.open(tmp_path / "d" / "b.jpg").convert("RGB").getpixel((0, 0)):
            raise ZeroDivisionError("division by zero")
        return real(image, size, quality)

    monkeypatch.setattr(convert_module, "encode_jpeg", buggy)
    out = tmp_path / "out"
    argv = ["build", str(data), "--out", str(out), "--no-progress", "--workers", "1"]
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert "1 record met an internal error" in err and str(out / "errors.log") in err
    log = (out / "errors.log").read_text()
    assert "line 2:" in log and "Traceback" in log and "ZeroDivisionError" in log
    assert [s.info["line"] for s in BuildSource(str(out)).samples()] == [1, 3]
    (reject,) = rejects(out)
    assert reject["code"] == "internal_error" and "traceback" not in reject
    monkeypatch.setattr(convert_module, "encode_jpeg", real)  # the bug fixed: a rerun redoes that task
    assert main(argv) == 0
    assert [s.info["line"] for s in BuildSource(str(out)).samples()] == [1, 2, 3]


def test_a_build_with_no_samples_exits_1_naming_the_top_reasons(tmp_path, capsys):
    data = write_jsonl(tmp_path / "in.jsonl", [conversation("missing.jpg"), conversation("gone.jpg")])
    assert main(["build", str(data), "--out", str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "no samples written: all 2 records rejected (image_missing 2; " in err
    assert "e.g. line 1: " in err and "missing.jpg" in err  # the first reject of the top code


def stored_colour(out):
    (sample,) = BuildSource(str(out)).samples()
    return np.asarray(Image.open(io.BytesIO(sample.images[0]))).reshape(-1, 3).mean(axis=0)


def test_a_rerun_sees_changed_and_added_images(tmp_path, caplog):
    root = tmp_path / "d"
    Image.new("RGB", (64, 64), (250, 0, 0)).save(root.mkdir() or root / "a.png")
    data = write_jsonl(root / "in.jsonl", [conversation("a.png"), conversation("later.png")])
    out = tmp_path / "out"
    build(config(data, out), progress=False)
    assert stored_colour(out)[0] > 200 and [r["code"] for r in rejects(out)] == ["image_missing"]

    os.utime(root / "a.png", ns=(1, 1))  # a new time, the same bytes: hashed again, found unchanged
    with caplog.at_level("INFO"):
        build(config(data, out), progress=False)
    assert "already holds this complete build" in caplog.text

    Image.new("RGB", (64, 64), (0, 0, 250)).save(root / "a.png")  # same size, new pixels
    Image.new("RGB", (32, 32), (0, 250, 0)).save(root / "later.png")
    caplog.clear()
    with caplog.at_level("INFO"):
        manifest = build(config(data, out), progress=False)
    assert "already holds" not in caplog.text
    colours = [
        np.asarray(Image.open(io.BytesIO(s.images[0]))).reshape(-1, 3).mean(axis=0)
        for s in BuildSource(str(out)).samples()
    ]
    assert colours[0][2] > 200 and colours[0][0] < 50 and colours[1][1] > 200
    assert manifest.num_rejected == 0 and rejects(out) == []


def test_one_read_and_one_decode_per_distinct_image_of_a_record(tmp_path, monkeypatch):
    write_image(tmp_path / "d" / "big.png", 1600, 1200, fmt="PNG")
    write_image(tmp_path / "d" / "small.jpg", 64, 64)
    data = write_jsonl(tmp_path / "d" / "in.jsonl", [conversation(*["big.png"] * 90, "small.jpg", "big.png")])
    opened, decoded = [], []
    real = convert_module.SourceImage

    class Counting(real):
        def __init__(self, data, ref, **kw):
            opened.append(ref)
            super().__init__(data, ref, **kw)

        def decode(self, size=None):
            decoded.append(self.ref)
            return super().decode(size)

    monkeypatch.setattr(convert_module, "SourceImage", Counting)
    build(config(data, tmp_path / "out", max_length=16384, max_pixels=28 * 28 * 16), progress=False, workers=1)
    (sample,) = BuildSource(str(tmp_path / "out")).samples()
    assert len(sample.images) == 92 and sample.images[0] == sample.images[89] == sample.images[91]
    assert sorted(opened) == sorted(decoded) == ["big.png", "small.jpg"]


def test_a_50_mb_text_is_rejected_without_being_tokenized(tmp_path, monkeypatch, tokenizer):
    write_image(tmp_path / "d" / "a.jpg", 64, 64)
    huge = conversation("a.jpg", question="word " * 10_000_000)  # 50 MB of text
    data = write_jsonl(tmp_path / "d" / "in.jsonl", [huge, conversation("a.jpg")])
    tokenized = []
    real = convert_module.Renderer.render

    def counting(self, record, train_on, *videos):
        tokenized.append(sum(len(getattr(p, "text", "")) for m in record.messages for p in m.content))
        return real(self, record, train_on, *videos)

    monkeypatch.setattr(convert_module.Renderer, "render", counting)
    build(config(data, tmp_path / "out"), progress=False, workers=1)  # in this process, where calls are counted
    (reject,) = rejects(tmp_path / "out")
    assert reject["line"] == 1 and reject["code"] == "too_long" and "50000015 characters" in reject["reason"]
    assert max(tokenized) < 1000  # only the short record was tokenized


def test_the_token_bound_holds_on_the_qwen_vocabulary(tokenizer):
    chars = max_token_chars(tokenizer)
    assert chars == 128  # the longest Qwen token: 128 spaces
    backend = tokenizer.backend_tokenizer
    hangul_jamo = "\u1100\u1161\u11a8" * 2000  # NFC composes each three into one syllable
    for text in (" " * 50_000, "a" * 50_000, "=" * 50_000, hangul_jamo, "\n" * 50_000, "ab " * 20_000):
        assert min_tokens(len(text), chars) <= len(backend.encode(text, add_special_tokens=False).ids)
    assert NFC_SHRINK * chars * 2048 < 50_000_000


def test_overwrite_and_cleanup_delete_only_the_builds_own_files(clinical, tmp_path):
    out = tmp_path / "out"
    build(config(clinical.jsonl, out, samples_per_shard=4), progress=False)
    (out / "shard-notes.txt").write_text("mine")
    (out / "paper.partial").write_text("mine")
    (out / "shard-archive").mkdir()
    (out / "shard-archive" / "old.tar").write_text("mine")
    (out / "shard-000000-000.tar.partial").write_bytes(b"left by a killed run")
    manifest = build(config(clinical.jsonl, out, samples_per_shard=5), overwrite=True, progress=False)
    assert (out / "shard-notes.txt").read_text() == (out / "paper.partial").read_text() == "mine"
    assert (out / "shard-archive" / "old.tar").read_text() == "mine"
    assert not (out / "shard-000000-000.tar.partial").exists()
    assert sorted(p.name for p in out.glob("shard-0*")) == sorted(s.path for s in manifest.shards)
    (out / "manifest.json").unlink()  # an unfinished build, resumed and cleaned up
    build(config(clinical.jsonl, out, samples_per_shard=5), progress=False)
    assert (out / "shard-notes.txt").exists() and (out / "paper.partial").exists()
    assert (out / "shard-archive" / "old.tar").exists()


def test_validate_reports_what_build_rejects_with_the_same_reason(tmp_path):
    root = tmp_path / "d"
    write_image(root / "a.jpg", 64, 64)
    nested = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    lines = [
        conversation("a.jpg", question="word " * 400),  # too long for max_length 256
        nested,
        conversation("a\u0000.jpg"),
        conversation("loop.jpg"),
        conversation("a.jpg"),
    ]
    (root / "loop.jpg").symlink_to(root / "loop.jpg")
    data = write_jsonl(root / "in.jsonl", lines)
    build(config(data, tmp_path / "out", max_length=256), progress=False)
    built = [(r["line"], r["code"], r["reason"]) for r in rejects(tmp_path / "out")]
    codes = [code for _, code, _ in built]
    assert codes[:3] == ["too_long", "invalid_json", "image_missing"] and [line for line, _, _ in built] == [1, 2, 3, 4]
    assert codes[3].startswith("image_")  # the symlink loop: a reject (images.py may name it more precisely)
    report = validate(str(data), max_length=256)
    assert [(p["line"], p["code"], p["reason"]) for p in report.problems] == built
    assert report.traceback is None and report.images == 1


def test_a_bug_outside_any_record_shows_its_traceback_and_keeps_it_in_the_log(tmp_path, monkeypatch, capsys):
    write_image(tmp_path / "d" / "a.jpg", 64, 64)
    data = write_jsonl(tmp_path / "d" / "in.jsonl", [conversation("a.jpg")])

    def broken(*args, **kwargs):
        raise KeyError("a regression in assembly")

    monkeypatch.setattr(build_module, "assemble", broken)
    out = tmp_path / "out"
    assert main(["build", str(data), "--out", str(out), "--no-progress", "--workers", "1"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and f"traceback in {out / 'errors.log'}" in err
    assert "KeyError: 'a regression in assembly'" in (out / "errors.log").read_text()
