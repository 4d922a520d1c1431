"""shardkit.boxes: grounding boxes and points follow shardkit's resize, written in each family's convention.

Expected coordinates come from an independent computation (exact fractions, a hand-written half-to-even rule,
the stored size from grid.py's real smart_resize) and from outputs the authors printed (Qwen's process_bbox.ipynb).
"""

from __future__ import annotations

import io
import json
import math
import random
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from shardkit.boxes import (
    STYLES,
    Box,
    ImageSize,
    Point,
    box_spans,
    fill,
    find_text_boxes,
    get_style,
    mentions_boxes,
    parse_objects,
    parse_qwen_objects,
    parse_swift_objects,
    rescale_text,
    upright,
    write,
)
from shardkit.errors import ConfigError, RecordError
from shardkit.families import get_family
from shardkit.images import Grid, SourceImage, smart_resize

FAMILY_SCALE = {"qwen2_vl": "rel1000", "qwen2_5_vl": "abs", "qwen3_vl": "rel1000"}


def stored(family: str, width: int, height: int, max_pixels: int | None = None) -> ImageSize:
    """The image as shardkit stores it for ``family``: smart_resize with the family's grid."""
    f = get_family(family)
    h, w = smart_resize(height, width, f.factor, f.min_pixels, max_pixels or f.max_pixels)
    return ImageSize(width, height, w, h)


def half_even(q: Fraction) -> int:
    """Round half to even, written out (not Python's round)."""
    n = q.numerator // q.denominator
    rest = q - n
    return n + (rest > Fraction(1, 2) or (rest == Fraction(1, 2) and n % 2 == 1))


def expected(coords, image: ImageSize, scale: str, unit: int | None = None) -> tuple[int, ...]:
    """The coordinates on the stored image, computed independently: abs pixels or 0-1000, clamped as Qwen's tool."""
    out = []
    for i, v in enumerate(coords):
        src = unit or (image.original_width, image.original_height)[i % 2]
        size = (image.width, image.height)[i % 2]
        dst, top = (size, size - 1) if scale == "abs" else (1000, 1000)
        out.append(min(max(half_even(Fraction(str(v)) * dst / src), 0), top))
    return tuple(out)


def text_of(style: str, coords, label: str | None) -> str:
    """The family's text for one object, laid out by hand from the authors' examples."""
    pairs = ",".join(f"({x},{y})" for x, y in zip(coords[0::2], coords[1::2], strict=True))
    if style == "qwen2_vl":
        ref = "" if label is None else f"<|object_ref_start|>{label}<|object_ref_end|>"
        return f"{ref}<|box_start|>{pairs}<|box_end|>"
    key = "bbox_2d" if len(coords) == 4 else "point_2d"
    label_part = "" if label is None else f', "label": "{label}"'
    return f'{{"{key}": [{", ".join(map(str, coords))}]{label_part}}}'


# ---- Qwen's own published example ----


def test_qwen_process_bbox_notebook_example():
    """process_bbox.ipynb: [146, 137, 615, 415] on 640x428 -> 644x420: [147, 134, 619, 407]; Qwen2-VL's
    [228, 320, 961, 970]."""
    assert smart_resize(428, 640, 28, 56 * 56, 14 * 14 * 4 * 1280) == (420, 644)
    image = stored("qwen2_5_vl", 640, 428)
    assert (image.width, image.height) == (644, 420)
    box = Box(146, 137, 615, 415, label="cake")
    assert write(box, image, "abs") == (147, 134, 619, 407)
    assert write(box, image, "rel1000") == (228, 320, 961, 970)
    assert get_style("qwen2_5_vl").answer([((147, 134, 619, 407), "cake")]) == (
        '```json\n[\n\t{"bbox_2d": [147, 134, 619, 407], "label": "cake"}\n]\n```'
    )
    assert get_style("qwen2_vl").item((228, 320, 961, 970), "cake") == (
        "<|object_ref_start|>cake<|object_ref_end|><|box_start|>(228,320),(961,970)<|box_end|>"
    )


