"""Every input form on files written in its own conventions (JSON as LLaVA / LLaMA-Factory / ms-swift ship it,
Parquet written by ``datasets`` in the current and the older layout, Pillow images): each good record builds
token for token as the published chat template renders the same conversation, with the right images in order;
what shardkit cannot train is refused with its own reject code."""

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from shardkit.build import build
from shardkit.cli import main
from shardkit.config import BuildConfig
from shardkit.errors import InputError
from shardkit.inputs import RawItem, detect, open_input
from shardkit.load import BuildSource
from shardkit.stats import build_stats, format_stats
from shardkit.validate import validate
from tests.helpers import FIXTURES, write_image, write_jsonl

SIZES = [(56, 84), (84, 56), (70, 70)]  # (width, height) of the images of the legacy fixtures


def template_tokens(tokenizer, template, messages, sample) -> list[int]:
    """The chat template's tokens for ``messages``, each image pad expanded to the sample's image token count."""
    reference = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=False)
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    counts = iter(image["num_tokens"] for image in sample.info["images"])
    return [t for token in reference for t in ([pad] * next(counts) if token == pad else [token])]


def samples_of(config: BuildConfig) -> dict[int, object]:
    build(config, progress=False)
    return {s.info["line"]: s for s in BuildSource(config.out).samples()}


def rejects(folder) -> dict[int, dict]:
    return {r["line"]: r for r in map(json.loads, (Path(folder) / "rejects.jsonl").read_text().splitlines())}


def sizes(sample) -> list[tuple[int, int]]:
    return [(i["original_width"], i["original_height"]) for i in sample.info["images"]]


IMAGE = {"type": "image"}


def text(value: str) -> dict:
    return {"type": "text", "text": value}


def user(content) -> dict:
    return {"role": "user", "content": content}


