"""JSON inputs: JSON lines, or one JSON array of records, in the forms other projects write.

Each form is a class below (``--input-format NAME``); ``json``, what
``--input-format auto`` reads a JSON file as, reads each record in the form
its keys name (:func:`form_of`), so one file may mix forms (ms-swift's and
InternVL's documented examples do). A form named on the command line reads its
own records and rejects the others' as ``other_form``, naming the form and the
option that reads them.

Lines are read as bytes, so a line of invalid UTF-8 is one rejected record
rather than a crash; blank lines are skipped. The entries of a JSON array are
records numbered from 1, each with the line it starts on. A packed entry (a
list of records where one record is expected, as Qwen's finetune
``tools/pack_data.py`` writes for its data packing) is unpacked: each of its
records is one record, numbered in the same way; shardkit packs samples when it
loads them.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Generator, Iterator
from typing import Any, ClassVar

from shardkit.errors import InputError, RecordError
from shardkit.inputs.base import (
    InputFormat,
    RawItem,
    decode_line,
    open_location,
    refuse_placeholders,
    refuse_unsupported,
    validate_record,
)
from shardkit.inputs.chat import (
    Placeholders,
    lf_v1_messages,
    prompt_completion_turns,
    query_response_turns,
    to_messages,
)
from shardkit.schema import Record
from shardkit.storage import parent

NOT_AN_OBJECT = "__not_an_object__"
TURN_KEYS = ("messages", "conversations", "conversation")
PLACEHOLDERS = ("<image>", "<video>", "<audio>")
#: what each form's records look like, for reasons that name a form
DESCRIPTIONS = {
    "qwen": "a Qwen-form record ('messages' of image/text parts)",
    "sharegpt": "a ShareGPT record ('images' list, <image> placeholders, 'conversations' or a 'system' key)",
    "llava": "a LLaVA record ('image' and 'conversations')",
    "trl": "a TRL prompt-completion record ('prompt' and 'completion')",
    "swift": "an ms-swift query-response record ('query', 'response', 'history')",
    "llamafactory_v1": "a LLaMA-Factory v1 record (parts of 'type' and 'value', 'loss_weight')",
}


def form_of(data: dict[str, Any]) -> str:
    """The form a record's keys name. Without ``messages``/``conversations``/``conversation``: ``trl``
    (``prompt``/``completion``) or ``swift`` (``query``/``response``/``history``). Then ``llava`` (``image``
    without ``images``, or ``video`` without ``videos`` or ``images``), ``llamafactory_v1`` (message parts with a
    ``value``, or a ``loss_weight``), ``sharegpt`` (``images``, ``videos``, ``conversations``, ``conversation``
    or a ``system`` key), else ``qwen``. ``<image>`` in a text is not a key: :class:`JsonAuto` reads it as a
    placeholder."""
    if not any(key in data for key in TURN_KEYS):
        if "prompt" in data or "completion" in data:
            return "trl"
        if "query" in data or "response" in data or "history" in data:
            return "swift"
    if ("image" in data and "images" not in data) or ("video" in data and not {"videos", "images"} & data.keys()):
        return "llava"
    if _is_lf_v1(data.get("messages")):
        return "llamafactory_v1"
    if any(key in data for key in ("images", "videos", "conversations", "conversation", "system")):
        return "sharegpt"
    return "qwen"


def _is_lf_v1(messages: Any) -> bool:
    for message in messages if isinstance(messages, list) else []:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        parts = content if isinstance(content, list) else []
        if "loss_weight" in message or any(isinstance(p, dict) and "value" in p and "type" in p for p in parts):
            return True
    return False


def _has_placeholder(data: dict[str, Any]) -> bool:
    """Whether ``messages`` are in the placeholder form: a string content holds ``<image>``, ``<video>`` or
    ``<audio>``, and no content is a list of parts (the Qwen form's, where such strings are plain text)."""
    messages = data.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return False
    contents = [m.get("content") for m in messages]
    return not any(isinstance(c, list) for c in contents) and any(
        isinstance(c, str) and any(p in c for p in PLACEHOLDERS) for c in contents
    )


def iter_lines(path: str) -> Iterator[RawItem]:
    """The non-blank lines of ``path`` with their 1-based numbers, streaming."""
    with open_location(path) as f:
        for number, data in enumerate(f, start=1):
            if number == 1 and data.startswith(b"\xef\xbb\xbf"):
                data = data[3:]  # a UTF-8 byte order mark
            if data.strip():
                yield RawItem(number, data)


def iter_unpacked_lines(path: str) -> Iterator[RawItem]:
    """The records of JSON lines some of which are packed entries (a list of records): numbered from 1, each with
    its line; a line that is no valid JSON list stays one record, rejected where it is read."""
    number = 0
    for line in iter_lines(path):
        entries: Any = None
        if line.data.lstrip().startswith(b"["):
            try:
                entries = json.loads(line.data)
            except (ValueError, RecursionError):  # read again, and rejected, as one record
                entries = None
        for data in entries if isinstance(entries, list) else [line.data]:
            number += 1
            yield RawItem(number, _as_record(data), source_line=line.number)


def is_json_array(path: str) -> bool:
    """Whether the file holds one JSON array, rather than JSON lines (whose first line may be a packed entry: a
    complete JSON list with more lines after it)."""
    with open_location(path) as f:
        first = f.readline().lstrip(b"\xef\xbb\xbf")
        while first and not first.strip():
            first = f.readline()
        if not first.lstrip().startswith(b"["):
            return False
        try:
            json.loads(first)
        except (ValueError, RecursionError):
            return True  # the array goes on past its first line
        return not any(line.strip() for line in f)


def iter_array(path: str) -> Iterator[RawItem]:
    """The records of a JSON array file (packed entries unpacked), numbered from 1, each with the line it starts on."""
    with open_location(path) as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not valid UTF-8 (byte {exc.start})") from None
    line, counted, number = 1, 0, 0
    start = _skip_space(text, 0)
    for pos, value in _entries(path, text, start, unpack=True):
        line += text.count("\n", counted, pos)
        counted = pos
        number += 1
        yield RawItem(number, _as_record(value), source_line=line)


def _entries(path: str, text: str, pos: int, *, unpack: bool) -> Generator[tuple[int, Any], None, int]:
    """``(start, value)`` of each entry of the JSON array at ``text[pos]``, those of a packed entry (a list) in its
    place when ``unpack``; returns the position after the array."""
    decoder = json.JSONDecoder()
    pos = _skip_space(text, pos + 1)  # past the "["
    if text.startswith("]", pos):
        return pos + 1
    while True:
        pos = _skip_space(text, pos)
        if unpack and text.startswith("[", pos):
            pos = yield from _entries(path, text, pos, unpack=False)
        else:
            try:
                value, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path} is not a JSON array of records: {exc.msg} at line {exc.lineno}") from None
            yield pos, value
            pos = end
        pos = _skip_space(text, pos)
        if text.startswith(",", pos):
            pos += 1
        elif text.startswith("]", pos):
            return pos + 1
        else:
            line = text.count("\n", 0, pos) + 1
            raise InputError(f"{path} is not a JSON array of records: expected ',' or ']' at line {line}")