def test_cookbook_layouts():
    """The cookbooks' fenced, tab-indented lists (Qwen2.5-VL spatial_understanding, Qwen3-VL 2d_grounding)."""
    qwen3 = get_style("qwen3_vl")
    assert qwen3.answer([((74, 361, 324, 808), "plate/dish"), ((557, 839, 605, 999), "chopsticks")]) == (
        '```json\n[\n\t{"bbox_2d": [74, 361, 324, 808], "label": "plate/dish"},\n'
        '\t{"bbox_2d": [557, 839, 605, 999], "label": "chopsticks"}\n]\n```'
    )
    assert (
        qwen3.answer([((925, 618), "point_1")]) == '```json\n[\n\t{"point_2d": [925, 618], "label": "point_1"}\n]\n```'
    )
    assert qwen3.item((1, 2, 3, 4)) == '{"bbox_2d": [1, 2, 3, 4]}'
    assert qwen3.item((1, 2), 'say "hi" 日本') == '{"point_2d": [1, 2], "label": "say \\"hi\\" 日本"}'
    assert get_style("qwen2_vl").coords((246, 113)) == "<|box_start|>(246,113)<|box_end|>"  # ms-swift's point
    assert get_style("qwen2_5_vl").coords((101, 203, 504, 609)) == "[101, 203, 504, 609]"  # ms-swift's "new"
    assert get_style("qwen2_5_vl_tokens").ref("sheep") == "<|object_ref_start|>sheep<|object_ref_end|>"
    assert set(STYLES) >= set(FAMILY_SCALE)
    with pytest.raises(ConfigError, match="qwen2_vl"):
        get_style("qwen9")


# ---- every family against the independent computation ----


@pytest.mark.parametrize("family", sorted(FAMILY_SCALE))
def test_written_boxes_equal_an_independent_computation(family):
    rng = random.Random(family)
    style = get_style(family)
    sizes = [(1000, 800), (640, 428), (800, 1000), (640, 480), (3000, 2000), (37, 5000), (4000, 3000), (57, 61)]
    sizes += [(rng.randint(30, 4000), rng.randint(30, 4000)) for _ in range(40)]
    for width, height in sizes:
        image = stored(family, width, height)
        for _ in range(20):
            x1, x2 = sorted(rng.sample(range(width + 1), 2))
            y1, y2 = sorted(rng.sample(range(height + 1), 2))
            box = [x1 + rng.choice([0, 0.5, 0.25]), y1, x2, y2]
            box[0] = min(box[0], x2 - 0.1)
            written = write(Box(*box, label="a b"), image, FAMILY_SCALE[family])
            assert written == expected(box, image, FAMILY_SCALE[family]), (width, height, box)
            assert style.item(written, "a b") == text_of(family, written, "a b")
            point = (rng.uniform(0, width), rng.randint(0, height))
            assert write(Point(*point), image, style.scale) == expected(point, image, style.scale)


def test_agrees_with_qwens_float_tool_away_from_exact_ties():
    """Qwen's convert_to_qwen25vl_format: round(x * (new_w / orig_w)), clamped to new_w - 1; ties differ by float."""
    rng = random.Random(3)
    for _ in range(2000):
        ow, oh = rng.randint(50, 4000), rng.randint(50, 4000)
        image = stored("qwen2_5_vl", ow, oh)
        x, y = rng.randint(0, ow), rng.randint(0, oh)
        for v, o, n in ((x, ow, image.width), (y, oh, image.height)):
            exact = Fraction(v * n, o)
            if exact - math.floor(exact) == Fraction(1, 2):
                continue
            theirs = max(0, min(round(v * (n / o)), n - 1))
            assert expected([v, v], ImageSize(o, o, n, n), "abs")[0] == theirs


def test_half_to_even_on_exact_ties():
    assert write(Box(8, 8, 24, 24), ImageSize(640, 480, 644, 476), "rel1000") == (12, 17, 38, 50)  # 12.5 -> 12
    # exact 101.5 -> 102 (Qwen's float tool gives 101), 402.5 -> 402 (it gives 403)
    assert write(Point(100, 0), ImageSize(800, 1000, 812, 1008), "abs") == (102, 0)
    assert write(Point(400, 0), ImageSize(640, 428, 644, 420), "abs") == (402, 0)
    # a float is the decimal it prints as: 0.0125 is 12.5/1000 (its binary value is above, 0.0375's below)
    assert write(Point(0.0125, 0.0375, space="norm1"), ImageSize(10, 10, 28, 28), "rel1000") == (12, 38)


