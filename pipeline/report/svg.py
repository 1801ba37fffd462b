"""Small inline SVG charts for the reports: a line chart and horizontal bars (no plotting
library: the driver and the CLI stay light, and the page needs nothing from outside)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from pipeline.report.page import esc, number

COLOURS = ("#2f6fde", "#e07b00", "#1a7f37", "#c62828", "#7b3fb5")


def _ticks(high: float, count: int = 5) -> list[float]:
    """Round steps from 0 to at least ``high``."""
    if high <= 0:
        return [0.0, 1.0]
    raw = high / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if m * step >= raw)
    return [i * step for i in range(int(math.ceil(high / step - 1e-9)) + 1)]


def line_chart(series: Sequence[tuple[str, Sequence[float], Sequence[float]]], *,
               x_label: str, y_label: str, width: int = 540, height: int = 240,
               y_max: float | None = None, x_format=lambda v: f"{v:g}",
               y_format=lambda v: f"{v:g}", step: bool = False, name: str = "") -> str:
    """``(legend, xs, ys)`` lines on shared axes from 0; ``step`` draws stairs (a CED)."""
    left, right, top, bottom = 56, 12, 12, 38
    xs_all = [x for _, xs, _ in series for x in xs] or [1.0]
    ys_all = [y for _, _, ys in series for y in ys if math.isfinite(y)] or [1.0]
    x_ticks = _ticks(max(xs_all))
    y_ticks = _ticks(y_max if y_max is not None else max(ys_all))
    x_hi, y_hi = x_ticks[-1] or 1.0, y_ticks[-1] or 1.0
    w, h = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + w * x / x_hi

    def py(y: float) -> float:
        return top + h * (1 - min(y, y_hi) / y_hi)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
           f'width="{width}" height="{height}" role="img" data-chart="{esc(name)}" '
           f'aria-label="{esc(y_label)} by {esc(x_label)}">']
    for y in y_ticks:
        out.append(f'<line x1="{left}" x2="{left + w}" y1="{py(y):.1f}" y2="{py(y):.1f}" '
                   'stroke="#e6e9ef"/>')
        out.append(f'<text x="{left - 6}" y="{py(y) + 4:.1f}" text-anchor="end">'
                   f'{esc(y_format(y))}</text>')
    for x in x_ticks:
        out.append(f'<text x="{px(x):.1f}" y="{top + h + 16}" text-anchor="middle">'
                   f'{esc(x_format(x))}</text>')
    out.append(f'<line x1="{left}" x2="{left + w}" y1="{top + h}" y2="{top + h}" '
               'stroke="#9aa3b2"/>')
    out.append(f'<text x="{left + w / 2:.1f}" y="{height - 4}" text-anchor="middle">'
               f'{esc(x_label)}</text>')
    out.append(f'<text x="12" y="{top + h / 2:.1f}" text-anchor="middle" '
               f'transform="rotate(-90 12 {top + h / 2:.1f})">{esc(y_label)}</text>')
    for i, (legend, xs, ys) in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        points, last = [], None
        for x, y in zip(xs, ys, strict=True):
            y = y if math.isfinite(y) else 0.0
            if step and last is not None:
                points.append(f"{px(x):.1f},{py(last):.1f}")
            points.append(f"{px(x):.1f},{py(y):.1f}")
            last = y
        if len(points) == 1:  # one point: a dot, not an invisible line
            x, y = points[0].split(",")
            out.append(f'<circle cx="{x}" cy="{y}" r="3" fill="{colour}"/>')
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" '
                   f'points="{" ".join(points)}"><title>{esc(legend)}</title></polyline>')
        if len(series) > 1:
            out.append(f'<text x="{left + w - 4}" y="{top + 14 + 14 * i}" text-anchor="end" '
                       f'style="fill:{colour}">{esc(legend)}</text>')
    out.append("</svg>")
    return "".join(out)


def bars(items: Sequence[tuple[str, float]], *, unit: str = "", width: int = 540,
         digits: int = 1, name: str = "") -> str:
    """Horizontal bars, one per ``(label, value)``, the value written beside each."""
    left, bar_h, gap = 150, 18, 8
    top = 4
    height = top + len(items) * (bar_h + gap) + 4
    high = max([v for _, v in items] + [1e-12])
    w = width - left - 110
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
           f'width="{width}" height="{height}" role="img" data-chart="{esc(name)}">']
    for i, (label, value) in enumerate(items):
        y = top + i * (bar_h + gap)
        length = max(1.0, w * value / high) if value > 0 else 0.0
        out.append(f'<text x="{left - 8}" y="{y + 13}" text-anchor="end">{esc(label)}</text>')
        out.append(f'<rect x="{left}" y="{y}" width="{length:.1f}" height="{bar_h}" rx="3" '
                   f'fill="{COLOURS[i % len(COLOURS)]}"><title>{esc(label)}: '
                   f'{esc(number(value, digits))}{esc(unit)}</title></rect>')
        out.append(f'<text x="{left + length + 6:.1f}" y="{y + 13}">'
                   f'{esc(number(value, digits))}{esc(unit)}</text>')
    out.append("</svg>")
    return "".join(out)
