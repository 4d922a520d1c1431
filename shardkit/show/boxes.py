"""The grounding boxes and points of a stored sample, as pixel positions on its stored images, for ``show`` to draw.

Two sources: the boxes written from the record's objects (the sample's ``boxes``: each knows its image, label and
scale) and the boxes already in its text (found again in the stored, trained text by
:func:`shardkit.boxes.find_text_boxes`, in the family's scale; drawn only for a sample with one image, since
nothing says which image a text box of several refers to). A written coordinate is a pixel of the stored image
(``abs``, Qwen2.5-VL) or a thousandth of its side (``rel1000``, Qwen2-VL, Qwen3-VL).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from shardkit.boxes import OBJECT_REF_END, OBJECT_REF_START, Box, Scale, find_text_boxes, pixel_of
from shardkit.errors import RecordError
from shardkit.shards import Sample

_JSON_LABEL = re.compile(r"""\s*,\s*(["'])label\1\s*:\s*(["'])((?:\\.|(?!\2).)*)\2""")
_XML_ALT = re.compile(r"""\balt\s*=\s*(["'])(.*?)\1""")


@dataclass(frozen=True)
class Drawn:
    """One box or point to draw on image ``image``: pixel coordinates on the stored image (x1, y1, x2, y2, or x, y),
    its label, and where it comes from (``objects`` or ``text``)."""

    image: int
    kind: Literal["box", "point"]
    pixels: tuple[float, ...]
    label: str | None
    source: Literal["objects", "text"]


def drawn_boxes(sample: Sample, scale: Scale | None) -> list[Drawn]:
    """What to draw on ``sample``'s images: its written boxes, and the boxes in its text read in ``scale`` (the
    build family's; None: a family without boxes, whose text is not read)."""
    info = sample.stored
    sizes = [(image.width, image.height) for image in info.images]
    out = [
        Drawn(box.image, box.kind, _pixels(box.written, sizes[box.image], box.scale), box.label, "objects")
        for box in info.boxes
        if box.image < len(sizes)
    ]
    if scale is None or len(sizes) != 1 or not info.text_boxes or not info.text_boxes.found:
        return out
    for text in _texts(info.messages or []):
        try:
            found = find_text_boxes(text, "real" if scale == "abs" else "norm1000")
        except RecordError:  # a text the build would not write; show draws what it can read
            continue
        for tb in found:
            kind: Literal["box", "point"] = "box" if isinstance(tb.shape, Box) else "point"
            pixels = _pixels([float(v) for v in tb.shape.coords], sizes[0], scale)
            out.append(Drawn(0, kind, pixels, _label(text, tb.kind, tb.start, tb.end), "text"))
    return out


def _pixels(written: list[int] | list[float], size: tuple[int, int], scale: Scale) -> tuple[float, ...]:
    return tuple(pixel_of(v, size[i % 2], scale) for i, v in enumerate(written))


def _texts(messages: list) -> list[str]:
    return [
        part["text"]
        for message in messages
        for part in message.get("content", [])
        if isinstance(part, dict) and isinstance(part.get("text"), str)
    ]


def _label(text: str, kind: str, start: int, end: int) -> str | None:
    """The label written with a text box: the JSON object's ``label`` after it, the ref tokens right before its box
    tokens, or the XML ``alt``."""
    if kind in ("bbox_2d", "point_2d"):
        found = _JSON_LABEL.match(text, end)
        return found.group(3) if found else None
    if kind == "box_tokens" and text.endswith(OBJECT_REF_END, 0, start):
        opened = text.rfind(OBJECT_REF_START, 0, start)
        return text[opened + len(OBJECT_REF_START) : start - len(OBJECT_REF_END)] if opened >= 0 else None
    if kind == "xml_points":
        found = _XML_ALT.search(text, start, end)
        return found.group(2) if found else None
    return None
