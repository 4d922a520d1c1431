"""Every code block of README.md, read from the README itself, so that a snippet cannot drift from the code.

- ``python`` blocks run in README order in one namespace, as a reader pastes them, in a folder laid out as they
  assume (``shards/``, ``shards-qwen3/``, ``shards/clinical``, ``shards/vqa``, and ``s3://bucket/captions`` on a real
  S3 API server on 127.0.0.1). What the README leaves to the reader is given: ``model`` (a tiny random Qwen2-VL with
  the real vocabulary), ``device`` (the CPU), ``checkpoint`` (a dict) and ``training_client`` (a stand-in recording
  its calls: Tinker's service cannot be reached from the tests).
- ``json`` blocks are input records the record model accepts; ``yaml`` blocks are mix files shardkit reads.
- ``bash`` blocks: every ``shardkit`` command (``torchrun ... -m shardkit.cli`` included) is parsed by shardkit's own
  command line and its options checked by their models; those that need only local files run for real, each block
  in a fresh folder holding the demo data (``data/``) and a default build of it (``shards/``). Those that do not run,
  and why: a model id from the Hugging Face hub (no hub here; training runs in tests/test_train_local.py), an
  ``s3://`` bucket of the reader's, or the output of one of those. ``bin/demo`` runs with this environment when it
  holds requirements/demo.txt (bin/test's .venv); ``bin/test``, ``pip install`` and ``export`` lines are CI and shell.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shardkit.build import build
from shardkit.cli import _build_config, _command_of, _parser, _train_config, main
from shardkit.config import BuildConfig
from shardkit.load.mix import read_mix_file
from shardkit.schema import Record
from shardkit.synthetic import make_clinical_dataset

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
# commands that read and write local files only: run for real where their inputs are local
RUNNABLE = {"validate", "build", "stats", "verify", "show", "export", "demo-data"}


def blocks(language: str) -> list[tuple[int, str]]:
    """(line, text) of every README block in ``language``."""
    return [(README[: m.start()].count("\n") + 1, m.group(2)) for m in BLOCK.finditer(README) if m.group(1) == language]


def commands(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """The shell commands of a bash block, continuation lines joined and comments dropped: each as its argument list
    and the optional groups of a synopsis (``[--format tar|parquet]``), taken out of it, each as a word list."""
    found = []
    for line in text.replace("\\\n", " ").splitlines():
        line = re.split(r"\s#\s", " " + line, maxsplit=1)[0]
        groups = [group.split() for group in re.findall(r"\[([^][]*)\]", line)]
        if words := shlex.split(re.sub(r"\[[^][]*\]", " ", line)):
            found.append((words, groups))
    return found


def shardkit_args(words: list[str]) -> list[str] | None:
    """The arguments given to shardkit by a command line (``shardkit ...`` or ``... -m shardkit.cli ...``)."""
    if words[0] == "shardkit":
        return words[1:]
    if "shardkit.cli" in words and words[words.index("shardkit.cli") - 1] == "-m":
        return words[words.index("shardkit.cli") + 1 :]
    return None


def check_options(args: list[str], groups: list[list[str]] = ()) -> None:
    """``args`` parse with shardkit's command line and give a valid configuration (each option exists, each value
    is one its model accepts); so does each optional group of a synopsis added to them, each of its ``a|b``
    alternatives, while a placeholder value (``N``, ``NAME_OR_PATH``) needs only an option that takes a value."""
    for option, *values in groups:
        alternatives = values[0].split("|") if values else [None]
        for value in alternatives:
            if value is not None and re.fullmatch(r"[A-Z][A-Z0-9_,.]*", value):
                actions = {flag: a for a in _parser(args[0])._subparsers._group_actions[0].choices[args[0]]._actions
                           for flag in a.option_strings}  # fmt: skip
                assert option in actions and actions[option].nargs != 0, f"README: {option} {value} of {args[0]}"
            else:
                check_options([*args, option, *([value] if value else [])])
    try:
        parsed = _parser(_command_of(args)).parse_args(args)
    except SystemExit as exc:
        pytest.fail(f"README: `shardkit {shlex.join(args)}` does not parse (exit {exc.code})")
    if parsed.command == "build":
        _build_config(parsed)
    elif parsed.command == "validate":
        from shardkit.options import given

        BuildConfig.create(**given(parsed, BuildConfig), out="")
    elif parsed.command == "train":
        _train_config(parsed)


def why_not_run(args: list[str], folder: Path) -> str | None:
    """Why a README command cannot run here, or None."""
    if args[0] not in RUNNABLE:
        return f"`shardkit {args[0]}` needs a model from the Hugging Face hub"
    if any("://" in a for a in args):
        return "an object store of the reader's"
    positional = [a for a in args[1:] if not a.startswith("-")][: 2 if args[0] == "export" else 1]
    if args[0] not in ("build", "validate", "demo-data") and not (folder / positional[-1]).exists():
        return f"{positional[-1]} is the output of a command that does not run here"
    return None


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """The reader's folder: ``data/`` (the demo data set, enough cases for ``--key 0000000042``) and ``shards/``,
    a default build of it."""
    folder = tmp_path_factory.mktemp("reader")
    data = make_clinical_dataset(folder / "data", cases=42, seed=0, megapixels=(0.05, 0.1))
    shutil.copy(data.jsonl, folder / "data" / "train.jsonl")
    build(BuildConfig.create(input=str(data.jsonl), out=str(folder / "shards")), progress=False)
    return folder


@pytest.mark.slow
def test_bash_blocks_parse_and_the_local_ones_run(demo, tmp_path, monkeypatch, capsys):
    ran, not_run = [], {}
    for number, (line, text) in enumerate(blocks("bash")):
        folder = tmp_path / f"block-{number}"
        shutil.copytree(demo, folder)
        monkeypatch.chdir(folder)
        for words, groups in commands(text):
            args = shardkit_args(words)
            if args is None:
                continue
            check_options(args, groups)
            if why := why_not_run(args, folder):
                not_run[f"line {line}: shardkit {shlex.join(args)}"] = why
                continue
            if args[0] == "build" and Path(args[args.index("--out") + 1]).resolve() == (folder / "shards").resolve():
                shutil.rmtree(folder / "shards")  # the block's own build of shards/ replaces the default one
            code = main(args)
            capsys.readouterr()
            assert code == 0, f"README line {line}: `shardkit {shlex.join(args)}` exited {code}"
            ran.append(args[0])
    assert {"validate", "build", "stats", "verify", "show", "export"} <= set(ran)
    for command, why in not_run.items():  # only the reasons the module docstring gives
        assert why.startswith(("`shardkit train`", "`shardkit embed`", "an object store", "shards-emb/")), command


@pytest.mark.slow
def test_bin_demo_runs(tmp_path):
    check = [sys.executable, str(ROOT / "bin" / "_locks.py"), "check", "requirements/demo.txt"]
    if subprocess.run(check, capture_output=True).returncode:
        pytest.skip(
            "this environment does not hold requirements/demo.txt (bin/test's .venv does): bin/demo would install"
        )
    line, text = blocks("bash")[0]
    assert "bin/demo" in text
    venv = Path(sys.executable).parent.parent
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "SHARDKIT_VENV": str(venv), "HOME": str(tmp_path)}
    result = subprocess.run(
        [str(ROOT / "bin" / "demo"), str(tmp_path / "demo")], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "installing" not in result.stderr
    assert (tmp_path / "demo" / "shards" / "manifest.json").exists()


def test_json_blocks_are_records():
    found = blocks("json")
    assert found
    for line, text in found:
        assert Record.model_validate(json.loads(text)).messages, f"README line {line}"


def test_yaml_blocks_are_mix_files(tmp_path):
    found = blocks("yaml")
    assert found
    for number, (line, text) in enumerate(found):
        path = tmp_path / f"mix-{number}.yaml"
        path.write_text(text)
        mix = read_mix_file(str(path))
        assert mix.builds, f"README line {line}"


class StandInTrainingClient:
    """Records what a README snippet sends to Tinker (the service cannot be reached from the tests)."""

    def __init__(self):
        self.calls = []

    def forward_backward(self, datums, loss_fn):
        self.calls.append((len(datums), loss_fn))


@pytest.mark.slow
def test_python_blocks_run_in_order(s3, tmp_path, monkeypatch):
    from transformers import Qwen2VLForConditionalGeneration

    from shardkit.testing import tiny_qwen2_vl_config

    data = make_clinical_dataset(tmp_path / "data", cases=8, seed=0, megapixels=(0.05, 0.1))
    made = {
        "shards": {},
        "shards-qwen3": {"model": "qwen3_vl"},
        "shards/clinical": {"samples_per_shard": 4},
        "shards/vqa": {"samples_per_shard": 2},
        "captions": {"samples_per_shard": 3},
    }
    for name, options in made.items():
        build(BuildConfig.create(input=str(data.jsonl), out=str(tmp_path / name), **options), progress=False)
    # the Parquet snippet reads shards/shard-*.parquet: a Parquet build's shards beside the tar build's
    parquet = tmp_path / "parquet"
    build(BuildConfig.create(input=str(data.jsonl), out=str(parquet), format="parquet"), progress=False)
    for shard in parquet.glob("shard-*.parquet"):
        shutil.copy(shard, tmp_path / "shards")
    s3.put(str(tmp_path / "captions"), "bucket/captions", recursive=True)
    monkeypatch.chdir(tmp_path)

    model = Qwen2VLForConditionalGeneration(tiny_qwen2_vl_config()).eval()
    client = StandInTrainingClient()
    namespace = {"model": model, "device": "cpu", "checkpoint": {}, "training_client": client}
    found = blocks("python")
    assert len(found) >= 6
    for line, text in found:
        try:
            exec(compile(text, f"README.md, block at line {line}", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"README's python block at line {line} fails: {type(exc).__name__}: {exc}") from exc
    assert namespace["checkpoint"]["data"]["epoch"] == 3  # the torch loop ran epochs 0-2: the state points at the next
    assert client.calls and all(fn == "cross_entropy" for _, fn in client.calls)
    assert len(namespace["ds"]) == 8  # datasets read the Parquet shards, and only them