def assistant(content) -> dict:
    return {"role": "assistant", "content": content}


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
        {"role": "user", "content": [IMAGE, text("What are the colors of the bus in the image?")]},
        {"role": "assistant", "content": "The bus in the image is white and red."},
        {"role": "user", "content": "What feature can be seen on the back of the bus?"},
        {"role": "assistant", "content": "The back of the bus features an advertisement."},
    ],
    2: [
        {"role": "user", "content": [IMAGE, IMAGE, text("Which is wider?")]},
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
    assert detect(str(path)) == "json"
    samples = samples_of(BuildConfig.create(input=str(path), out=str(root / "out")))
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
    assert (as_sharegpt["code"], as_sharegpt["form"]) == ("other_form", "llava")
    assert as_sharegpt["reason"] == (
        "a LLaVA record ('image' and 'conversations'), which --input-format sharegpt does not read: use "
        "--input-format llava, or auto to read each record in its own form"
    )

    kept = samples_of(BuildConfig.create(input=str(path), out=str(root / "kept"), keep_keys=("source",)))
    assert kept[5].info["meta"] == {"source": "coco"}


# InternVL's chat data format doc (internvl_chat docs, get_started/chat_data_format.md, "Multi-Image Data"): its
# example record, with the images' sizes in width_list / height_list
INTERNVL_MULTI_IMAGE = {
    "id": 0,
    "image": [
        "cimages/multimages/16/5pc.png",
        "cimages/multimages/16/5pd.png",
        "cimages/multimages/16/1602207874_p5b.png",
        "cimages/multimages/16/5pe.png",
        "cimages/multimages/16/1473016381_p5a.png",
    ],
    "height_list": [23, 22, 23, 41, 52],
    "width_list": [240, 240, 240, 240, 240],
    "conversations": [
        {
            "from": "human",
            "value": "Let F = {2, 5, 7, 9}\n\nLet G = {1, 4, 6, 8}\n\nWhich of the following is true?\nA. \n<image>\n\n"
            "B. /\n<image>\n\nC. /\n<image>\n\nD. /\n<image>\n\nE. /\n<image>\n\nAnswer with the option's letter "
            "from the given choices directly.",
        },
        {"from": "gpt", "value": "A"},
    ],
}


def test_internvl_multi_image_sizes_are_ignored(tmp_path):
    expected = list(zip(INTERNVL_MULTI_IMAGE["width_list"], INTERNVL_MULTI_IMAGE["height_list"], strict=True))
    for seed, (name, (width, height)) in enumerate(zip(INTERNVL_MULTI_IMAGE["image"], expected, strict=True)):
        write_image(tmp_path / name, width, height, fmt="PNG", seed=seed)
    data = write_jsonl(tmp_path / "internvl.jsonl", [INTERNVL_MULTI_IMAGE])
    assert validate(str(data)).problems == []
    sample = samples_of(BuildConfig.create(input=str(data), out=str(tmp_path / "out")))[1]
    assert sizes(sample) == expected


# Qwen's finetune (QwenLM/Qwen3-VL, qwen-vl-finetune): demo/single_images.json's first record (the placeholder after
# the question) and the README's multi-image example
QWEN_DEMO = [
    {"image": "demo/images/10095.png", "conversations": [
        {"from": "human", "value": "Is the value of Favorable 38 in 2015?\n<image>"}, {"from": "gpt", "value": "Yes"}]},
    {"image": ["cats/001.jpg", "cats/002.jpg"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nWhat are the differences between these two cats?"},
        {"from": "gpt", "value": "The first cat is an orange tabby with short fur and green eyes, while the second "
                                 "is a gray Siamese with blue eyes and pointed coloration."}]},
]  # fmt: skip


def test_newlines_around_image_follow_the_project_of_each_form(tmp_path, tokenizer, qwen2_vl_template):
    """One rule per form, the rule of the project the form comes from. llava: as Qwen's finetune reads LLaVA-style
    text (qwen-vl-finetune/qwenvl/data/data_processor.py, _build_messages, at QwenLM/Qwen3-VL 96588727): a user
    turn is split at each <image>, each piece stripped, blank pieces dropped; the assistant's text is kept (2U1's
    Qwen2-VL-Finetune drops one newline on each side, the same for these records). sharegpt: as LLaMA-Factory's
    mm_plugin and ms-swift's template replace the placeholder, the text around it is kept. The projects' own code
    cannot be imported here (neither is a package), so the records are their published examples and the expected
    messages are what that code makes of them."""
    write_image(tmp_path / "demo" / "images" / "10095.png", *SIZES[0], fmt="PNG")
    write_image(tmp_path / "cats" / "001.jpg", *SIZES[1])
    write_image(tmp_path / "cats" / "002.jpg", *SIZES[2], seed=1)
    llava = write_jsonl(tmp_path / "qwen_demo.jsonl", QWEN_DEMO)
    sharegpt = write_jsonl(
        tmp_path / "as_sharegpt.jsonl", [{"images": r["image"], "conversations": r["conversations"]} for r in QWEN_DEMO]
    )
    answers = [r["conversations"][1]["value"] for r in QWEN_DEMO]
    expected = {
        "llava": [
            [text("Is the value of Favorable 38 in 2015?"), IMAGE],
            [IMAGE, IMAGE, text("What are the differences between these two cats?")],
        ],
        "sharegpt": [
            [text("Is the value of Favorable 38 in 2015?\n"), IMAGE],
            [IMAGE, text("\n"), IMAGE, text("\nWhat are the differences between these two cats?")],
        ],
    }
    for form, path in (("llava", llava), ("sharegpt", sharegpt)):
        samples = samples_of(BuildConfig.create(input=str(path), out=str(tmp_path / form)))
        for number, (content, answer) in enumerate(zip(expected[form], answers, strict=True), start=1):
            messages = [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
            sample = samples[number]
            assert sample.input_ids.tolist() == template_tokens(tokenizer, qwen2_vl_template, messages, sample)


# -- one file, several forms ----------------------------------------------------------------

# ms-swift's Custom-dataset.md, "Multimodal" / "Supervised Fine-tuning": one JSONL whose first record is text only,
# the next with images and <image> placeholders, then audio and video records (image paths made relative here; the
# video record is read, and rejected here for its clip, which is not written: tests/test_video_build.py builds videos)
SWIFT_SFT = [
    {"messages": [{"role": "user", "content": "Where is the capital of Zhejiang?"},
                  {"role": "assistant", "content": "The capital of Zhejiang is Hangzhou."}]},
    {"messages": [{"role": "user", "content": "<image><image>What is the difference between the two images?"},
                  {"role": "assistant", "content": "The first one is a kitten, and the second one is a puppy."}],
     "images": ["x.jpg", "x.png"]},
    {"messages": [{"role": "user", "content": "<audio>What did the audio say?"},
                  {"role": "assistant", "content": "The weather is really nice today."}], "audios": ["x.mp3"]},
    {"messages": [{"role": "system", "content": "You are a helpful and harmless assistant."},
                  {"role": "user", "content": "<image>What is in the image, <video>What is in the video?"},
                  {"role": "assistant", "content": "The image shows an elephant, and the video shows a puppy running "
                                                   "on the grass."}],
     "images": ["x.jpg"], "videos": ["x.mp4"]},
]  # fmt: skip
# InternVL's chat_data_format.md: "your JSONL file can contain different types of data": its pure-text and
# single-image examples (shortened answers), then its multi-image example
INTERNVL_MIXED = [
    {"id": 0, "conversations": [
        {"from": "human", "value": "Find the length of the hypotenuse given two sides\n\"side_length1 = 5, "
                                   "side_length2 = 6\""},
        {"from": "gpt", "value": "To find the length of the hypotenuse, use the Pythagorean theorem."}]},
    {"id": 0, "image": "images/00000000.jpg", "conversations": [
        {"from": "human", "value": "<image>\nCan you extract any readable text from the image?"},
        {"from": "gpt", "value": "Dares Wins Vol. 5 Tommy's Heroes Vol. 6: For Tomorrow Vol. 7: Closing Time "
                                 "miniseries."}], "width": 897, "height": 1152},
]  # fmt: skip


def test_one_file_may_mix_forms_each_record_read_in_its_own(tmp_path, tokenizer, qwen2_vl_template, capsys):
    """ms-swift's and InternVL's documented examples mix forms in one file; a form guessed from the first record
    rejected the others and the build exited 0. Each record is read in the form its keys name; a form named with
    --input-format rejects the others' records, and that build exits 1 naming them and the option."""
    write_image(tmp_path / "x.jpg", *SIZES[0])
    write_image(tmp_path / "x.png", *SIZES[1], fmt="PNG")
    write_image(tmp_path / "images" / "00000000.jpg", *SIZES[2])
    for seed, (name, *size) in enumerate(zip(INTERNVL_MULTI_IMAGE["image"], *[INTERNVL_MULTI_IMAGE[k] for k in (
        "width_list", "height_list")], strict=True)):  # fmt: skip
        write_image(tmp_path / name, *size, fmt="PNG", seed=seed)
    swift = write_jsonl(tmp_path / "swift.jsonl", SWIFT_SFT)
    internvl = write_jsonl(tmp_path / "internvl.jsonl", [*INTERNVL_MIXED, INTERNVL_MULTI_IMAGE])

    samples = samples_of(BuildConfig.create(input=str(swift), out=str(tmp_path / "swift")))
    expected = {
        1: SWIFT_SFT[0]["messages"],
        2: [
            {"role": "user", "content": [IMAGE, IMAGE, text("What is the difference between the two images?")]},
            SWIFT_SFT[1]["messages"][1],
        ],
    }
    assert sorted(samples) == [1, 2]
    for number, messages in expected.items():
        sample = samples[number]
        assert sample.input_ids.tolist() == template_tokens(tokenizer, qwen2_vl_template, messages, sample)
    assert sizes(samples[2]) == [SIZES[0], SIZES[1]]
    found = rejects(tmp_path / "swift")
    assert {line: r["code"] for line, r in found.items()} == {3: "audio_not_supported", 4: "video_missing"}

    samples = samples_of(BuildConfig.create(input=str(internvl), out=str(tmp_path / "internvl")))
    assert sorted(samples) == [1, 2, 3] and sizes(samples[2]) == [SIZES[2]] and len(sizes(samples[3])) == 5
    first = INTERNVL_MIXED[0]["conversations"]
    messages = [{"role": "user", "content": first[0]["value"]}, {"role": "assistant", "content": first[1]["value"]}]
    assert samples[1].input_ids.tolist() == template_tokens(tokenizer, qwen2_vl_template, messages, samples[1])

    # a record with content parts is in the Qwen form, where "<image>" and "<video>" in a string are plain text
    literal = {"messages": [user([{"type": "image", "image": "x.jpg"}, text("What does <image> mean?")]),
                            assistant("See the <video>.")]}  # fmt: skip
    record = open_input(str(swift)).record(RawItem(1, json.dumps(literal).encode()))
    assert [p.type for p in record.messages[0].content] == ["image", "text"]
    assert record.messages[1].content[0].text == "See the <video>."

    command = ["build", str(swift), "--out", str(tmp_path / "named"), "--input-format", "qwen", "--no-progress"]
    assert main(command) == 1
    err = capsys.readouterr().err
    # the image record and the image-and-video record (the qwen form reads videos as parts)
    assert "2 records are in other input forms (sharegpt 2; e.g. line 2: a ShareGPT record" in err
    assert "--input-format qwen reads its own form only: --input-format auto reads each record in its own form" in err
    assert rejects(tmp_path / "named")[2]["code"] == rejects(tmp_path / "named")[4]["code"] == "other_form"
    assert [s.info["line"] for s in BuildSource(str(tmp_path / "named")).samples()] == [1]


# Qwen's finetune README (qwen-vl-finetune/README.md, "Packed Data Example"): one packed entry is a list of records,
# as its tools/pack_data.py writes them (a JSON array of such lists, or one list per JSON line)
QWEN_PACKED = [
    {"image": "images/001.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat's the main object in this picture?"},
        {"from": "gpt", "value": "A red apple on a wooden table"}]},
    {"image": "images/002.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat's the main object in this picture?"},
        {"from": "gpt", "value": "A green orange on a plastic table"}]},
]  # fmt: skip


