import json
import subprocess
import sys

from shardkit.cli import main
from tests.conftest import write_image, write_jsonl


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
