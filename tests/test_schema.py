import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from shardkit.json_schema import json_schemas
from shardkit.schema import ImagePart, Record, TextPart, format_validation_error

SCHEMAS = Path(__file__).parents[1] / "schemas"


def test_exported_json_schemas_are_in_sync():
    for name, schema in json_schemas().items():
        on_disk = json.loads((SCHEMAS / name).read_text())
        assert on_disk == schema, f"schemas/{name} is stale: run python -m shardkit.json_schema schemas"


def test_string_and_list_content_are_the_same():
    a = Record.model_validate({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    b = Record.model_validate(
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "yo"}]},
            ]
        }
    )
    assert a == b
    assert a.messages[0].content == [TextPart(type="text", text="hi")]


def test_images_in_order_and_meta_kept():
    record = Record.model_validate(
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": "a.jpg"},
                        {"type": "text", "text": "x"},
                        {"type": "image", "image": "b.jpg"},
                    ],
                },
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": [{"type": "image", "image": "c.jpg"}]},
                {"role": "assistant", "content": "ok"},
            ],
            "meta": {"diagnosis": "x", "nested": {"a": [1, 2]}},
        }
    )
    assert [p.image for p in record.images()] == ["a.jpg", "b.jpg", "c.jpg"]
    assert all(isinstance(p, ImagePart) for p in record.images())
    assert record.meta == {"diagnosis": "x", "nested": {"a": [1, 2]}}


@pytest.mark.parametrize(
    "data, message",
    [
        ({"meta": {}}, "messages: missing (required)"),
        ({"messages": []}, "messages: List should have at least 1 item"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role: unknown role 'bot'"),
        (
            {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}]},
            "messages[0].content[0]: unsupported content type 'audio' (expected 'image', 'video' or 'text')",
        ),
        (
            {"messages": [{"role": "user", "content": [{"text": "x"}]}]},
            "messages[0].content[0]: content part has no 'type'",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "txt": "x"}]}]},
            "messages[0].content[0].txt: unknown field",
        ),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content: must be a string or a list of parts"),
        ({"messages": [{"role": "user", "content": "x"}]}, "the last message is a user turn that no answer follows"),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "system", "content": "y"},
                    {"role": "assistant", "content": "z"},
                ]
            },
            "a system message may only come first",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "content": [{"type": "image", "image": "a.jpg"}]},
                ]
            },
            "images belong in user messages",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "mesages": []},
            "mesages: unknown field",
        ),
        ([1, 2], "a record must be a JSON object"),
    ],
)
def test_invalid_records_get_a_plain_reason(data, message):
    with pytest.raises(ValidationError) as info:
        Record.model_validate_json(json.dumps(data))
    assert message in format_validation_error(info.value)