@pytest.mark.parametrize("layout", ["json", "jsonl"])
def test_qwen_packed_entries_are_unpacked_into_records(tmp_path, tokenizer, qwen2_vl_template, layout):
    write_image(tmp_path / "images" / "001.jpg", *SIZES[0])
    write_image(tmp_path / "images" / "002.jpg", *SIZES[1])
    single = {**QWEN_PACKED[0], "image": "images/002.jpg"}
    if layout == "json":
        path = tmp_path / "packed.json"
        path.write_text(json.dumps([QWEN_PACKED, [single]], indent=4))
        starts = [n for n, line in enumerate(path.read_text().splitlines(), start=1) if line == "        {"]
    else:
        path = write_jsonl(tmp_path / "packed.jsonl", [QWEN_PACKED, single, b"[{not json"])
        starts = [1, 1, 2, 3]
    source = open_input(str(path))
    assert source.unit == "record"
    assert [(item.number, item.source_line) for item in source.items()] == list(enumerate(starts, start=1))[:3] + (
        [] if layout == "json" else [(4, 3)]
    )
    samples = samples_of(BuildConfig.create(input=str(path), out=str(tmp_path / "out")))
    assert sorted(samples) == [1, 2, 3]
    assert [sizes(samples[n]) for n in (1, 2, 3)] == [[SIZES[0]], [SIZES[1]], [SIZES[1]]]
    for number, record in zip((1, 2), QWEN_PACKED, strict=True):
        question, answer = (turn["value"] for turn in record["conversations"])
        messages = [
            {"role": "user", "content": [IMAGE, text(question.removeprefix("<image>\n"))]},
            {"role": "assistant", "content": answer},
        ]
        assert samples[number].input_ids.tolist() == template_tokens(
            tokenizer, qwen2_vl_template, messages, samples[number]
        )
    if layout == "jsonl":
        assert rejects(tmp_path / "out")[4] | {"reason": ""} == {
            "line": 4, "code": "invalid_json", "reason": "", "source_line": 3
        }  # fmt: skip


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
    assert detect(str(path)) == "json"
    sample = samples_of(BuildConfig.create(input=str(path), out=str(tmp_path / "out")))[1]
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
        sample = samples_of(BuildConfig.create(input=str(data), out=str(out), train_on=train_on))[1]
        assert tokenizer.decode(sample.input_ids[sample.weights > 0].tolist()) == trained


