"""SVG charts, the project's one way to draw a figure: the report page and the dashboard inline them, and the
benchmark writes one as its figure file (`write_svg`).

Hand-drawn SVG rather than matplotlib: the report page must be one self-contained file under a content
security policy that allows no inline stylesheet but its own (matplotlib's SVG carries a `<style>` of its
own, and its ids and date change from one render to the next), a chart here costs about 0.1 ms against
matplotlib's 0.9 s import and about 170 ms a figure, and matplotlib is no dependency of ours. Standard
library only, so that the benchmark and the service draw alike, neither needing a plotting package;
text is escaped here, so a chart is safe to insert into a page as it is."""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape
from pathlib import Path

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f")


@dataclass
class Series:
    name: str
    xs: list[float]
    ys: list[float]


@dataclass
class Rule:
    """A dashed reference line across the plot: horizontal at y = value (axis "y") or vertical at x."""

    value: float
    label: str
    axis: str = "y"


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if m * step >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    if abs(v) >= 1e6:
        return f"{v / 1e6:g}M"
    if abs(v) >= 1e4:
        return f"{v / 1e3:g}k"
    return f"{v:g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"


def _frame(width: int, height: int, title: str, body: list[str]) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11" role="img">'
        f"<title>{escape(title)}</title>"
        f'<text x="{width / 2}" y="14" text-anchor="middle" font-size="13" font-weight="bold">'
        f"{escape(title)}</text>" + "".join(body) + "</svg>"
    )


