"""Grounding: boxes and points parsed from a record, checked, mapped to the stored image and written per family.

Conventions (sources: Qwen's ``qwen-vl-finetune/tools/process_bbox.ipynb`` and cookbooks, ms-swift's
``Custom-dataset.md`` "Grounding" and ``template/base.py``; gathered in the research notes of issue 26):

* A box is ``(x1, y1, x2, y2)``, top-left then bottom-right, x before y; a point is ``(x, y)``. ``real``
  coordinates are continuous pixels of the original image as shardkit decodes it (upright), so ``x2 == width``
  is inside; ``norm1`` is ms-swift's 0-1; ``norm1000`` the 0-1000 of Qwen2-VL and Qwen3-VL text.
* A written coordinate is computed once, from the original value, in exact rational arithmetic (a float counts as
  the decimal it prints as), and rounded half to even: the rule of Python's ``round``, which Qwen's tool and
  ms-swift's ``normalize_bbox`` both apply (to floats, whose ties then fall either way).
* ``abs`` (Qwen2.5-VL): pixels of the stored image, ``x * width / original_width``, clamped to ``[0, width - 1]``;
  ``rel1000`` (Qwen2-VL, Qwen3-VL): ``x * 1000 / original_width``, clamped to ``[0, 1000]``. The clamps are those of
  Qwen's tool (ms-swift does not clamp). shardkit stretches the whole image (no crop, no pad), so a relative
  value on the original is the relative value on the stored image.
* EXIF: on an image whose file is stored rotated or mirrored (orientation 2-8), boxes are refused unless
  ``boxes_in`` says the frame they were drawn in: ``raw`` (the file's pixels, as ms-swift and qwen-vl-utils read
  them), mapped as Pillow's ``exif_transpose`` moves pixels; or ``upright`` (as a browser shows it), kept.
* Inverted corners are refused, where ms-swift swaps them silently.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any, ClassVar, Literal

from shardkit.errors import ConfigError, RecordError

Space = Literal["real", "norm1", "norm1000"]
Scale = Literal["abs", "rel1000"]
BoxesIn = Literal["raw", "upright"] | None
Coordinate = int | float | Fraction

_UNIT = {"norm1": 1, "norm1000": 1000}
#: the reject codes of grounding: this module's, and the conversion's (a family without boxes, a cut through one)
REJECT_CODES = frozenset(
    {
        "box_count",
        "box_empty",
        "box_image",
        "box_invalid",
        "box_inverted",
        "box_orientation",
        "box_outside",
        "box_truncated",
        "boxes_not_supported",
        "objects_bbox_type",
        "objects_invalid",
        "ref_unsafe",
        "text_box_image_ambiguous",
        "text_box_malformed",
        "text_box_refused",
    }
)
REF_OBJECT, BBOX, OBJECTS = "<ref-object>", "<bbox>", "<objects>"
OBJECT_REF_START, OBJECT_REF_END = "<|object_ref_start|>", "<|object_ref_end|>"
BOX_START, BOX_END, QUAD_START = "<|box_start|>", "<|box_end|>", "<|quad_start|>"


def _exact(value: Any) -> Fraction:
    """``value`` as an exact fraction; a float as the decimal it prints as (``90.9`` is 909/10)."""
    if isinstance(value, bool) or not isinstance(value, int | float | Fraction):
        raise RecordError(f"coordinate {value!r} is not a number", "box_invalid", detail={"value": repr(value)})
    if isinstance(value, float):
        if not math.isfinite(value):
            raise RecordError(f"coordinate {value} is not finite", "box_invalid")
        return Fraction(repr(value))
    return Fraction(value)


def _plain(values: Sequence[Coordinate]) -> list[int | float]:
    """Coordinates as JSON numbers, for an error's detail."""
    return [int(v) if Fraction(v).denominator == 1 else float(v) for v in values]


class _Shape:
    """What boxes and points share: their coordinates in order, their space, label and image."""

    COORDS: ClassVar[tuple[str, ...]] = ()
    space: Space
    label: str | None
    image: int

    @property
    def coords(self) -> tuple[Coordinate, ...]:
        """The coordinates in order: x1, y1, x2, y2 for a box, x, y for a point."""
        return tuple(getattr(self, name) for name in self.COORDS)

    def with_coords(self, values: Sequence[Coordinate]) -> Any:
        """The same shape with other coordinates."""
        return replace(self, **dict(zip(self.COORDS, values, strict=True)))

    def _check(self) -> tuple[Fraction, ...]:
        if self.space not in ("real", *_UNIT):
            raise RecordError(f"unknown coordinate space {self.space!r}", "box_invalid")
        if self.label is not None and not isinstance(self.label, str):
            raise RecordError(f"label {self.label!r} is not a string", "box_invalid")
        if isinstance(self.image, bool) or not isinstance(self.image, int) or self.image < 0:
            raise RecordError(f"image index {self.image!r} is not a non-negative integer", "box_image")
        return tuple(_exact(v) for v in self.coords)


