"""``shardkit validate``: read every record and open every image, report each problem.

Nothing is written. A record's problems are all reported (every bad image,
not only the first); an item that is not a valid record is one problem.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shardkit.errors import RecordError
from shardkit.images import DEFAULT_MAX_IMAGE_BYTES, ImageRoot, decode_image
from shardkit.inputs import open_input
from shardkit.render import Renderer


@dataclass
class ValidationReport:
    """Counts and problems (``RecordError.to_json()`` rows, in input order)."""

    records: int = 0
    images: int = 0
    unit: str = "line"
    problems: list[dict[str, Any]] = field(default_factory=list)

    @property
    def bad_lines(self) -> list[int]:
        return sorted({p["line"] for p in self.problems})

    @property
    def ok(self) -> bool:
        return not self.problems


def validate(
    path: str,
    *,
    input_format: str = "auto",
    image_root: str | None = None,
    max_image_pixels: int = 100_000_000,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    allow_remote: bool = False,
    on_record: Callable[[], None] | None = None,
    **input_options: Any,
) -> ValidationReport:
    """Check every record of the input at ``path`` (any input form) and every image it names."""
    source = open_input(path, input_format, **input_options)
    root = ImageRoot(image_root or source.image_root(), allow_remote=allow_remote, max_image_bytes=max_image_bytes)
    report = ValidationReport(unit=source.unit)
    for item in source.items():
        report.records += 1
        if on_record:
            on_record()
        try:
            record = source.record(item)
            Renderer.check_text(record)
        except RecordError as exc:
            report.problems.append(exc.at(item.line).to_json())
            continue
        for part in record.images():
            report.images += 1
            try:
                decode_image(root.read(part.image), part.image, max_pixels=max_image_pixels)
            except RecordError as exc:
                report.problems.append(exc.at(item.line).to_json())
    return report