def _as_record(value: Any) -> bytes | dict[str, Any]:
    return value if isinstance(value, bytes | dict) else {NOT_AN_OBJECT: value}


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def parse_record(item: RawItem) -> dict[str, Any]:
    """The JSON object of an item: a JSON line parsed, or an entry of a JSON array; :class:`RecordError` if it is
    not valid UTF-8, not valid JSON, or not an object."""
    data: Any = item.data
    if isinstance(data, bytes):
        text = decode_line(item)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RecordError(f"invalid JSON: {exc.msg} at column {exc.colno}", "invalid_json", item.number) from None
    if not isinstance(data, dict) or NOT_AN_OBJECT in data:
        raise RecordError("a record must be a JSON object", "invalid_record", item.number)
    return data


def no_conversation(data: dict[str, Any], line: int) -> RecordError:
    """The reject of a record with no turns in any form: it names the keys the record has, and where turns go."""
    keys = ", ".join(repr(key) for key in data) or "no keys"
    return RecordError(
        f"no conversation: the record has {keys} but no 'messages', 'conversations' or 'conversation' list (nor "
        "'prompt' and 'completion', or 'query' and 'response'); put its turns in 'messages'",
        "invalid_record",
        line,
    )


def other_form(found: str, form: str, line: int) -> RecordError:
    """The reject of a record in the form ``found`` read as ``form``: it names both, and the options that read it."""
    return RecordError(
        f"{DESCRIPTIONS[found]}, which --input-format {form} does not read: use --input-format {found}, or auto to "
        "read each record in its own form",
        "other_form",
        line,
        {"form": found},
    )