# -- TRL, LLaMA-Factory v1, ms-swift query-response -----------------------------------------

LLAVA_MIX_ROWS = [  # as theblackcat102/llava-instruct-mix holds them: the conversation as a Python literal string
    [{"from": "human", "value": "<image>\nWhat is the man doing?"}, {"from": "gpt", "value": "He is surfing."},
     {"from": "human", "value": "Is the water calm?"}, {"from": "gpt", "value": "No, there are waves."}],
    [{"from": "human", "value": "What colour is the bus?\n<image>"}, {"from": "gpt", "value": "Red."}],
]  # fmt: skip


def trl_llava_instruct_mix(path: Path) -> Path:
    """A Parquet file made as TRL's examples/datasets/llava_instruct_mix.py makes trl-lib/llava-instruct-mix
    (huggingface/trl at f2cd5771), with ``datasets``: each LLaVA turn's text without ``<image>`` and stripped,
    roles user/assistant, the image as a one-image ``images`` list; the last message is the completion, the
    others the prompt. (The script is not part of the trl package, so its steps are written again here; what TRL
    then does with a record is its own prepare_multimodal_messages, see trl_conversation.)"""
    import ast

    import datasets
    from PIL import Image

    images = [Image.new("RGB", size, colour) for size, colour in zip(SIZES, ("red", "blue"), strict=False)]
    features = datasets.Features({"conversations": datasets.Value("string"), "image": datasets.Image()})
    source = datasets.Dataset.from_dict(
        {"conversations": [repr(rows) for rows in LLAVA_MIX_ROWS], "image": images}, features=features
    )

    def messages(example):
        turns = [
            {"role": "user" if t["from"] == "human" else "assistant", "content": t["value"].replace("<image>", "")}
            for t in ast.literal_eval(example["conversations"])
        ]
        turns = [{**t, "content": t["content"].strip()} for t in turns]
        return {"messages": turns, "images": [example["image"]]}

    def prompt_completion(example):
        return {"prompt": example["messages"][:-1], "completion": example["messages"][-1:]}

    dataset = source.map(messages, remove_columns=["conversations", "image"])
    dataset.map(prompt_completion, remove_columns=["messages"]).to_parquet(str(path))
    return path


