"""Pydantic models of one input record: the Qwen2-VL conversation JSONL line.

``{"messages": [{"role": "user", "content": [{"type": "image", "image": "images/a.jpg"},
{"type": "text", "text": "..."}]}, {"role": "assistant", "content": "..."}], "meta": {...}}``;
a video is a ``{"type": "video", "video": "clips/a.mp4"}`` part (or a list of frame images).

Models are strict where a typo would otherwise pass silently (unknown keys are
errors); ``meta`` is free-form and kept as it is. :func:`format_validation_error`
turns pydantic's report into one plain sentence for the rejects file.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_validator,
)
from pydantic_core import PydanticCustomError


class TextPart(BaseModel):
    """A piece of text inside a message."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["text"]
    text: str


class InlineImage(str):
    """An image whose bytes the input holds (a Parquet or Arrow cell) rather than a path naming a file.

    Its text is the label a sample records as the image's source and errors
    name (``inline image 1 of row 12 (cat.jpg, 102400 bytes)``); ``data`` is
    the image file's bytes, read as they are.
    """

    data: bytes

    def __new__(cls, label: str, data: bytes) -> InlineImage:
        image = super().__new__(cls, label)
        image.data = data
        return image

    def __reduce__(self) -> tuple[type[InlineImage], tuple[str, bytes]]:
        return InlineImage, (str(self), self.data)


