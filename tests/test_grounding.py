"""Grounding through a whole build: ms-swift's grounding data set built for every family, each box written in the
family's convention for the stored image (checked against an independent computation and against the stored pixels),
coordinates in the text rescaled or refused, rejects with their line, --overlength fit and truncate, rotation refused
at load time, and stats, show and the LLaMA-Factory export reading the stored coordinates."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shardkit.boxes import ImageSize
from shardkit.build import build
from shardkit.config import BuildConfig
from shardkit.errors import ConfigError
from shardkit.export import export_llamafactory
from shardkit.families import get_family
from shardkit.images import smart_resize
from shardkit.load.augment import Augment
from shardkit.load.batch import Collator
from shardkit.load.source import BuildSource
from shardkit.show import make_page
from shardkit.stats import build_stats, format_stats
from tests import test_show
from tests.helpers import write_jsonl
from tests.test_boxes import expected, text_of

chromium = test_show.chromium  # the headless Chromium fixture, for the page test

#: the pictures: size and the bright blocks drawn on a dark ground, where the boxes of the records lie
PICTURES = {
    "sheep.jpg": ((1000, 800), [(100, 200, 500, 600), (600, 100, 700, 300)]),
    "cake.jpg": ((640, 428), [(146, 137, 615, 415)]),
}
SCALE = {"qwen2_vl": "rel1000", "qwen2_5_vl": "abs", "qwen3_vl": "rel1000", "qwen3_vl_hf": "rel1000"}

#: ms-swift's documented grounding form (Custom-dataset.md, "Grounding"), on the pictures above
SWIFT_RECORDS = [
    {
        "messages": [
            {"role": "user", "content": "<image>Describe the image."},
            {"role": "assistant", "content": "<ref-object><bbox> grazes next to <ref-object><bbox>"},
        ],
        "images": ["sheep.jpg"],
        "objects": {"ref": ["a sheep", "a lamb"], "bbox": [[100, 200, 500, 600], [600, 100, 700, 300]]},
    },
    {
        "messages": [
            {"role": "user", "content": "<image>Find the <ref-object> in the image"},
            {"role": "assistant", "content": "<bbox><bbox>"},
        ],
        "images": ["sheep.jpg"],
        "objects": {"ref": ["sheep"], "bbox": [[100, 200, 500, 600], [600, 100, 700, 300]], "bbox_type": "real"},
    },
    {
        "messages": [
            {"role": "user", "content": "<image>Tap the cake"},
            {"role": "assistant", "content": "Action: click(start_box='<bbox>')"},
        ],
        "images": ["cake.jpg"],
        "objects": {"ref": [], "bbox": [[380.5, 276]]},
    },
    {
        "messages": [
            {"role": "user", "content": "<image><image>Where is the <ref-object>, and the <ref-object>?"},
            {"role": "assistant", "content": "<bbox> and <bbox>"},
        ],
        "images": ["sheep.jpg", "cake.jpg"],
        "objects": {
            "ref": ["sheep", "cake"],
            "bbox": [[0.1, 0.25, 0.5, 0.75], [0.228125, 0.3200934579, 0.9609375, 0.9696261682]],
            "bbox_type": "norm1",
            "image_id": [0, 1],
        },
    },
    {  # ms-swift's query-response form carries objects too
        "query": "<image>Find the <ref-object>",
        "response": "<bbox>",
        "images": ["cake.jpg"],
        "objects": {"ref": ["cake"], "bbox": [[146, 137, 615, 415]]},
    },
    {  # the qwen form: a list of the cookbooks' objects, the whole answer at <objects>
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image", "image": "sheep.jpg"}, {"type": "text", "text": "Outline."}],
            },
            {"role": "assistant", "content": "<objects>"},
        ],
        "objects": [
            {"label": "sheep", "bbox_2d": [100, 200, 500, 600]},
            {"label": "lamb", "bbox_2d": [600, 100, 700, 300]},
            {"label": "tip", "point_2d": [300, 400]},
        ],
    },
]


def picture(path: Path, size: tuple[int, int], blocks: list, orientation: int = 1) -> Path:
    """A dark picture with bright blocks (x1, y1, x2, y2) as JPEG, its file turned by an EXIF ``orientation``."""
    pixels = np.full((size[1], size[0], 3), 25, np.uint8)
    for x1, y1, x2, y2 in blocks:
        pixels[y1:y2, x1:x2] = 230
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, format="JPEG", quality=95, exif=exif.tobytes())
    return path


@pytest.fixture(scope="module")
def grounding_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("grounding")
    for name, (size, blocks) in PICTURES.items():
        picture(root / name, size, blocks)
    return write_jsonl(root / "swift.jsonl", SWIFT_RECORDS)


def samples_of(build_dir: str) -> list:
    return list(BuildSource(build_dir).samples())


def rejects_of(build_dir: str) -> list[dict]:
    return [json.loads(line) for line in (Path(build_dir) / "rejects.jsonl").read_text().splitlines()]


def stored_pixels(sample, index: int) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(sample.images[index])).convert("L"), dtype=np.float64)


def assert_on_the_block(gray: np.ndarray, box: tuple[float, ...]) -> None:
    """The stored picture is bright just inside each side of ``box`` (pixels) and dark just outside it: the box
    lies on its block within the resampling's blur (3 pixels)."""
    x1, y1, x2, y2 = (round(v) for v in box)
    h, w = gray.shape
    assert gray[y1 + 3 : y2 - 3, x1 + 3 : x2 - 3].mean() > 200
    for inside, outside in (
        (gray[y1 + 3 : y2 - 3, x1 + 3], gray[y1 + 3 : y2 - 3, x1 - 4] if x1 >= 4 else None),
        (gray[y1 + 3 : y2 - 3, x2 - 4], gray[y1 + 3 : y2 - 3, x2 + 3] if x2 + 3 < w else None),
        (gray[y1 + 3, x1 + 3 : x2 - 3], gray[y1 - 4, x1 + 3 : x2 - 3] if y1 >= 4 else None),
        (gray[y2 - 4, x1 + 3 : x2 - 3], gray[y2 + 3, x1 + 3 : x2 - 3] if y2 + 3 < h else None),
    ):
        assert inside.mean() > 200, box
        assert outside is None or outside.mean() < 60, box