def test_the_sheep_of_issue_26_on_the_default_and_a_smaller_grid():
    image = stored("qwen2_5_vl", 1000, 800)
    assert (image.width, image.height) == (1008, 812)
    assert write(Box(100, 200, 500, 600), image, "abs") == (101, 203, 504, 609)
    small = stored("qwen2_5_vl", 1000, 800, max_pixels=750000)
    assert (small.width, small.height) == (952, 756)  # the issue's example needs --max-pixels 750000
    assert write(Box(100, 200, 500, 600), small, "abs") == (95, 189, 476, 567)
    assert write(Box(100, 200, 500, 600), image, "rel1000") == (100, 250, 500, 750)
    assert write(Box(100, 200, 500, 600), stored("qwen3_vl", 1000, 800), "rel1000") == (100, 250, 500, 750)


def test_edges_clamp_as_qwens_tool():
    image = stored("qwen2_5_vl", 1000, 800)
    assert write(Box(0, 0, 1000, 800), image, "abs") == (0, 0, 1007, 811)
    assert write(Box(0, 0, 1000, 800), image, "rel1000") == (0, 0, 1000, 1000)
    assert write(Point(1000, 800), image, "abs") == (1007, 811)


def test_points_norm1_and_floats():
    image = stored("qwen2_5_vl", 1000, 800)
    assert write(Point(500, 400), image, "abs") == (504, 406)
    assert write(Point(500, 400), image, "rel1000") == (500, 500)
    assert write(Box(0.1, 0.25, 0.5, 0.75, space="norm1"), image, "abs") == (101, 203, 504, 609)
    assert write(Box(0.1, 0.25, 0.5, 0.75, space="norm1"), image, "rel1000") == (100, 250, 500, 750)
    assert write(Box(90.9, 160.8, 135, 212.8), image, "abs") == (92, 163, 136, 216)
    assert write(Box(90.9, 160.8, 135, 212.8), image, "rel1000") == (91, 201, 135, 266)


def test_overlength_fit_sizes_move_the_boxes():
    """--overlength fit: Grid.plan shrinks the images to a token budget; boxes follow the planned size."""
    f = get_family("qwen2_5_vl")
    grid = Grid(f.factor, f.min_pixels, f.max_pixels)
    [(h, w)] = grid.plan([(800, 1000)], budget=900)
    assert (w, h) == (924, 756)
    assert write(Box(100, 200, 500, 600), ImageSize(1000, 800, w, h), "abs") == (92, 189, 462, 567)
    (ha, wa), (hb, wb) = grid.plan([(800, 1000), (428, 640)], budget=900)
    assert (wa, ha, wb, hb) == (728, 588, 644, 420)
    images = [ImageSize(1000, 800, wa, ha), ImageSize(640, 428, wb, hb)]
    objects = {"ref": [], "bbox": [[100, 200, 500, 600], [146, 137, 615, 415]], "image_id": [0, 1]}
    grounding = parse_swift_objects(objects, ["<image><image>", "<bbox> <bbox>"], 2)
    texts, written = fill(["<image><image>", "<bbox> <bbox>"], grounding, get_style("qwen2_5_vl"), images)
    assert written == [(73, 147, 364, 441), (147, 134, 619, 407)]
    assert texts[1] == "[73, 147, 364, 441] [147, 134, 619, 407]"


# ---- ms-swift's form, from its documentation ----

SWIFT_DOC = [  # docs/source_en/Customization/Custom-dataset.md, "Grounding"
    {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "<image>Describe the image."},
            {"role": "assistant", "content": "<ref-object><bbox> and <ref-object><bbox> are playing on the beach"},
        ],
        "images": ["/xxx/x.jpg"],
        "objects": {
            "ref": ["a dog", "a woman"],
            "bbox": [[331.5, 761.4, 853.5, 1594.8], [676.5, 685.8, 1099.5, 1427.4]],
        },
    },
    {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "<image>Find the <ref-object> in the image"},
            {"role": "assistant", "content": "<bbox><bbox>"},
        ],
        "images": ["/xxx/x.jpg"],
        "objects": {"ref": ["sheep"], "bbox": [[90.9, 160.8, 135, 212.8], [360.9, 480.8, 495, 532.8]]},
    },
    {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "<image>Help me open Google Chrome"},
            {"role": "assistant", "content": "Action: click(start_box='<bbox>')"},
        ],
        "images": ["/xxx/x.jpg"],
        "objects": {"ref": [], "bbox": [[615, 226]]},
    },
]