def trl_conversation(prompt: list, completion: list, images: list) -> list[dict]:
    """A prompt-completion record's conversation as TRL's own ``prepare_multimodal_messages`` (trl.data_utils) lays it
    out for its vision SFT trainer (images placed before the first user text), image blocks as ``IMAGE``."""
    from trl.data_utils import prepare_multimodal_messages

    prepared = prepare_multimodal_messages(prompt + completion, images=images)
    return [
        {"role": m["role"], "content": [IMAGE if p["type"] == "image" else text(p["text"]) for p in m["content"]]}
        for m in prepared
    ]


def trained_text(tokenizer, sample) -> str:
    return tokenizer.decode(sample.input_ids[sample.weights > 0].tolist())


def test_trl_prompt_completion_in_parquet_and_json(tmp_path, tokenizer, qwen2_vl_template):
    """TRL's vision SFT form: images go before the first user text (TRL's prepare_multimodal_messages), only the
    completion is trained (TRL's completion-only loss); a prompt without a completion has no answer."""
    import pyarrow.parquet as pq

    path = trl_llava_instruct_mix(tmp_path / "llava-instruct-mix.parquet")
    assert set(pq.read_schema(path).names) == {"images", "prompt", "completion"} and detect(str(path)) == "hf"
    samples = samples_of(BuildConfig.create(input=str(path), out=str(tmp_path / "parquet")))
    rows = pq.read_table(path).to_pylist()
    expected = {n: trl_conversation(row["prompt"], row["completion"], row["images"]) for n, row in enumerate(rows, 1)}
    assert expected[2] == [user([IMAGE, text("What colour is the bus?")]), assistant([text("Red.")])]
    for number, messages in expected.items():
        sample = samples[number]
        assert sample.input_ids.tolist() == template_tokens(tokenizer, qwen2_vl_template, messages, sample)
        assert trained_text(tokenizer, sample) == messages[-1]["content"][0]["text"] + "<|im_end|>"
    assert [sizes(samples[n]) for n in (1, 2)] == [[SIZES[0]], [SIZES[1]]]

    write_image(tmp_path / "a.jpg", *SIZES[2])
    records = [
        {"images": ["a.jpg"], "prompt": [{"role": "user", "content": "What is the man doing?"}],
         "completion": [{"role": "assistant", "content": "He is surfing."}]},
        {"image": "a.jpg", "prompt": [{"role": "user", "content": [{"type": "text", "text": "Look: <image> "},
                                                                    {"type": "image"}]}],
         "completion": [{"role": "assistant", "content": [{"type": "text", "text": "A pattern."}]}]},
        {"images": ["a.jpg"], "prompt": "<image>What is it?", "completion": "A pattern."},  # ms-swift reads these
        {"images": ["a.jpg"], "prompt": [{"role": "user", "content": "What is it?"}]},  # TRL's prompt-only form
        {"images": ["a.jpg"], "prompt": [{"role": "user", "content": "What is it?"}],
         "completion": [{"role": "assistant", "content": "A pattern."}], "label": False},  # unpaired preference
    ]  # fmt: skip
    data = write_jsonl(tmp_path / "trl.jsonl", records)
    samples = samples_of(BuildConfig.create(input=str(data), out=str(tmp_path / "json")))
    expected = {
        1: trl_conversation(records[0]["prompt"], records[0]["completion"], ["a.jpg"]),
        2: trl_conversation(records[1]["prompt"], records[1]["completion"], ["a.jpg"]),
        3: [user([IMAGE, text("What is it?")]), assistant("A pattern.")],
    }  # TRL leaves "<image>" in a message list as text; in a string, ms-swift's placeholder
    assert expected[2][0] == user([text("Look: <image> "), IMAGE])
    for number, messages in expected.items():
        sample = samples[number]
        assert sample.input_ids.tolist() == template_tokens(tokenizer, qwen2_vl_template, messages, sample)
    found = rejects(tmp_path / "json")
    assert {line: r["code"] for line, r in found.items()} == {4: "no_answer", 5: "preference_pair"}
    assert "TRL's prompt-only form" in found[4]["reason"] and "TRL's KTO form" in found[5]["reason"]


