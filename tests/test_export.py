"""Export to LLaMA-Factory: the stored images as they are, placeholders aligned, the input's text, merged entries."""

import json

import pytest

from shardkit.cli import main
from shardkit.errors import ConfigError
from shardkit.export import dataset_info_entry, export_llamafactory
from shardkit.load import BuildSource
from tests.helpers import conversation, write_image, write_jsonl

OTHER = {"file_name": "alpaca.json", "columns": {"prompt": "instruction"}}


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def llamafactory_text(content):
    """An input message's content as LLaMA-Factory text: its text parts, ``<image>`` where its images are."""
    if isinstance(content, str):
        return content
    return "".join("<image>" if part["type"] == "image" else part["text"] for part in content)


def test_export_holds_the_stored_images_and_the_input_text(builds, small_dataset, tmp_path):
    out = tmp_path / "lf"
    out.mkdir()
    (out / "dataset_info.json").write_text(json.dumps({"other": OTHER}))
    summary = export_llamafactory(builds["tar"], str(out), name="clinical", progress=False)

    stored = list(BuildSource(builds["tar"]).samples())
    lines = read_jsonl(out / "clinical.jsonl")
    records = {i + 1: line for i, line in enumerate(small_dataset.jsonl.read_text().splitlines())}
    assert len(lines) == len(stored) == summary.samples and not summary.skipped
    assert summary.images == sum(len(s.images) for s in stored)
    for line, sample in zip(lines, stored, strict=True):
        assert line["images"] == [f"images/clinical/{sample.key}_{i}.jpg" for i in range(len(sample.images))]
        assert [(out / path).read_bytes() for path in line["images"]] == sample.images
        assert sum(m["content"].count("<image>") for m in line["messages"]) == len(line["images"])
        source = json.loads(records[sample.info["line"]])["messages"]
        assert line["messages"] == [{"role": m["role"], "content": llamafactory_text(m["content"])} for m in source]
    written = {p.relative_to(out).as_posix() for p in (out / "images").rglob("*") if p.is_file()}
    assert written == {path for line in lines for path in line["images"]}
    assert summary.largest_image_pixels == max(i["width"] * i["height"] for s in stored for i in s.info["images"])

    info = json.loads((out / "dataset_info.json").read_text())
    assert info == {"other": OTHER, "clinical": dataset_info_entry("clinical")}
    assert (out / info["clinical"]["file_name"]).is_file()
    assert info["clinical"]["formatting"] == "sharegpt"
    assert info["clinical"]["columns"] == {"messages": "messages", "images": "images"}

    parquet = tmp_path / "lf-parquet"
    export_llamafactory(builds["parquet"], str(parquet), name="clinical", progress=False)
    assert (parquet / "clinical.jsonl").read_bytes() == (out / "clinical.jsonl").read_bytes()
    for path in written:
        assert (parquet / path).read_bytes() == (out / path).read_bytes()


@pytest.fixture(scope="module")
def awkward_build(tmp_path_factory, make_build):
    """A build of records LLaMA-Factory can and cannot take: (folder, {line: reason code} of the latter)."""
    root = tmp_path_factory.mktemp("awkward")
    write_image(root / "images" / "a.jpg", 90, 60, seed=1)
    write_image(root / "images" / "b.jpg", 60, 90, seed=2)
    system = conversation("images/a.jpg", "images/b.jpg", question="Compare them.", answer="The same.")
    system["messages"].insert(0, {"role": "system", "content": "You are a dermatologist."})
    two_users = conversation("images/a.jpg")
    two_users["messages"].insert(0, {"role": "user", "content": "Hello."})
    records = [
        conversation("images/a.jpg"),  # 1
        conversation("images/a.jpg", question="What does <image> mean?"),  # 2
        conversation("images/b.jpg", answer="See the <video>."),  # 3
        system,  # 4
        two_users,  # 5
        conversation(question="No picture here.", answer="Fine."),  # 6
    ]
    jsonl = write_jsonl(root / "data.jsonl", records)
    return make_build(jsonl), {2: "llamafactory_placeholder", 3: "llamafactory_placeholder", 5: "llamafactory_turns"}


def test_samples_llamafactory_would_misread_are_listed_and_left_out(awkward_build, tmp_path, capsys):
    location, left_out = awkward_build
    out = tmp_path / "lf"
    assert main(["export", "llamafactory", location, "--out", str(out), "--name", "awkward", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for line in left_out:
        assert f"line {line}: left out: " in printed
    assert "'<image>'" in printed and "'<video>'" in printed and "user, user, assistant" in printed
    assert "3 samples, 3 images" in printed and "3 samples left out" in printed

    lines = read_jsonl(out / "awkward.jsonl")
    assert [line["images"] for line in lines] == [
        ["images/awkward/0000000001_0.jpg"],
        ["images/awkward/0000000004_0.jpg", "images/awkward/0000000004_1.jpg"],
        [],
    ]
    assert lines[1]["messages"] == [
        {"role": "system", "content": "You are a dermatologist."},
        {"role": "user", "content": "<image><image>Compare them."},
        {"role": "assistant", "content": "The same."},
    ]
    written = sorted(p.name for p in (out / "images" / "awkward").iterdir())
    assert written == ["0000000001_0.jpg", "0000000004_0.jpg", "0000000004_1.jpg"]  # none of the left-out samples

    summary = export_llamafactory(location, str(out), name="again", progress=False)
    assert {s["line"]: s["code"] for s in summary.skipped} == left_out
    assert list(json.loads((out / "dataset_info.json").read_text())) == ["awkward", "again"]
    again = (out / "images" / "again" / "0000000001_0.jpg").read_bytes()
    assert again == (out / "images" / "awkward" / "0000000001_0.jpg").read_bytes()


def test_export_errors_are_clear(awkward_build, tmp_path, capsys):
    location, _ = awkward_build
    with pytest.raises(ConfigError, match="data set name"):
        export_llamafactory(location, str(tmp_path / "x"), name="../up")
    out = tmp_path / "broken"
    out.mkdir()
    (out / "dataset_info.json").write_text("{not json")
    assert main(["export", "llamafactory", location, "--out", str(out), "--no-progress"]) == 2
    assert "dataset_info.json is not valid JSON" in capsys.readouterr().err
    assert (out / "dataset_info.json").read_text() == "{not json" and not (out / "shardkit.jsonl").exists()
    assert main(["export", "llamafactory", str(tmp_path / "nothing"), "--out", str(tmp_path / "y")]) == 2
    assert "not a complete shardkit build" in capsys.readouterr().err