def texts_of(record) -> list[str]:
    return [m["content"] for m in record["messages"]]


def test_swift_documented_examples_parse_and_fill():
    beach, sheep, click = SWIFT_DOC
    g = parse_swift_objects(beach["objects"], texts_of(beach), 1)
    assert g.refs == ("a dog", "a woman") and [s.coords for s in g.shapes] == [
        (331.5, 761.4, 853.5, 1594.8),
        (676.5, 685.8, 1099.5, 1427.4),
    ]
    assert all(isinstance(s, Box) and s.space == "real" and s.image == 0 for s in g.shapes)
    assert [(p.message, p.kind, p.index) for p in g.placeholders] == [
        (2, "ref", 0),
        (2, "bbox", 0),
        (2, "ref", 1),
        (2, "bbox", 1),
    ]
    assert all(texts_of(beach)[p.message][p.start : p.end] in ("<ref-object>", "<bbox>") for p in g.placeholders)
    image = stored("qwen2_vl", 1200, 1600)
    texts, written = fill(texts_of(beach), g, get_style("qwen2_vl"), [image])
    a, b = (expected(s.coords, image, "rel1000") for s in g.shapes)
    assert written == [a, b]
    assert (
        texts[2]
        == f"{text_of('qwen2_vl', a, 'a dog')} and {text_of('qwen2_vl', b, 'a woman')} are playing on the beach"
    )
    assert texts[:2] == texts_of(beach)[:2]

    g = parse_swift_objects(sheep["objects"], texts_of(sheep), 1)
    assert [p.message for p in g.placeholders] == [1, 2, 2]  # user and assistant alike, in order
    image = stored("qwen2_5_vl", 1000, 800)
    texts, written = fill(texts_of(sheep), g, get_style("qwen2_5_vl_tokens"), [image])
    assert written[0] == (92, 163, 136, 216) and written[1] == expected([360.9, 480.8, 495, 532.8], image, "abs")
    assert texts[1] == "<image>Find the <|object_ref_start|>sheep<|object_ref_end|> in the image"

    g = parse_swift_objects(click["objects"], texts_of(click), 1)
    assert g.shapes == (Point(615, 226),)
    texts, _ = fill(texts_of(click), g, get_style("qwen2_vl"), [stored("qwen2_vl", 1000, 800)])
    assert texts[2] == "Action: click(start_box='<|box_start|>(615,282)<|box_end|>')"


def test_swift_new_format_json_template_fills_to_valid_json():
    """ms-swift's QWENVL_BBOX_FORMAT=new example: the user writes the JSON around the placeholders."""
    answer = '[\n\t{"bbox_2d": <bbox>, "label": "<ref-object>"},\n\t{"bbox_2d": <bbox>, "label": "<ref-object>"}\n]'
    objects = {"ref": ["sheep", "dog"], "bbox": [[0.1, 0.25, 0.5, 0.75], [0, 0, 1, 1]], "bbox_type": "norm1"}
    texts = ["<image>Locate every animal.", answer]
    g = parse_swift_objects(objects, texts, 1)
    assert find_text_boxes(answer) == []  # "bbox_2d": <bbox> is a placeholder, not coordinates
    image = stored("qwen2_5_vl", 1000, 800)
    filled, _ = fill(texts, g, get_style("qwen2_5_vl"), [image])
    assert json.loads(filled[1]) == [
        {"bbox_2d": [101, 203, 504, 609], "label": "sheep"},
        {"bbox_2d": [0, 0, 1007, 811], "label": "dog"},
    ]