class JsonInput(InputFormat):
    """A JSON input read as one form: JSON lines or one JSON array (packed entries unpacked) of records."""

    #: other forms whose records this one reads as its own
    also_reads: ClassVar[frozenset[str]] = frozenset()
    #: whether the form reads videos (its video keys, ``video`` parts and ``<video>`` placeholders)
    takes_video: ClassVar[bool] = False

    @functools.cached_property
    def is_array(self) -> bool:
        """Whether the input is one JSON array (its entries are then records, numbered from 1)."""
        return is_json_array(self.location)

    @functools.cached_property
    def is_packed(self) -> bool:
        """Whether some JSON line is a packed entry (a list of records): records are then numbered from 1."""
        return not self.is_array and any(item.data.lstrip().startswith(b"[") for item in iter_lines(self.location))

    @property
    def unit(self) -> str:  # type: ignore[override]
        return "record" if self.is_array or self.is_packed else "line"

    def unit_of(self, item: RawItem) -> str:
        return "line" if item.source_line is None else "record"

    def items(self) -> Iterator[RawItem]:
        if self.is_array:
            return iter_array(self.location)
        return iter_unpacked_lines(self.location) if self.is_packed else iter_lines(self.location)

    def record(self, item: RawItem) -> Record:
        data = parse_record(item)
        refuse_unsupported(data, item.number, video=self.takes_video)
        found = form_of(data)
        if found != self.name and found not in self.also_reads:
            raise other_form(found, self.name, item.number)
        return self.convert(data, item.number)

    def convert(self, data: dict[str, Any], line: int) -> Record:
        """The validated record of ``data``, a record in this form."""
        raise NotImplementedError

    def image_root(self) -> str:
        return parent(self.location)

    def extra_meta(self, data: dict[str, Any], known: frozenset[str], line: int) -> dict[str, Any]:
        """``meta`` with the record's other top-level keys that hold data, each named in ``keep_keys``; any other
        such key is refused (``unknown_key``), since its data would be lost."""
        if not isinstance(data.get("meta") or {}, dict):
            raise RecordError("'meta' must be an object", "invalid_record", line)
        meta = dict(data.get("meta") or {})
        keep = set(self.options.get("keep_keys") or ())
        for key, value in data.items():
            if key in known or value in (None, "", [], {}):
                continue
            if key in OTHER_FORM:
                found = OTHER_FORM[key]
                raise RecordError(
                    f"{key!r} is not read in the {self.name} form: use --input-format {found}",
                    "other_form",
                    line,
                    {"form": found},
                )
            if key not in keep:
                raise RecordError(
                    f"unknown top-level key {key!r} holds data that would be lost; keep it in meta with "
                    f"--keep-keys {key}, or remove it",
                    "unknown_key",
                    line,
                )
            meta[key] = value
        return meta

    def finish(self, messages: list[dict[str, Any]], data: dict[str, Any], meta: dict[str, Any], line: int) -> Record:
        """The validated record of ``messages`` with the record's ``meta`` and ``id``; ``<audio>`` placeholders
        refused, and ``<video>`` ones left in a form that reads no videos."""
        out: dict[str, Any] = {"messages": messages}
        if meta:
            out["meta"] = meta
        if data.get("id") is not None:
            out["id"] = data["id"]  # the schema checks its type
        if "objects" in getattr(self, "known", ()) and data.get("objects") is not None:
            out["objects"] = data["objects"]  # ms-swift's grounding boxes (shardkit.boxes reads them)
        return refuse_placeholders(validate_record(out, line), line, video=self.takes_video)


OTHER_FORM = {"image": "llava", "images": "sharegpt", "video": "llava", "videos": "sharegpt"}  # the media keys of
# the other placeholder form


class QwenJsonl(JsonInput):
    """``{"messages": [{"role": ..., "content": str | [{"type": "image" | "text", ...}]}], "meta": {...}}`` per line;
    ``<image>`` in a text is plain text."""

    name = "qwen"
    takes_video = True

    def convert(self, data: dict[str, Any], line: int) -> Record:
        if "messages" not in data:
            raise no_conversation(data, line)
        return validate_record(data, line)