@dataclass(frozen=True)
class Box(_Shape):
    """A box ``(x1, y1, x2, y2)`` in ``space`` on image ``image`` (0-based), with its label; never inverted or empty."""

    COORDS: ClassVar[tuple[str, ...]] = ("x1", "y1", "x2", "y2")
    x1: Coordinate
    y1: Coordinate
    x2: Coordinate
    y2: Coordinate
    space: Space = "real"
    label: str | None = None
    image: int = 0

    def __post_init__(self) -> None:
        x1, y1, x2, y2 = self._check()
        detail = {"box": _plain(self.coords)}
        if x1 > x2 or y1 > y2:
            raise RecordError(
                f"box {detail['box']} is inverted: corners are (x1, y1) top-left, (x2, y2) bottom-right",
                "box_inverted",
                detail=detail,
            )
        if x1 == x2 or y1 == y2:
            raise RecordError(f"box {detail['box']} is empty: zero width or height", "box_empty", detail=detail)


@dataclass(frozen=True)
class Point(_Shape):
    """A point ``(x, y)`` in ``space`` on image ``image`` (0-based), with its label."""

    COORDS: ClassVar[tuple[str, ...]] = ("x", "y")
    x: Coordinate
    y: Coordinate
    space: Space = "real"
    label: str | None = None
    image: int = 0

    def __post_init__(self) -> None:
        self._check()


Shape = Box | Point


def shape(coords: Any, space: Space = "real", label: str | None = None, image: int = 0) -> Shape:
    """A box from 4 numbers or a point from 2 (ms-swift's rule); ``box_invalid`` for anything else."""
    if not isinstance(coords, list | tuple) or len(coords) not in (2, 4):
        raise RecordError(
            f"a box is 4 numbers [x1, y1, x2, y2] and a point 2 [x, y], not {coords!r}",
            "box_invalid",
            detail={"value": repr(coords)},
        )
    return (Box if len(coords) == 4 else Point)(*coords, space=space, label=label, image=image)


@dataclass(frozen=True)
class ImageSize:
    """One image's sizes: ``original_*`` as decoded (upright), ``width``/``height`` as stored (after resize and fit),
    and the EXIF orientation of its file (1: stored upright)."""

    original_width: int
    original_height: int
    width: int
    height: int
    orientation: int = 1


# (x, y) in the file's frame of size (w, h) -> the upright frame, as Pillow's exif_transpose moves pixels
_EXIF_MAPS = {
    2: lambda x, y, w, h: (w - x, y),
    3: lambda x, y, w, h: (w - x, h - y),
    4: lambda x, y, w, h: (x, h - y),
    5: lambda x, y, w, h: (y, x),
    6: lambda x, y, w, h: (h - y, x),
    7: lambda x, y, w, h: (h - y, w - x),
    8: lambda x, y, w, h: (y, w - x),
}


def _extent(s: Shape, image: ImageSize) -> tuple[int, int]:
    """Width and height of the space ``s`` lives in, on the upright original."""
    if s.space == "real":
        return image.original_width, image.original_height
    return _UNIT[s.space], _UNIT[s.space]


def upright(s: Shape, image: ImageSize, boxes_in: BoxesIn = None) -> Shape:
    """``s`` in the upright original's frame: mapped by the EXIF orientation when drawn in the ``raw`` frame.

    ``box_orientation`` when the image's file is rotated or mirrored and ``boxes_in`` does not say the frame.
    """
    move = _EXIF_MAPS.get(image.orientation)
    if move is None or boxes_in == "upright":
        return s
    if boxes_in != "raw":
        raise RecordError(
            f"image {s.image} is stored with EXIF orientation {image.orientation} (rotated or mirrored): say whether "
            "its boxes were drawn on the file's pixels (raw, as ms-swift and qwen-vl-utils read it) or on the "
            "upright picture (upright, as a browser shows it)",
            "box_orientation",
            detail={"image": s.image, "orientation": image.orientation},
        )
    w, h = _extent(s, image)
    if image.orientation >= 5:  # a quarter turn: the file is the upright picture's height wide
        w, h = h, w
    values = [_exact(v) for v in s.coords]
    pairs = [move(x, y, w, h) for x, y in zip(values[0::2], values[1::2], strict=True)]
    if isinstance(s, Point):
        return s.with_coords(pairs[0])
    (ax, ay), (bx, by) = pairs
    return s.with_coords((min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)))


