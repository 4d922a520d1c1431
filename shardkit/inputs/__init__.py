"""Input forms, each read into the same validated records.

``qwen`` (the Qwen2-VL conversation JSONL), ``sharegpt`` (LLaMA-Factory's
``<image>`` placeholders and ``images`` list), ``llava`` (LLaVA / InternVL's
``image`` and ``conversations``), ``folder`` (an image folder with
``labels.json``) and ``hf`` (local Hugging Face Parquet / Arrow files).
:func:`open_input` picks the form from the location when it is unambiguous.
"""

from __future__ import annotations

import json
from typing import Any

from shardkit.errors import ConfigError, InputError
from shardkit.inputs.base import InputFormat, RawItem
from shardkit.inputs.folder import LABELS, ImageFolder
from shardkit.inputs.hf import HFDataset
from shardkit.inputs.jsonl import Llava, QwenJsonl, ShareGPT, is_json_array, iter_array, iter_lines
from shardkit.storage import open_fs

FORMATS: dict[str, type[InputFormat]] = {f.name: f for f in (QwenJsonl, ShareGPT, Llava, ImageFolder, HFDataset)}


def detect(location: str) -> str:
    """The input form of ``location``: by its files for folders and Parquet/Arrow, by its first record for JSON."""
    fs, path = open_fs(location)
    if fs.isdir(path):
        names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
        if LABELS in names:
            return "folder"
        if names & {"dataset_info.json", "state.json"} or any(n.endswith((".parquet", ".arrow")) for n in names):
            return "hf"
        raise InputError(f"{location} is a folder without labels.json or Parquet/Arrow files: give --input-format")
    if path.endswith((".parquet", ".arrow")) or any(c in path for c in "*?["):
        return "hf"
    if path.rsplit("/", 1)[-1] == LABELS:
        return "folder"
    if not fs.exists(path):
        raise InputError(f"input not found: {location}")
    if is_json_array(location):
        first = next(iter_array(location), None)
        return "llava" if first is not None and _is_llava(first.data) else "sharegpt"
    first = next(iter_lines(location), None)
    try:
        record = json.loads(first.data) if first else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "qwen"  # the bad line is reported where it is
    if _is_llava(record):
        return "llava"
    if isinstance(record, dict) and ("images" in record or "conversations" in record or _has_placeholder(record)):
        return "sharegpt"
    return "qwen"


def _is_llava(record: Any) -> bool:
    return isinstance(record, dict) and "image" in record and "images" not in record and "meta" not in record


def _has_placeholder(record: dict[str, Any]) -> bool:
    messages = record.get("messages")
    return isinstance(messages, list) and any(
        isinstance(m, dict) and isinstance(m.get("content"), str) and "<image>" in m["content"] for m in messages
    )


def open_input(location: str, form: str = "auto", **options: Any) -> InputFormat:
    """The input at ``location`` read as ``form`` (``auto``: detected)."""
    name = detect(location) if form == "auto" else form
    if name not in FORMATS:
        raise ConfigError(f"unknown input format {form!r}; choose auto or one of {', '.join(FORMATS)}")
    return FORMATS[name](location, **{k: v for k, v in options.items() if v is not None})


__all__ = ["FORMATS", "InputFormat", "RawItem", "detect", "open_input"]
