"""Input forms on real files: JSONL, ShareGPT, image folders, Hugging Face Parquet/Arrow, inline and remote images,
the train/validation split and duplicate removal."""

import base64
import http.server
import json
import threading
import time

import pytest

from shardkit.build import build, build_train_val
from shardkit.config import BuildConfig
from shardkit.errors import InputError, RecordError
from shardkit.inputs import detect, open_input
from shardkit.inputs.base import RawItem, hash_files
from shardkit.inputs.jsonl import QwenJsonl, iter_lines
from shardkit.load import BuildSource
from shardkit.schema import InlineImage
from shardkit.validate import validate
from tests.helpers import conversation, write_image, write_jsonl


def rejects(folder):
    return {r["line"]: r for r in map(json.loads, (folder / "rejects.jsonl").read_text().splitlines())}


def answers(folder):
    return {s.info["line"]: s.info["messages"][-1]["content"][0]["text"] for s in BuildSource(str(folder)).samples()}


# -- JSON lines ---------------------------------------------------------------------------


def test_blank_lines_are_skipped_and_numbers_are_physical(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n   \n{"b": 2}\r\n{"c": 3}')
    lines = list(iter_lines(str(path)))
    assert [(r.number, r.data.strip()) for r in lines] == [(1, b'{"a": 1}'), (4, b'{"b": 2}'), (5, b'{"c": 3}')]
    assert QwenJsonl(str(path)).count() == 3


def test_input_hash_changes_with_content(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"a": 1}\n')
    first = hash_files(QwenJsonl(str(path)).files())
    path.write_text('{"a": 2}\n')
    assert hash_files(QwenJsonl(str(path)).files()) != first


def test_invalid_utf8_and_json_are_record_errors(tmp_path):
    source = QwenJsonl(str(tmp_path / "x.jsonl"))
    with pytest.raises(RecordError) as info:
        source.record(RawItem(3, b'{"messages": "caf\xe9"}\n'))
    assert (info.value.code, info.value.line) == ("invalid_utf8", 3)
    assert "byte 0xe9 at column 18" in info.value.reason
    with pytest.raises(RecordError) as info:
        source.record(RawItem(9, b'{"messages": [\n'))
    assert (info.value.code, info.value.line) == ("invalid_json", 9)
    assert info.value.reason == "invalid JSON: Expecting value at column 15"


def test_missing_or_folder_input_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="input not found"):
        list(QwenJsonl(str(tmp_path / "nope.jsonl")).items())
    with pytest.raises(InputError, match="is a folder"):
        QwenJsonl(str(tmp_path)).count()


# -- ShareGPT / LLaMA-Factory ---------------------------------------------------------------


def sharegpt_records():
    return [
        {
            "messages": [
                {"role": "user", "content": "<image>What is shown?"},
                {"role": "assistant", "content": "A rash."},
            ],
            "images": ["images/a.jpg"],
        },
        {
            "conversations": [
                {"from": "human", "value": "Compare <image> and <image>."},
                {"from": "gpt", "value": "Same."},
            ],
            "images": ["images/a.jpg", "images/b.jpg"],
            "system": "You are a dermatologist.",
        },
        {
            "messages": [{"role": "user", "content": "<image><image>Two?"}, {"role": "assistant", "content": "No."}],
            "images": ["images/a.jpg"],
        },
        {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]},
    ]


@pytest.mark.parametrize("array", [False, True])
def test_sharegpt_placeholders_become_image_parts(tmp_path, array, tokenizer):
    write_image(tmp_path / "images" / "a.jpg", 120, 90)
    write_image(tmp_path / "images" / "b.jpg", 90, 120)
    if array:
        path = tmp_path / "data.json"
        path.write_text(json.dumps(sharegpt_records(), indent=1))
    else:
        path = write_jsonl(tmp_path / "data.jsonl", sharegpt_records())
    assert detect(str(path)) == "json"
    source = open_input(str(path))
    items = list(source.items())
    second = source.record(items[1])
    assert [m.role for m in second.messages] == ["system", "user", "assistant"]
    assert [p.type for p in second.messages[1].content] == ["text", "image", "text", "image", "text"]
    assert [p.image for p in second.images()] == ["images/a.jpg", "images/b.jpg"]
    with pytest.raises(RecordError, match="2 <image> placeholders but 1 images"):
        source.record(items[2])
    with pytest.raises(RecordError, match="unknown role 'tool'"):  # text only: read in the qwen form
        source.record(items[3])
    build(BuildConfig.create(input=str(path), out=str(tmp_path / "out")), progress=False)
    assert sorted(rejects(tmp_path / "out")) == [3, 4]
    assert answers(tmp_path / "out") == {1: "A rash.", 2: "Same."}


# -- image folder + labels.json ------------------------------------------------------------