def check_inside(s: Shape, image: ImageSize) -> None:
    """``box_outside`` unless ``s`` (in the upright frame) lies within its image, edges included."""
    w, h = _extent(s, image)
    values = [_exact(v) for v in s.coords]
    if any(not 0 <= x <= w for x in values[0::2]) or any(not 0 <= y <= h for y in values[1::2]):
        kind = "box" if isinstance(s, Box) else "point"
        frame = f"its image ({w}x{h})" if s.space == "real" else f"the {s.space} range 0-{w}"
        raise RecordError(
            f"{kind} {_plain(s.coords)} ({s.space}) lies outside {frame}",
            "box_outside",
            detail={kind: _plain(s.coords), "image": s.image, "size": [w, h]},
        )


def write(s: Shape, image: ImageSize, scale: Scale, boxes_in: BoxesIn = None) -> tuple[int, ...]:
    """``s``'s integer coordinates on the stored image: ``abs`` pixels or ``rel1000``, once from the original values.

    Orients (:func:`upright`) and checks (:func:`check_inside`) first; rounds half to even; clamps as Qwen's tool.
    """
    s = upright(s, image, boxes_in)
    check_inside(s, image)
    src = _extent(s, image)
    if scale == "abs":
        dst, top = (image.width, image.height), (image.width - 1, image.height - 1)
    else:
        dst = top = (1000, 1000)
    return tuple(min(max(round(_exact(v) * dst[i % 2] / src[i % 2]), 0), top[i % 2]) for i, v in enumerate(s.coords))


# ---- writing: a family's text for a box or point ----

_JSON_UNSAFE = re.compile(r'["\\\x00-\x1f]')


@dataclass(frozen=True)
class Style:
    """How a family writes boxes and points: the coordinate scale and the syntax (box tokens or JSON)."""

    name: str
    scale: Scale
    syntax: Literal["tokens", "json"]

    def ref(self, label: str) -> str:
        """The text for a ``<ref-object>``: the label in ref tokens, or bare (JSON styles: it lands in a string)."""
        if self.syntax == "tokens":
            return f"{OBJECT_REF_START}{label}{OBJECT_REF_END}"
        if _JSON_UNSAFE.search(label):
            raise RecordError(
                f"ref {label!r} holds a quote, backslash or control character, which would break the JSON around "
                "<ref-object> (ms-swift inserts it unescaped)",
                "ref_unsafe",
                detail={"ref": label},
            )
        return label

    def coords(self, written: Sequence[int]) -> str:
        """The text for a ``<bbox>``: ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>``, or the JSON list ``[x1, y1, ..]``."""
        if self.syntax == "tokens":
            pairs = ",".join(f"({x},{y})" for x, y in zip(written[0::2], written[1::2], strict=True))
            return f"{BOX_START}{pairs}{BOX_END}"
        return "[" + ", ".join(str(v) for v in written) + "]"

    def item(self, written: Sequence[int], label: str | None = None) -> str:
        """One object: ref then box tokens, or the cookbooks' ``{"bbox_2d": [...], "label": "..."}`` (``point_2d``)."""
        if self.syntax == "tokens":
            return ("" if label is None else self.ref(label)) + self.coords(written)
        key = "bbox_2d" if len(written) == 4 else "point_2d"
        tail = "" if label is None else f', "label": {json.dumps(label, ensure_ascii=False)}'
        return f'{{"{key}": {self.coords(written)}{tail}}}'

    def answer(self, items: Sequence[tuple[Sequence[int], str | None]]) -> str:
        """A whole answer of (written, label) objects: the cookbooks' fenced, tab-indented JSON list, or (tokens,
        for which no family shows a layout) the objects one per line."""
        if self.syntax == "tokens":
            return "\n".join(self.item(w, label) for w, label in items)
        return "```json\n[\n\t" + ",\n\t".join(self.item(w, label) for w, label in items) + "\n]\n```"