# LLaMA-Factory's data/v1_multimodal_demo.jsonl (its first two records) and data/v1_sft_demo.jsonl (its first record),
# hiyouga/LLaMA-Factory at ff6d4d12; then a record that trains only its last answer
LF_V1 = [
    {"messages": [{"role": "user", "content": [{"type": "image_url", "value": "data/mllm_demo_data/1.jpg"},
                                               {"type": "text", "value": "Who are they?"}]},
                  {"role": "assistant", "content": [{"type": "text",
                                                     "value": "They're Kane and Gretzka from Bayern Munich."}]},
                  {"role": "user", "content": [{"type": "text", "value": "What are they doing?"},
                                               {"type": "image_url", "value": "data/mllm_demo_data/1.jpg"}]},
                  {"role": "assistant", "content": [{"type": "text",
                                                     "value": "They are celebrating on the soccer field."}]}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "value": "data/mllm_demo_data/2.jpg"},
                                               {"type": "text", "value": "Who is he?"}]},
                  {"role": "assistant", "content": [{"type": "text",
                                                     "value": "He's Thomas Muller from Bayern Munich."}]},
                  {"role": "user", "content": [{"type": "text", "value": "Why is he on the ground?"}]},
                  {"role": "assistant", "content": [{"type": "text",
                                                     "value": "Because he's sliding on his knees to celebrate."}]}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "value": "hi"}], "loss_weight": 0.0},
                  {"role": "assistant", "content": [{"type": "text", "value": "Hello! I am {{name}}, an AI assistant "
                   "developed by {{author}}. How can I assist you today?"}], "loss_weight": 1.0}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "value": "hi"}], "loss_weight": 0.0},
                  {"role": "assistant", "content": [{"type": "text", "value": "Hello."}], "loss_weight": 0.0},
                  {"role": "user", "content": [{"type": "text", "value": "Who are you?"}], "loss_weight": 0.0},
                  {"role": "assistant", "content": [{"type": "text", "value": "An assistant."}], "loss_weight": 1.0}]},
]  # fmt: skip


def v1_to_template(record: dict) -> list[dict]:
    """LLaMA-Factory v1's messages as the chat template's (as its rendering/format.py _to_hf_messages does)."""
    return [
        {"role": m["role"], "content": [IMAGE if p["type"] == "image_url" else text(p["value"]) for p in m["content"]]}
        for m in record["messages"]
    ]


def test_llamafactory_v1_records(tmp_path, tokenizer, qwen2_vl_template):
    """image_url parts are images where they stand; an assistant turn is trained unless its loss_weight is 0 (LLaMA-
    Factory never trains the other turns, whatever their weight); other weights and reasoning parts are refused."""
    write_image(tmp_path / "data" / "mllm_demo_data" / "1.jpg", *SIZES[0])
    write_image(tmp_path / "data" / "mllm_demo_data" / "2.jpg", *SIZES[1])
    bad = [
        {"messages": [LF_V1[2]["messages"][0], {**LF_V1[2]["messages"][1], "loss_weight": 0.5}]},
        {"messages": [LF_V1[2]["messages"][0], {"role": "assistant", "content": [
            {"type": "reasoning", "value": "The user greets."}, {"type": "text", "value": "Hello."}]}]},
    ]  # fmt: skip
    data = write_jsonl(tmp_path / "v1.jsonl", LF_V1 + bad)
    samples = samples_of(BuildConfig.create(input=str(data), out=str(tmp_path / "out")))
    assert sorted(samples) == [1, 2, 3, 4]
    for number, record in enumerate(LF_V1, start=1):
        sample = samples[number]
        messages = v1_to_template(record)
        assert sample.input_ids.tolist() == template_tokens(tokenizer, qwen2_vl_template, messages, sample)
    assert [sizes(samples[n]) for n in (1, 2)] == [[SIZES[0], SIZES[0]], [SIZES[1]]]
    answers = [m["content"][0]["value"] for m in LF_V1[0]["messages"] if m["role"] == "assistant"]
    assert trained_text(tokenizer, samples[1]) == "".join(a + "<|im_end|>" for a in answers)
    assert trained_text(tokenizer, samples[4]) == "An assistant.<|im_end|>"
    found = rejects(tmp_path / "out")
    assert "messages[1] has loss_weight 0.5: shardkit trains a turn wholly or not at all" in found[5]["reason"]
    assert "messages[1] has a 'reasoning' part" in found[6]["reason"]
    as_qwen = validate(str(data), input_format="qwen").problems[0]
    assert (as_qwen["code"], as_qwen["form"]) == ("other_form", "llamafactory_v1")
    assert "use --input-format llamafactory_v1" in as_qwen["reason"]


# ms-swift's Custom-dataset.md: the query-response form ({"system", "query", "response", "history"}) and the
# ShareGPT form ({"system", "conversation": [{"human", "assistant"}]}), with images as its multimodal section adds
SWIFT_FORMS = [
    {"system": "You are a helpful assistant.", "query": "<image>And this one?", "response": "A dog.",
     "history": [["<image>What is this?", "A cat."]], "images": ["cat.jpg", "dog.jpg"]},
    {"system": "You are a helpful assistant.", "conversation": [
        {"human": "<image>What is this?", "assistant": "A cat."}, {"human": "Sure?", "assistant": "Yes."}],
     "images": ["cat.jpg"]},
    {"query": "<image>What is this?", "images": ["cat.jpg"]},
]  # fmt: skip


