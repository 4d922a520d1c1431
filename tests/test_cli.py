import json
import subprocess
import sys

from shardkit.cli import main
from tests.helpers import write_image, write_jsonl


def test_validate_reports_each_bad_line_and_exits_1(clinical, capsys):
    assert main(["validate", str(clinical.jsonl)]) == 1
    out = capsys.readouterr().out.splitlines()
    problem_lines = [int(line.split(":")[0].removeprefix("line ")) for line in out if line.startswith("line ")]
    assert problem_lines == sorted(clinical.bad_lines)
    assert out[-1].endswith(f"{len(clinical.bad_lines)} problems on {len(clinical.bad_lines)} lines")


def test_validate_json_and_clean_input(clinical, tmp_path, capsys):
    assert main(["validate", str(clinical.jsonl), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert {p["line"]: p["code"] for p in report["problems"]} == clinical.bad_lines and report["ok"] is False
    clean = tmp_path / "clean.jsonl"
    good = clinical.jsonl.read_bytes().splitlines()[: clinical.good_lines[-1]]
    clean.write_bytes(b"\n".join(good) + b"\n")
    assert main(["validate", str(clean), "--image-root", str(clinical.root)]) == 0
    assert capsys.readouterr().out.strip().endswith("clean")


def test_build_then_stats(clinical, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["build", str(clinical.jsonl), "--out", str(out), "--format", "parquet", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"{len(clinical.good_lines)} samples" in printed and f"{len(clinical.bad_lines)} records rejected" in printed
    assert main(["stats", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"Samples:               {len(clinical.good_lines)}" in text and "Top" in text
    assert main(["stats", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == len(clinical.good_lines)


def test_build_exit_codes(clinical, tmp_path, capsys):
    assert main(["build", str(clinical.jsonl), "--out", str(tmp_path / "s"), "--strict", "--no-progress"]) == 1
    assert f"line {min(clinical.bad_lines)}" in capsys.readouterr().err
    assert main(["build", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "input not found" in capsys.readouterr().err
    assert main(["build", str(clinical.jsonl), "--out", str(tmp_path / "o"), "--min-pixels", "99999999"]) == 2
    assert "larger than max_pixels" in capsys.readouterr().err


def test_build_says_how_many_turns_each_sample_trains(tmp_path, capsys):
    from tests.test_build import THREE_TURNS

    write_image(tmp_path / "a.jpg", 64, 48)
    data = write_jsonl(tmp_path / "in.jsonl", [THREE_TURNS])
    assert main(["build", str(data), "--out", str(tmp_path / "all"), "--no-progress"]) == 0
    assert "trained turns per sample: 3 (--train-on all_assistant: every assistant turn)" in capsys.readouterr().out
    command = ["build", str(data), "--out", str(tmp_path / "last"), "--no-progress", "--train-on", "last_assistant"]
    assert main(command) == 0
    assert "trained turns per sample: 1 (--train-on last_assistant: the last assistant turn only)" in (
        capsys.readouterr().out
    )


def test_installed_command_help():
    result = subprocess.run(
        [sys.executable, "-m", "shardkit.cli", "build", "--help"], capture_output=True, text=True, check=True
    )
    for option in (
        "--format",
        "--model",
        "--tokenizer",
        "--max-length",
        "--min-pixels",
        "--max-pixels",
        "--train-on",
        "--samples-per-shard",
        "--max-shard-bytes",
        "--strict",
        "--overlength",
    ):
        assert option in result.stdout
    assert "(default: all_assistant)" in " ".join(result.stdout.split())


def run_without(modules, *args):
    """``shardkit ARGS`` in a process where ``modules`` cannot be imported, as on an install without that extra."""
    code = (
        "import sys\n"
        f"sys.modules.update(dict.fromkeys({list(modules)!r}))\n"
        "from shardkit.cli import main\n"
        f"sys.exit(main({list(map(str, args))!r}))\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_without_an_extra_help_works_and_a_command_names_the_extra(tmp_path):
    from shardkit.cli import COMMANDS

    for command in COMMANDS:
        result = run_without(["torch", "tinker", "peft"], command, "--help")
        assert result.returncode == 0 and "usage: shardkit" in result.stdout, (command, result.stderr[-2000:])
        assert result.stderr == "", (command, result.stderr)  # no traceback, no "PyTorch was not found"
    needs = [
        (["torch"], ["embed", tmp_path, "--model", "m", "--out", tmp_path / "e"], "torch", "torch"),
        (["torch"], ["train", "--data", tmp_path, "--model", "m", "--output", tmp_path / "r"], "torch", "torch"),
        (["tinker"], ["train", "--backend", "tinker", "--base-model", "B", "--data", tmp_path,
                      "--output", tmp_path / "t"], "tinker", "tinker"),
    ]  # fmt: skip
    for blocked, args, module, extra in needs:
        result = run_without(blocked, *args)
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.splitlines() == [
            f"shardkit: error: shardkit {args[0]} needs {module}, which is not installed: "
            f"pip install 'shardkit[{extra}]'"
        ]


def test_validate_takes_dedup_as_build_does(tmp_path, capsys):
    from tests.helpers import conversation, write_image, write_jsonl

    write_image(tmp_path / "a.jpg", 64, 64)
    record = conversation("a.jpg", question="What is it?", answer="A rash.")
    other = conversation("a.jpg", question="And this?", answer="A rash.")
    data = write_jsonl(tmp_path / "in.jsonl", [record, other, record])
    assert main(["validate", str(data), "--dedup"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "line 3: duplicate of line 1 (same images and text) [duplicate]"
    assert lines[-1] == "3 records, 2 images checked: 1 problem on 1 line"
    assert main(["validate", str(data)]) == 0


def test_one_of_a_thing_is_said_in_the_singular(tmp_path, capsys):
    from tests.helpers import conversation, write_image, write_jsonl

    write_image(tmp_path / "a.jpg", 64, 64)
    data = write_jsonl(tmp_path / "in.jsonl", [conversation("a.jpg", question="What?", answer="A rash.")])
    assert main(["build", str(data), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("1 sample, 1 image, ") and " in 1 tar shard -> " in printed
    assert main(["verify", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.strip() == "1 shard and the index: all match the manifest"


def test_validate_help_states_every_exit_code():
    result = subprocess.run(
        [sys.executable, "-m", "shardkit.cli", "validate", "--help"], capture_output=True, text=True, check=True
    )
    text = " ".join(result.stdout.split())
    assert "Exit 0 when clean; 1 when any problem; 2 a user or environment error" in text and "3 an internal" in text


def test_schemas_are_written_into_a_new_folder(tmp_path):
    folder = tmp_path / "new" / "schemas"
    result = subprocess.run(
        [sys.executable, "-m", "shardkit.json_schema", str(folder)], capture_output=True, text=True, check=True
    )
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.schema.json", "record.schema.json"]
    assert result.stdout.split() == [str(folder / "record.schema.json"), str(folder / "manifest.schema.json")]


def test_validate_of_an_input_with_no_records_exits_1_saying_so(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    for path in ("/dev/null", str(tmp_path / "empty.jsonl")):
        assert main(["validate", path]) == 1
        assert capsys.readouterr().out == "0 records, 0 images checked: the input has no records\n"
        assert main(["validate", path, "--json"]) == 1
        assert json.loads(capsys.readouterr().out)["ok"] is False