STYLES: dict[str, Style] = {
    s.name: s
    for s in (
        Style("qwen2_vl", "rel1000", "tokens"),  # Qwen2-VL paper 2.2.1; maintainer's fine-tune form (Qwen3-VL#9)
        Style("qwen2_5_vl", "abs", "json"),  # Qwen2.5-VL spatial_understanding cookbook
        Style("qwen3_vl", "rel1000", "json"),  # Qwen3-VL 2d_grounding cookbook
        Style("qwen2_5_vl_tokens", "abs", "tokens"),  # ms-swift's default (legacy) text for Qwen2.5-VL
        Style("qwen3_vl_tokens", "rel1000", "tokens"),  # ms-swift's default (legacy) text for Qwen3-VL
    )
}


def get_style(name: str) -> Style:
    """The style registered under ``name``."""
    try:
        return STYLES[name]
    except KeyError:
        raise ConfigError(f"unknown box style {name!r}; choose one of {', '.join(STYLES)}") from None


# ---- a record's objects and their placeholders ----


@dataclass(frozen=True)
class Placeholder:
    """A placeholder in message ``message`` at ``[start, end)``; the ``index``-th of its ``kind``."""

    message: int
    start: int
    end: int
    kind: Literal["ref", "bbox", "objects"]
    index: int


@dataclass(frozen=True)
class Grounding:
    """A record's objects: the refs, the shapes (original coordinates) and the placeholders they fill, in order."""

    refs: tuple[str, ...] = ()
    shapes: tuple[Shape, ...] = ()
    placeholders: tuple[Placeholder, ...] = ()

    def labels(self) -> list[str | None]:
        """Each shape's label: its own (the qwen form's ``label``), else the ref of the last ``<ref-object>`` placed
        before its ``<bbox>`` (ms-swift's lists do not pair refs with boxes; the text does), else None."""
        before: dict[int, str] = {}
        last = None
        for p in self.placeholders:  # in conversation order
            if p.kind == "ref":
                last = self.refs[p.index]
            elif p.kind == "bbox":
                before[p.index] = last
        return [s.label if s.label is not None else before.get(i) for i, s in enumerate(self.shapes)]


_KINDS = {REF_OBJECT: "ref", BBOX: "bbox", OBJECTS: "objects"}


def _placeholders(texts: Sequence[str], tags: Sequence[str]) -> tuple[Placeholder, ...]:
    """Each of ``tags`` in ``texts``, numbered per kind across the whole conversation (as ms-swift fills them)."""
    pattern = re.compile("|".join(re.escape(t) for t in tags))
    seen: dict[str, int] = {}
    out = []
    for m, text in enumerate(texts):
        for match in pattern.finditer(text):
            kind = _KINDS[match.group()]
            out.append(Placeholder(m, match.start(), match.end(), kind, seen.get(kind, 0)))
            seen[kind] = seen.get(kind, 0) + 1
    return tuple(out)


def _count(placeholders: Sequence[Placeholder], kind: str) -> int:
    return sum(p.kind == kind for p in placeholders)


def _at(exc: RecordError, where: str) -> RecordError:
    return RecordError(f"{where}: {exc.reason}", exc.code, exc.line, {**exc.detail, "where": where})