def _keep_inline(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    # pydantic would turn a str subclass into a plain str, losing the bytes
    return value if isinstance(value, InlineImage) else handler(value)


def _inline_bytes(value: Any) -> Any:
    # {"bytes": "<base64>"} (how Hugging Face writes an image to JSON) is the same as a base64 data: URI
    if isinstance(value, dict) and set(value) <= {"bytes", "path"} and isinstance(value.get("bytes"), str):
        return "data:application/octet-stream;base64," + value["bytes"]
    return value


class ImagePart(BaseModel):
    """An image inside a message.

    A path relative to the dataset root (the JSONL's folder or ``--image-root``),
    a base64 ``data:`` URI, ``{"bytes": "<base64>"}``, or an ``http(s)`` URL
    (fetched only with ``--allow-remote``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["image"]
    image: Annotated[
        str,
        Field(min_length=1),
        BeforeValidator(_inline_bytes, json_schema_input_type=str | dict[Literal["bytes", "path"], str]),
        WrapValidator(_keep_inline),
    ]


class VideoPart(BaseModel):
    """A video inside a message: a clip (a path relative to the dataset root, as an image's, or a ``data:`` URI),
    or its frames already sampled (a list of image paths, ms-swift's and LLaMA-Factory's form), ``fps`` frames a
    second (default 2; for a clip the sampling rate is the build's ``--video-fps``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["video"]
    video: str | list[str]
    fps: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> VideoPart:
        frames = self.video if isinstance(self.video, list) else None
        if frames is None and not self.video:
            raise ValueError("a video part needs a path (or a list of frame images)")
        if frames is not None and (not frames or not all(frames)):
            raise ValueError("a video given as frames needs at least one frame image, each a path")
        if frames is None and self.fps is not None:
            raise ValueError("'fps' gives the rate of a list of frames; a clip is sampled at the build's --video-fps")
        return self

    @property
    def frames(self) -> list[str] | None:
        """The frame images of a video given as a list, else None (a clip)."""
        return self.video if isinstance(self.video, list) else None


Part = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class ImageUrl(BaseModel):
    """The ``image_url`` object of an OpenAI-style part."""

    url: str
    detail: str | None = None


class ImageUrlPart(BaseModel):
    """OpenAI's image part, read as an :class:`ImagePart` with ``image = url`` (``file://`` removed)."""

    type: Literal["image_url"]
    image_url: ImageUrl | str


def _string_to_parts(value: Any) -> Any:
    # A plain string is the same as one text part, as in the chat templates.
    if isinstance(value, str):
        return [{"type": "text", "text": value}]
    if isinstance(value, list):
        return [_image_url_to_image(part) for part in value]
    return value


def _image_url_to_image(part: Any) -> Any:
    # OpenAI's {"type": "image_url", "image_url": {"url": ...}} (or a bare URL string) is an image part;
    # a file:// URL is its local path.
    if not (isinstance(part, dict) and part.get("type") == "image_url" and set(part) <= {"type", "image_url"}):
        return part
    ref = part.get("image_url")
    url = ref.get("url") if isinstance(ref, dict) and set(ref) <= {"url", "detail"} else ref
    if not isinstance(url, str):
        return part
    return {"type": "image", "image": url.removeprefix("file://")}


class Message(BaseModel):
    """One turn of the conversation."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    role: Literal["system", "user", "assistant"]
    content: Annotated[
        list[Part],
        BeforeValidator(_string_to_parts, json_schema_input_type=str | list[Part | ImageUrlPart]),
    ]
    loss: bool | None = None
    """Whether this message's content is a training target, overriding ``--train-on`` for it (ms-swift's
    per-message ``loss``); unset: ``--train-on`` decides."""

    def images(self) -> list[ImagePart]:
        return [p for p in self.content if isinstance(p, ImagePart)]

    def videos(self) -> list[VideoPart]:
        return [p for p in self.content if isinstance(p, VideoPart)]


#: the error type (and reject code) of a record whose last message is not the assistant's answer
NO_ANSWER = "no_answer"


class Record(BaseModel):
    """One training sample: a conversation with images and videos (any number), optional free-form ``meta`` and
    grounding ``objects``.

    It ends with the assistant's answer: a record whose last message is a user (or system) turn is a prompt
    for generation (GRPO, evaluation), not a training sample, and is rejected as ``no_answer``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    messages: list[Message] = Field(min_length=1)
    meta: dict[str, Any] | None = None
    id: str | int | None = None
    objects: dict[str, Any] | list[dict[str, Any]] | None = Field(
        None,
        description="grounding boxes and points, written for the model's family at build: ms-swift's form "
        '{"ref": [...], "bbox": [[x1, y1, x2, y2] | [x, y], ...], "bbox_type": "real" | "norm1", "image_id": [...]} '
        "with <ref-object> and <bbox> placeholders in the text, or a list of "
        '{"bbox_2d": [x1, y1, x2, y2] | "point_2d": [x, y], "label": ..., "image": i} in pixels of the original '
        "image, placed by <objects> (the whole answer) or <bbox> / <ref-object>; checked by shardkit.boxes",
    )

    @model_validator(mode="after")
    def _check_turns(self) -> Record:
        roles = [m.role for m in self.messages]
        if roles[-1] != "assistant":
            raise PydanticCustomError(
                NO_ANSWER,
                "the last message is a {role} turn that no answer follows (a prompt-only record, as for GRPO): "
                "nothing to train on; end the record with the assistant's answer",
                {"role": roles[-1]},
            )
        if "system" in roles[1:]:
            raise ValueError(f"a system message may only come first (found at message {roles.index('system', 1)})")
        for i, m in enumerate(self.messages):
            if m.role != "user" and m.images():
                raise ValueError(f"message {i} ({m.role}) has an image; images belong in user messages")
            if m.role != "user" and m.videos():
                raise ValueError(f"message {i} ({m.role}) has a video; videos belong in user messages")
        return self

    def images(self) -> list[ImagePart]:
        """All image parts, in order of appearance."""
        return [p for m in self.messages for p in m.images()]

    def videos(self) -> list[VideoPart]:
        """All video parts, in order of appearance."""
        return [p for m in self.messages for p in m.videos()]


def format_validation_error(error: ValidationError) -> str:
    """One plain sentence (or a few joined by ``; ``) for a pydantic error."""
    parts = []
    for item in error.errors(include_url=False)[:3]:
        loc = _format_loc(item["loc"])
        kind = item["type"]
        if kind == "json_invalid":
            msg = "invalid JSON: " + str(item["ctx"].get("error", item["msg"])).replace(
                " at line 1 column ", " at column "
            )
        elif kind == "union_tag_invalid":
            tag = item["ctx"].get("tag")
            msg = f"unsupported content type {tag!r} (expected 'image', 'video' or 'text')"
        elif kind == "union_tag_not_found":
            msg = "content part has no 'type'"
        elif kind == "model_type" and not item["loc"]:
            msg = "a record must be a JSON object"
        elif kind == "literal_error" and item["loc"][-1] == "role":
            msg = f"unknown role {item['input']!r} (expected 'system', 'user' or 'assistant')"
        elif kind == "list_type" and item["loc"][-1] == "content":
            msg = "must be a string or a list of parts"
        elif kind == "missing":
            msg = "missing (required)"
        elif kind == "extra_forbidden":
            msg = "unknown field (not allowed)"
        elif kind == "value_error":
            msg = str(item["ctx"]["error"])
        elif kind == NO_ANSWER:
            msg = item["msg"]
        else:
            msg = item["msg"]
        parts.append(f"{loc}: {msg}" if loc and kind != "json_invalid" else msg)
    extra = len(error.errors()) - 3
    if extra > 0:
        parts.append(f"and {extra} more")
    return "; ".join(parts)


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for i, piece in enumerate(loc):
        if i >= 2 and loc[i - 2] == "content" and isinstance(loc[i - 1], int):
            continue  # pydantic puts the union tag ('text'/'image') in the path; drop it
        if isinstance(piece, int):
            out += f"[{piece}]"
        else:
            out += f".{piece}" if out else str(piece)
    return out
