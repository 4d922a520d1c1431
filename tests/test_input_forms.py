"""Every input form on files written in its own conventions (JSON as LLaVA / LLaMA-Factory / ms-swift ship it,
Parquet written by ``datasets`` in the current and the older layout, Pillow images): each good record builds
token for token as the published chat template renders the same conversation, with the right images in order;
what shardkit cannot train is refused with its own reject code."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shardkit.build import build
from shardkit.cli import main
from shardkit.config import BuildConfig
from shardkit.errors import InputError
from shardkit.inputs import detect, open_input
from shardkit.shards.reading import iter_build_samples
from shardkit.stats import build_stats, format_stats
from shardkit.validate import validate
from tests.conftest import FIXTURES, write_image, write_jsonl

SIZES = [(56, 84), (84, 56), (70, 70)]  # (width, height) of the images of the legacy fixtures


def template_tokens(tokenizer, template, messages, sample) -> list[int]:
    """The chat template's tokens for ``messages``, each image pad expanded to the sample's image token count."""
    reference = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=False)
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    counts = iter(image["num_tokens"] for image in sample.info["images"])
    return [t for token in reference for t in ([pad] * next(counts) if token == pad else [token])]


def built(config: BuildConfig) -> dict[int, object]:
    build(config, progress=False)
    return {s.info["line"]: s for s in iter_build_samples(config.out)}


def rejects(folder) -> dict[int, dict]:
    return {r["line"]: r for r in map(json.loads, (Path(folder) / "rejects.jsonl").read_text().splitlines())}


def sizes(sample) -> list[tuple[int, int]]:
    return [(i["original_width"], i["original_height"]) for i in sample.info["images"]]


IMAGE = {"type": "image"}


def text(value: str) -> dict:
    return {"type": "text", "text": value}


# -- LLaVA / InternVL / Qwen2-VL-Finetune ------------------------------------------------------

LLAVA = [
    {
        "id": "000000033471",
        "image": "coco/000000033471.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
            {"from": "gpt", "value": "The bus in the image is white and red."},
            {"from": "human", "value": "What feature can be seen on the back of the bus?"},
            {"from": "gpt", "value": "The back of the bus features an advertisement."},
        ],
    },
    {  # InternVL: a list of images, with the first image's width and height (ignored)
        "id": 7,
        "image": ["coco/a.jpg", "coco/b.jpg"],
        "width": 84,
        "height": 56,
        "conversations": [
            {"from": "human", "value": "<image>\n<image>\nWhich is wider?"},
            {"from": "gpt", "value": "The second."},
        ],
    },
    {  # text only, with a system turn
        "id": "text-1",
        "conversations": [
            {"from": "system", "value": "Answer briefly."},
            {"from": "human", "value": "Hi?"},
            {"from": "gpt", "value": "Hello."},
        ],
    },
    {"id": "bad-count", "image": "coco/a.jpg", "conversations": [{"from": "human", "value": "<image>\n<image>"}]},
    {
        "id": "extra",
        "image": "coco/a.jpg",
        "source": "coco",
        "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}],
    },
]
LLAVA_EXPECTED = {
    1: [
        {"role": "user", "content": [IMAGE, text("\nWhat are the colors of the bus in the image?")]},
        {"role": "assistant", "content": "The bus in the image is white and red."},
        {"role": "user", "content": "What feature can be seen on the back of the bus?"},
        {"role": "assistant", "content": "The back of the bus features an advertisement."},
    ],
    2: [
        {"role": "user", "content": [IMAGE, text("\n"), IMAGE, text("\nWhich is wider?")]},
        {"role": "assistant", "content": "The second."},
    ],
    3: [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
    ],
}


@pytest.fixture
def llava_images(tmp_path):
    write_image(tmp_path / "coco" / "000000033471.jpg", *SIZES[2])
    write_image(tmp_path / "coco" / "a.jpg", *SIZES[0])
    write_image(tmp_path / "coco" / "b.jpg", *SIZES[1])
    return tmp_path


@pytest.mark.parametrize("array", [True, False])
def test_llava_records_build_as_the_chat_template_renders_them(
    llava_images, tokenizer, qwen2_vl_template, array, capsys
):
    root = llava_images
    if array:  # as LLaVA ships llava_instruct_150k.json
        path = root / "llava_instruct.json"
        path.write_text(json.dumps(LLAVA, indent=2))
    else:
        path = write_jsonl(root / "llava_instruct.jsonl", LLAVA)
    assert detect(str(path)) == "llava"
    samples = built(BuildConfig.create(input=str(path), out=str(root / "out")))
    assert sorted(samples) == [1, 2, 3]
    for number, messages in LLAVA_EXPECTED.items():
        sample = samples[number]
        assert sample.input_ids.tolist() == template_tokens(tokenizer, qwen2_vl_template, messages, sample)
    assert sizes(samples[1]) == [SIZES[2]] and sizes(samples[2]) == [SIZES[0], SIZES[1]]
    found = rejects(root / "out")
    assert found[4]["code"] == "invalid_record" and "2 <image> placeholders but 1 images" in found[4]["reason"]
    assert found[5]["code"] == "unknown_key" and "'source'" in found[5]["reason"]
    if array:  # records of a JSON array are numbered, with the line each starts on
        starts = [n for n, line in enumerate(path.read_text().splitlines(), start=1) if line == "  {"]
        assert [found[4]["source_line"], found[5]["source_line"]] == starts[3:5]
        assert main(["validate", str(path)]) == 1
        out = capsys.readouterr().out
        assert f"record 4 (line {starts[3]}): 2 <image> placeholders but 1 images" in out
        assert f"record 5 (line {starts[4]}): unknown top-level key 'source'" in out

    as_sharegpt = validate(str(path), input_format="sharegpt").problems[0]
    assert as_sharegpt["reason"] == "'image' is not read in the sharegpt form: use --input-format llava"

    kept = built(BuildConfig.create(input=str(path), out=str(root / "kept"), keep_keys=("source",)))
    assert kept[5].info["meta"] == {"source": "coco"}


def test_placeholders_are_counted_one_by_one(tmp_path):
    data = write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"messages": [{"role": "user", "content": "<image>\n<image>"}, {"role": "assistant", "content": "x"}]},
            {
                "messages": [
                    {"role": "user", "content": "<image><image><image>"},
                    {"role": "assistant", "content": "x"},
                ],
                "images": ["a.jpg", "b.jpg"],
            },
        ],
    )
    reasons = [p["reason"] for p in validate(str(data), input_format="sharegpt").problems]
    assert reasons == ["2 <image> placeholders but 0 images", "3 <image> placeholders but 2 images"]


# -- LLaMA-Factory and ms-swift JSON -----------------------------------------------------------


def test_llamafactory_mllm_demo_without_placeholders(tmp_path, tokenizer, qwen2_vl_template):
    """mllm_demo.json's records name their images but have no <image>: they go before the first question."""
    write_image(tmp_path / "mllm_demo_data" / "1.jpg", *SIZES[0])
    records = [
        {
            "messages": [
                {"content": "Who are they?", "role": "user"},
                {"content": "They're Kane and Gretzka from Bayern Munich.", "role": "assistant"},
                {"content": "What are they doing?", "role": "user"},
                {"content": "They are celebrating on the soccer field.", "role": "assistant"},
            ],
            "images": ["mllm_demo_data/1.jpg"],
        }
    ]
    path = tmp_path / "mllm_demo.json"
    path.write_text(json.dumps(records, indent=2, ensure_ascii=False))
    assert detect(str(path)) == "sharegpt"
    sample = built(BuildConfig.create(input=str(path), out=str(tmp_path / "out")))[1]
    messages = [
        {"role": "user", "content": [IMAGE, text("Who are they?")]},
        *({"role": m["role"], "content": m["content"]} for m in records[0]["messages"][1:]),
    ]
    assert sample.input_ids.tolist() == template_tokens(tokenizer, qwen2_vl_template, messages, sample)
    assert sizes(sample) == [SIZES[0]]


