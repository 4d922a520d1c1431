"""Trainers fed by the streaming loaders: local torch (``local``) and Tinker (``tinker``)."""

from __future__ import annotations

import json
from pathlib import Path


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop the lines of ``metrics.jsonl`` after ``step``: a run resumed from that step writes them again."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))
