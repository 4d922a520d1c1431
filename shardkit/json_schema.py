"""The JSON Schemas of shardkit's files, kept in ``schemas/``: the input record (:class:`shardkit.schema.Record`) and
the build manifest (:class:`shardkit.shards.Manifest`).

    python -m shardkit.json_schema [FOLDER]     writes them into FOLDER (default: schemas), created when missing
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from shardkit.schema import Record
from shardkit.shards.manifest import Manifest


def json_schemas() -> dict[str, dict[str, Any]]:
    """Each schema file's name and its schema."""
    return {
        "record.schema.json": Record.model_json_schema(),
        "manifest.schema.json": Manifest.model_json_schema(),
    }


def write_json_schemas(folder: str) -> list[str]:
    """Write :func:`json_schemas` into ``folder``, created when missing; the paths written."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in json_schemas().items():
        path = Path(folder) / name
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        written.append(str(path))
    return written


if __name__ == "__main__":
    if len(sys.argv) > 2 or sys.argv[1:2] in (["-h"], ["--help"]):
        sys.exit("usage: python -m shardkit.json_schema [FOLDER]  (writes the JSON Schemas there; default: schemas)")
    try:
        print("\n".join(write_json_schemas(sys.argv[1] if len(sys.argv) > 1 else "schemas")))
    except OSError as exc:
        sys.exit(f"shardkit.json_schema: error: {exc.strerror or exc}: {exc.filename or ''}")
