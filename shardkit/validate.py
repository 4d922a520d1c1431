"""``shardkit validate``: the build's own conversion of every record, without writing anything.

Each record goes through :class:`shardkit.convert.Converter`, exactly as in a
build with the same options, so whatever the build would reject (a missing
image, a record too long for ``max_length``, a duplicate with ``dedup``, ...)
is reported here with the same code and reason: one problem per rejected record.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from shardkit.errors import RecordError


@dataclass
class ValidationReport:
    """Counts and problems (``RecordError.to_json()`` rows, in input order).

    ``traceback`` holds the first internal error's traceback (a bug), if any.
    """

    records: int = 0
    images: int = 0
    unit: str = "line"
    problems: list[dict[str, Any]] = field(default_factory=list)
    traceback: str | None = None

    @property
    def bad_lines(self) -> list[int]:
        return sorted({p["line"] for p in self.problems})

    @property
    def ok(self) -> bool:
        """No problem, and at least one record (an input without records builds nothing)."""
        return self.records > 0 and not self.problems


def validate(path: str, *, on_record: Callable[[], None] | None = None, **options: Any) -> ValidationReport:
    """Convert every record of the input at ``path`` as a build would; ``options`` are
    :class:`~shardkit.config.BuildConfig` fields (``input_format``, ``image_root``, ``model``, ``max_length``...)."""
    from shardkit.config import BuildConfig
    from shardkit.convert import Converter
    from shardkit.dedup import find_duplicates
    from shardkit.tokenizer import load_fast_tokenizer

    config = BuildConfig.create(input=path, out="", **{k: v for k, v in options.items() if v is not None})
    convert = Converter(config, load_fast_tokenizer(config.tokenizer_name)[0])
    report = ValidationReport(unit=convert.input.unit)
    duplicates = find_duplicates(convert.input, convert.root).duplicates if config.dedup else {}
    for item in convert.input.items():
        item = replace(item, duplicate_of=duplicates.get(item.number))
        report.records += 1
        if on_record:
            on_record()
        try:
            report.images += len(convert(item).images)
        except RecordError as exc:
            problem = exc.to_json()
            trace = problem.pop("traceback", None)
            if trace and report.traceback is None:
                report.traceback = f"{report.unit} {item.number}:\n{trace}"
            report.problems.append(problem)
    return report
