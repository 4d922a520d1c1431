"""Small inline SVG histograms for the page's summary (no script, no external resources)."""

from __future__ import annotations

from html import escape

import numpy as np

WIDTH, HEIGHT, BARS_HEIGHT = 280, 130, 90


def _bins(values: np.ndarray, most: int) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if np.issubdtype(values.dtype, np.integer) and high - low < most:
        return np.arange(low, high + 2) - 0.5  # one bar per integer value
    return np.linspace(low, high if high > low else low + 1, most + 1)


def histogram_svg(values: list[float] | np.ndarray, title: str, *, most_bars: int = 24) -> str:
    """An SVG histogram of ``values`` with its title, count and range."""
    values = np.asarray(values)
    head = f'<svg class="chart" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img">'
    label = f'<text x="4" y="12" class="ct">{escape(title)} (n={len(values)})</text>'
    if not len(values):
        return f'{head}{label}<text x="4" y="60">no values</text></svg>'
    counts, edges = np.histogram(values, bins=_bins(values, most_bars))
    step = (WIDTH - 8) / len(counts)
    tallest = max(int(counts.max()), 1)
    bars = []
    for i, count in enumerate(counts):
        height = BARS_HEIGHT * int(count) / tallest
        low, high = edges[i], edges[i + 1]
        tip = f"{low:g} to {high:g}: {int(count)}"
        bars.append(
            f'<rect x="{4 + i * step:.1f}" y="{18 + BARS_HEIGHT - height:.1f}" width="{max(step - 1, 1):.1f}" '
            f'height="{height:.1f}"><title>{escape(tip)}</title></rect>'
        )
    if np.issubdtype(values.dtype, np.integer) and len(counts) <= 12:  # a label under each bar
        labels = [(4 + (i + 0.5) * step, f"{edges[i] + 0.5:g}", "middle") for i in range(len(counts))]
    else:
        labels = [(4, f"{values.min():g}", "start"), (WIDTH - 4, f"{values.max():g}", "end")]
    axis = "".join(f'<text x="{x:.1f}" y="{HEIGHT - 6}" text-anchor="{a}">{t}</text>' for x, t, a in labels)
    return head + label + "".join(bars) + axis + "</svg>"