def test_ms_swift_query_response_and_conversation(tmp_path, tokenizer, qwen2_vl_template):
    write_image(tmp_path / "cat.jpg", *SIZES[0])
    write_image(tmp_path / "dog.jpg", *SIZES[1])
    data = write_jsonl(tmp_path / "swift.jsonl", SWIFT_FORMS)
    samples = samples_of(BuildConfig.create(input=str(data), out=str(tmp_path / "out")))
    system = {"role": "system", "content": "You are a helpful assistant."}
    expected = {
        1: [system, user([IMAGE, text("What is this?")]), assistant("A cat."), user([IMAGE, text("And this one?")]),
            assistant("A dog.")],
        2: [system, user([IMAGE, text("What is this?")]), assistant("A cat."), user("Sure?"), assistant("Yes.")],
    }  # fmt: skip
    for number, messages in expected.items():
        sample = samples[number]
        assert sample.input_ids.tolist() == template_tokens(tokenizer, qwen2_vl_template, messages, sample)
    assert sizes(samples[1]) == [SIZES[0], SIZES[1]] and sizes(samples[2]) == [SIZES[0]]
    (reject,) = rejects(tmp_path / "out").values()
    assert (reject["line"], reject["code"]) == (3, "no_answer")

    import datasets
    from PIL import Image

    pairs = {"conversation": [SWIFT_FORMS[1]["conversation"]], "images": [[Image.new("RGB", SIZES[0], "red")]]}
    parquet = tmp_path / "conversation.parquet"
    datasets.Dataset.from_dict(pairs).to_parquet(str(parquet))  # as ms-swift reads a data set of this form
    sample = samples_of(BuildConfig.create(input=str(parquet), out=str(tmp_path / "parquet")))[1]
    messages = expected[2][1:]  # no system column
    assert sample.input_ids.tolist() == template_tokens(tokenizer, qwen2_vl_template, messages, sample)


# -- refusals --------------------------------------------------------------------------------

TURNS = [{"role": "user", "content": "<image>Why?"}, {"role": "assistant", "content": "Because."}]
REFUSED = [
    # LLaMA-Factory's mllm_video_demo.json (read: its clip is not here) and mllm_audio_demo.json (refused)
    ({"messages": [{"content": "<video>Why is this video funny?", "role": "user"},
                   {"content": "Because a baby is reading.", "role": "assistant"}],
      "videos": ["mllm_demo_data/1.mp4"]}, "video_missing"),
    ({"messages": [{"content": "<audio>What's that sound?", "role": "user"},
                   {"content": "Glass shattering.", "role": "assistant"}],
      "audios": ["mllm_demo_data/1.mp3"]}, "audio_not_supported"),
    # a leftover placeholder without its list, a singular key (LLaVA's, beside ShareGPT's images)
    ({"messages": [{"role": "user", "content": "<video>Why?"}, {"role": "assistant", "content": "x"}]},
     "invalid_record"),
    ({"messages": [{"role": "user", "content": "<audio>Why?"}, {"role": "assistant", "content": "x"}]},
     "audio_not_supported"),
    ({"messages": TURNS, "images": ["a.jpg"], "video": "clip.mp4"}, "other_form"),
    ({"messages": TURNS, "images": ["a.jpg"], "audio": "clip.wav"}, "audio_not_supported"),
    # ms-swift's DPO record, TRL's and LLaMA-Factory's preference pairs
    ({"messages": TURNS, "images": ["a.jpg"], "rejected_response": "I don't know."}, "preference_pair"),
    ({"messages": TURNS, "images": ["a.jpg"], "chosen": {"role": "assistant", "content": "a"},
      "rejected": {"role": "assistant", "content": "b"}}, "preference_pair"),
    # a key that holds data shardkit would drop
    ({"messages": TURNS, "images": ["a.jpg"], "tools": '[{"name": "search"}]'}, "unknown_key"),
]  # fmt: skip
QWEN_REFUSED = [
    ([{"type": "video", "video": "clip.mp4"}, text("What happens?")], "video_missing"),  # read: no clip here
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
        (qwen, [c for _, c in QWEN_REFUSED] + ["video_missing"], 0),
    ]
    for path, codes, good_records in cases:
        expected = {i + 1 + good_records: code for i, code in enumerate(codes)}
        report = validate(str(path))
        assert {p["line"]: p["code"] for p in report.problems} == expected
        manifest = build(BuildConfig.create(input=str(path), out=str(tmp_path / path.stem)), progress=False)
        assert {line: r["code"] for line, r in rejects(tmp_path / path.stem).items()} == expected
        assert manifest.num_samples == good_records
    reasons = [p["reason"] for p in validate(str(sharegpt)).problems]
    assert reasons[0] == "video not found: mllm_demo_data/1.mp4"
    assert "the record has audio ('audios'); shardkit builds image, video and text samples, never audio" in reasons[1]
    assert "1 <video> placeholders but 0 videos" in reasons[2]
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
    assert detect(str(data)) == "json"
    samples = samples_of(BuildConfig.create(input=str(data), out=str(tmp_path / "out")))
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
    samples = samples_of(BuildConfig.create(input=str(path), out=str(tmp_path / "out")))
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
    samples = samples_of(BuildConfig.create(input=str(path), out=str(tmp_path / "out")))
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
    samples = samples_of(BuildConfig.create(input=str(path), out=str(tmp_path / "out")))
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
    samples = samples_of(config)
    assert [m["content"][-1]["text"] for m in samples[1].info["messages"]] == ["Colour?", "red"]  # the most frequent
    assert [m["content"][-1]["text"] for m in samples[2].info["messages"]] == ["Shape?", "round"]
    report = validate(str(tmp_path / "vqa_v2.parquet"))
    assert "'answers' holds a list that is not of strings" in report.problems[0]["reason"]
    assert main(["validate", str(tmp_path / "vqa.parquet"), "--question-column", "nope"]) == 2