def test_image_folder_with_labels(tmp_path):
    root = tmp_path / "pets"
    for name in ("cat1.jpg", "dog1.jpg", "cat2.jpg"):
        write_image(root / name, 64, 48)
    (root / "labels.json").write_text(
        json.dumps({"cat1.jpg": "cat", "dog1.jpg": "dog", "missing.jpg": "cat", "cat2.jpg": "cat"})
    )
    assert detect(str(root)) == "folder" and detect(str(root / "labels.json")) == "folder"
    report = validate(str(root))
    assert report.unit == "entry" and [p["line"] for p in report.problems] == [3]
    build(BuildConfig.create(input=str(root), out=str(tmp_path / "out"), prompt="Cat or dog?"), progress=False)
    stored = list(BuildSource(str(tmp_path / "out")).samples())
    assert [s.info["meta"]["label"] for s in stored] == ["cat", "dog", "cat"]
    assert stored[0].info["messages"][0]["content"][1]["text"] == "Cat or dog?"
    assert rejects(tmp_path / "out")[3]["code"] == "image_missing"


# -- Hugging Face data sets ------------------------------------------------------------------


@pytest.fixture(scope="module")
def cifar_like(tmp_path_factory):
    """A CIFAR-10-layout data set (``img`` Image feature, ``label`` ClassLabel), written by ``datasets``."""
    import datasets
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("cifar")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(6)]
    features = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(names=["airplane", "automobile", "bird"])}
    )
    ds = datasets.Dataset.from_dict({"img": images, "label": [0, 1, 2, 2, 1, 0]}, features=features)
    ds.to_parquet(str(root / "train.parquet"))
    ds.save_to_disk(str(root / "saved"))
    return root


@pytest.mark.parametrize("where", ["train.parquet", "saved"])
def test_hugging_face_files_use_class_names(cifar_like, tmp_path, where):
    location = str(cifar_like / where)
    assert detect(location) == "hf"
    manifest = build(BuildConfig.create(input=location, out=str(tmp_path / "out"), min_pixels=28 * 28), progress=False)
    assert manifest.num_samples == 6 and manifest.num_records == 6
    assert list(answers(tmp_path / "out").values()) == [
        "airplane",
        "automobile",
        "bird",
        "bird",
        "automobile",
        "airplane",
    ]
    sample = next(BuildSource(str(tmp_path / "out")).samples())
    assert sample.info["images"][0]["original_width"] == 32 and sample.info["images"][0]["source"].startswith("inline")