def test_ms_swift_per_message_loss(tmp_path, tokenizer):
    write_image(tmp_path / "a.jpg", *SIZES[0])
    record = {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "<image>What is it?"},
            {"role": "assistant", "content": "A square.", "loss": True},
            {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": "Maybe.", "loss": False},
            {"role": "user", "content": "And now?"},
            {"role": "assistant", "content": "Yes."},
        ],
        "images": [{"path": "a.jpg"}],
    }
    data = write_jsonl(tmp_path / "swift.jsonl", [record])
    for train_on, trained in [
        ("last_assistant", "A square.<|im_end|>Yes.<|im_end|>"),
        ("all_assistant", "A square.<|im_end|>Yes.<|im_end|>"),
    ]:
        out = tmp_path / train_on
        sample = built(BuildConfig.create(input=str(data), out=str(out), train_on=train_on))[1]
        assert tokenizer.decode(sample.input_ids[sample.weights > 0].tolist()) == trained


# -- refusals --------------------------------------------------------------------------------

TURNS = [{"role": "user", "content": "<image>Why?"}, {"role": "assistant", "content": "Because."}]
REFUSED = [
    # LLaMA-Factory's mllm_video_demo.json and mllm_audio_demo.json
    ({"messages": [{"content": "<video>Why is this video funny?", "role": "user"},
                   {"content": "Because a baby is reading.", "role": "assistant"}],
      "videos": ["mllm_demo_data/1.mp4"]}, "video_not_supported"),
    ({"messages": [{"content": "<audio>What's that sound?", "role": "user"},
                   {"content": "Glass shattering.", "role": "assistant"}],
      "audios": ["mllm_demo_data/1.mp3"]}, "audio_not_supported"),
    # a leftover placeholder without its list, a singular key
    ({"messages": [{"role": "user", "content": "<video>Why?"}, {"role": "assistant", "content": "x"}]},
     "video_not_supported"),
    ({"messages": [{"role": "user", "content": "<audio>Why?"}, {"role": "assistant", "content": "x"}]},
     "audio_not_supported"),
    ({"messages": TURNS, "images": ["a.jpg"], "video": "clip.mp4"}, "video_not_supported"),
    ({"messages": TURNS, "images": ["a.jpg"], "audio": "clip.wav"}, "audio_not_supported"),
    # ms-swift's DPO record, TRL's and LLaMA-Factory's preference pairs
    ({"messages": TURNS, "images": ["a.jpg"], "rejected_response": "I don't know."}, "preference_pair"),
    ({"messages": TURNS, "images": ["a.jpg"], "chosen": {"role": "assistant", "content": "a"},
      "rejected": {"role": "assistant", "content": "b"}}, "preference_pair"),
    # a key that holds data shardkit would drop
    ({"messages": TURNS, "images": ["a.jpg"], "tools": '[{"name": "search"}]'}, "unknown_key"),
]  # fmt: skip
QWEN_REFUSED = [
    ([{"type": "video", "video": "clip.mp4"}, text("What happens?")], "video_not_supported"),
    ([{"type": "video_url", "video_url": {"url": "clip.mp4"}}], "video_not_supported"),
    ([{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}], "audio_not_supported"),
    ([{"type": "audio", "audio": "a.wav"}], "audio_not_supported"),
]


