import json
import subprocess
import sys

from shardkit.cli import main


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


def test_validate_of_an_input_with_no_records_exits_1_saying_so(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    for path in ("/dev/null", str(tmp_path / "empty.jsonl")):
        assert main(["validate", path]) == 1
        assert capsys.readouterr().out == "0 records, 0 images checked: the input has no records\n"
        assert main(["validate", path, "--json"]) == 1
        assert json.loads(capsys.readouterr().out)["ok"] is False