def test_qwen_form_objects():
    objects = [
        {"image": 0, "label": "sheep", "bbox_2d": [100, 200, 500, 600]},
        {"label": "tip", "point_2d": [500, 400]},
        {"image": 1, "label": "cake", "bbox_2d": [146, 137, 615, 415]},
    ]
    texts = ["<image><image>Outline the objects.", "<objects>"]
    g = parse_qwen_objects(objects, texts, 2)
    assert g.shapes[1] == Point(500, 400, label="tip") and g.shapes[2].image == 1
    images = [stored("qwen3_vl", 1000, 800), stored("qwen3_vl", 640, 428)]
    filled, _ = fill(texts, g, get_style("qwen3_vl"), images)
    assert filled[1] == (
        '```json\n[\n\t{"bbox_2d": [100, 250, 500, 750], "label": "sheep"},\n'
        '\t{"point_2d": [500, 500], "label": "tip"},\n\t{"bbox_2d": [228, 320, 961, 970], "label": "cake"}\n]\n```'
    )
    pairs = ["<image><image>Find them.", "<ref-object>: <bbox>; <ref-object>: <bbox>; <ref-object>: <bbox>"]
    filled, _ = fill(pairs, parse_qwen_objects(objects, pairs, 2), get_style("qwen2_vl"), images)
    assert filled[1].startswith("<|object_ref_start|>sheep<|object_ref_end|>: <|box_start|>(100,250),(500,750)")
    boxes_only = ["<image><image>", "<bbox> <bbox> <bbox>"]
    assert len(parse_qwen_objects(objects, boxes_only, 2).placeholders) == 3


# ---- rejects ----

BOX = [[100, 200, 500, 600]]


@pytest.mark.parametrize(
    ("objects", "texts", "images", "code"),
    [
        ({"ref": [], "bbox": [[500, 600, 100, 200]]}, ["<bbox>"], 1, "box_inverted"),
        ({"ref": [], "bbox": [[100, 200, 100, 600]]}, ["<bbox>"], 1, "box_empty"),
        ({"ref": [], "bbox": BOX, "image_id": [1]}, ["<bbox>"], 1, "box_image"),
        ({"ref": [], "bbox": BOX, "image_id": [0, 0]}, ["<bbox>"], 1, "box_image"),
        ({"ref": [], "bbox": BOX}, ["<bbox>"], 0, "box_image"),
        ({"ref": [], "bbox": BOX}, ["<bbox><bbox>"], 1, "box_count"),
        ({"ref": ["a", "b"], "bbox": BOX}, ["<ref-object><bbox>"], 1, "box_count"),
        ({"ref": [], "bbox": BOX}, ["no placeholder"], 1, "box_count"),
        (None, ["<bbox>"], 1, "box_count"),
        ({"ref": [], "bbox": BOX, "bbox_type": "norm1000"}, ["<bbox>"], 1, "objects_bbox_type"),
        ({"ref": [], "bbox": [[1, 2, 3]]}, ["<bbox>"], 1, "box_invalid"),
        ({"ref": [], "bbox": [[1, 2, True, 4]]}, ["<bbox>"], 1, "box_invalid"),
        ({"ref": [], "bbox": [[1, 2, float("nan"), 4]]}, ["<bbox>"], 1, "box_invalid"),
        ({"ref": [], "bbox": [["1", 2, 3, 4]]}, ["<bbox>"], 1, "box_invalid"),
        ({"ref": [], "bbox": BOX, "bbox_typ": "norm1"}, ["<bbox>"], 1, "objects_invalid"),
        ({"ref": [3], "bbox": BOX}, ["<bbox>"], 1, "objects_invalid"),
    ],
)
def test_swift_rejects(objects, texts, images, code):
    with pytest.raises(RecordError) as info:
        parse_swift_objects(objects, texts, images)
    assert info.value.code == code, info.value.reason


@pytest.mark.parametrize(
    ("objects", "texts", "code"),
    [
        ([{"label": "a", "bbox_2d": [1, 2, 3]}], ["<bbox>"], "box_invalid"),
        ([{"label": "a", "bbox_2d": [1, 2]}], ["<bbox>"], "box_invalid"),
        ([{"label": "a", "bbox_2d": [1, 2, 3, 4], "point_2d": [1, 2]}], ["<bbox>"], "objects_invalid"),
        ([{"label": "a", "box": [1, 2, 3, 4]}], ["<bbox>"], "objects_invalid"),
        ([{"label": "a", "bbox_2d": [1, 2, 3, 4], "image": 2}], ["<bbox>"], "box_image"),
        ([{"label": "a", "bbox_2d": [1, 2, 3, 4]}], ["<objects><bbox>"], "box_count"),
        ([{"label": "a", "bbox_2d": [1, 2, 3, 4]}], ["<objects><objects>"], "box_count"),
        ([{"label": "a", "bbox_2d": [1, 2, 3, 4]}], ["nothing"], "box_count"),
        ([{"bbox_2d": [1, 2, 3, 4]}], ["<ref-object><bbox>"], "box_count"),
        ({"label": "a"}, ["<objects>"], "objects_invalid"),
    ],
)
def test_qwen_form_rejects(objects, texts, code):
    with pytest.raises(RecordError) as info:
        parse_qwen_objects(objects, texts, 1)
    assert info.value.code == code, info.value.reason


