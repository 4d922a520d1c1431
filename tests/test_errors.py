import pickle

import pytest

from shardkit.errors import (
    ConfigError,
    InputError,
    OutputError,
    RecordError,
    ShardAccessError,
    ShardCorruptError,
    ShardError,
    ShardkitError,
    ShardMissingError,
    ShardNetworkError,
    WorkerError,
)


@pytest.mark.parametrize(
    "error, builtin",
    [
        (ConfigError("bad option"), ValueError),
        (InputError("no input"), OSError),
        (OutputError("bad output"), OSError),
        (ShardError("bad shard"), OSError),
        (ShardMissingError("a/shard.tar is missing"), FileNotFoundError),
        (ShardAccessError("a/shard.tar cannot be read: permission denied"), PermissionError),
        (ShardNetworkError("a/shard.tar cannot be read: network error"), ConnectionError),
        (ShardCorruptError("a/shard.tar: sample 3 does not match its checksum"), ShardError),
        (WorkerError("a worker died"), RuntimeError),
        (RecordError("bad record", "invalid_json", 7, {"image": "a.jpg"}), ValueError),
    ],
)
def test_errors_inherit_builtin_and_pickle(error, builtin):
    assert isinstance(error, ShardkitError) and isinstance(error, builtin)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error)
    if isinstance(error, ShardError):
        assert copy.kind == error.kind


def test_record_error_keeps_its_fields_across_pickle():
    error = RecordError("image not found: a.jpg", "image_missing", detail={"image": "a.jpg"}).at(12)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.reason, copy.code, copy.line, copy.detail) == (
        "image not found: a.jpg",
        "image_missing",
        12,
        {"image": "a.jpg"},
    )
    assert str(copy) == "line 12: image not found: a.jpg"
    assert copy.to_json() == {"line": 12, "code": "image_missing", "reason": "image not found: a.jpg", "image": "a.jpg"}