class ShareGPT(JsonInput):
    """LLaMA-Factory's and ms-swift's multimodal form: ``<image>`` (``<video>``) placeholders in the text and an
    ``images`` (``videos``) list.

    ``{"messages": [{"role": "user", "content": "<image>What is this?"}, ...], "images": ["a.jpg"]}``,
    or with ``"conversations": [{"from": "human", "value": ...}]``, or ms-swift's ``"conversation"`` of
    ``{"human": ..., "assistant": ...}`` pairs; an optional ``"system"`` string, ``"id"`` and
    ``"meta"`` object; a message's ``"loss": true|false`` (ms-swift) says whether it is trained; ms-swift's
    grounding ``"objects"`` (:mod:`shardkit.boxes`). Each placeholder takes the next image (video), in order, the
    text around it kept as it is; their numbers must match. A video is a clip's path or a list of frame images
    (ms-swift's ``"videos": [["f1.jpg", "f2.jpg"]]``). Other top-level keys that hold data are refused
    (``unknown_key``) unless named in ``keep_keys``, which keeps them in ``meta``.
    """

    name = "sharegpt"
    also_reads = frozenset({"qwen"})
    takes_video = True
    #: the top-level keys of the images and of the videos
    image_key: ClassVar[str] = "images"
    video_key: ClassVar[str] = "videos"
    #: top-level keys read as the record
    known: ClassVar[frozenset[str]] = frozenset(
        {"messages", "conversations", "conversation", "images", "videos", "system", "id", "meta", "objects"}
    )
    #: how ``<image>`` in a text is read
    placeholders: ClassVar[Placeholders] = Placeholders.KEEP

    def convert(self, data: dict[str, Any], line: int) -> Record:
        turns = next((data[key] for key in TURN_KEYS if key in data), None)
        if turns is None:
            raise no_conversation(data, line)
        images = record_images(data, self.image_key, line)
        videos = record_videos(data, self.video_key, line)
        meta = self.extra_meta(data, self.known, line)
        system = data.get("system")
        messages = to_messages(turns, images, line, system=system, placeholders=self.placeholders, videos=videos)
        return self.finish(messages, data, meta, line)


class Llava(ShareGPT):
    """The LLaVA / InternVL / Qwen2-VL-Finetune form: ``image`` (a path or a list) and ``conversations``; ``video``
    (a path or a list of them) with ``<video>``, as LLaVA-Video and Qwen2-VL-Finetune write it.

    ``{"id": "1", "image": "x.jpg", "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"},
    {"from": "gpt", "value": "A cat."}]}``, one per line or a JSON array; InternVL's image sizes (``width`` and
    ``height``, or ``width_list`` and ``height_list`` for several images) are ignored: the images' own sizes are
    read. A user turn's text is read as Qwen's finetune reads it (:attr:`Placeholders.STRIP`):
    ``"<image>\\nWhat is it?"`` is the image, then ``"What is it?"``. Otherwise as :class:`ShareGPT`.
    """

    name = "llava"
    also_reads = frozenset({"qwen", "sharegpt"})  # text-only conversations: no image key says which
    image_key = "image"
    video_key = "video"
    known = frozenset(
        {"id", "image", "video", "conversations", "messages", "system", "meta", "width", "height", "width_list",
         "height_list"}
    )  # fmt: skip
    placeholders = Placeholders.STRIP


def record_images(data: dict[str, Any], key: str, line: int) -> list[Any]:
    """The record's images under ``key`` (a path, ``{"path"}``, ``{"bytes"}``, or a list of them), in order."""
    images = data.get(key) or []
    images = [images] if isinstance(images, str | dict) else images
    if not isinstance(images, list) or not all(isinstance(i, str | dict) for i in images):
        raise RecordError(f"{key!r} must be a list of image paths", "invalid_record", line)
    # ms-swift's {"path": ...}; {"bytes": "<base64>"} is read by the schema
    return [i["path"] if isinstance(i, dict) and not i.get("bytes") and i.get("path") else i for i in images]


def record_videos(data: dict[str, Any], key: str, line: int) -> list[str | list[str]]:
    """The record's videos under ``key`` (a path, or a list of them), in order; a video given as its frames is a
    list of image paths (``{"path": ...}`` entries read as their path)."""
    videos = data.get(key) or []
    videos = [videos] if isinstance(videos, str) else videos
    out: list[str | list[str]] = []
    for video in videos if isinstance(videos, list) else [None]:
        if isinstance(video, list):
            frames = [f["path"] if isinstance(f, dict) and isinstance(f.get("path"), str) else f for f in video]
            if all(isinstance(f, str) for f in frames):
                out.append(frames)
                continue
        elif isinstance(video, str):
            out.append(video)
            continue
        raise RecordError(
            f"{key!r} must be a list of videos, each a path or a list of frame image paths", "invalid_record", line
        )
    return out