def test_rejects_at_write_time_need_the_image():
    image = ImageSize(1000, 800, 1008, 812)
    for shape in (Box(900, 700, 1100, 900), Box(-1, 0, 10, 10), Point(1000.5, 3), Box(0.5, 0.5, 1.5, 1, space="norm1")):
        with pytest.raises(RecordError) as info:
            write(shape, image, "abs")
        assert info.value.code == "box_outside"
        assert json.dumps(info.value.to_json())
    quoted = ['"<ref-object>"', "<bbox>"]
    g = parse_swift_objects({"ref": ['he said "hi"'], "bbox": BOX}, quoted, 1)
    with pytest.raises(RecordError, match="quote") as info:
        fill(quoted, g, get_style("qwen2_5_vl"), [image])
    assert info.value.code == "ref_unsafe"
    g = parse_swift_objects({"ref": ["a", "b"], "bbox": [[900, 700, 1100, 900]]}, ["<ref-object><ref-object><bbox>"], 1)
    with pytest.raises(RecordError) as info:
        fill(["<ref-object><ref-object><bbox>"], g, get_style("qwen2_vl"), [image])
    assert info.value.code == "box_outside" and info.value.detail["image"] == 0


# ---- coordinates already in the text ----

SHEEP = '```json\n[\n\t{"bbox_2d": [100, 200, 500, 600], "label": "sheep"}\n]\n```'


def test_text_boxes_rescaled_in_place():
    image = stored("qwen2_5_vl", 1000, 800)
    texts, n = rescale_text(["<image>Find the sheep.", SHEEP], [image], "abs")
    assert n == 1 and texts == ["<image>Find the sheep.", SHEEP.replace("100, 200, 500, 600", "101, 203, 504, 609")]
    single = "[{'bbox_2d': [100,200,500,600], 'label': 'sheep'}]"
    assert rescale_text([single], [image], "abs") == ([single.replace("100,200,500,600", "101,203,504,609")], 1)
    forms = [
        ('{"point_2d": [500, 400]}', '{"point_2d": [504, 406]}'),
        (
            '<points x1="500" y1="400" x2="100" y2="200" alt="cake">cake</points>',
            '<points x1="504" y1="406" x2="101" y2="203" alt="cake">cake</points>',
        ),
        (
            "click(start_box='<|box_start|>(500,400)<|box_end|>')",
            "click(start_box='<|box_start|>(504,406)<|box_end|>')",
        ),
        ("<|box_start|>( 100 , 200 ),(500,600)<|box_end|>", "<|box_start|>( 101 , 203 ),(504,609)<|box_end|>"),
    ]
    for before, after in forms:
        assert rescale_text([before], [image], "abs")[0] == [after], before
    xml = find_text_boxes(forms[1][0])
    assert [tb.shape for tb in xml] == [Point(500, 400), Point(100, 200)] and {tb.kind for tb in xml} == {"xml_points"}


def test_text_rescaling_round_trips_with_the_writers():
    """A box written as text on the original, then rescaled, is the box written for the stored image."""
    rng = random.Random(7)
    for family in ("qwen2_5_vl", "qwen2_5_vl_tokens"):
        style = get_style(family)
        for _ in range(200):
            ow, oh = rng.randint(60, 3000), rng.randint(60, 3000)
            image = stored("qwen2_5_vl", ow, oh)
            x1, x2 = sorted(rng.sample(range(ow), 2))
            y1, y2 = sorted(rng.sample(range(oh), 2))
            as_original = style.answer([((x1, y1, x2, y2), "thing"), ((x2, y2), None)])
            box = write(Box(x1, y1, x2, y2), image, "abs")
            point = write(Point(x2, y2), image, "abs")
            [text], _ = rescale_text([as_original], [image], "abs")
            assert text == style.answer([(box, "thing"), (point, None)])
            assert [tb.shape.coords for tb in find_text_boxes(text)] == [box, point]