def test_video_audio_preference_and_unknown_keys_are_refused(tmp_path):
    write_image(tmp_path / "a.jpg", *SIZES[0])
    good = {"messages": TURNS, "images": ["a.jpg"], "id": 3, "meta": {"split": "train"}}
    sharegpt = write_jsonl(tmp_path / "sharegpt.jsonl", [good] + [record for record, _ in REFUSED])
    qwen = write_jsonl(
        tmp_path / "qwen.jsonl",
        [
            {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "x"}]}
            for content, _ in QWEN_REFUSED
        ]
        + [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}], "videos": ["v"]}],
    )
    cases = [
        (sharegpt, [code for _, code in REFUSED], 1),
        (qwen, [c for _, c in QWEN_REFUSED] + ["video_not_supported"], 0),
    ]
    for path, codes, good_records in cases:
        expected = {i + 1 + good_records: code for i, code in enumerate(codes)}
        report = validate(str(path))
        assert {p["line"]: p["code"] for p in report.problems} == expected
        manifest = build(BuildConfig.create(input=str(path), out=str(tmp_path / path.stem)), progress=False)
        assert {line: r["code"] for line, r in rejects(tmp_path / path.stem).items()} == expected
        assert manifest.num_samples == good_records
    reasons = [p["reason"] for p in validate(str(sharegpt)).problems]
    assert "shardkit builds image-text samples only" in reasons[0] and "'videos'" in reasons[0]
    assert "preference pair ('rejected_response')" in reasons[6]
    assert "unknown top-level key 'tools'" in reasons[8] and "--keep-keys tools" in reasons[8]