def test_hugging_face_column_mapping_with_pyarrow(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jpeg = write_image(tmp_path / "x.jpg", 40, 30).read_bytes()
    table = pa.table(
        {"picture": [jpeg, jpeg, b""], "caption": ["a red square", "a blue one", "empty"], "id": [1, 2, 3]}
    )
    pq.write_table(table, tmp_path / "captions.parquet")
    config = BuildConfig.create(
        input=str(tmp_path / "captions.parquet"),
        out=str(tmp_path / "out"),
        image_column="picture",
        text_column="caption",
        prompt="Describe the image.",
        min_pixels=28 * 28,
    )
    build(config, progress=False)
    assert answers(tmp_path / "out") == {1: "a red square", 2: "a blue one"}
    assert rejects(tmp_path / "out")[3]["code"] == "image_missing"
    with pytest.raises(InputError, match="no column 'photo'"):
        list(open_input(str(tmp_path / "captions.parquet"), image_column="photo").items())


def test_hugging_face_image_bytes_pass_through_without_base64(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jpeg = write_image(tmp_path / "x.jpg", 40, 30).read_bytes()
    cells = [{"bytes": jpeg, "path": "cat.jpg"}, {"bytes": b"not a jpeg", "path": None}]
    pq.write_table(pa.table({"image": cells, "text": ["a cat", "broken"]}), tmp_path / "in.parquet")
    source = open_input(str(tmp_path / "in.parquet"))
    first, second = (source.record(item).images()[0].image for item in source.items())
    assert isinstance(first, InlineImage) and first.data == jpeg
    assert first == f"inline image 1 of row 1 (cat.jpg, {len(jpeg)} bytes)"
    assert second == "inline image 1 of row 2 (10 bytes)"
    build(BuildConfig.create(input=str(tmp_path / "in.parquet"), out=str(tmp_path / "out")), progress=False)
    sample = next(BuildSource(str(tmp_path / "out")).samples())
    assert sample.info["images"][0]["source"] == first and sample.info["images"][0]["original_width"] == 40
    reject = rejects(tmp_path / "out")[2]
    assert reject["code"] == "image_not_image" and "inline image 1 of row 2" in reject["reason"]


# -- inline and remote images ----------------------------------------------------------------


def test_inline_images_as_data_uris_and_bytes_fields(tmp_path):
    jpeg = write_image(tmp_path / "x.jpg", 80, 60).read_bytes()
    encoded = base64.b64encode(jpeg).decode()
    records = [
        conversation(f"data:image/jpeg;base64,{encoded}"),
        {
            "messages": [
                {"role": "user", "content": [{"type": "image", "image": {"bytes": encoded}}]},
                {"role": "assistant", "content": "ok"},
            ]
        },
        conversation("data:image/jpeg;base64,not-base64!"),
    ]
    data = write_jsonl(tmp_path / "in.jsonl", records)
    build(BuildConfig.create(input=str(data), out=str(tmp_path / "out")), progress=False)
    stored = list(BuildSource(str(tmp_path / "out")).samples())
    assert len(stored) == 2 and all(s.info["images"][0]["original_width"] == 80 for s in stored)
    assert rejects(tmp_path / "out")[3]["code"] == "image_corrupt"


@pytest.fixture
def image_server(tmp_path):
    """A real HTTP server on 127.0.0.1: /ok.jpg, /missing.jpg (404), /big.jpg, /flaky.jpg (503 once), /slow.jpg."""
    jpeg = write_image(tmp_path / "served.jpg", 64, 64).read_bytes()
    calls = {"flaky": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            if self.path == "/flaky.jpg":
                calls["flaky"] += 1
                if calls["flaky"] == 1:
                    self.send_error(503)
                    return
            if self.path == "/slow.jpg":
                time.sleep(1.5)
            if self.path == "/missing.jpg":
                self.send_error(404)
                return
            body = jpeg * 40 if self.path == "/big.jpg" else jpeg
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", calls
    server.shutdown()


def test_remote_images_only_when_allowed(tmp_path, image_server):
    base, calls = image_server
    names = ["ok", "missing", "big", "flaky", "slow"]
    data = write_jsonl(tmp_path / "in.jsonl", [conversation(f"{base}/{n}.jpg") for n in names])
    build(BuildConfig.create(input=str(data), out=str(tmp_path / "off")), progress=False)
    assert {r["code"] for r in rejects(tmp_path / "off").values()} == {"image_remote"}

    config = BuildConfig.create(
        input=str(data),
        out=str(tmp_path / "on"),
        allow_remote=True,
        remote_timeout=0.5,
        remote_max_bytes=len((tmp_path / "served.jpg").read_bytes()) * 2,
    )
    manifest = build(config, progress=False)
    found = rejects(tmp_path / "on")
    assert manifest.num_samples == 2  # ok, and flaky after a retry
    assert calls["flaky"] == 2
    assert (found[2]["code"], found[3]["code"], found[5]["code"]) == (
        "image_missing",
        "image_too_large",
        "image_timeout",
    )
    assert "HTTP 404" in found[2]["reason"] and "within 0.5 s (--remote-timeout" in found[5]["reason"]


# -- split and dedup ---------------------------------------------------------------------------


def test_validation_split_is_stable_as_the_input_grows(clinical, tmp_path):
    lines = clinical.jsonl.read_bytes().splitlines(keepends=True)
    first = tmp_path / "first.jsonl"
    first.write_bytes(b"".join(lines[:8]))
    grown = tmp_path / "grown.jsonl"
    grown.write_bytes(b"".join(lines))

    def sides(path, out):
        config = BuildConfig.create(
            input=str(path), out=str(out), image_root=str(clinical.root), val_fraction=0.4, split="train"
        )
        manifests = build_train_val(config, progress=False)
        return {split: {s.info["line"] for s in BuildSource(str(out / split)).samples()} for split in manifests}

    small, large = sides(first, tmp_path / "a"), sides(grown, tmp_path / "b")
    assert small["train"] and small["val"] and not small["train"] & small["val"]
    assert small["train"] <= large["train"] and small["val"] <= large["val"]  # nobody moved
    assert large["train"] | large["val"] == set(clinical.good_lines)


def test_dedup_rejects_repeats_of_the_same_images_and_text(tmp_path):
    write_image(tmp_path / "images" / "a.jpg", 64, 48)
    write_image(tmp_path / "images" / "b.jpg", 64, 48, seed=1)
    (tmp_path / "images" / "a_copy.jpg").write_bytes((tmp_path / "images" / "a.jpg").read_bytes())
    base = conversation("images/a.jpg", question="What?", answer="A rash.")
    records = [
        base,
        {**base, "meta": {"other": 1}},
        conversation("images/a_copy.jpg", question="What?", answer="A rash."),
        conversation("images/b.jpg", question="What?", answer="A rash."),
        conversation("images/a.jpg", question="Why?"),
    ]
    data = write_jsonl(tmp_path / "in.jsonl", records)
    manifest = build(BuildConfig.create(input=str(data), out=str(tmp_path / "out"), dedup=True), progress=False)
    found = rejects(tmp_path / "out")
    assert sorted(found) == [2, 3] and all(r["code"] == "duplicate" for r in found.values())
    assert "duplicate of line 1" in found[2]["reason"]
    assert manifest.num_samples == 3 and manifest.rejects_by_code == {"duplicate": 2}
