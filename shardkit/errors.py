"""One hierarchy of errors.

Every error is a :class:`ShardkitError` and also the builtin a caller would
catch without knowing shardkit (``ValueError`` for bad data or options,
``OSError`` for files). All of them pickle, so they cross process boundaries
(DataLoader workers, build workers) intact.
"""

from __future__ import annotations

from typing import Any


class ShardkitError(Exception):
    """Base class of every error shardkit raises on purpose."""


class ConfigError(ShardkitError, ValueError):
    """An option or configuration value is invalid."""


class InputError(ShardkitError, OSError):
    """The input as a whole cannot be read (missing file, unreadable folder)."""


class OutputError(ShardkitError, OSError):
    """The output location cannot be used (not a shardkit build, changed config)."""


class ShardError(ShardkitError, OSError):
    """A file of a build (shard, index, manifest) is missing, unreadable, truncated or does not match its manifest.

    ``kind`` says which, for counting: ``missing``, ``access``, ``network`` or ``corrupt``.
    """

    kind = "corrupt"


class ShardMissingError(ShardError, FileNotFoundError):
    """A file of a build is not there."""

    kind = "missing"


class ShardAccessError(ShardError, PermissionError):
    """A file of a build may not be read: no permission, or no usable object-store credentials."""

    kind = "access"


class ShardNetworkError(ShardError, ConnectionError):
    """A file of a build could not be read because the network or the object store failed (worth a retry)."""

    kind = "network"


class ShardCorruptError(ShardError):
    """A shard's bytes do not match their checksum, or cannot be decoded: the data itself is damaged."""


class WorkerError(ShardkitError, RuntimeError):
    """A worker process died (killed, or out of memory) before its task finished; a rerun resumes."""


class RecordError(ShardkitError, ValueError):
    """One input record is rejected; the rest of the build goes on.

    ``code`` is a short stable category (``invalid_json``, ``image_missing``,
    ...), ``reason`` the plain sentence shown to users, ``line`` the 1-based
    source line, ``detail`` extra JSON-serialisable context (e.g. the image).
    """

    def __init__(
        self,
        reason: str,
        code: str = "invalid",
        line: int | None = None,
        detail: dict[str, Any] | None = None,
    ):
        super().__init__(reason, code, line, detail)
        self.reason = reason
        self.code = code
        self.line = line
        self.detail = dict(detail or {})

    def at(self, line: int, source_line: int | None = None) -> RecordError:
        """The same error, placed at ``line`` (and, for a record of a JSON array, the ``source_line`` it starts on)."""
        detail = self.detail if source_line is None else {**self.detail, "source_line": source_line}
        return RecordError(self.reason, self.code, line, detail)

    def to_json(self) -> dict[str, Any]:
        """The ``rejects.jsonl`` row for this error."""
        return {"line": self.line, "code": self.code, "reason": self.reason, **self.detail}

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line is not None else ""
        return f"{where}{self.reason}"