def line_chart(
    series: list[Series],
    title: str,
    xlabel: str,
    ylabel: str,
    *,
    log_x: bool = False,
    rules: list[Rule] | None = None,
    width: int = 520,
    height: int = 300,
) -> str:
    """Lines with markers and a legend; log_x for temperatures and query budgets; dashed `rules`."""
    pts = [(x, y) for s in series for x, y in zip(s.xs, s.ys, strict=True) if math.isfinite(y)]
    if not pts:
        return _frame(width, 40, title, ['<text x="10" y="32">no data</text>'])
    rules = [r for r in rules or [] if math.isfinite(r.value) and (r.axis == "y" or not log_x or r.value > 0)]
    left, right, top, bottom = 58, 130, 24, 40
    fx = (lambda v: math.log10(v)) if log_x else (lambda v: v)
    x_lo = min([fx(x) for x, _ in pts] + [fx(r.value) for r in rules if r.axis == "x"])
    x_hi = max([fx(x) for x, _ in pts] + [fx(r.value) for r in rules if r.axis == "x"])
    y_lo = min([y for _, y in pts] + [r.value for r in rules if r.axis == "y"])
    y_hi = max([y for _, y in pts] + [r.value for r in rules if r.axis == "y"])
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    pad = (y_hi - y_lo) * 0.08 or abs(y_hi) * 0.1 or 1.0
    y_lo, y_hi = y_lo - pad, y_hi + pad
    pw, ph = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (fx(x) - x_lo) / (x_hi - x_lo) * pw

    def sy(y: float) -> float:
        return top + (1 - (y - y_lo) / (y_hi - y_lo)) * ph

    body = [f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>']
    for t in _ticks(y_lo, y_hi):
        body.append(
            f'<line x1="{left}" x2="{left + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#eee"/>'
            f'<text x="{left - 4}" y="{sy(t) + 4:.1f}" text-anchor="end">{_fmt(t)}</text>'
        )
    xticks = sorted({x for x, _ in pts}) if log_x else _ticks(x_lo, x_hi)
    if all(float(x).is_integer() for x, _ in pts):  # epochs: no tick between two of them
        xticks = [t for t in xticks if float(t).is_integer()]
    for t in xticks[:: max(1, len(xticks) // 10)]:
        body.append(f'<text x="{sx(t):.1f}" y="{top + ph + 14}" text-anchor="middle">{_fmt(t)}</text>')
    body.append(f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle">{escape(xlabel)}</text>')
    body.append(
        f'<text transform="translate(12,{top + ph / 2}) rotate(-90)" text-anchor="middle">'
        f"{escape(ylabel)}</text>"
    )
    for r in rules:
        if r.axis == "y":
            x1, x2, y1, y2, tx, ty = left, left + pw, sy(r.value), sy(r.value), left + 4, sy(r.value) - 4
        else:
            x1, x2, y1, y2, tx, ty = sx(r.value), sx(r.value), top, top + ph, sx(r.value) + 4, top + ph - 6
        anchor = "start"
        if tx > left + pw / 2:  # the label goes on the side of the line with room for it
            tx, anchor = tx - 8, "end"
        body.append(
            f'<line x1="{x1:.1f}" x2="{x2:.1f}" y1="{y1:.1f}" y2="{y2:.1f}" stroke="#555" '
            'stroke-dasharray="4 3"/>'
            f'<text x="{tx:.1f}" y="{ty:.1f}" text-anchor="{anchor}" fill="#555">{escape(r.label)}</text>'
        )
    for i, s in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        xy = [(sx(x), sy(y)) for x, y in zip(s.xs, s.ys, strict=True) if math.isfinite(y)]
        if not xy:
            continue
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)
        body.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.8"/>')
        body += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{color}"/>' for x, y in xy]
        ly = top + 10 + 16 * i
        body.append(
            f'<rect x="{left + pw + 10}" y="{ly - 8}" width="10" height="10" fill="{color}"/>'
            f'<text x="{left + pw + 24}" y="{ly + 1}">{escape(s.name)}</text>'
        )
    return _frame(width, height, title, body)


@dataclass
class Bar:
    label: str
    value: float
    err: float  # half-width of the error bar (0: none)
    highlight: bool = False


def bar_chart(
    bars: list[Bar], title: str, xlabel: str, *, reference: float | None = None, width: int = 560
) -> str:
    """Horizontal bars with error bars; a dashed reference line (e.g. the best LS student)."""
    if not bars:
        return _frame(width, 40, title, ['<text x="10" y="32">no data</text>'])
    left, right, top, row = 150, 70, 24, 20
    height = top + row * len(bars) + 36
    errs = [b.err if math.isfinite(b.err) else 0.0 for b in bars]
    lo = min(b.value - e for b, e in zip(bars, errs, strict=True))
    hi = max(b.value + e for b, e in zip(bars, errs, strict=True))
    if reference is not None:
        lo, hi = min(lo, reference), max(hi, reference)
    span = hi - lo or 1.0
    lo, hi = lo - 0.15 * span, hi + 0.1 * span
    pw = width - left - right

    def sx(v: float) -> float:
        return left + (v - lo) / (hi - lo) * pw

    body = []
    for t in _ticks(lo, hi):
        body.append(
            f'<line x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{top}" y2="{top + row * len(bars)}" stroke="#eee"/>'
            f'<text x="{sx(t):.1f}" y="{top + row * len(bars) + 14}" text-anchor="middle">{_fmt(t)}</text>'
        )
    for i, (b, e) in enumerate(zip(bars, errs, strict=True)):
        y = top + i * row
        color = PALETTE[1] if b.highlight else PALETTE[0]
        body.append(
            f'<text x="{left - 6}" y="{y + 14}" text-anchor="end">{escape(b.label)}</text>'
            f'<rect x="{left}" y="{y + 4}" width="{max(sx(b.value) - left, 0):.1f}" height="{row - 8}" '
            f'fill="{color}" opacity="0.75"/>'
        )
        if e > 0:
            body.append(
                f'<line x1="{sx(b.value - e):.1f}" x2="{sx(b.value + e):.1f}" y1="{y + row / 2}" '
                f'y2="{y + row / 2}" stroke="#000"/>'
            )
        body.append(f'<text x="{sx(b.value + e) + 4:.1f}" y="{y + 14}">{b.value:.2f}</text>')
    if reference is not None:
        body.append(
            f'<line x1="{sx(reference):.1f}" x2="{sx(reference):.1f}" y1="{top}" '
            f'y2="{top + row * len(bars)}" stroke="#d62728" stroke-dasharray="4 3"/>'
        )
    body.append(f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle">{escape(xlabel)}</text>')
    return _frame(width, height, title, body)


def write_svg(svg: str, path: str | Path) -> None:
    """A chart as a figure file of its own (an SVG document any browser or editor opens)."""
    Path(path).write_text('<?xml version="1.0" encoding="utf-8"?>\n' + svg + "\n", encoding="utf-8")