def pixels_of(written: list[int], image: dict, scale: str) -> tuple[float, ...]:
    """Written coordinates as pixels of the stored image, computed here: abs as they are, rel1000 by the side."""
    sides = (image["width"], image["height"])
    return tuple(v if scale == "abs" else v * sides[i % 2] / 1000 for i, v in enumerate(written))


@pytest.mark.parametrize("family", list(SCALE))
def test_a_swift_grounding_set_builds_for_each_family_with_its_coordinates_on_the_stored_images(
    family, grounding_data, make_build, tokenizer
):
    out = make_build(grounding_data, model=family)
    samples = samples_of(out)
    assert len(samples) == len(SWIFT_RECORDS) and not rejects_of(out)
    f, scale = get_family(family), SCALE[family]
    boxes = points = 0
    for sample in samples:
        info = sample.info
        record = SWIFT_RECORDS[info["line"] - 1]
        for image in info["images"]:  # the stored size, computed here with the processor's rule
            assert (image["height"], image["width"]) == smart_resize(
                image["original_height"], image["original_width"], f.factor, f.min_pixels, f.max_pixels
            )
        assert info["objects"] == record["objects"]
        text = tokenizer.decode(sample.input_ids.tolist())
        for box in info["boxes"]:
            image = info["images"][box["image"]]
            size = ImageSize(image["original_width"], image["original_height"], image["width"], image["height"])
            unit = 1 if box["space"] == "norm1" else None
            assert box["written"] == list(expected(box["source"], size, scale, unit)), (family, box)
            assert box["scale"] == scale
            if box["kind"] == "box":
                boxes += 1
                assert_on_the_block(stored_pixels(sample, box["image"]), pixels_of(box["written"], image, scale))
            else:
                points += 1
            if family == "qwen2_vl" or isinstance(record["objects"], list):  # a whole item: box tokens or cookbook JSON
                style = "qwen2_vl" if family == "qwen2_vl" else "qwen3_vl"
                label = box["label"] if family != "qwen2_vl" or isinstance(record["objects"], list) else None
                assert text_of(style, box["written"], label) in text
            else:  # ms-swift's <bbox> alone in a JSON family: the list
                assert "[" + ", ".join(map(str, box["written"])) + "]" in text
        assert "<bbox>" not in text and "<ref-object>" not in text and "<objects>" not in text
    manifest = BuildSource(out).manifest
    assert (manifest.num_boxes, manifest.num_points, manifest.num_text_boxes) == (boxes, points, 0) == (9, 2, 0)