def test_text_boxes_refused_unchanged_or_ambiguous():
    image = stored("qwen2_5_vl", 1000, 800)
    with pytest.raises(RecordError) as info:
        rescale_text([SHEEP], [image], "abs", refuse=True)
    assert info.value.code == "text_box_refused"
    on_grid = ImageSize(1008, 812, 1008, 812)
    assert rescale_text([SHEEP], [on_grid], "abs", refuse=True) == ([SHEEP], 0)
    edge = '{"bbox_2d": [0, 0, 1008, 812]}'  # not clamped when the image is kept as it is
    assert rescale_text([edge], [on_grid], "abs") == ([edge], 0)
    with pytest.raises(RecordError) as info:
        rescale_text([SHEEP], [image, stored("qwen2_5_vl", 640, 428)], "abs")
    assert info.value.code == "text_box_image_ambiguous"
    assert rescale_text([SHEEP], [image, image], "abs")[1] == 1
    assert rescale_text(["no boxes here"], [image, stored("qwen2_5_vl", 640, 428)], "abs") == (["no boxes here"], 0)
    assert rescale_text([SHEEP], [stored("qwen3_vl", 1000, 800), stored("qwen3_vl", 640, 428)], "rel1000")[1] == 0


@pytest.mark.parametrize(
    ("text", "scale", "code"),
    [
        ('{"bbox_2d": [100, 200, 1200, 600]}', "rel1000", "box_outside"),
        ("<|box_start|>(10,10),(5,20)<|box_end|>", "rel1000", "box_inverted"),
        ("<|box_start|>(10,10),(10,20)<|box_end|>", "rel1000", "box_empty"),
        ('{"point_2d": [-1, 5]}', "rel1000", "box_outside"),
        ('{"bbox_2d": [0, 0, 1001, 5]}', "abs", "box_outside"),
        ('{"bbox_2d": [1, 2, 3]}', "abs", "text_box_malformed"),
        ('{"bbox_2d": [[1, 2, 3, 4]]}', "abs", "text_box_malformed"),
        ('{"bbox_2d": "1, 2, 3, 4"}', "abs", "text_box_malformed"),
        ('{"point_2d": [1, 2e3]}', "abs", "text_box_malformed"),
        ("<|box_start|>(1,2),(3)<|box_end|>", "abs", "text_box_malformed"),
        ("<|box_start|>(1,2),(3,4)", "abs", "text_box_malformed"),
        ("<|quad_start|>(1,2),(3,4),(5,6),(7,8)<|quad_end|>", "rel1000", "text_box_malformed"),
        ('<points x1="5" alt="a">a</points>', "abs", "text_box_malformed"),
        ('<points x1="5" y1="six">a</points>', "abs", "text_box_malformed"),
    ],
)
def test_text_box_rejects(text, scale, code):
    image = ImageSize(1000, 800, 1008, 812)
    with pytest.raises(RecordError) as info:
        rescale_text(["<image>", text], [image], scale)
    assert info.value.code == code, info.value.reason
    assert info.value.detail["where"].startswith("message 1")


def test_relative_text_is_checked_and_kept():
    text = '```json\n[\n\t{"bbox_2d": [0, 250, 1000, 750], "label": "a"}\n]\n```<|box_start|>(5,5)<|box_end|>'
    assert rescale_text([text], [stored("qwen3_vl", 1000, 800)], "rel1000", refuse=True) == ([text], 0)


# ---- EXIF orientation ----


