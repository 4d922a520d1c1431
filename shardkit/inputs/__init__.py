"""Input forms, each read into the same validated records.

JSON files (:mod:`shardkit.inputs.jsonl`): ``qwen`` (the Qwen2-VL conversation
JSONL), ``sharegpt`` (LLaMA-Factory's ``<image>`` placeholders and ``images``
list), ``llava`` (LLaVA / InternVL's ``image`` and ``conversations``), and
``json``: each record in the form its keys name. Other inputs: ``folder`` (an
image folder with ``labels.json``) and ``hf`` (local Hugging Face Parquet /
Arrow files). :func:`open_input` picks the form from the location.
"""

from __future__ import annotations

from typing import Any

from shardkit.errors import ConfigError, InputError
from shardkit.inputs.base import InputFormat, RawItem
from shardkit.inputs.folder import LABELS, ImageFolder
from shardkit.inputs.hf import HFDataset
from shardkit.inputs.jsonl import JSON_FORMS, JsonAuto
from shardkit.storage import open_fs

FORMATS: dict[str, type[InputFormat]] = {f.name: f for f in (JsonAuto, *JSON_FORMS, ImageFolder, HFDataset)}


def detect(location: str) -> str:
    """The input form of ``location``: by its files for folders and Parquet/Arrow; ``json`` (each record in its own
    form) for a JSON file."""
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
    return JsonAuto.name


def open_input(location: str, form: str = "auto", **options: Any) -> InputFormat:
    """The input at ``location`` read as ``form`` (``auto``: detected)."""
    name = detect(location) if form == "auto" else form
    if name not in FORMATS:
        raise ConfigError(f"unknown input format {form!r}; choose auto or one of {', '.join(FORMATS)}")
    return FORMATS[name](location, **{k: v for k, v in options.items() if v is not None})


__all__ = ["FORMATS", "InputFormat", "RawItem", "detect", "open_input"]