def test_labels_and_texts_of_the_swift_set(grounding_data, make_build):
    """Each box takes the ref placed before it (ms-swift's lists do not pair them; the text does)."""
    samples = {s.info["line"]: s.info for s in samples_of(make_build(grounding_data, model="qwen2_5_vl"))}
    assert [b["label"] for b in samples[1]["boxes"]] == ["a sheep", "a lamb"]
    assert [b["label"] for b in samples[2]["boxes"]] == ["sheep", "sheep"]
    assert [b["label"] for b in samples[3]["boxes"]] == [None]
    answer = samples[1]["messages"][-1]["content"][0]["text"]  # the stored (trained) text
    assert answer == "a sheep[101, 203, 504, 609] grazes next to a lamb[605, 102, 706, 304]"
    assert samples[3]["messages"][-1]["content"][0]["text"] == "Action: click(start_box='[383, 271]')"
    assert samples[6]["messages"][-1]["content"][0]["text"] == (
        '```json\n[\n\t{"bbox_2d": [101, 203, 504, 609], "label": "sheep"},\n'
        '\t{"bbox_2d": [605, 102, 706, 304], "label": "lamb"},\n\t{"point_2d": [302, 406], "label": "tip"}\n]\n```'
    )
    tokens = {s.info["line"]: s.info for s in samples_of(make_build(grounding_data, model="qwen2_vl"))}
    assert tokens[1]["messages"][-1]["content"][0]["text"] == (
        "<|object_ref_start|>a sheep<|object_ref_end|><|box_start|>(100,250),(500,750)<|box_end|> grazes next to "
        "<|object_ref_start|>a lamb<|object_ref_end|><|box_start|>(600,125),(700,375)<|box_end|>"
    )
    legacy = samples_of(make_build(grounding_data, model="qwen2_5_vl", box_style="qwen2_5_vl_tokens"))
    first = legacy[0].info["messages"][-1]["content"][0]["text"]  # ms-swift's default text, on request
    assert first.startswith("<|object_ref_start|>a sheep<|object_ref_end|><|box_start|>(101,203),(504,609)<|box_end|>")
    manifest = json.loads((Path(make_build(grounding_data, model="qwen2_5_vl")) / "manifest.json").read_text())
    assert (manifest["num_boxes"], manifest["num_points"], "num_text_boxes" in manifest) == (9, 2, False)


def test_an_hf_objects_column_builds(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    data = picture(tmp_path / "sheep.jpg", *PICTURES["sheep.jpg"]).read_bytes()
    rows = {
        "messages": [
            [{"role": "user", "content": "<image>Find the <ref-object>"}, {"role": "assistant", "content": "<bbox>"}],
            [{"role": "user", "content": "<image>Describe."}, {"role": "assistant", "content": "A sheep."}],
        ],
        "images": [[{"bytes": data, "path": "sheep.jpg"}], [{"bytes": data, "path": "sheep.jpg"}]],
        "objects": [{"ref": ["sheep"], "bbox": [[100.0, 200.0, 500.0, 600.0]], "bbox_type": None, "image_id": None},
                    None],
    }  # fmt: skip
    pq.write_table(pa.table(rows), tmp_path / "train.parquet")
    build(BuildConfig.create(input=str(tmp_path / "train.parquet"), out=str(tmp_path / "out"), model="qwen2_5_vl"))
    first, second = samples_of(str(tmp_path / "out"))
    assert first.info["boxes"][0]["written"] == [101, 203, 504, 609] and "boxes" not in second.info


# ---- coordinates already in the text ----

SHEEP_ANSWER = '```json\n[\n\t{"bbox_2d": [100, 200, 500, 600], "label": "sheep"}\n]\n```'


def text_record(image: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text",
             "text": "Where is the sheep?"}]}, {"role": "assistant", "content": answer}]}  # fmt: skip


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("text-boxes")
    picture(root / "sheep.jpg", *PICTURES["sheep.jpg"])
    picture(root / "on_grid.jpg", (1008, 812), [(101, 203, 504, 609)])  # already the stored size: kept
    return write_jsonl(
        root / "text.jsonl",
        [
            text_record("sheep.jpg", SHEEP_ANSWER),
            text_record("on_grid.jpg", SHEEP_ANSWER.replace("100, 200, 500, 600", "101, 203, 504, 609")),
            text_record("sheep.jpg", "<|box_start|>(10,10),(5,20)<|box_end|>"),  # inverted: every family
            text_record("sheep.jpg", '{"bbox_2d": [100, 200, 1200, 600]}'),  # outside 1000x800 and 0-1000
            text_record("sheep.jpg", '{"bbox_2d": [1, 2, 3]}'),  # malformed
        ],
    )