def jpeg_with_orientation(raw: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    raw.save(out, format="JPEG", quality=95, exif=exif.tobytes())
    return out.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_raw_frame_boxes_follow_the_pixels_through_exif_orientation(orientation):
    """A white block drawn at a raw-frame box lands, in shardkit's upright decode, where upright() puts the box."""
    raw = np.zeros((64, 96, 3), np.uint8)
    raw[8:40, 16:48] = 255  # box (16, 8, 48, 40) in the file's frame, on 8-pixel JPEG blocks
    source = SourceImage(jpeg_with_orientation(Image.fromarray(raw), orientation), "x.jpg", max_pixels=10**6)
    assert source.orientation == orientation
    image = ImageSize(source.width, source.height, source.width, source.height, source.orientation)
    bright = np.asarray(source.decode().convert("L")) > 128
    ys, xs = np.nonzero(bright)
    seen = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert upright(Box(16, 8, 48, 40), image, "raw").coords == seen
    corner = upright(Point(16, 8), image, "raw").coords
    assert corner in {(seen[0], seen[1]), (seen[2], seen[1]), (seen[0], seen[3]), (seen[2], seen[3])}
    norm = upright(
        Box(Fraction(16, 96), Fraction(8, 64), Fraction(48, 96), Fraction(40, 64), space="norm1"), image, "raw"
    )
    assert (
        tuple(v * s for v, s in zip(norm.coords, (image.original_width, image.original_height) * 2, strict=True))
        == seen
    )
    assert upright(Box(16, 8, 48, 40), image, "upright").coords == (16, 8, 48, 40)


def test_rotated_photo_boxes_need_their_frame():
    """Raw 1000x800 JPEG with EXIF orientation 6: shardkit stores it upright, 800x1000 -> 812x1008."""
    h, w = smart_resize(1000, 800, 28, 56 * 56, 28 * 28 * 1280)
    image = ImageSize(800, 1000, w, h, orientation=6)
    box = Box(100, 200, 500, 600)
    assert write(box, image, "abs", boxes_in="raw") == (203, 101, 609, 504)
    assert write(box, image, "rel1000", boxes_in="raw") == (250, 100, 750, 500)
    assert write(box, image, "abs", boxes_in="upright") == (102, 202, 508, 605)
    for scale in ("abs", "rel1000"):
        with pytest.raises(RecordError) as info:
            write(box, image, scale)
        assert info.value.code == "box_orientation"
    text = "<|box_start|>(100,250),(500,750)<|box_end|>"
    with pytest.raises(RecordError) as info:
        rescale_text([text], [image], "rel1000")
    assert info.value.code == "box_orientation"
    assert rescale_text([text], [image], "rel1000", boxes_in="raw") == (
        ["<|box_start|>(250,100),(750,500)<|box_end|>"],
        1,
    )
    assert rescale_text([text], [image], "rel1000", boxes_in="upright") == ([text], 0)
    with pytest.raises(RecordError) as info:
        rescale_text([text], [image], "rel1000", boxes_in="raw", refuse=True)
    assert info.value.code == "text_box_refused"


# ---- what the conversion uses: the first look, the spans a cut must not enter, the labels, the names ----


def test_mentions_spans_labels_and_names():
    assert not mentions_boxes(["A sheep at (100, 200).", "bbox and points, no syntax"])
    for text in ("<bbox>", "<ref-object>", "<objects>", "'bbox_2d'", "point_2d", "<|box_start|>", "<points x=1>"):
        assert mentions_boxes(["plain", f"a {text} b"]), text
    text = 'ok {"bbox_2d": [1, 2, 3, 4], "label": "a"} <|object_ref_start|>b<|object_ref_end|>'
    text += '<|box_start|>(1,2)<|box_end|> <points x1="5" y1="6">c</points>'
    spans = [text[s:e] for s, e in box_spans(text)]
    assert spans == [
        '"bbox_2d": [1, 2, 3, 4]',
        "<|object_ref_start|>b<|object_ref_end|>",
        "<|box_start|>(1,2)<|box_end|>",
        '<points x1="5" y1="6">',
    ]
    texts = ["<image>Find the <ref-object> and the <ref-object>", "<bbox><bbox>, then <bbox>"]
    g = parse_swift_objects({"ref": ["a", "b"], "bbox": BOX * 3}, texts, 1)
    assert g.labels() == ["b", "b", "b"]  # the last ref placed before each box
    g = parse_swift_objects({"ref": ["a"], "bbox": BOX * 2}, ["<bbox><ref-object><bbox>"], 1)
    assert g.labels() == [None, "a"]
    assert parse_objects([{"label": "x", "point_2d": [1, 2]}], ["<objects>"], 1).labels() == ["x"]
    with pytest.raises(RecordError) as info:
        rescale_text(
            ["ok", '{"bbox_2d": [1]}'], [ImageSize(10, 10, 28, 28)], "abs", names=["messages[0]", "messages[3]"]
        )
    assert info.value.detail["where"] == "messages[3]"