class Trl(JsonInput):
    """TRL's prompt-completion form, as its vision SFT data sets hold it (``trl-lib/llava-instruct-mix``).

    ``{"images": ["a.jpg"], "prompt": [{"role": "user", "content": "What is it?"}], "completion": [{"role":
    "assistant", "content": "A cat."}]}`` (``image`` for one image). As lists of messages (the conversational
    form) images are ``{"type": "image"}`` parts, or go before the first user text, and ``<image>`` is text, as in
    TRL; as strings (ms-swift reads ``prompt`` and ``completion`` as its query and response) the prompt is one user
    turn where ``<image>`` is a placeholder. Only the completion is trained, as TRL does: the prompt's assistant
    turns are context. A prompt without a completion is ``no_answer``; a boolean ``label`` (TRL's unpaired
    preference form, for KTO) is ``preference_pair``.
    """

    name = "trl"
    known = frozenset({"prompt", "completion", "images", "image", "id", "meta"})

    def convert(self, data: dict[str, Any], line: int) -> Record:
        if isinstance(data.get("label"), bool):
            raise RecordError(
                "an unpaired preference record ('label', TRL's KTO form): shardkit builds supervised samples only",
                "preference_pair",
                line,
            )
        images = record_images(data, "images" if "images" in data else "image", line)
        meta = self.extra_meta(data, self.known, line)
        turns = prompt_completion_turns(data.get("prompt"), data.get("completion"), line)
        rule = Placeholders.TEXT if isinstance(data.get("prompt"), list) else Placeholders.KEEP
        return self.finish(to_messages(turns, images, line, placeholders=rule), data, meta, line)


class Swift(JsonInput):
    """ms-swift's query-response form: ``{"system": ..., "query": "<image>What is it?", "response": "A cat.",
    "history": [["query 1", "response 1"]], "images": ["a.jpg"]}``; ``<image>`` placeholders and grounding
    ``"objects"`` as in ``sharegpt``. A query without a response is ``no_answer``."""

    name = "swift"
    known = frozenset({"query", "response", "history", "system", "images", "id", "meta", "objects"})

    def convert(self, data: dict[str, Any], line: int) -> Record:
        images = record_images(data, "images", line)
        meta = self.extra_meta(data, self.known, line)
        turns = query_response_turns(data.get("query"), data.get("response"), data.get("history"), line)
        return self.finish(to_messages(turns, images, line, system=data.get("system")), data, meta, line)


class LlamaFactoryV1(JsonInput):
    """LLaMA-Factory's v1 form (``data/v1_sft_demo.jsonl``, ``data/v1_multimodal_demo.jsonl``): ``{"messages":
    [{"role": "user", "content": [{"type": "image_url", "value": "a.jpg"}, {"type": "text", "value": "Who?"}],
    "loss_weight": 0.0}, {"role": "assistant", "content": [{"type": "text", "value": "..."}], "loss_weight":
    1.0}]}``. Images are where their parts are; see :func:`~shardkit.inputs.chat.lf_v1_messages` for the weights.
    """

    name = "llamafactory_v1"
    known = frozenset({"messages", "id", "meta"})

    def convert(self, data: dict[str, Any], line: int) -> Record:
        meta = self.extra_meta(data, self.known, line)
        return self.finish(lf_v1_messages(data.get("messages"), line), data, meta, line)


class JsonAuto(JsonInput):
    """Each record in the form its keys name (:func:`form_of`); a ``messages`` record with ``<image>``, ``<video>``
    or ``<audio>`` in a string content, no content given as a list of parts and no other sign of a form is read as
    ``sharegpt`` (the placeholder form)."""

    name = "json"

    @functools.cached_property
    def forms(self) -> dict[str, JsonInput]:
        return {form.name: form(self.location, **self.options) for form in JSON_FORMS}

    def record(self, item: RawItem) -> Record:
        data = parse_record(item)
        found = form_of(data)
        if found == "qwen" and _has_placeholder(data):
            found = "sharegpt"
        form = self.forms[found]
        refuse_unsupported(data, item.number, video=form.takes_video)
        return form.convert(data, item.number)


JSON_FORMS: tuple[type[JsonInput], ...] = (QwenJsonl, ShareGPT, Llava, Trl, Swift, LlamaFactoryV1)