def test_reasons_say_what_was_found_and_what_would_work(tmp_path, tokenizer, qwen2_vl_template):
    """An image column holding a list (one image, as TRL-style ``images`` columns do) is read, not called empty;
    a record without turns is not sent to --keep-keys for a key that then leaves it without a conversation."""
    import datasets
    from PIL import Image

    pictures = [[Image.new("RGB", SIZES[0], "red")], [Image.new("RGB", SIZES[1]), Image.new("RGB", SIZES[2])], []]
    features = datasets.Features({"images": datasets.List(datasets.Image()), "label": datasets.Value("string")})
    path = tmp_path / "listed.parquet"
    datasets.Dataset.from_dict({"images": pictures, "label": ["red", "two", "none"]}, features=features).to_parquet(
        str(path)
    )
    samples = samples_of(BuildConfig.create(input=str(path), out=str(tmp_path / "out"), image_column="images"))
    assert [sizes(samples[n]) for n in (1, 2)] == [[SIZES[0]], [SIZES[1], SIZES[2]]]
    messages = [user([IMAGE, IMAGE, text("Classify this image.")]), assistant("two")]
    assert samples[2].input_ids.tolist() == template_tokens(tokenizer, qwen2_vl_template, messages, samples[2])
    reject = rejects(tmp_path / "out")[3]
    assert (reject["code"], reject["reason"]) == ("image_missing", "the image column 'images' holds an empty list")

    write_image(tmp_path / "a.jpg", *SIZES[0])
    records = [
        {"question": "What is it?", "answer": "A square.", "images": ["a.jpg"]},
        {"prompt": [{"role": "user", "content": "What is it?"}], "completion": [{"role": "assistant", "content": "A."}],
         "images": ["a.jpg"]},
    ]  # fmt: skip
    data = write_jsonl(tmp_path / "odd.jsonl", records)
    for form, keep in itertools.product(("auto", "sharegpt"), ((), ("question", "answer"))):
        problems = validate(str(data), input_format=form, keep_keys=keep).problems
        assert (problems[0]["line"], problems[0]["code"]) == (1, "invalid_record")
        assert problems[0]["reason"] == (
            "no conversation: the record has 'question', 'answer', 'images' but no 'messages', 'conversations' or "
            "'conversation' list (nor 'prompt' and 'completion', or 'query' and 'response'); put its turns in "
            "'messages'"
        )
        assert not any("--keep-keys" in p["reason"] for p in problems)
    assert [p["line"] for p in validate(str(data)).problems] == [1]  # auto reads the second record as TRL's form
    reason = validate(str(data), input_format="sharegpt").problems[1]["reason"]
    assert reason.startswith("a TRL prompt-completion record ('prompt' and 'completion'), which --input-format")


def test_an_hf_image_cell_that_is_a_list_is_named_as_such(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = {"bytes": write_image(tmp_path / "x.jpg", *SIZES[0]).read_bytes(), "path": "x.jpg"}
    chat = [{"role": "user", "content": "<image>Who?"}, {"role": "assistant", "content": "Two."}]
    pq.write_table(pa.table({"messages": [chat], "images": [[[image]]]}), tmp_path / "chat.parquet")
    # a list of images in an image column is read as images; a list of lists is not
    pq.write_table(pa.table({"image": [[[image]]], "label": ["cat"]}), tmp_path / "labels.parquet")
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