def test_qwen2_5_vl_answers_are_rescaled_never_kept(text_data, make_build):
    out = make_build(text_data, model="qwen2_5_vl")
    samples = {s.info["line"]: s for s in samples_of(out)}
    rescaled = samples[1].info["messages"][-1]["content"][0]["text"]
    assert rescaled == SHEEP_ANSWER.replace("100, 200, 500, 600", "101, 203, 504, 609")
    assert samples[1].info["text_boxes"] == {"found": 1, "rescaled": 1}
    assert_on_the_block(stored_pixels(samples[1], 0), (101, 203, 504, 609))
    kept = samples[2].info["messages"][-1]["content"][0]["text"]
    assert "[101, 203, 504, 609]" in kept and samples[2].info["text_boxes"] == {"found": 1, "rescaled": 0}
    assert {r["line"]: r["code"] for r in rejects_of(out)} == {
        3: "box_inverted",
        4: "box_outside",
        5: "text_box_malformed",
    }
    assert BuildSource(out).manifest.num_text_boxes == 2

    refused = make_build(text_data, model="qwen2_5_vl", text_boxes="refuse")
    assert [s.info["line"] for s in samples_of(refused)] == [2]  # the image shardkit kept as it was
    reject = next(r for r in rejects_of(refused) if r["line"] == 1)
    assert reject["code"] == "text_box_refused" and "1000x800 -> 1008x812" in reject["reason"]


def test_relative_families_keep_text_boxes_and_reject_those_outside_0_1000(text_data, make_build):
    for family in ("qwen2_vl", "qwen3_vl"):
        out = make_build(text_data, model=family)
        samples = {s.info["line"]: s for s in samples_of(out)}
        assert samples[1].info["messages"][-1]["content"][0]["text"] == SHEEP_ANSWER  # 0-1000: nothing to change
        rejects = {r["line"]: r for r in rejects_of(out)}
        assert {line: r["code"] for line, r in rejects.items()} == {
            3: "box_inverted",
            4: "box_outside",
            5: "text_box_malformed",
        }
        assert "messages[1]" in rejects[4]["reason"] and "0-1000" in rejects[4]["reason"]


# ---- rejects of objects, each with its line ----


@pytest.mark.parametrize(
    ("objects", "answer", "code"),
    [
        ({"ref": [], "bbox": [[900, 700, 1100, 900]]}, "<bbox>", "box_outside"),
        ({"ref": [], "bbox": [[500, 600, 100, 200]]}, "<bbox>", "box_inverted"),
        ({"ref": [], "bbox": [[100, 200, 100, 600]]}, "<bbox>", "box_empty"),
        ({"ref": [], "bbox": [[100, 200, 500, 600]], "bbox_type": "norm1000"}, "<bbox>", "objects_bbox_type"),
        ({"ref": [], "bbox": [[100, 200, 500, 600]]}, "<bbox><bbox>", "box_count"),
        ({"ref": [], "bbox": [[100, 200, 500, 600]], "image_id": [1]}, "<bbox>", "box_image"),
        (None, "<bbox>", "box_count"),
        ([{"label": 'say "hi"', "bbox_2d": [100, 200, 500, 600]}], '{"label": "<ref-object>", "bbox_2d": <bbox>}',
         "ref_unsafe"),
    ],
)  # fmt: skip
def test_object_rejects_carry_their_line(tmp_path, objects, answer, code):
    picture(tmp_path / "sheep.jpg", *PICTURES["sheep.jpg"])
    good = {"messages": [{"role": "user", "content": "<image>Find it"}, {"role": "assistant", "content": "<bbox>"}],
            "images": ["sheep.jpg"], "objects": {"ref": [], "bbox": [[100, 200, 500, 600]]}}  # fmt: skip
    bad = {**good, "messages": [good["messages"][0], {"role": "assistant", "content": answer}]}
    if objects is None:
        del bad["objects"]
    else:
        bad["objects"] = objects
    write_jsonl(tmp_path / "data.jsonl", [good, bad])
    manifest = build(BuildConfig.create(input=str(tmp_path / "data.jsonl"), out=str(tmp_path / "out"),
                                        model="qwen2_5_vl"))  # fmt: skip
    assert manifest.num_samples == 1 and manifest.num_boxes == 1
    [reject] = rejects_of(str(tmp_path / "out"))
    assert (reject["line"], reject["code"]) == (2, code), reject["reason"]