def _image_index(value: Any, image_count: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < image_count:
        raise RecordError(
            f"{where}: image index {value!r} is not one of the record's {image_count} image(s) (0-based)",
            "box_image",
            detail={"where": where, "image_id": repr(value), "images": image_count},
        )
    return value


def parse_swift_objects(objects: Any, texts: Sequence[str], image_count: int) -> Grounding:
    """ms-swift's ``objects`` field (``ref``, ``bbox``, ``bbox_type`` real|norm1, ``image_id``) with the
    ``<ref-object>`` / ``<bbox>`` placeholders of ``texts`` (the messages' text, in order); None when absent.

    Each ref fills the next ``<ref-object>`` and each bbox the next ``<bbox>`` across the conversation; the counts
    must match (ms-swift would leave extra placeholders as text), or ``box_count``.
    """
    objects = {} if objects is None else objects
    if not isinstance(objects, Mapping) or set(objects) - {"ref", "bbox", "bbox_type", "image_id"}:
        raise RecordError(
            "objects must be {ref, bbox, bbox_type, image_id} (ms-swift's grounding form)",
            "objects_invalid",
            detail={"objects": repr(objects)[:200]},
        )
    refs = objects.get("ref") or []
    bbox = objects.get("bbox") or []
    space = objects.get("bbox_type") or "real"
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        raise RecordError("objects.ref must be a list of strings", "objects_invalid")
    if not isinstance(bbox, list):
        raise RecordError("objects.bbox must be a list of [x1, y1, x2, y2] boxes and [x, y] points", "objects_invalid")
    if space not in ("real", "norm1"):
        raise RecordError(
            f"objects.bbox_type {space!r}: ms-swift reads only 'real' (pixels) and 'norm1' (0-1) and would take "
            "this as real",
            "objects_bbox_type",
            detail={"bbox_type": repr(space)},
        )
    ids = objects.get("image_id")
    ids = [0] * len(bbox) if ids is None else ids
    if not isinstance(ids, list) or len(ids) != len(bbox):
        raise RecordError(f"objects.image_id must list one image index per bbox ({len(bbox)})", "box_image")
    shapes = []
    for i, (coords, image) in enumerate(zip(bbox, ids, strict=True)):
        where = f"objects.bbox[{i}]"
        image = _image_index(image, image_count, where)
        try:
            shapes.append(shape(coords, space, image=image))
        except RecordError as exc:
            raise _at(exc, where) from None
    placeholders = _placeholders(texts, (REF_OBJECT, BBOX))
    for kind, tag, n in (("ref", REF_OBJECT, len(refs)), ("bbox", BBOX, len(shapes))):
        if _count(placeholders, kind) != n:
            raise RecordError(
                f"the text has {_count(placeholders, kind)} {tag} and objects.{kind} has {n}: they must match",
                "box_count",
                detail={"placeholder": tag, "in_text": _count(placeholders, kind), "objects": n},
            )
    return Grounding(tuple(refs), tuple(shapes), placeholders)


def parse_qwen_objects(objects: Any, texts: Sequence[str], image_count: int) -> Grounding:
    """shardkit's qwen-form ``objects``: ``[{"bbox_2d": [x1, y1, x2, y2] | "point_2d": [x, y], "label": str,
    "image": i}]`` in real pixels of the original image (``image`` defaults to 0, ``label`` is optional).

    Placed either by one ``<objects>`` (the family's whole answer) or, as ms-swift's form, by one ``<bbox>`` per object
    and, optionally, one ``<ref-object>`` per object (its label).
    """
    objects = [] if objects is None else objects
    if not isinstance(objects, list):
        raise RecordError("objects must be a list of {bbox_2d | point_2d, label, image}", "objects_invalid")
    shapes = []
    for i, item in enumerate(objects):
        where = f"objects[{i}]"
        keys = set(item) if isinstance(item, Mapping) else set()
        if not keys or keys - {"bbox_2d", "point_2d", "label", "image"} or len(keys & {"bbox_2d", "point_2d"}) != 1:
            raise RecordError(
                f"{where} must hold bbox_2d or point_2d, and may hold label and image",
                "objects_invalid",
                detail={"where": where, "object": repr(item)[:200]},
            )
        image = _image_index(item.get("image", 0), image_count, where)
        coords = item.get("bbox_2d", item.get("point_2d"))
        if len(coords if isinstance(coords, list) else []) != (4 if "bbox_2d" in item else 2):
            raise RecordError(f"{where}: bbox_2d is 4 numbers, point_2d 2, not {coords!r}", "box_invalid")
        try:
            shapes.append(shape(coords, "real", item.get("label"), image))
        except RecordError as exc:
            raise _at(exc, where) from None
    placeholders = _placeholders(texts, (REF_OBJECT, BBOX, OBJECTS))
    refs, boxes, whole = (_count(placeholders, k) for k in ("ref", "bbox", "objects"))
    n = len(shapes)
    if (whole, refs, boxes) != (1, 0, 0) and not (whole == 0 and boxes == n and refs in (0, n)):
        raise RecordError(
            f"{n} object(s) need one {OBJECTS}, or one {BBOX} each (and optionally one {REF_OBJECT} each); the text "
            f"has {whole} {OBJECTS}, {boxes} {BBOX}, {refs} {REF_OBJECT}",
            "box_count",
            detail={"objects": n, "in_text": {"objects": whole, "bbox": boxes, "ref": refs}},
        )
    if refs and any(s.label is None for s in shapes):
        raise RecordError(f"each object needs a label to fill {REF_OBJECT}", "box_count")
    return Grounding(tuple(s.label or "" for s in shapes), tuple(shapes), placeholders)


def parse_objects(objects: Any, texts: Sequence[str], image_count: int) -> Grounding:
    """A record's ``objects`` in either form: a list is the qwen form (:func:`parse_qwen_objects`), anything else
    ms-swift's (:func:`parse_swift_objects`; None: no objects, and then no ``<ref-object>`` / ``<bbox>`` either)."""
    if isinstance(objects, list):
        return parse_qwen_objects(objects, texts, image_count)
    return parse_swift_objects(objects, texts, image_count)


def fill(
    texts: Sequence[str], grounding: Grounding, style: Style, images: Sequence[ImageSize], boxes_in: BoxesIn = None
) -> tuple[list[str], list[tuple[int, ...]]]:
    """``texts`` with each placeholder written in ``style`` for the stored images, and each shape's written
    coordinates (for the stored record)."""
    written = []
    for i, s in enumerate(grounding.shapes):
        try:
            written.append(write(s, images[s.image], style.scale, boxes_in))
        except RecordError as exc:
            raise _at(exc, f"object {i}") from None
    out = list(texts)
    for p in sorted(grounding.placeholders, key=lambda p: (p.message, p.start), reverse=True):
        if p.kind == "ref":
            new = style.ref(grounding.refs[p.index])
        elif p.kind == "bbox":
            new = style.coords(written[p.index])
        else:
            new = style.answer([(w, s.label) for w, s in zip(written, grounding.shapes, strict=True)])
        out[p.message] = out[p.message][: p.start] + new + out[p.message][p.end :]
    return out, written


# ---- coordinates already in the text ----

_NUM = r"-?[0-9]+(?:\.[0-9]+)?"
_JSON_KEY = re.compile(r"""(["'])(bbox_2d|point_2d)\1\s*:\s*""")
_LIST = re.compile(r"\[([^\[\]]*)\]")
_BOX_TOKENS = re.compile(re.escape(BOX_START) + r"(.*?)" + re.escape(BOX_END), re.S)
_PAIRS = re.compile(rf"\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*(?:,\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*)?")
_XML = re.compile(r"<points?\b[^>]*>")
_XML_ATTR = re.compile(r"""\b([xy])([0-9]*)\s*=\s*(["'])(.*?)\3""")


@dataclass(frozen=True)
class TextBox:
    """A box or point already written in a text: its syntax, its span, each coordinate's span, and its shape."""

    kind: Literal["bbox_2d", "point_2d", "box_tokens", "xml_points"]
    start: int
    end: int
    numbers: tuple[tuple[int, int], ...]
    shape: Shape


def _malformed(text: str, at: int, why: str) -> RecordError:
    return RecordError(
        f"malformed box in the text at character {at} ({text[at : at + 40]!r}): {why}",
        "text_box_malformed",
        detail={"at": at},
    )


def _list_numbers(text: str, start: int, end: int) -> list[tuple[int, int]] | None:
    """Spans of the comma-separated numbers in ``text[start:end]``; None if anything else is there."""
    spans, pos = [], start
    for part in text[start:end].split(","):
        s = pos + len(part) - len(part.lstrip())
        if not re.fullmatch(_NUM, part.strip()):
            return None
        spans.append((s, s + len(part.strip())))
        pos += len(part) + 1
    return spans


def find_text_boxes(text: str, space: Space = "real") -> list[TextBox]:
    """The boxes and points of the Qwen families' syntaxes in ``text``, in order: ``bbox_2d`` / ``point_2d`` JSON
    (double or single quotes), ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` (or one pair: a point), and the
    cookbook's XML ``<points x1="" y1="" ...>``, one point per pair. Coordinates are read in ``space``.

    ``text_box_malformed`` for syntax that does not hold the right numbers, and for quad tokens (no family
    documents them); ``box_inverted`` / ``box_empty`` as for any box.
    """
    if QUAD_START in text:
        raise _malformed(text, text.index(QUAD_START), "quad tokens are not a documented box form of any Qwen family")
    found: list[tuple[str, int, int, list[tuple[int, int]]]] = []
    for m in _JSON_KEY.finditer(text):
        if text.startswith(BBOX, m.end()):
            continue  # ms-swift's placeholder, filled by fill()
        body = _LIST.match(text, m.end())
        size = 4 if m.group(2) == "bbox_2d" else 2
        spans = body and _list_numbers(text, body.start(1), body.end(1))
        if not body or not spans or len(spans) != size:
            raise _malformed(text, m.start(), f"{m.group(2)} must be a list of {size} numbers")
        found.append((m.group(2), m.start(), body.end(), spans))
    boxes = list(_BOX_TOKENS.finditer(text))
    if text.count(BOX_START) != len(boxes) or text.count(BOX_END) != len(boxes):
        raise _malformed(text, text.find(BOX_START if BOX_START in text else BOX_END), "unpaired box tokens")
    for m in boxes:
        pairs = _PAIRS.fullmatch(text, m.start(1), m.end(1))
        if not pairs:
            raise _malformed(text, m.start(), "box tokens must hold (x1,y1),(x2,y2) or (x,y)")
        spans = [pairs.span(g) for g in range(1, 5) if pairs.group(g) is not None]
        found.append(("box_tokens", m.start(), m.end(), spans))
    for m in _XML.finditer(text):
        axes: dict[str, dict[str, tuple[int, int]]] = {}
        for a in _XML_ATTR.finditer(text, m.start(), m.end()):
            if not re.fullmatch(_NUM, a.group(4)):
                raise _malformed(text, a.start(), f"{a.group(1)}{a.group(2)} is not a number")
            axes.setdefault(a.group(2), {})[a.group(1)] = a.span(4)
        for suffix in sorted(axes, key=lambda k: int(k or 0)):
            if set(axes[suffix]) != {"x", "y"}:
                raise _malformed(text, m.start(), f"x{suffix} and y{suffix} must come together")
            found.append(("xml_points", m.start(), m.end(), [axes[suffix]["x"], axes[suffix]["y"]]))
    out = []
    for kind, start, end, spans in sorted(found, key=lambda f: (f[1], f[3][0])):
        values = [Fraction(text[s:e]) for s, e in spans]
        try:
            out.append(TextBox(kind, start, end, tuple(spans), shape(values, space)))
        except RecordError as exc:
            raise _at(exc, f"{kind} at character {start}") from None
    return out


def _moves(image: ImageSize, scale: Scale, boxes_in: BoxesIn) -> bool:
    """Whether text coordinates of ``scale`` must change for this image."""
    turned = image.orientation in _EXIF_MAPS and boxes_in == "raw"
    resized = (image.width, image.height) != (image.original_width, image.original_height)
    return turned or (scale == "abs" and resized)


def _text_frame(images: Sequence[ImageSize], scale: Scale, boxes_in: BoxesIn) -> ImageSize:
    """The one image text boxes can refer to; images that differ in size are ambiguous unless none needs a change
    (the boxes are then checked against the largest)."""
    distinct = list(dict.fromkeys(images))
    if len(distinct) == 1:
        return distinct[0]
    if any(_moves(im, scale, boxes_in) for im in distinct):
        raise RecordError(
            f"the text holds box coordinates and the record's {len(images)} images change differently: nothing "
            "says which image each refers to (write them as objects with an image index)",
            "text_box_image_ambiguous",
            detail={"images": len(images)},
        )
    w = max(im.original_width for im in distinct)
    h = max(im.original_height for im in distinct)
    orientation = next((im.orientation for im in distinct if im.orientation in _EXIF_MAPS), 1)
    return ImageSize(w, h, w, h, orientation)


def rescale_text(
    texts: Sequence[str],
    images: Sequence[ImageSize],
    scale: Scale,
    *,
    boxes_in: BoxesIn = None,
    refuse: bool = False,
    names: Sequence[str] | None = None,
) -> tuple[list[str], int]:
    """``texts`` with the coordinates already written in them moved from the original image to the stored one, and
    how many boxes and points changed; only the numbers are replaced, every other character is kept.

    ``abs`` (Qwen2.5-VL) coordinates are rescaled as :func:`write` does; ``rel1000`` ones (Qwen2-VL, Qwen3-VL) are
    only checked to lie in 0-1000 (and mapped for a ``raw`` EXIF frame). With ``refuse``, text coordinates that
    would change are ``text_box_refused``. A text whose image is unchanged is only checked, never rewritten.
    Errors name text ``m`` as ``names[m]`` (default ``message m``).
    """
    out, changed, _ = _rescale(texts, images, scale, boxes_in, refuse, names)
    return out, changed


def _rescale(
    texts: Sequence[str],
    images: Sequence[ImageSize],
    scale: Scale,
    boxes_in: BoxesIn,
    refuse: bool,
    names: Sequence[str] | None,
) -> tuple[list[str], int, int]:
    """:func:`rescale_text`, and how many boxes and points the texts hold."""
    space: Space = "real" if scale == "abs" else "norm1000"
    names = [f"message {m}" for m in range(len(texts))] if names is None else names
    found = []
    for m, text in enumerate(texts):
        try:
            found.append(find_text_boxes(text, space))
        except RecordError as exc:
            raise _at(exc, names[m]) from None
    count = sum(map(len, found))
    if not images or not count:
        return list(texts), 0, count
    frame = _text_frame(images, scale, boxes_in)
    moves = _moves(frame, scale, boxes_in)
    if moves and refuse:
        raise RecordError(
            f"the text holds {count} box coordinate(s) on an image shardkit changed "
            f"({frame.original_width}x{frame.original_height} -> {frame.width}x{frame.height}, orientation "
            f"{frame.orientation}); write them as objects, or let shardkit rescale them (--text-boxes rescale)",
            "text_box_refused",
            detail={"text_boxes": count},
        )
    out, changed = [], 0
    for m, (text, boxes) in enumerate(zip(texts, found, strict=True)):
        pieces, pos = [], 0
        for tb in boxes:
            try:
                if not moves:
                    check_inside(upright(tb.shape, frame, boxes_in), frame)
                    continue
                new = [str(v) for v in write(tb.shape, frame, scale, boxes_in)]
            except RecordError as exc:
                raise _at(exc, f"{names[m]}, {tb.kind} at character {tb.start}") from None
            changed += new != [text[s:e] for s, e in tb.numbers]
            for (s, e), v in zip(tb.numbers, new, strict=True):
                pieces += [text[pos:s], v]
                pos = e
        out.append("".join(pieces) + text[pos:])
    return out, changed, count


# ---- a record's texts, grounded for its stored images ----

#: any text that may hold a placeholder or a family's box syntax (a record without any is never grounded)
_MENTIONS = re.compile(
    "|".join(
        re.escape(t)
        for t in (REF_OBJECT, BBOX, OBJECTS, BOX_START, BOX_END, QUAD_START, OBJECT_REF_START, "bbox_2d", "point_2d")
    )
    + r"|<points?\b"
)


def mentions_boxes(texts: Sequence[str]) -> bool:
    """Whether any of ``texts`` holds a placeholder or a box syntax of a Qwen family (a cheap first look)."""
    return any(_MENTIONS.search(text) for text in texts)


@dataclass(frozen=True)
class Grounded:
    """A record's texts written for its stored images: the texts, each shape's written coordinates, and how many
    boxes and points its texts held already (``text_boxes``) and how many of those were rescaled."""

    texts: list[str]
    written: list[tuple[int, ...]]
    text_boxes: int
    rescaled: int


def ground(
    texts: Sequence[str],
    grounding: Grounding,
    images: Sequence[ImageSize],
    style: Style,
    *,
    boxes_in: BoxesIn = None,
    refuse: bool = False,
    names: Sequence[str] | None = None,
) -> Grounded:
    """``texts`` (the record's, in order) for ``images`` (their stored sizes): coordinates already in them rescaled
    or checked (:func:`rescale_text`), then the placeholders of ``grounding`` filled in ``style`` (:func:`fill`)."""
    rescaled, changed, count = _rescale(texts, images, style.scale, boxes_in, refuse, names)
    filled, written = fill(rescaled, grounding, style, images, boxes_in)
    return Grounded(filled, written, count, changed)


def stored_boxes(grounding: Grounding, written: Sequence[Sequence[int]], scale: Scale) -> list[dict[str, Any]]:
    """What a sample's JSON records of each shape: its image, label, kind, original coordinates and their space,
    and the coordinates written for the stored image with their scale (``abs`` pixels or ``rel1000``)."""
    return [
        {
            "image": s.image,
            "label": label,
            "kind": "box" if isinstance(s, Box) else "point",
            "source": _plain(s.coords),
            "space": s.space,
            "written": list(w),
            "scale": scale,
        }
        for s, label, w in zip(grounding.shapes, grounding.labels(), written, strict=True)
    ]


_SPANS = re.compile(
    r"""(["'])(?:bbox_2d|point_2d)\1\s*:\s*\[[^\[\]]*\]"""
    + "|"
    + re.escape(BOX_START)
    + ".*?"
    + re.escape(BOX_END)
    + "|"
    + re.escape(OBJECT_REF_START)
    + ".*?"
    + re.escape(OBJECT_REF_END)
    + r"|<points?\b[^>]*>",
    re.S,
)


def box_spans(text: str) -> list[tuple[int, int]]:
    """The ``[start, end)`` of each box, point and ref written in ``text`` (JSON ``bbox_2d`` / ``point_2d`` with
    its list, box and ref tokens with what they enclose, an XML ``<points>`` tag): where a cut would break one."""
    return [m.span() for m in _SPANS.finditer(text)]


def pixel_of(value: float, size: int, scale: Scale) -> float:
    """A written coordinate as a pixel position on the stored image side of ``size`` pixels (``rel1000``: of 1000)."""
    return float(value) if scale == "abs" else value * size / 1000
