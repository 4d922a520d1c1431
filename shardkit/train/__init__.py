"""Trainers fed by the streaming loaders: local torch (``local``) and Tinker (``tinker``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, field_validator

from shardkit.config import Options


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop the lines of ``metrics.jsonl`` after ``step``: a run resumed from that step writes them again."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


class DataOptions(Options):
    """What both trainers read: one build, several with ``weights`` or a ``mix`` file; an evaluation build."""

    data: list[str] = []
    weights: list[float] | None = None
    mix: str | None = None
    epoch_size: int | None = Field(None, ge=1)
    eval_data: str | None = None
    eval_every: int | None = Field(None, ge=1)

    @field_validator("data", mode="before")
    @classmethod
    def _one_or_more(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    def open_stream(self, **options: Any) -> Any:
        """The training stream (:func:`shardkit.load.mix.open_stream`) with these builds and ``options``."""
        from shardkit.load.mix import open_stream

        return open_stream(self.data, weights=self.weights, mix_file=self.mix, epoch_size=self.epoch_size, **options)


class SourceCounter:
    """``source_samples`` of the metrics: samples of each build of a mix consumed so far, all ranks together."""

    def __init__(self, stream: Any, done: dict[str, int] | None = None):
        self.names: list[str] = list(getattr(stream.source, "locations", []))
        self.stream = stream
        self.total = np.array([(done or {}).get(n, 0) for n in self.names], dtype=np.int64)
        self._seen = self._local()

    def _local(self) -> np.ndarray:
        return np.array(getattr(self.stream, "source_counts", []), dtype=np.int64)

    def update(self, all_reduce: Any = None) -> dict[str, int] | None:
        """Add what this rank consumed since the last call (summed over ranks by ``all_reduce``); the totals."""
        if not self.names:
            return None
        now = self._local()
        delta, self._seen = now - self._seen, now
        self.total += delta if all_reduce is None else all_reduce(delta)
        return dict(zip(self.names, self.total.tolist(), strict=True))
