"""The HTML page of ``shardkit show``: one static file, images inline, every piece of user data escaped.

A sample's videos are shown as strips of their stored frames, each captioned with its time in the clip (as the
processors count it, ``index / fps``) and its frame index; a long video shows :data:`STRIP_FRAMES` of them, evenly
spaced, and says so.

Samples are read through their typed model (:class:`~shardkit.shards.base.SampleInfo`:
a number is a number). A Content-Security-Policy in the page forbids loading
anything from outside it: only ``data:`` images, the page's own style, and the
page's own script (allowed by its sha256; no other script or event handler runs).
"""

from __future__ import annotations

import base64
import hashlib
import json
from html import escape

import numpy as np

from shardkit.boxes import Scale
from shardkit.shards import BuildInfo, Manifest, Sample
from shardkit.shards.base import StoredImage, StoredVideo
from shardkit.show.boxes import Drawn, drawn_boxes
from shardkit.show.charts import histogram_svg
from shardkit.show.data import Reject
from shardkit.show.tokens import ImageSpan, Token, TokenDecoder, Turn, VideoSpan, visible
from shardkit.words import counted

STRIP_FRAMES = 32  # most frames of one video a card shows
STRIP_SIDE = 112  # longest side of a frame in a strip, pixels

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1200px;padding:16px;color:#222;background:#fafafa}
h1{font-size:20px;margin:4px 0 12px}h2{font-size:16px;margin:0 0 6px}
h1 small{font-weight:400;color:#666;font-size:13px;margin-left:8px}
.counts{display:flex;flex-wrap:wrap;gap:8px}
.count{background:#fff;border:1px solid #ddd;padding:4px 10px;font-size:11px}
.count b{display:block;font-size:17px}.options{font-size:11px;color:#444;margin:6px 0}
.charts{display:flex;flex-wrap:wrap;gap:12px;margin:10px 0}.chart{background:#fff;border:1px solid #ddd}
.chart rect{fill:#4a7bd0}.chart text{font-size:10px;fill:#555}.chart .ct{font-size:11px;fill:#222}
#filter{width:360px;padding:5px;font-size:14px}#shown{margin-left:10px;color:#666}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;margin:14px 0;padding:12px}
.facts{color:#555;font-size:12px;margin-bottom:8px}.badge{background:#fde2b6;border-radius:3px;padding:0 5px}
.images{display:flex;gap:10px;overflow-x:auto;align-items:flex-start}.images figure{margin:0;display:table}
.images figcaption{font-size:11px;color:#555;display:table-caption;caption-side:bottom}
.frame{position:relative;line-height:0}.frame svg{position:absolute;left:0;top:0;width:100%;height:100%}
.boxes rect,.boxes circle{fill:none;stroke:#ff2d55;stroke-width:var(--s)}.boxes .text rect{stroke-dasharray:6 3}
.boxes circle{fill:#ff2d55}.boxes text{fill:#fff;stroke:#ff2d55;stroke-width:var(--s);paint-order:stroke}
.turn{margin:8px 0;border-left:3px solid #ccc;padding-left:8px}.role{font-weight:600;font-size:12px;color:#356}
.toks{font:12px/1.6 ui-monospace,monospace;white-space:pre-wrap;word-break:break-word}
.toks span{border-right:1px solid #e4e4e4}.toks .s{color:#999}
.toks .w{background:rgba(255,150,0,var(--w,1));border-right-color:#e0a050}.toks .w.s{color:#6a3d00}
.chip{display:inline-block;background:#dfe8f7;color:#234;border-radius:9px;padding:0 7px;margin:1px;font-size:11px}
.video{margin:8px 0}.strip{display:flex;gap:4px;overflow-x:auto}.strip figure{margin:0;display:table}
.strip figcaption,.video>p{font-size:11px;color:#555;margin:2px 0}
.strip figcaption{display:table-caption;caption-side:bottom}
.nl{color:#bbb}details pre{font-size:11px;margin:4px 0}
table.rejects{border-collapse:collapse;font-size:12px}table.rejects td,th{border-top:1px solid #ddd;padding:4px 8px}
th{text-align:left}
"""

SCRIPT = """
const box = document.getElementById('filter'), shown = document.getElementById('shown');
const cards = Array.from(document.querySelectorAll('.card'));
const texts = cards.map(card => card.textContent.toLowerCase());
function applyFilter() {
  const query = box.value.trim().toLowerCase();
  let count = 0;
  cards.forEach((card, i) => { card.hidden = query !== '' && !texts[i].includes(query); count += !card.hidden; });
  shown.textContent = count + ' of ' + cards.length + ' samples shown';
}
box.addEventListener('input', applyFilter);
applyFilter();
"""
SCRIPT_HASH = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
CSP = f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{SCRIPT_HASH}'"


def _text(value: object) -> str:
    """``value`` as HTML text: escaped, its control characters :func:`~shardkit.show.tokens.visible`."""
    return escape(visible(str(value)))


def _data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def _options(info: BuildInfo) -> str:
    """The build's options as one line (the family's normalisation constants and token ids left out)."""
    family = info.family
    rows = [("model", f"{info.model} (patch {family.patch_size}, merge {family.merge_size})")]
    skip = {"family", "special_tokens", "model", "tokenizer_fingerprint", "input_sha256"}
    rows += [(k, v) for k, v in sorted(info.model_dump(mode="json").items()) if k not in skip and v is not None]
    return " · ".join(f"<b>{_text(k)}</b> {_text(v)}" for k, v in rows)


def summary_html(location: str, manifest: Manifest, samples: list[Sample], token_lengths: np.ndarray) -> str:
    """The top of the page: counts, options and charts."""
    m = manifest
    counts = [
        ("samples", m.num_samples),
        ("images", m.num_images),
        *([("videos", m.num_videos), ("video frames", m.num_video_frames)] if m.num_videos else []),
        ("tokens", m.num_tokens),
        ("trained tokens", m.num_trained_tokens),
        ("records read", m.num_records),
        ("rejected", m.num_rejected),
        ("fitted", m.num_fitted),
        ("truncated", m.num_truncated),
        *([("boxes and points", m.num_grounded)] if m.num_grounded else []),
        (f"{m.format} shards", len(m.shards)),
        ("shown here", len(samples)),
    ]
    boxes = "".join(f'<div class="count"><b>{v}</b>{_text(k)}</div>' for k, v in counts)
    rejected = ", ".join(f"{_text(k)} {v}" for k, v in m.rejects_by_code.items())
    images = [image for sample in samples for image in sample.stored.images]
    charts = [
        histogram_svg(token_lengths, "tokens per sample, whole build"),
        histogram_svg(np.array([len(s.stored.images) for s in samples], dtype=np.int64), "images per sample, shown"),
        histogram_svg(np.array([i.num_tokens for i in images], dtype=np.int64), "tokens per image, shown"),
    ]
    return (
        f'<h1>shardkit show <small>{_text(location)}</small></h1><div class="counts">{boxes}</div>'
        + (f'<p class="options">rejected: {rejected}</p>' if rejected else "")
        + f'<p class="options">{_options(m.config)}</p><div class="charts">{"".join(charts)}</div>'
    )


def _token_html(token: Token) -> str:
    text = _text(token.text).replace("\n", '<b class="nl">↵</b>\n')
    css = "s" if token.special else ""
    if token.weight > 0:
        intensity = 0.25 + 0.75 * min(token.weight, 1.0)
        return f'<span class="w {css}" style="--w:{intensity:.2f}" title="weight {token.weight:g}">{text}</span>'
    return f'<span class="{css}">{text}</span>' if css else f"<span>{text}</span>"


def _chip_html(span: ImageSpan) -> str:
    grid = ",".join(map(str, span.grid_thw))
    kind = "video" if isinstance(span, VideoSpan) else "image"
    return (
        f'<span class="chip" data-{kind}="{span.number}" data-grid="{_text(grid)}" '
        f'data-tokens="{span.num_tokens:d}" data-trained="{span.trained:d}">{_text(span.label)}</span>'
    )


def _turn_html(turn: Turn) -> str:
    items = "".join(_chip_html(i) if isinstance(i, ImageSpan) else _token_html(i) for i in turn.items)
    role = _text(turn.role or "(no header)")
    return f'<div class="turn"><div class="role">{role}</div><div class="toks">{items}</div></div>'


def _boxes_svg(image: StoredImage, drawn: list[Drawn]) -> str:
    """An SVG over the stored image, in its pixels: each box a rectangle and each point a dot, with its label (boxes
    already in the text dashed)."""
    if not drawn:
        return ""
    w, h = image.width, image.height
    line, font = max(2.0, max(w, h) / 300), max(12.0, max(w, h) / 45)
    shapes = []
    for d in drawn:
        if d.kind == "box":
            x1, y1, x2, y2 = d.pixels
            shape = f'<rect x="{x1:g}" y="{y1:g}" width="{x2 - x1:g}" height="{y2 - y1:g}"/>'
            x, y = x1, y1
        else:
            x, y = d.pixels
            shape = f'<circle cx="{x:g}" cy="{y:g}" r="{2 * line:g}"/>'
        label = "" if d.label is None else _text(d.label)
        below = y < font * 1.2  # a label at the top edge goes inside the box
        caption = f'<text x="{x + line:g}" y="{y + font if below else y - line:g}">{label}</text>' if label else ""
        coords = ",".join(f"{v:g}" for v in d.pixels)
        shapes.append(
            f'<g class="{d.kind} {d.source}" data-kind="{d.kind}" data-source="{d.source}" data-label="{label}" '
            f'data-pixels="{coords}">{shape}{caption}</g>'
        )
    return (
        f'<svg class="boxes" viewBox="0 0 {w:d} {h:d}" preserveAspectRatio="none" style="--s:{line:g}px;'
        f'font:{font:g}px sans-serif">{"".join(shapes)}</svg>'
    )


def _figure_html(number: int, image: StoredImage, jpeg: bytes, drawn: list[Drawn] = ()) -> str:
    t, h, w = image.grid_thw
    caption = (
        f"image {number} · stored {image.width}×{image.height} (original {image.original_width}×"
        f"{image.original_height}) · grid {t}×{h}×{w} · {image.num_tokens} tokens · {image.source}"
    )
    if drawn:
        kinds = [d.kind for d in drawn]
        caption += f" · {counted(kinds.count('box'), 'box', 'boxes')}, {counted(kinds.count('point'), 'point')}"
    return (
        f'<figure><div class="frame"><img src="{_data_uri(jpeg)}" width="{image.width:d}" '
        f'height="{image.height:d}" alt="image {number}">{_boxes_svg(image, list(drawn))}</div>'
        f"<figcaption>{_text(caption)}</figcaption></figure>"
    )


def _strip_html(number: int, video: StoredVideo, frames: list[bytes]) -> str:
    """One video: what it is, then a strip of its stored frames (at most :data:`STRIP_FRAMES`), each with its time."""
    t, h, w = video.grid_thw
    shown = list(range(len(frames)))
    if len(shown) > STRIP_FRAMES:
        shown = sorted({round(i * (len(frames) - 1) / (STRIP_FRAMES - 1)) for i in range(STRIP_FRAMES)})
    scale = STRIP_SIDE / max(video.width, video.height)
    width, height = max(1, round(video.width * scale)), max(1, round(video.height * scale))
    sampled = f"{len(frames)} of {video.source_frames} frames ({video.source_fps:g} fps, {video.duration:g} s)"
    about = (
        f"video {number} · {video.source} · {sampled} · stored {video.width}×{video.height} (original "
        f"{video.original_width}×{video.original_height}) · grid {t}×{h}×{w} · {video.num_tokens} tokens"
        + (f" · {len(shown)} frames shown" if len(shown) < len(frames) else "")
    )
    figures = []
    for j in shown:
        caption = f"{video.frame_times[j]:.2f} s · frame {video.frame_indices[j]}"
        figures.append(
            f'<figure><img src="{_data_uri(frames[j])}" width="{width:d}" height="{height:d}" '
            f'alt="video {number} frame {j + 1}"><figcaption>{_text(caption)}</figcaption></figure>'
        )
    stamps = f"<p>timestamps: {_text(' '.join(video.timestamps))}</p>" if video.timestamps else ""
    strip = f'<div class="strip">{"".join(figures)}</div>'
    return f'<div class="video" data-video="{number}"><p>{_text(about)}</p>{stamps}{strip}</div>'


def card_html(sample: Sample, decoder: TokenDecoder, scale: Scale | None = None) -> str:
    """One sample: images (with its grounding boxes drawn; boxes in its text read in ``scale``, the family's), videos
    (strips of their frames), facts, the conversation as tokens, meta."""
    info = sample.stored
    drawn = drawn_boxes(sample, scale)
    badges = []
    if info.fitted:
        lowered = "videos and images lowered" if info.videos else "images lowered in resolution"
        badges.append(f'<span class="badge">fitted: {lowered}</span>')
    if info.truncated_tokens:
        badges.append(f'<span class="badge">truncated: {info.truncated_tokens:d} tokens cut</span>')
    facts = (
        f"source line {info.line:d} · {info.num_tokens:d} tokens, "
        f"{info.num_trained_tokens:d} trained · {len(info.images)} images "
        + (f"· {len(info.videos)} videos " if info.videos else "")
        + " ".join(badges)
    )
    figures = "".join(
        _figure_html(n, i, jpeg, [d for d in drawn if d.image == n - 1])
        for n, (i, jpeg) in enumerate(zip(info.images, sample.images, strict=True), 1)
    )
    strips = "".join(
        _strip_html(n, v, frames) for n, (v, frames) in enumerate(zip(info.videos, sample.videos, strict=True), 1)
    )
    turns = "".join(_turn_html(turn) for turn in decoder.turns(sample))
    meta = _text(json.dumps(info.meta, indent=1, ensure_ascii=False, sort_keys=True))
    key = _text(sample.key)
    return (
        f'<section class="card" data-key="{key}" data-trained="{info.num_trained_tokens:d}">'
        f'<h2>{key}</h2><div class="facts">{facts}</div>'
        f'<div class="images">{figures}</div>{strips}{turns}'
        f"<details open><summary>meta</summary><pre>{meta}</pre></details></section>"
    )


def rejects_html(rows: list[Reject], total: int, thumbnails_from: str | None) -> str:
    """The rejects section: line, code, reason, thumbnail."""
    note = f"{total} rejected records" + (f", the first {len(rows)} listed" if total > len(rows) else "")
    if thumbnails_from is None:
        note += "; pass --image-root (the input's image folder) to see thumbnails"
    cells = []
    for r in rows:
        thumb = f'<img src="{_data_uri(r.thumbnail)}" alt="thumbnail">' if r.thumbnail else ""
        cells.append(
            f"<tr><td>{_text(r.line)}</td><td>{_text(r.code)}</td><td>{_text(r.reason)}</td><td>{thumb}</td></tr>"
        )
    header = "<tr><th>line</th><th>code</th><th>reason</th><th>image</th></tr>"
    return f'<h2 id="rejects">Rejects</h2><p>{_text(note)}</p><table class="rejects">{header}{"".join(cells)}</table>'


def page_html(summary: str, cards: list[str], rejects: str = "") -> str:
    """The whole document."""
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f"<title>shardkit show</title><style>{STYLE}</style></head><body>{summary}"
        '<p><input id="filter" type="search" placeholder="filter: meta value or text"> <span id="shown"></span></p>'
        f'<main id="cards">{"".join(cards)}</main>{rejects}<script>{SCRIPT}</script></body></html>\n'
    )