def test_exif_rotated_photos_need_the_frame_of_their_boxes(tmp_path):
    """A 1000x800 file with EXIF orientation 6 is the upright 800x1000 picture; its box drawn on the file's
    pixels (ms-swift's frame) is found on the stored picture with --box-orientation raw."""
    raw_block = (100, 200, 500, 600)
    picture(tmp_path / "turned.jpg", (1000, 800), [raw_block], orientation=6)
    record = {"messages": [{"role": "user", "content": "<image>Find it"}, {"role": "assistant", "content": "<bbox>"}],
              "images": ["turned.jpg"], "objects": {"ref": [], "bbox": [list(raw_block)]}}  # fmt: skip
    write_jsonl(tmp_path / "data.jsonl", [record])
    options = {"input": str(tmp_path / "data.jsonl"), "model": "qwen2_5_vl"}
    build(BuildConfig.create(out=str(tmp_path / "unsaid"), **options))
    assert [r["code"] for r in rejects_of(str(tmp_path / "unsaid"))] == ["box_orientation"]
    build(BuildConfig.create(out=str(tmp_path / "raw"), box_orientation="raw", **options))
    [sample] = samples_of(str(tmp_path / "raw"))
    image = sample.info["images"][0]
    assert (image["width"], image["height"], image["orientation"]) == (812, 1008, 6)
    assert sample.info["boxes"][0]["written"] == [203, 101, 609, 504]  # research T9
    assert_on_the_block(stored_pixels(sample, 0), (203, 101, 609, 504))
    build(BuildConfig.create(out=str(tmp_path / "upright"), box_orientation="upright", **options))
    assert samples_of(str(tmp_path / "upright"))[0].info["boxes"][0]["written"] == [102, 202, 508, 605]
    manifest = json.loads((tmp_path / "raw" / "manifest.json").read_text())
    assert manifest["config"]["box_orientation"] == "raw" and "text_boxes" not in manifest["config"]


# ---- --overlength fit and truncate ----


def test_fit_lowers_the_images_and_the_boxes_follow(grounding_data, tmp_path, tokenizer):
    config = BuildConfig.create(input=str(grounding_data), out=str(tmp_path / "out"), model="qwen2_5_vl",
                                max_length=300)  # fmt: skip
    build(config)
    samples = samples_of(str(tmp_path / "out"))
    assert len(samples) == len(SWIFT_RECORDS) and all(s.info["fitted"] for s in samples)
    for sample in samples:
        assert len(sample.input_ids) <= 300
        text = tokenizer.decode(sample.input_ids.tolist())
        for box in sample.info["boxes"]:
            image = sample.info["images"][box["image"]]
            size = ImageSize(image["original_width"], image["original_height"], image["width"], image["height"])
            unit = 1 if box["space"] == "norm1" else None
            assert box["written"] == list(expected(box["source"], size, "abs", unit))
            assert ", ".join(map(str, box["written"])) in text  # the text is written for the fitted size
            if box["kind"] == "box":
                assert_on_the_block(stored_pixels(sample, box["image"]), box["written"])


