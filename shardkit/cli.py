"""The ``shardkit`` command: parse options, build a config, call the library.

Exit codes: 0 success; 1 the data has problems (``validate`` found some,
``build --strict`` met a rejected record, or a build wrote no sample); 2 a user
or environment problem, as one line (bad option, unreadable input, unusable
output folder, disk full, a worker process killed); 3 an internal error (a bug:
its traceback is shown, or written to the build's ``errors.log``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from shardkit import __version__
from shardkit.errors import ConfigError, RecordError, ShardkitError
from shardkit.options import add_options, flag, given
from shardkit.words import counted

EXIT_OK, EXIT_PROBLEMS, EXIT_FATAL, EXIT_BUG = 0, 1, 2, 3
#: words argparse takes as values although they start with "-": negative numbers and lists of numbers (no option
#: of shardkit's looks like one)
NEGATIVE_NUMBERS = re.compile(r"^-\.?\d[\d.eE+,-]*$")

logger = logging.getLogger("shardkit")


def _is_mix_file(location: str) -> bool:
    return location.endswith((".json", ".yaml", ".yml"))


# How model fields are spelled on the command line; what they mean, their defaults and bounds come from the models.
_BUILD_SPELLING = {
    "input": {"flag": "input", "metavar": "INPUT"},
    "out": {"metavar": "DIR"},
    "keep_keys": {"metavar": "KEY[,KEY]"},
    "tokenizer": {"metavar": "NAME_OR_PATH"},
    "ray_address": {"metavar": "ADDR"},
    "progress": {"flag": "--no-progress"},
}
_DATA_SPELLING = {
    "data": {"action": "append", "metavar": "DIR_OR_URL"},
    "weights": {"metavar": "W1,W2,..."},
    "mix": {"metavar": "FILE"},
    "eval_data": {"metavar": "DIR_OR_URL"},
    "eval_every": {"metavar": "N"},
    "output": {"metavar": "DIR"},
    "model": {"metavar": "PATH_OR_ID", "required": False},  # needed by one backend only: checked in _train_config
    "base_model": {"metavar": "NAME", "required": False},
    "image_embeddings": {"metavar": "DIR_OR_URL"},
}
_READ_SPELLING = {
    "keys": {"flag": "--key", "action": "append", "metavar": "KEY"},
    "progress": {"flag": "--no-progress"},
    "megapixels": {"metavar": "MIN,MAX"},
    "images_per_case": {"metavar": "MIN,MAX"},
}
# BuildConfig fields that only a build uses (validate writes nothing); split is set by the build itself
_BUILD_ONLY = (
    "out",
    "val_fraction",
    "split",
    "format",
    "samples_per_shard",
    "max_shard_bytes",
    "jpeg_quality",
)


def _validate_options(p: argparse.ArgumentParser) -> None:
    from shardkit.config import BuildConfig

    add_options(p, BuildConfig, exclude=_BUILD_ONLY, overrides=_BUILD_SPELLING)
    p.add_argument("--json", action="store_true", help="print one JSON report instead of text")


def _build_options(p: argparse.ArgumentParser) -> None:
    from shardkit.config import BuildConfig, BuildRun

    add_options(p, BuildConfig, exclude=["split"], overrides=_BUILD_SPELLING)
    add_options(p, BuildRun, overrides=_BUILD_SPELLING)


def _stats_options(p: argparse.ArgumentParser) -> None:
    from shardkit.stats import StatsOptions
    from shardkit.train import DataOptions

    p.add_argument(
        "build",
        metavar="DIR",
        nargs="+",
        help="a build; several builds (with --weights) or a mix file describe one epoch of the mix",
    )
    add_options(p, DataOptions, ["weights", "mix", "epoch_size"], overrides=_DATA_SPELLING)
    add_options(p, StatsOptions)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def _train_options(p: argparse.ArgumentParser) -> None:
    from shardkit.train import TinkerTrainConfig, TrainConfig

    p.add_argument("--backend", choices=list(_BACKENDS), default="torch", help="where to train (default: %(default)s)")
    add_options(p, TrainConfig, overrides=_DATA_SPELLING)
    add_options(p, TinkerTrainConfig, ["base_model"], overrides=_DATA_SPELLING)


def _embed_options(p: argparse.ArgumentParser) -> None:
    from shardkit.embed import EmbedConfig

    spelling = {"build": {"flag": "build", "metavar": "BUILD"}, "model": {"metavar": "PATH_OR_ID"}}
    add_options(p, EmbedConfig, overrides={**spelling, "out": {"metavar": "DIR_OR_URL"}})
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _verify_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("build", metavar="DIR_OR_URL", help="a shardkit build, or an embeddings folder made by embed")


def _export_options(p: argparse.ArgumentParser) -> None:
    from shardkit.export import ExportOptions

    p.add_argument("target", choices=["llamafactory"], help="the trainer")
    p.add_argument("build", metavar="BUILD", help="a shardkit build (folder or fsspec URL)")
    p.add_argument("--out", required=True, metavar="DIR", help="the data set folder (LLaMA-Factory's dataset_dir)")
    add_options(p, ExportOptions, overrides=_READ_SPELLING)


def _show_options(p: argparse.ArgumentParser) -> None:
    from shardkit.show import ShowOptions

    p.add_argument("build", metavar="BUILD", help="a shardkit build (folder or fsspec URL)")
    add_options(p, ShowOptions, overrides=_READ_SPELLING)
    p.add_argument("--text", action="store_true", help="print the conversations to the terminal instead")


def _demo_data_options(p: argparse.ArgumentParser) -> None:
    from shardkit.synthetic import DemoDataOptions

    p.add_argument("out", metavar="DIR", help="the folder to write (created when missing)")
    add_options(p, DemoDataOptions, overrides=_READ_SPELLING)


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line, with the options of ``command`` only (so that no other command's models are imported)."""
    parser = argparse.ArgumentParser(
        prog="shardkit",
        description="Validate, preprocess and shard vision-language fine-tuning data for Qwen2-VL, "
        "Qwen2.5-VL and Qwen3-VL; stream it to torch or Tinker; train.",
    )
    parser.add_argument("--version", action="version", version=f"shardkit {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, spec in COMMANDS.items():
        p = commands.add_parser(name, help=spec.help, description=spec.description)
        p._negative_number_matcher = NEGATIVE_NUMBERS  # so that --weights -1,2 is a value (then refused as such)
        if name == command:
            spec.options(p)
    return parser


def _command_of(argv: list[str]) -> str | None:
    """The command named in ``argv`` (the first word that is not an option: the top level's take no value)."""
    return next((word for word in argv if not word.startswith("-")), None)


def _validate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from shardkit.config import BuildConfig
    from shardkit.validate import validate

    with tqdm(unit="rec", desc="validate", disable=None, file=sys.stderr) as bar:
        options = given(args, BuildConfig)
        report = validate(options.pop("input"), on_record=lambda: bar.update(1), **options)
    if args.json:
        print(
            json.dumps(
                {"records": report.records, "images": report.images, "problems": report.problems, "ok": report.ok},
                indent=2,
            )
        )
    else:
        for problem in report.problems:
            where = f" (line {problem['source_line']})" if "source_line" in problem else ""
            print(f"{report.unit} {problem['line']}{where}: {problem['reason']} [{problem['code']}]")
        verdict = (
            "clean"
            if report.ok
            else f"{counted(len(report.problems), 'problem')} on {counted(len(report.bad_lines), report.unit)}"
        )
        verdict = verdict if report.records else "the input has no records"
        print(f"{counted(report.records, 'record')}, {counted(report.images, 'image')} checked: {verdict}")
    if report.traceback:
        print(f"shardkit: internal error (a bug in shardkit, please report it) on {report.traceback}", file=sys.stderr)
        return EXIT_BUG
    return EXIT_OK if report.ok else EXIT_PROBLEMS


def _build_config(args: argparse.Namespace) -> tuple[Any, Any]:
    """The :class:`~shardkit.config.BuildConfig` and :class:`~shardkit.config.BuildRun` of a build command."""
    from shardkit.config import BuildConfig, BuildRun

    options = given(args, BuildConfig)
    if "val_fraction" in options:
        options["split"] = "train"  # build_train_val makes both halves
    return BuildConfig.create(**options), BuildRun.create(**given(args, BuildRun))


def _build(args: argparse.Namespace) -> int:
    from shardkit.build import build, build_train_val

    config, run = _build_config(args)
    options = run.model_dump()
    try:
        if config.val_fraction:
            manifests = build_train_val(config, **options)
        else:
            manifests = {"": build(config, **options)}
    except RecordError as exc:
        print(f"shardkit: --strict: {exc}", file=sys.stderr)
        if exc.code == "internal_error":
            print(exc.detail.get("traceback", ""), file=sys.stderr)
            return EXIT_BUG
        return EXIT_PROBLEMS
    code = EXIT_OK
    for split, manifest in manifests.items():
        out = f"{config.out.rstrip('/')}/{split}" if split else config.out
        videos = ""
        if manifest.num_videos:
            videos = f"{counted(manifest.num_videos, 'video')} ({counted(manifest.num_video_frames, 'frame')}), "
        print(
            f"{counted(manifest.num_samples, 'sample')}, {counted(manifest.num_images, 'image')}, {videos}"
            f"{counted(manifest.num_tokens, 'token')} in {counted(len(manifest.shards), manifest.format + ' shard')} "
            f"-> {out}"
        )
        if manifest.num_samples:
            print(
                f"trained turns per sample: {manifest.num_trained_turns / manifest.num_samples:.3g} "
                f"(--train-on {config.train_on}: {config.train_on.meaning})"
            )
        if manifest.num_fitted:
            print(
                f"{counted(manifest.num_fitted, 'sample')} had their "
                f"{'videos and images lowered in frames or' if manifest.num_videos else 'images lowered in'} "
                f"resolution to fit --max-length {config.max_length}"
            )
        if manifest.num_rejected:
            print(
                f"{counted(manifest.num_rejected, 'record')} rejected (see {out}/rejects.jsonl): "
                + ", ".join(f"{k} {v}" for k, v in manifest.rejects_by_code.items())
            )
        code = max(code, _build_verdict(manifest, out, split))
    return code


def _build_verdict(manifest: Any, out: str, split: str) -> int:
    """The exit code of a finished build: a bug (3), records rejected for their input form (1) or no samples at
    all (1) fail it, with one line saying why (a split that no record fell into is no failure)."""
    from shardkit.convert import INTERNAL_ERROR
    from shardkit.shards.folder import ERRORS_LOG

    if internal := manifest.rejects_by_code.get(INTERNAL_ERROR):
        print(
            f"shardkit: error: {counted(internal, 'record')} met an internal error (a bug in shardkit, please report "
            "it); "
            f"the other records are built; first traceback in {out}/{ERRORS_LOG}",
            file=sys.stderr,
        )
        return EXIT_BUG
    if manifest.rejects_by_code.get("other_form"):
        other = list(_rejects_with(out, "other_form"))
        forms = ", ".join(f"{form} {count}" for form, count in Counter(r.get("form") for r in other).most_common())
        print(
            f"shardkit: error: {counted(len(other), 'record')} {'is' if len(other) == 1 else 'are'} in other input "
            f"forms ({forms}; e.g. line {other[0]['line']}: "
            f"{other[0]['reason']}); they were rejected and the other records built. --input-format "
            f"{getattr(manifest.config, 'input_format', '?')} reads its own form only: --input-format auto reads "
            "each record in its own form",
            file=sys.stderr,
        )
        return EXIT_PROBLEMS
    if not manifest.num_samples and (manifest.num_records or not split):
        top = sorted(manifest.rejects_by_code.items(), key=lambda kv: -kv[1])[:3]
        reasons = ", ".join(f"{code} {count}" for code, count in top) or "the input has no records"
        if top and (example := _first_reject(out, top[0][0])):
            reasons += f"; e.g. line {example['line']}: {example['reason']}"
        print(
            f"shardkit: error: no samples written: all {manifest.num_records} records rejected ({reasons}); "
            f"see {out}/rejects.jsonl or run shardkit validate",
            file=sys.stderr,
        )
        return EXIT_PROBLEMS
    return EXIT_OK


def _stats(args: argparse.Namespace) -> int:
    from shardkit.stats import StatsOptions, build_stats, format_stats
    from shardkit.train import DataOptions

    mix = DataOptions.create(**given(args, DataOptions))
    options = given(args, StatsOptions)
    if len(args.build) > 1 or mix.mix or _is_mix_file(args.build[0]):
        from shardkit.stats import format_mix_stats, mix_stats

        mix_file = mix.mix or (args.build[0] if _is_mix_file(args.build[0]) else None)
        builds = [] if mix_file and not mix.mix else args.build
        stats = mix_stats(
            builds,
            weights=mix.weights,
            mix_file=mix_file,
            epoch_size=mix.epoch_size,
            **options,
        )
        print(json.dumps(stats, indent=2) if args.json else format_mix_stats(stats))
        return EXIT_OK
    stats = build_stats(args.build[0], **options)
    if "meta_key" in options and stats["meta_key"] not in stats["meta_keys"]:  # asked for, and absent: a typo?
        raise ConfigError(
            f"no sample of {args.build[0]} has the meta key {stats['meta_key']!r} "
            f"(their meta keys: {', '.join(stats['meta_keys']) or 'none'})"
        )
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return EXIT_OK


_BACKENDS = {"torch": "TrainConfig", "tinker": "TinkerTrainConfig"}


def _train_config(args: argparse.Namespace) -> Any:
    """The :class:`~shardkit.train.TrainConfig` or :class:`~shardkit.train.TinkerTrainConfig` of a train command."""
    import shardkit.train

    model = getattr(shardkit.train, _BACKENDS[args.backend])
    others = [getattr(shardkit.train, name) for backend, name in _BACKENDS.items() if backend != args.backend]
    if stray := [flag(name) for other in others for name in given(args, other) if name not in model.model_fields]:
        raise ConfigError(f"{', '.join(stray)}: not an option of --backend {args.backend}")
    options = given(args, model)
    for name, field in model.model_fields.items():
        if field.is_required() and name not in options:
            raise ConfigError(f"--backend {args.backend} needs {flag(name)}: {field.description}")
    return model.create(**options)


def _first_rank() -> bool:
    """Whether this process is rank 0 of its torchrun (``RANK``), or runs alone: asked once a command has left the
    process group (``shardkit.model.leave_distributed``)."""
    return os.environ.get("RANK", "0") == "0"


def _train(args: argparse.Namespace) -> int:
    config = _train_config(args)
    if args.backend == "tinker":
        from shardkit.train.tinker import train_tinker

        history = train_tinker(config)
    else:
        from shardkit.train.local import train

        history = train(config)
    if history and _first_rank():
        last = history[-1]
        print(f"trained to step {last['step']} (loss {last['loss']:.4f}); outputs in {config.output}")
    return EXIT_OK


def _embed(args: argparse.Namespace) -> int:
    from shardkit.embed import EmbedConfig
    from shardkit.embed.run import embed

    config = EmbedConfig.create(**given(args, EmbedConfig))
    manifest = embed(config, progress=False if args.no_progress else None)
    if _first_rank():
        print(
            f"{counted(manifest.num_images, 'image')}, {counted(manifest.num_image_tokens, 'image token')} "
            f"({manifest.dtype}, hidden {manifest.vision.hidden_size}) in {counted(len(manifest.shards), 'shard')} -> "
            f"{config.out}"
        )
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    from shardkit.load.source import verify_build
    from shardkit.shards import read_manifest
    from shardkit.shards.embeddings import is_embeddings, read_embedding_manifest, verify_embeddings

    embeddings = is_embeddings(args.build)
    problems = verify_embeddings(args.build) if embeddings else verify_build(args.build)
    for problem in problems:
        print(problem)
    shards = len((read_embedding_manifest if embeddings else read_manifest)(args.build).shards)
    verdict = counted(len(problems), "problem") if problems else "all match the manifest"
    print(f"{counted(shards, 'shard')} and the index: {verdict}")
    return EXIT_PROBLEMS if problems else EXIT_OK


def _export(args: argparse.Namespace) -> int:
    from shardkit.export import ExportOptions, export_llamafactory

    summary = export_llamafactory(args.build, args.out, **given(args, ExportOptions))
    for problem in summary.skipped:
        print(f"line {problem['line']}: left out: {problem['reason']}")
    print(
        f"{counted(summary.samples, 'sample')}, {counted(summary.images, 'image')} -> {args.out}/{summary.name}.jsonl "
        f"(dataset {summary.name!r} in {args.out}/dataset_info.json)"
        + (f"; {counted(len(summary.skipped), 'sample')} left out" if summary.skipped else "")
    )
    print(
        f"in the LLaMA-Factory config: dataset_dir: {args.out}, dataset: {summary.name}, and image_max_pixels: "
        f"{summary.largest_image_pixels} or more, so that it keeps the images as they are"
    )
    return EXIT_OK


def _show(args: argparse.Namespace) -> int:
    from shardkit.show import ShowOptions, show_text, write_page

    options = ShowOptions.create(**given(args, ShowOptions))
    if args.text:
        print(show_text(args.build, color=sys.stdout.isatty(), **options.model_dump()), end="")
        return EXIT_OK
    page = write_page(args.build, **options.model_dump())
    rejects = f", {counted(page.rejects, 'reject')}" if options.rejects else ""
    print(f"{counted(page.samples, 'sample')}{rejects} -> {page.out} ({page.bytes / 1e6:.1f} MB)")
    return EXIT_OK


def _demo_data(args: argparse.Namespace) -> int:
    from shardkit.synthetic import DemoDataOptions, make_clinical_dataset

    dataset = make_clinical_dataset(args.out, **given(args, DemoDataOptions))
    print(
        f"wrote {counted(len(dataset.good_lines), 'case')} to {dataset.jsonl}"
        + (
            f" plus {counted(len(dataset.bad_lines), 'broken record')} (lines {min(dataset.bad_lines)}-"
            f"{max(dataset.bad_lines)})"
            if dataset.bad_lines
            else ""
        )
    )
    return EXIT_OK


class Command(NamedTuple):
    """A subcommand: what runs it, what adds its options, and its help."""

    run: Callable[[argparse.Namespace], int]
    options: Callable[[argparse.ArgumentParser], None]
    help: str
    description: str | None = None


COMMANDS = {
    "validate": Command(
        _validate,
        _validate_options,
        help="check an input as build would, without writing anything",
        description="Convert every record exactly as build does with the same options (images read and resized, "
        "the chat tokenized), writing nothing. Prints one line per record build would reject, with its 1-based line "
        "number, code and plain reason, then a summary. Exit 0 when clean; 1 when any problem; 2 a user or "
        "environment error (one line: a bad option, an unreadable input); 3 an internal error (a bug: its traceback is "
        "printed).",
    ),
    "build": Command(
        _build,
        _build_options,
        help="turn an input and its images into training-ready shards",
        description="Validate each record, resize its images to the model's grid, render and tokenize the chat with "
        "per-token loss weights, and write WebDataset tar or Parquet shards, rejects.jsonl and manifest.json (last). "
        "Rejected records are listed in rejects.jsonl and do not fail the build unless --strict. Running the same "
        "command again resumes an interrupted build, and builds again the tasks whose image files changed. Exit 0 "
        "built; 1 --strict met a reject, or no sample was written; 2 a user or environment error (one line); 3 an "
        "internal error (a bug; traceback in OUT/errors.log).",
    ),
    "stats": Command(
        _stats,
        _stats_options,
        help="statistics of a build",
        description="Samples, images, images per sample, top labels from meta, token-length and image-size "
        "distributions, rejects by reason; read from the manifest and shards (image bytes are not read).",
    ),
    "train": Command(
        _train,
        _train_options,
        help="fine-tune from shards: local torch (one node or torchrun) or Tinker",
        description="Local torch (default): Qwen2-VL / Qwen2.5-VL / Qwen3-VL (dense, MoE) via transformers, full "
        "fine-tune or LoRA, AdamW, warmup + cosine, gradient clipping, bf16 autocast on CUDA; multi-node with "
        "torchrun (DDP, only rank 0 writes). Tinker (--backend tinker): LoRA on a Qwen3-VL base model through the "
        "Tinker API (needs TINKER_API_KEY; build the shards with --model qwen3_vl). Both checkpoint the loader's "
        "position: --resume continues exactly where a stopped run left off.",
    ),
    "embed": Command(
        _embed,
        _embed_options,
        help="run a model's vision tower once over every image of a build and cache the embeddings",
        description="Compute each image's embeddings (the vision tower with its merger, what the language model "
        "receives) and write them as shards with a manifest naming the build and the vision tower's fingerprint, "
        "for shardkit train --freeze-vision-tower --image-embeddings DIR. CUDA when available (bf16), else CPU; "
        "under torchrun each rank embeds its share. Run the same command again after an interruption to resume.",
    ),
    "verify": Command(
        _verify,
        _verify_options,
        help="check a build (or an embeddings folder) against its manifest (every shard's size, sha256 and format; "
        "counts; the index)",
        description="Read every shard and the index of a build or embeddings folder (folder or URL), no further than "
        "their recorded size, and compare size, sha256 and format with the manifest; check the manifest's counts "
        "against its shards and the index, and its model family's constants against the family it names. Prints one "
        "line per problem; exit 0 when all match, 1 otherwise.",
    ),
    "export": Command(
        _export,
        _export_options,
        help="write a build in another trainer's data format",
        description="llamafactory: DIR/NAME.jsonl in LLaMA-Factory's sharegpt format, pointing at the build's "
        "resized images (copied to DIR/images/NAME/), and NAME's entry merged into DIR/dataset_info.json. Samples "
        "LLaMA-Factory would misread are listed and left out.",
    ),
    "show": Command(
        _show,
        _show_options,
        help="see what the model will be trained on: an HTML page of samples, or one in the terminal",
        description="Write one self-contained HTML file (images inline, no server, nothing loaded from outside) of "
        "a build: a summary with charts, then one card per sample with its stored images, its tokens decoded by the "
        "build's tokenizer with every trained token highlighted (weight as intensity), image chips, meta and facts. "
        "Samples are drawn deterministically by --seed, or named with --key. --text prints the conversations instead, "
        "trained tokens in colour on a terminal, between [[ and ]] otherwise.",
    ),
    "demo-data": Command(
        _demo_data,
        _demo_data_options,
        help="generate a synthetic data set in the seed's layout",
        description="Write DIR/train_structured.jsonl and DIR/images/case_XX_YY.jpg: clinical cases with 1-6 "
        "photo-like JPEGs each. --bad-lines appends one broken record per kind of problem shardkit rejects.",
    ),
}


# Optional dependencies (pyproject.toml's extras): the top-level module a command may import -> the extra installing it
_EXTRAS = {"torch": "torch", "tinker": "tinker", "peft": "lora", "ray": "ray", "s3fs": "s3", "matplotlib": "plot"}


def main(argv: list[str] | None = None) -> int:
    # transformers' advice "PyTorch was not found ..." on every command of a torch-less install: a command that needs
    # torch says so itself (below)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    argv = sys.argv[1:] if argv is None else argv
    args = _parser(_command_of(argv)).parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return COMMANDS[args.command].run(args)
    except BrokenPipeError:
        return _closed_stdout()
    except ShardkitError as exc:
        print(f"shardkit: error: {exc}", file=sys.stderr)
        return EXIT_FATAL
    except OSError as exc:  # the environment (a file, the network, the disk), not shardkit
        from shardkit.build import os_error_text

        print(f"shardkit: error: {os_error_text(exc)}", file=sys.stderr)
        return EXIT_FATAL
    except KeyboardInterrupt:
        print("shardkit: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:  # an optional dependency this command needs is not installed
        if (extra := _EXTRAS.get((exc.name or "").partition(".")[0])) is None:
            return _bug(args)
        print(
            f"shardkit: error: shardkit {args.command} needs {exc.name}, which is not installed: "
            f"pip install 'shardkit[{extra}]'",
            file=sys.stderr,
        )
        return EXIT_FATAL
    except Exception as exc:  # a bug: the traceback, and where it is kept
        from shardkit.storage import credentials_problem

        if problem := credentials_problem(exc):
            print(f"shardkit: error: {problem}", file=sys.stderr)
            return EXIT_FATAL
        return _bug(args)


def _bug(args: argparse.Namespace) -> int:
    """Report the exception being handled as a bug: its traceback, and where it is kept."""
    trace = traceback.format_exc()
    print(trace, file=sys.stderr)
    log = _log_bug(args, trace)
    print(
        "shardkit: internal error (a bug in shardkit, please report it)" + (f"; traceback in {log}" if log else ""),
        file=sys.stderr,
    )
    return EXIT_BUG


def _first_reject(out: str, code: str) -> dict[str, Any] | None:
    """The first row of ``OUT/rejects.jsonl`` with ``code``."""
    return next(_rejects_with(out, code), None)


def _rejects_with(out: str, code: str) -> Iterator[dict[str, Any]]:
    """The rows of ``OUT/rejects.jsonl`` with ``code``, in order."""
    from shardkit.shards.folder import REJECTS_FILE
    from shardkit.storage import join, open_fs

    fs, folder = open_fs(out)
    with fs.open(join(folder, REJECTS_FILE), "rb") as f:
        yield from (row for line in f if (row := json.loads(line))["code"] == code)


def _log_bug(args: argparse.Namespace, trace: str) -> str | None:
    """Write a bug's traceback to the build folder's ``errors.log``; its path, or None where there is none."""
    from shardkit.shards.folder import ERRORS_LOG

    out = getattr(args, "out", None)
    if args.command != "build" or not out or "://" in out or not os.path.isdir(out):
        return None
    path = os.path.join(out, ERRORS_LOG)
    try:
        with open(path, "a") as f:
            f.write(f"shardkit {__version__}: internal error\n{trace}")
    except OSError:
        return None
    return path


def _closed_stdout() -> int:
    """The reader of our output went away (``| head``): stop quietly, as command-line tools do."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # so that flushing stdout at exit raises nothing
    return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by a closed pipe


if __name__ == "__main__":
    sys.exit(main())
