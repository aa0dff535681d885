"""One self-contained HTML page: inline CSS, inline SVG charts, images as data URIs; no script, no external URL."""

from __future__ import annotations

import base64
import html
import math
import re

import numpy as np
import pandas as pd

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:1.2em auto;padding:0 1em;
color:#222}
p.answer{font-size:16px;background:#eef5fc;border-left:4px solid #4a7fb5;padding:.6em .9em;margin:.6em 0}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:2.2em} h3{font-size:1.05em;margin:1.4em 0 .3em}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:13px;display:block;overflow-x:auto;max-width:100%;
scrollbar-width:thin;scrollbar-color:#999 #eee} table::-webkit-scrollbar{height:9px;background:#eee}
table::-webkit-scrollbar-thumb{background:#999;border-radius:4px} div.wide{font-size:12px;color:#555}
th,td{padding:3px 9px;border-bottom:1px solid #e6e6e6;text-align:left;vertical-align:top}
th{background:#f4f4f4;font-weight:600} td.n,th.n{text-align:right;font-variant-numeric:tabular-nums;
white-space:nowrap} tr.hl td{background:#fff6d6}
p.note{color:#555;font-size:13px;margin:.3em 0 .8em} nav a{margin-right:.8em}
.bar{display:inline-block;height:10px;background:#4a7fb5;vertical-align:middle}
.bar.fail{background:#c77}
.thumbs{display:flex;flex-wrap:wrap;gap:6px;margin:.3em 0 .8em} .label{font-size:12px;color:#555;margin-top:.4em}
figure{margin:0;width:104px;font-size:11px;text-align:center;color:#444}
figure img{width:96px;height:96px;object-fit:contain;background:#eee;display:block;margin:0 auto 2px;
border:3px solid #ccc} figure.kept img{border-color:#3a9a5b} figure.dropped img{border-color:#c44}
figure figcaption{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
svg{display:block;margin:.4em 0 1em;font:11px system-ui,sans-serif} svg text{fill:#333}
.charts{display:flex;flex-wrap:wrap;gap:1em} .groups{display:flex;flex-wrap:wrap;column-gap:2em}
"""
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
           "#bcbd22"]


def esc(x) -> str:
    return html.escape(str(x), quote=True)


def page(title: str, intro: str, sections: list[tuple[str, str, str]]) -> str:
    """The page: a title, a line of introduction, a table of contents and one section per (id, heading, body)."""
    nav = " ".join(f'<a href="#{sid}">{esc(head)}</a>' for sid, head, _ in sections)
    body = "\n".join(f'<section id="{sid}"><h2>{esc(head)}</h2>\n{content}</section>' for sid, head, content in
                     sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<link rel="icon" href="data:,"><style>{CSS}</style></head>\n<body><h1>{esc(title)}</h1>'
            f'<p class="note">{intro}</p><nav>{nav}</nav>\n{body}\n</body></html>\n')


def note(text: str) -> str:
    """A paragraph of explanation (``text`` is HTML)."""
    return f'<p class="note">{text}</p>'


NUMBER = re.compile(r"[<+-]?\d[\d,]*(\.\d+)?%?|\[[^\]]*\]|n/a|")  # a number, an interval, n/a or nothing


def table(df: pd.DataFrame, highlight: set[int] = frozenset(), raw: set[str] = frozenset()) -> str:
    """A table; columns whose values are all numbers (or intervals) are right-aligned. ``raw`` columns hold
    HTML; ``highlight`` are row positions to mark."""
    df = df.copy()
    for c in df.columns:  # a float column of whole numbers (NaN for none) is a count
        if df[c].dtype == object and df[c].map(lambda v: v is None or (isinstance(v, (int, float)) and
                                                                      not isinstance(v, bool))).all():
            df[c] = pd.to_numeric(df[c])  # numbers with gaps, e.g. read back from JSON
        values = df[c].dropna()
        if df[c].dtype.kind == "f" and len(values) and (values == values.round()).all() and (values.abs() > 1).any():
            df[c] = pd.Series([None if pd.isna(v) else int(v) for v in df[c]], index=df.index, dtype=object)
    numeric = {c for c in df.columns if len(df) and all(NUMBER.fullmatch(_cell(v)) for v in df[c]) and
               any(_cell(v) not in ("", "n/a") for v in df[c])}
    head = "".join(f'<th class="n">{esc(c)}</th>' if c in numeric else f"<th>{esc(c)}</th>" for c in df.columns)
    rows = []
    for i, (_, row) in enumerate(df.iterrows()):
        cells = "".join(f'<td class="{"n" if c in numeric else ""}">'
                        f'{row[c] if c in raw else esc(_cell(row[c]))}</td>' for c in df.columns)
        rows.append(f'<tr class="hl">{cells}</tr>' if i in highlight else f"<tr>{cells}</tr>")
    hint = (f'<div class="wide">{len(df.columns)} columns: scroll the table sideways for the rest '
            '&rarr;</div>') if len(df.columns) > 9 else ""
    return f"{hint}<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _cell(v) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.3f}"
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return f"{v:,}"
    return "" if v is None else str(v)


def bar(share: float, fail: bool = False, width: int = 160) -> str:
    """An inline bar of ``share`` (0..1) of ``width`` pixels."""
    return f'<span class="bar{" fail" if fail else ""}" style="width:{max(1, round(share * width))}px"></span>'


def data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()


def thumbs(items: list[tuple[str | None, str, str]], label: str = "") -> str:
    """A row of thumbnails: (data URI or None, caption, class: kept / dropped / "")."""
    figs = "".join(f'<figure class="{cls}">' + (f'<img src="{uri}" alt="{esc(cap)}" title="{esc(cap)}">' if uri
                                                else '<img alt="missing">') +
                   f"<figcaption>{esc(cap)}</figcaption></figure>" for uri, cap, cls in items)
    return (f'<div class="label">{esc(label)}</div>' if label else "") + f'<div class="thumbs">{figs}</div>'


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if step * m >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:g}"


class Plot:
    """An SVG chart frame: data ranges mapped to pixels, axes with ticks and labels; add marks with :meth:`add`."""

    def __init__(self, x: tuple[float, float], y: tuple[float, float], xlabel: str, ylabel: str, title: str = "",
                 width: int = 460, height: int = 260, xticks: list[tuple[float, str]] | None = None, right: int = 14,
                 yticks: bool = True):
        self.x0, self.x1 = x if x[1] > x[0] else (x[0] - 1, x[0] + 1)
        self.y0, self.y1 = y if y[1] > y[0] else (y[0] - 1, y[0] + 1)
        self.w, self.h, self.m = width, height, (28 if title else 12, right, 38, 52)  # top, right, bottom, left
        self.parts = [f'<text x="{width / 2}" y="16" text-anchor="middle" font-weight="600">{esc(title)}</text>'
                      ] if title else []
        t, r, b, l_ = self.m
        self.parts.append(f'<rect x="{l_}" y="{t}" width="{width - l_ - r}" height="{height - t - b}" fill="#fbfbfb" '
                          'stroke="#bbb"/>')
        for v in _ticks(self.y0, self.y1) if yticks else []:
            py = self.py(v)
            self.parts.append(f'<line x1="{l_}" x2="{width - r}" y1="{py:.1f}" y2="{py:.1f}" stroke="#eee"/>'
                              f'<text x="{l_ - 4}" y="{py + 4:.1f}" text-anchor="end">{_fmt(v)}</text>')
        for v, text in xticks or [(v, _fmt(v)) for v in _ticks(self.x0, self.x1)]:
            px = self.px(v)
            self.parts.append(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{height - b}" y2="{height - b + 4}" '
                              f'stroke="#888"/><text x="{px:.1f}" y="{height - b + 15}" text-anchor="middle">'
                              f'{esc(text)}</text>')
        self.parts.append(f'<text x="{(l_ + width - r) / 2}" y="{height - 6}" text-anchor="middle">{esc(xlabel)}'
                          f'</text><text transform="translate(12,{(t + height - b) / 2}) rotate(-90)" '
                          f'text-anchor="middle">{esc(ylabel)}</text>')

    def px(self, v: float) -> float:
        return self.m[3] + (v - self.x0) / (self.x1 - self.x0) * (self.w - self.m[3] - self.m[1])

    def py(self, v: float) -> float:
        return self.h - self.m[2] - (v - self.y0) / (self.y1 - self.y0) * (self.h - self.m[0] - self.m[2])

    def add(self, svg: str) -> Plot:
        self.parts.append(svg)
        return self

    def hline(self, y: float, label: str, color: str = "#888") -> Plot:
        """A dashed line across, labelled in the right margin when there is one (clear of the data)."""
        py, outside = self.py(y), self.m[1] >= 60
        x, anchor = (self.w - self.m[1] + 4, "start") if outside else (self.w - self.m[1] - 3, "end")
        return self.add(f'<line x1="{self.m[3]}" x2="{self.w - self.m[1]}" y1="{py:.1f}" y2="{py:.1f}" '
                        f'stroke="{color}" stroke-dasharray="5,4"/><text x="{x}" '
                        f'y="{py + (4 if outside else -3):.1f}" text-anchor="{anchor}" fill="{color}">'
                        f'{esc(label)}</text>')

    def vline(self, x: float, label: str, color: str = "#c44") -> Plot:
        px = self.px(x)
        return self.add(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{self.m[0]}" y2="{self.h - self.m[2]}" '
                        f'stroke="{color}" stroke-width="2"/><text x="{px + 3:.1f}" y="{self.m[0] + 11}" '
                        f'fill="{color}">{esc(label)}</text>')

    def legend(self, names: list[str]) -> Plot:
        """The series' names, right of the plot area."""
        for i, name in enumerate(names):
            y = self.m[0] + 8 + 13 * i
            x = self.w - self.m[1] + 8
            self.add(f'<rect x="{x}" y="{y - 7}" width="10" height="3" fill="{PALETTE[i % len(PALETTE)]}"/>'
                     f'<text x="{x + 14}" y="{y - 2}">{esc(name)}</text>')
        return self

    def svg(self) -> str:
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.w}" height="{self.h}" '
                f'viewBox="0 0 {self.w} {self.h}" role="img">{"".join(self.parts)}</svg>')


def histogram(values: np.ndarray, lines: list[tuple[float, str]], xlabel: str, title: str = "",
              bins: int = 30) -> str:
    """Counts of ``values`` (1st to 99th percentile, the rest in the end bins) with vertical ``lines``."""
    values = values[np.isfinite(values)]
    if not len(values):
        return note("no finite scores")
    lo, hi = np.percentile(values, [1, 99])
    for x, _ in lines:  # keep the threshold in view
        lo, hi = min(lo, x), max(hi, x)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    counts, _ = np.histogram(np.clip(values, lo, hi), edges)
    plot = Plot((lo, hi), (0, counts.max() * 1.08), xlabel, "samples", title)
    for c, a, b in zip(counts, edges[:-1], edges[1:]):
        x0, x1, y = plot.px(a), plot.px(b), plot.py(c)
        plot.add(f'<rect x="{x0:.1f}" y="{y:.1f}" width="{max(0.5, x1 - x0 - 0.5):.1f}" height="{plot.py(0) - y:.1f}"'
                 ' fill="#7aa6d6"/>')
    for x, label in lines:
        plot.vline(x, label)
    return plot.svg()


def lines(series: dict[str, tuple[list[float], list[float]]], xlabel: str, ylabel: str, title: str = "",
          chance: float | None = None, xticks: list[tuple[float, str]] | None = None) -> str:
    """One line with markers per series, a dashed chance line and a legend."""
    xs = [x for sx, _ in series.values() for x in sx]
    ys = [y for _, sy in series.values() for y in sy] + ([chance] if chance is not None else [])
    plot = Plot((min(xs), max(xs)), (0, max(ys) * 1.12 or 1), xlabel, ylabel, title, width=480, xticks=xticks,
                right=max(84, 8 + 7 * max(len(n) for n in series) + 14))
    if chance is not None:
        plot.hline(chance, f"chance {chance:.3f}")
    for i, (sx, sy) in enumerate(series.values()):
        color = PALETTE[i % len(PALETTE)]
        pts = " ".join(f"{plot.px(x):.1f},{plot.py(y):.1f}" for x, y in zip(sx, sy))
        plot.add(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="1.6"/>' +
                 "".join(f'<circle cx="{plot.px(x):.1f}" cy="{plot.py(y):.1f}" r="2.5" fill="{color}"/>'
                         for x, y in zip(sx, sy)))
    return plot.legend(list(series)).svg()


def points(items: list[tuple[str, float, float, float | None, float | None]], xlabel: str, ylabel: str,
           title: str = "", chance: float | None = None) -> str:
    """Labelled points (name, x, y, low, high) with vertical interval bars where known."""
    xs = [x for _, x, _, _, _ in items]
    ys = [v for _, _, y, lo, hi in items for v in (y, lo, hi) if v is not None]
    ys += [chance] if chance is not None else []
    pad = (max(xs) - min(xs)) * 0.08 or 1
    plot = Plot((min(xs) - pad, max(xs) + pad), (min(0, min(ys)), max(ys) * 1.12 or 1), xlabel, ylabel, title,
                width=560, height=300)
    if chance is not None:
        plot.hline(chance, f"chance {chance:.3f}")
    for i, (name, x, y, lo, hi) in enumerate(items):
        color = PALETTE[i % len(PALETTE)]
        px = plot.px(x)
        if lo is not None and hi is not None:
            plot.add(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{plot.py(lo):.1f}" y2="{plot.py(hi):.1f}" '
                     f'stroke="{color}" stroke-width="1.5"/>')
        left = px > plot.w * 0.6  # labels near the right edge go left of their point
        plot.add(f'<circle cx="{px:.1f}" cy="{plot.py(y):.1f}" r="4" fill="{color}"/>'
                 f'<text x="{px + (-6 if left else 6):.1f}" y="{plot.py(y) - 5 - 11 * (i % 2):.1f}" fill="{color}" '
                 f'text-anchor="{"end" if left else "start"}">{esc(name)}</text>')
    return plot.svg()


def forest(items: list[tuple[str, float, float | None, float | None]], xlabel: str, title: str = "",
           chance: float | None = None) -> str:
    """One row per (name, value, low, high), top to bottom: a point with its interval bar, the name above it,
    and a dashed chance line across."""
    vals = [v for _, y, lo, hi in items for v in (y, lo, hi) if v is not None] + ([chance] if chance else [])
    n = len(items)
    plot = Plot((min(vals + [0.0]), max(vals) * 1.08 or 1), (-0.6, n - 0.4), xlabel, "", title, width=520,
                height=(28 if title else 12) + 30 * n + 38, yticks=False)
    if chance is not None:
        px = plot.px(chance)
        plot.add(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{plot.m[0]}" y2="{plot.h - plot.m[2]}" stroke="#888" '
                 f'stroke-dasharray="5,4"/><text x="{px + 3:.1f}" y="{plot.h - plot.m[2] - 4}" fill="#888">chance '
                 f'{chance:.3f}</text>')
    for i, (name, y, lo, hi) in enumerate(items):
        color, py = PALETTE[i % len(PALETTE)], plot.py(n - 1 - i)
        if lo is not None and hi is not None:
            plot.add(f'<line x1="{plot.px(lo):.1f}" x2="{plot.px(hi):.1f}" y1="{py:.1f}" y2="{py:.1f}" '
                     f'stroke="{color}" stroke-width="2"/>')
        plot.add(f'<circle cx="{plot.px(y):.1f}" cy="{py:.1f}" r="4" fill="{color}"/>'
                 f'<text x="{plot.m[3] + 4}" y="{py - 7:.1f}" fill="{color}">{esc(name)}</text>')
    return plot.svg()
