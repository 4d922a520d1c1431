import pytest

from shardkit.errors import InputError, RecordError
from shardkit.read import RawLine, iter_raw_lines, parse_record, summarize_input


def test_blank_lines_are_skipped_and_numbers_are_physical(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n   \n{"b": 2}\r\n{"c": 3}')
    lines = list(iter_raw_lines(path))
    assert [(r.line, r.data.strip()) for r in lines] == [(1, b'{"a": 1}'), (4, b'{"b": 2}'), (5, b'{"c": 3}')]
    assert summarize_input(path).records == 3


def test_summary_hash_changes_with_content(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"a": 1}\n')
    first = summarize_input(path).sha256
    path.write_text('{"a": 2}\n')
    assert summarize_input(path).sha256 != first


def test_invalid_utf8_and_json_are_record_errors():
    with pytest.raises(RecordError) as info:
        parse_record(RawLine(3, b'{"messages": "caf\xe9"}\n'))
    assert (info.value.code, info.value.line) == ("invalid_utf8", 3)
    assert "byte 0xe9 at column 18" in info.value.reason
    with pytest.raises(RecordError) as info:
        parse_record(RawLine(9, b'{"messages": [\n'))
    assert (info.value.code, info.value.line) == ("invalid_json", 9)
    assert info.value.reason.startswith("invalid JSON: EOF while parsing a list at column")


def test_missing_or_folder_input_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="input not found"):
        list(iter_raw_lines(tmp_path / "nope.jsonl"))
    with pytest.raises(InputError, match="is a folder"):
        summarize_input(tmp_path)
