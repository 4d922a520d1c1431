"""``shardkit show``: what the model will be trained on, as a self-contained HTML page or as terminal text.

The build (local or any fsspec URL, tar or Parquet) is read through
:class:`~shardkit.load.source.BuildSource`; a deterministic choice of samples
(or the ones named by key) is shown with its stored images (their grounding boxes
and points drawn over them, with their labels), its tokens decoded
by the build's tokenizer with trained tokens highlighted, and its facts; a
summary with charts sits on top and, on request, the rejected records below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import Field

from shardkit.families import FAMILIES
from shardkit.load.source import BuildSource
from shardkit.options import Options
from shardkit.show.data import build_decoder, image_root_of, read_rejects, read_samples
from shardkit.show.page import card_html, page_html, rejects_html, summary_html
from shardkit.show.text import sample_text
from shardkit.storage import open_fs, write_bytes


class ShowOptions(Options):
    """The options of ``shardkit show``: which samples, the rejects, and where the page goes."""

    out: str = Field("show.html", description="the HTML file to write")
    samples: int = Field(50, ge=1, description="samples to show")
    seed: int = Field(0, description="seed of the choice of samples")
    keys: list[str] | None = Field(None, description="show the sample with this key (repeatable)")
    rejects: bool = Field(False, description="add the rejected records (rejects.jsonl)")
    image_root: str | None = Field(
        None, description="--rejects: folder the input's image paths are relative to, for thumbnails of rejects"
    )


@dataclass(frozen=True)
class Page:
    """The page's HTML and how many samples and reject rows it shows."""

    html: str
    samples: int
    rejects: int


@dataclass(frozen=True)
class WrittenPage:
    """What :func:`write_page` wrote where."""

    out: str
    samples: int
    rejects: int
    bytes: int


def make_page(location: str, **options: Any) -> Page:
    """The page of the build at ``location``; ``options`` are :class:`ShowOptions`': ``samples`` drawn by ``seed``
    (or those with ``keys``), and the rejects when asked (thumbnails of their images from ``image_root``)."""
    show = ShowOptions.create(**options)
    source, decoder, chosen = _chosen(location, show)
    summary = summary_html(location, source.manifest, chosen, source.index.num_tokens)
    family = FAMILIES.get(source.manifest.config.model)
    scale = family.box_style.scale if family is not None and family.box_style is not None else None
    cards = [card_html(sample, decoder, scale) for sample in chosen]
    section, rows = "", 0
    if show.rejects:
        found, total = read_rejects(location, source.manifest, image_root=show.image_root)
        root = image_root_of(source.manifest.config, show.image_root)
        section, rows = rejects_html(found, total, root), len(found)
    return Page(page_html(summary, cards, section), len(chosen), rows)


def write_page(location: str, out: str, **options: Any) -> WrittenPage:
    """Write the page of the build at ``location`` to ``out`` (a path or URL), atomically; see :func:`make_page`."""
    page = make_page(location, **options)
    data = page.html.encode("utf-8")
    fs, path = open_fs(out)
    write_bytes(fs, path, data)
    return WrittenPage(out, page.samples, page.rejects, len(data))


def show_text(location: str, *, color: bool, **options: Any) -> str:
    """The chosen samples' conversations as terminal text (see :func:`~shardkit.show.text.sample_text`)."""
    _, decoder, chosen = _chosen(location, ShowOptions.create(**options))
    return "\n".join(sample_text(sample, decoder, color=color) for sample in chosen)


__all__ = ["Page", "ShowOptions", "WrittenPage", "make_page", "sample_text", "show_text", "write_page"]


def _chosen(location: str, show: ShowOptions) -> tuple[BuildSource, Any, list[Any]]:
    """The build's source (closed), its token decoder and the samples drawn by ``seed`` (or those with ``keys``)."""
    source = BuildSource(location)
    try:
        return (
            source,
            build_decoder(source.manifest),
            read_samples(source, count=show.samples, seed=show.seed, keys=show.keys),
        )
    finally:
        source.close()