def test_truncate_never_cuts_through_a_box(tmp_path, tokenizer):
    picture(tmp_path / "sheep.jpg", *PICTURES["sheep.jpg"])
    record = {"messages": [{"role": "user", "content": "<image>Find the <ref-object>"},
                           {"role": "assistant", "content": "Here it is: <bbox>"}],
              "images": ["sheep.jpg"], "objects": {"ref": ["sheep"], "bbox": [[100, 200, 500, 600]]}}  # fmt: skip
    write_jsonl(tmp_path / "data.jsonl", [record])
    options = {"input": str(tmp_path / "data.jsonl"), "model": "qwen2_vl", "max_pixels": 56 * 56}
    build(BuildConfig.create(out=str(tmp_path / "whole"), **options))
    [whole] = samples_of(str(tmp_path / "whole"))
    n = len(whole.input_ids)
    assert [tokenizer.decode([i]) for i in whole.input_ids[-3:].tolist()] == ["<|box_end|>", "<|im_end|>", "\n"]
    build(BuildConfig.create(out=str(tmp_path / "after"), overlength="truncate", max_length=n - 2, **options))
    [after] = samples_of(str(tmp_path / "after"))
    assert after.info["truncated_tokens"] == 2 and after.info["boxes"][0]["written"] == [100, 250, 500, 750]
    build(BuildConfig.create(out=str(tmp_path / "inside"), overlength="truncate", max_length=n - 3, **options))
    [reject] = rejects_of(str(tmp_path / "inside"))
    assert reject["code"] == "box_truncated" and "(100,250),(500,750)" in reject["reason"]


# ---- load time, stats, show, export ----


def test_rotation_is_refused_for_builds_and_samples_with_boxes(grounding_data, text_data, make_build):
    manifest = BuildSource(make_build(grounding_data, model="qwen2_vl")).manifest
    with pytest.raises(ConfigError, match=r"11 grounding boxes or points.*rotation=0"):
        Collator.for_build(manifest, augment=Augment(rotation=10))
    collate = Collator.for_build(manifest, augment=Augment(rotation=0, brightness=0.2, contrast=0.2))
    samples = samples_of(make_build(grounding_data, model="qwen2_vl"))
    assert collate(samples[:2])["pixel_values"].shape[0] > 0
    text_manifest = BuildSource(make_build(text_data, model="qwen2_5_vl")).manifest
    with pytest.raises(ConfigError, match="2 grounding"):
        Collator.for_build(text_manifest, augment=Augment())
    direct = Collator.for_build(manifest)
    direct.augment = Augment(rotation=5)  # an augmentation given past for_build's check: each sample is checked
    with pytest.raises(ConfigError, match="sample 0000000001 carries 2"):
        direct(samples[:1])


def test_train_augment_leaves_rotation_out_for_data_with_boxes(grounding_data, text_data, make_build, caplog):
    from shardkit.train.local import TrainConfig, _open_data

    def augment_of(data: list[str]) -> Augment:
        config = TrainConfig.create(data=data, model="unused", output="unused", augment=True, num_workers=0)
        return _open_data(config)[1].augment

    plain_data = write_jsonl(grounding_data.parent / "plain.jsonl", [text_record("sheep.jpg", "A sheep.")])
    plain, boxes, text = (make_build(d, model="qwen2_vl") for d in (plain_data, grounding_data, text_data))
    assert augment_of([plain]) == Augment(seed=0)  # no boxes: the default strengths, rotation included
    assert not caplog.records
    for data, count in (([boxes], 11), ([text], 2), ([plain, boxes], 11)):  # a mix: its builds' boxes in all
        caplog.clear()
        assert augment_of(data) == Augment(seed=0, rotation=0)
        assert f"carries {count} grounding boxes or points, so its images are not rotated" in caplog.text


def test_stats_count_boxes(grounding_data, text_data, make_build):
    stats = build_stats(make_build(grounding_data, model="qwen3_vl"))
    assert (stats["boxes"], stats["points"], stats["text_boxes"], stats["box_rejects"]) == (9, 2, 0, {})
    stats = build_stats(make_build(text_data, model="qwen2_5_vl"))
    assert stats["text_boxes"] == 2
    assert stats["box_rejects"] == {"box_inverted": 1, "box_outside": 1, "text_box_malformed": 1}
    assert "Grounding:             0 boxes and 0 points from objects, 2 in the text; rejected: box_inverted: 1" in (
        format_stats(stats)
    )