# -- OpenAI-style image_url parts ------------------------------------------------------------


def test_openai_image_url_parts(tmp_path, tokenizer, qwen2_vl_template):
    import base64

    jpeg = write_image(tmp_path / "images" / "a.jpg", *SIZES[0]).read_bytes()
    write_image(tmp_path / "images" / "b.jpg", *SIZES[1])
    uri = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
    urls = [uri, "images/b.jpg", str(tmp_path / "images" / "a.jpg"), f"file://{tmp_path / 'images' / 'b.jpg'}"]
    records = [
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, text("What is it?")]},
                {"role": "assistant", "content": "A picture."},
            ]
        }
        for url in urls
    ]
    remote = {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.jpg"}}
    records.append(
        {"messages": [{"role": "user", "content": [remote]}, {"role": "assistant", "content": "A picture."}]}
    )
    data = write_jsonl(tmp_path / "openai.jsonl", records)
    assert detect(str(data)) == "qwen"
    samples = built(BuildConfig.create(input=str(data), out=str(tmp_path / "out")))
    assert [sizes(samples[n]) for n in (1, 2, 3, 4)] == [[SIZES[0]], [SIZES[1]], [SIZES[0]], [SIZES[1]]]
    messages = [
        {"role": "user", "content": [IMAGE, text("What is it?")]},
        {"role": "assistant", "content": "A picture."},
    ]
    for sample in samples.values():
        assert sample.input_ids.tolist() == template_tokens(tokenizer, qwen2_vl_template, messages, sample)
    assert rejects(tmp_path / "out")[5]["code"] == "image_remote"  # fetched only with --allow-remote


# -- Hugging Face Parquet: conversations, the_cauldron, VQA ----------------------------------

CHAT_EXPECTED = {
    1: [{"role": "user", "content": [IMAGE, text("Who are they?")]}, {"role": "assistant", "content": "Two players."}],
    2: [
        {"role": "user", "content": [text("Compare "), IMAGE, text(" and "), IMAGE]},
        {"role": "assistant", "content": "The second is wider."},
    ],
}


def current_layout(tmp_path: Path, kind: str) -> Path:
    """The legacy fixture's rows written again by the current ``datasets`` (``List`` features)."""
    import datasets
    import pyarrow.parquet as pq

    table = pq.read_table(FIXTURES / f"hf_legacy_{kind}.parquet")
    features = datasets.Features.from_dict(json.loads(table.schema.metadata[b"huggingface"])["info"]["features"])
    path = tmp_path / f"current_{kind}.parquet"
    datasets.Dataset.from_list(table.to_pylist(), features=features).to_parquet(str(path))
    return path


@pytest.mark.parametrize("kind", ["parts", "placeholders"])
@pytest.mark.parametrize("layout", ["current", "legacy"])
def test_hf_conversations_in_both_datasets_layouts(tmp_path, tokenizer, qwen2_vl_template, kind, layout):
    import pyarrow.parquet as pq

    path = current_layout(tmp_path, kind) if layout == "current" else FIXTURES / f"hf_legacy_{kind}.parquet"
    features = json.loads(pq.read_schema(path).metadata[b"huggingface"])["info"]["features"]
    assert features["images"]["_type"] == ("List" if layout == "current" else "Sequence")
    assert detect(str(path)) == "hf"
    samples = built(BuildConfig.create(input=str(path), out=str(tmp_path / "out")))
    assert sorted(samples) == [1, 2]
    for number, messages in CHAT_EXPECTED.items():
        sample = samples[number]
        assert sample.input_ids.tolist() == template_tokens(tokenizer, qwen2_vl_template, messages, sample)
    assert sizes(samples[1]) == [SIZES[0]] and sizes(samples[2]) == [SIZES[1], SIZES[2]]


def test_hf_the_cauldron_texts(tmp_path, tokenizer, qwen2_vl_template):
    import datasets
    from PIL import Image

    images = [[Image.new("RGB", SIZES[0], "red")], [Image.new("RGB", SIZES[1], "blue"), Image.new("RGB", SIZES[2])]]
    texts = [
        [
            {"user": "Colour?", "assistant": "Red.", "source": "x"},
            {"user": "Sure?", "assistant": "Yes.", "source": "x"},
        ],
        [{"user": "Which is blue?", "assistant": "The first.", "source": "y"}],
    ]
    path = tmp_path / "cauldron.parquet"
    datasets.Dataset.from_dict({"images": images, "texts": texts}).to_parquet(str(path))
    samples = built(BuildConfig.create(input=str(path), out=str(tmp_path / "out")))
    expected = {
        1: [
            {"role": "user", "content": [IMAGE, text("Colour?")]},
            {"role": "assistant", "content": "Red."},
            {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": "Yes."},
        ],
        2: [
            {"role": "user", "content": [IMAGE, IMAGE, text("Which is blue?")]},
            {"role": "assistant", "content": "The first."},
        ],
    }
    for number, messages in expected.items():
        assert samples[number].input_ids.tolist() == template_tokens(
            tokenizer, qwen2_vl_template, messages, samples[number]
        )
    assert sizes(samples[2]) == [SIZES[1], SIZES[2]]


@pytest.mark.parametrize("layout", ["current", "legacy"])
def test_hf_vqa_question_and_list_answers(tmp_path, tokenizer, qwen2_vl_template, layout):
    path = current_layout(tmp_path, "vqa") if layout == "current" else FIXTURES / "hf_legacy_vqa.parquet"
    samples = built(BuildConfig.create(input=str(path), out=str(tmp_path / "out")))
    assert sorted(samples) == [1, 2]
    for number, (question, answer) in {1: ("What colour is it?", "green"), 2: ("Is it wide?", "yes")}.items():
        messages = [{"role": "user", "content": [IMAGE, text(question)]}, {"role": "assistant", "content": answer}]
        assert samples[number].input_ids.tolist() == template_tokens(
            tokenizer, qwen2_vl_template, messages, samples[number]
        )
    assert rejects(tmp_path / "out")[3]["code"] == "invalid_record"  # an empty list of answers


def test_hf_question_column_option(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jpeg = write_image(tmp_path / "x.jpg", *SIZES[0]).read_bytes()
    table = pa.table(
        {"picture": [jpeg, jpeg], "ask": ["Colour?", "Shape?"], "reply": [["red", "pink", "red"], ["round"]]}
    )
    pq.write_table(table, tmp_path / "vqa.parquet")
    vqa_v2 = pa.table({"image": [jpeg], "question": ["Colour?"], "answers": [[{"answer": "red", "confidence": "yes"}]]})
    pq.write_table(vqa_v2, tmp_path / "vqa_v2.parquet")
    config = BuildConfig.create(
        input=str(tmp_path / "vqa.parquet"),
        out=str(tmp_path / "out"),
        image_column="picture",
        question_column="ask",
        text_column="reply",
    )
    samples = built(config)
    assert [m["content"][-1]["text"] for m in samples[1].info["messages"]] == ["Colour?", "red"]  # the most frequent
    assert [m["content"][-1]["text"] for m in samples[2].info["messages"]] == ["Shape?", "round"]
    report = validate(str(tmp_path / "vqa_v2.parquet"))
    assert "'answers' holds a list that is not of strings" in report.problems[0]["reason"]
    assert main(["validate", str(tmp_path / "vqa.parquet"), "--question-column", "nope"]) == 2


def test_an_hf_image_cell_that_is_a_list_is_named_as_such(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = {"bytes": write_image(tmp_path / "x.jpg", *SIZES[0]).read_bytes(), "path": "x.jpg"}
    chat = [{"role": "user", "content": "<image>Who?"}, {"role": "assistant", "content": "Two."}]
    pq.write_table(pa.table({"messages": [chat], "images": [[[image]]]}), tmp_path / "chat.parquet")
    pq.write_table(pa.table({"image": [[image]], "label": ["cat"]}), tmp_path / "labels.parquet")
    for name, where in (("chat", "image 1 of the column 'images'"), ("labels", "the column 'image'")):
        problems = validate(str(tmp_path / f"{name}.parquet")).problems
        assert [(p["code"], p["reason"]) for p in problems] == [
            ("invalid_record", f"{where} holds a list of 1 item, not an image (bytes, a path, or {{bytes, path}})")
        ]


def test_a_json_file_as_hf_input_is_one_clear_error(tmp_path):
    data = write_jsonl(tmp_path / "data.json", [{"a": 1}])
    with pytest.raises(InputError, match="is not a Parquet or Arrow file"):
        list(open_input(str(data), "hf").items())
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="cannot be read as parquet"):
        open_input(str(tmp_path / "broken.parquet")).count()


# -- output a user can act on ----------------------------------------------------------------


@pytest.mark.slow
def test_piping_to_head_shows_no_broken_pipe(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text("{not json}\n" * 5000)
    command = f"{sys.executable} -m shardkit.cli validate {data} | head -n 2"
    result = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=300, check=False)
    assert result.stdout.splitlines()[0].startswith("line 1: invalid JSON")
    assert "BrokenPipe" not in result.stderr and "Traceback" not in result.stderr


def test_stats_prints_the_meta_table_only_for_keys_that_exist(tmp_path):
    write_image(tmp_path / "a.jpg", *SIZES[0])
    records = [
        {"messages": TURNS, "images": ["a.jpg"], "meta": {"species": "cat"}},
        {"messages": TURNS, "images": ["a.jpg"], "meta": {"species": "dog"}},
    ]
    data = write_jsonl(tmp_path / "in.jsonl", records)
    build(BuildConfig.create(input=str(data), out=str(tmp_path / "out")), progress=False)
    assert "diagnosis" not in format_stats(build_stats(str(tmp_path / "out")))
    report = format_stats(build_stats(str(tmp_path / "out"), meta_key="species"))
    assert "Unique species values: 2" in report and "- cat: 1" in report


def test_an_image_problem_in_a_json_array_names_the_record_and_its_line(tmp_path, capsys):
    write_image(tmp_path / "a.jpg", 64, 48)
    turns = [{"role": "user", "content": "<image>What is it?"}, {"role": "assistant", "content": "A square."}]
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"messages": turns, "images": [name]} for name in ("a.jpg", "missing.jpg")], indent=2))
    second = [n for n, line in enumerate(path.read_text().splitlines(), start=1) if line == "  {"][1]
    assert main(["validate", str(path)]) == 1
    assert f"record 2 (line {second}): image not found: missing.jpg [image_missing]" in capsys.readouterr().out
    build(BuildConfig.create(input=str(path), out=str(tmp_path / "out")), progress=False)
    (reject,) = rejects(tmp_path / "out").values()
    assert (reject["line"], reject["source_line"], reject["code"]) == (2, second, "image_missing")