def test_page_holds_each_box_on_its_image(grounding_data, text_data, make_build):
    out = make_build(grounding_data, model="qwen3_vl")
    html = make_page(out, samples=10).html
    sheep = '<g class="box objects" data-kind="box" data-source="objects" data-label="a sheep" '
    assert sheep + 'data-pixels="99.2,200,496,600">' in html  # 100/1000 * 992 on the 992x800 picture
    assert html.count('<g class="box objects"') == 9 and html.count('<g class="point objects"') == 2
    text = make_page(make_build(text_data, model="qwen2_5_vl"), samples=10).html
    assert (
        'class="box text" data-kind="box" data-source="text" data-label="sheep" data-pixels="101,203,504,609"' in text
    )


def test_export_writes_the_stored_coordinates(grounding_data, make_build, tmp_path):
    relative = make_build(grounding_data, model="qwen2_vl")
    export_llamafactory(relative, str(tmp_path / "rel"), name="g", progress=False)
    lines = [json.loads(line) for line in (tmp_path / "rel" / "g.jsonl").read_text().splitlines()]
    assert "(100,250),(500,750)" in lines[0]["messages"][-1]["content"]

    absolute = make_build(grounding_data, model="qwen2_5_vl")
    with pytest.raises(ConfigError, match="image_max_pixels >= 1003520 and image_min_pixels <= 3136"):
        export_llamafactory(absolute, str(tmp_path / "abs"), name="g", progress=False)
    with pytest.raises(ConfigError, match="--image-max-pixels 1003520"):
        export_llamafactory(absolute, str(tmp_path / "abs"), name="g", image_max_pixels=589824, progress=False)
    assert not (tmp_path / "abs").exists()
    summary = export_llamafactory(absolute, str(tmp_path / "abs"), name="g", image_max_pixels=1003520, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "abs" / "g.jsonl").read_text().splitlines()]
    assert summary.samples == len(SWIFT_RECORDS) and "[101, 203, 504, 609]" in lines[0]["messages"][-1]["content"]
    stored = Image.open(tmp_path / "abs" / lines[0]["images"][0])
    assert stored.size == (1008, 812)


BOX_FACTS = """(async () => {
  await Promise.all(Array.from(document.images).map(image => image.decode().catch(() => null)));
  return Array.from(document.querySelectorAll('.card')).map(card => ({
    key: card.dataset.key,
    images: Array.from(card.querySelectorAll('.frame')).map(frame => {
      const img = frame.querySelector('img'), at = img.getBoundingClientRect();
      const scale = img.naturalWidth / at.width;
      return Array.from(frame.querySelectorAll('g')).map(g => {
        const shape = g.querySelector('rect, circle').getBoundingClientRect();
        const label = g.querySelector('text');
        return {kind: g.dataset.kind, label: label ? label.textContent : null, visible: shape.width > 0,
                box: [shape.left - at.left, shape.top - at.top, shape.right - at.left, shape.bottom - at.top]
                       .map(v => v * scale),
                labelInside: label ? label.getBoundingClientRect().left >= at.left : null};
      });
    }),
  }));
})()"""


def test_page_draws_each_box_on_its_image_in_chromium(chromium, grounding_data, make_build, tmp_path):
    """The rectangles Chromium lays out over each stored image sit at the stored box's pixels, with its label."""
    import asyncio

    out = make_build(grounding_data, model="qwen3_vl")
    page = tmp_path / "show.html"
    page.write_text(make_page(out, samples=10).html)
    cards, errors, screenshot = asyncio.run(chromium.inspect(page.as_uri(), BOX_FACTS))
    assert errors == []
    samples = {s.key: s.info for s in samples_of(out)}
    assert len(cards) == len(samples)
    for card in cards:
        info = samples[card["key"]]
        for index, drawn in enumerate(card["images"]):
            mine = [b for b in info["boxes"] if b["image"] == index]
            assert len(drawn) == len(mine)
            for shape, box in zip(drawn, mine, strict=True):
                pixels = pixels_of(box["written"], info["images"][index], "rel1000")
                assert shape["kind"] == box["kind"] and shape["label"] == box["label"] and shape["visible"]
                if box["kind"] == "box":  # the stroke straddles the edge: its middle is the box
                    assert shape["box"] == pytest.approx(list(pixels), abs=4), (card["key"], box)
                else:
                    middle = [(shape["box"][0] + shape["box"][2]) / 2, (shape["box"][1] + shape["box"][3]) / 2]
                    assert middle == pytest.approx(list(pixels), abs=1)
    (tmp_path / "boxes.png").write_bytes(screenshot)
