"""Three small inline-SVG charts for the HTML report, written by hand.

Why by hand: the report must open offline as one file, and these are a line chart, a scatter plot and a
heat map — a few hundred lines of SVG. matplotlib's SVG backend would do it too but is a large
dependency that mobilequant does not otherwise need (it is not installed in the target environment),
renders fonts as paths (bigger files, text not searchable) and offers no per-point tooltips; here every
point carries a ``<title>`` tooltip naming the layer.

All functions return an ``<svg>`` string; all text is escaped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

__all__ = ["line_chart", "scatter_chart", "heatmap"]

FONT = 'font-family="system-ui,Segoe UI,Helvetica,Arial,sans-serif" font-size="11"'
COLORS = {"acc": "#1f77b4", "iso": "#ff7f0e", "bad": "#d62728", "grid": "#e5e5e5", "axis": "#555"}


def _nice_ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks, v = [], start
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 10))
        v += step
    return ticks


class _Frame:
    """Plot area with linear x / y scales and the axes drawn."""

    def __init__(self, width, height, xlo, xhi, ylo, yhi, left=56, right=16, top=16, bottom=40):
        self.w, self.h = width, height
        self.l, self.r, self.t, self.b = left, right, top, bottom
        self.yticks = _nice_ticks(ylo, yhi)
        self.ylo, self.yhi = min(self.yticks[0], ylo), max(self.yticks[-1], yhi)
        self.xlo, self.xhi = xlo, xhi if xhi > xlo else xlo + 1

    def x(self, v):
        return self.l + (v - self.xlo) / (self.xhi - self.xlo) * (self.w - self.l - self.r)

    def y(self, v):
        v = min(max(v, self.ylo), self.yhi)
        return self.h - self.b - (v - self.ylo) / (self.yhi - self.ylo) * (self.h - self.t - self.b)

    def axes(self, xlabel: str, ylabel: str, xticks: Sequence[tuple[float, str]]) -> list[str]:
        out = []
        for t in self.yticks:
            y = self.y(t)
            out.append(f'<line x1="{self.l}" x2="{self.w - self.r}" y1="{y:.1f}" y2="{y:.1f}" stroke="{COLORS["grid"]}"/>')
            out.append(f'<text x="{self.l - 6}" y="{y + 4:.1f}" text-anchor="end">{t:g}</text>')
        for v, label in xticks:
            x = self.x(v)
            out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{self.h - self.b}" y2="{self.h - self.b + 4}" stroke="{COLORS["axis"]}"/>')
            out.append(f'<text x="{x:.1f}" y="{self.h - self.b + 16}" text-anchor="middle">{escape(label)}</text>')
        out.append(f'<line x1="{self.l}" x2="{self.w - self.r}" y1="{self.h - self.b}" y2="{self.h - self.b}" stroke="{COLORS["axis"]}"/>')
        out.append(f'<line x1="{self.l}" x2="{self.l}" y1="{self.t}" y2="{self.h - self.b}" stroke="{COLORS["axis"]}"/>')
        out.append(f'<text x="{(self.l + self.w - self.r) / 2:.1f}" y="{self.h - 6}" text-anchor="middle">{escape(xlabel)}</text>')
        out.append(f'<text transform="translate(14,{(self.t + self.h - self.b) / 2:.1f}) rotate(-90)" '
                   f'text-anchor="middle">{escape(ylabel)}</text>')
        return out


def _svg(width: int, height: int, body: list[str], label: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
            f'style="max-width:100%;height:auto" '
            f'role="img" aria-label="{escape(label)}" {FONT}>' + "".join(body) + "</svg>")


def _finite(vals) -> list[float]:
    return [v for v in vals if v is not None and math.isfinite(v)]


def line_chart(names: Sequence[str], series: dict[str, Sequence[float]], *, threshold: float | None = None,
               bad: Sequence[bool] = (), ylabel: str = "SQNR (dB)", width: int = 960, height: int = 300) -> str:
    """One point per layer along the network for each series (keys "acc" / "iso" pick the colours)."""
    n = len(names)
    vals = _finite([v for s in series.values() for v in s]) + ([threshold] if threshold is not None else [])
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
    f = _Frame(width, height, 0, max(n - 1, 1), lo - 3.0, hi + 3.0, top=30)
    step = max(1, round(n / 12))
    body = f.axes("layer (position along the network)", ylabel, [(i, str(i)) for i in range(0, n, step)])
    if threshold is not None:
        y = f.y(threshold)
        body.append(f'<line x1="{f.l}" x2="{width - f.r}" y1="{y:.1f}" y2="{y:.1f}" stroke="{COLORS["bad"]}" '
                    f'stroke-dasharray="6 4"><title>min_sqnr {threshold:g} dB</title></line>')
    labels = {"acc": "accumulated (as in the artifact)", "iso": "isolated (layer alone)"}
    for key, ys in series.items():
        color = COLORS.get(key, "#333")
        pts = [(f.x(i), f.y(v)) for i, v in enumerate(ys) if v is not None and math.isfinite(v)]
        if len(pts) > 1:
            body.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.6" points="'
                        + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts) + '"/>')
        for i, v in enumerate(ys):
            if v is None or not math.isfinite(v):
                continue
            is_bad = key == "iso" and i < len(bad) and bad[i]
            body.append(f'<circle cx="{f.x(i):.1f}" cy="{f.y(v):.1f}" r="{4.5 if is_bad else 2.6}" '
                        f'fill="{COLORS["bad"] if is_bad else color}"><title>#{i} {escape(names[i])}: '
                        f'{escape(labels.get(key, key))} {v:.1f} dB</title></circle>')
    lx = f.l + 10
    for k, key in enumerate(series):
        body.append(f'<rect x="{lx + 250 * k}" y="8" width="12" height="4" fill="{COLORS.get(key, "#333")}"/>'
                    f'<text x="{lx + 250 * k + 16}" y="14">{escape(labels.get(key, key))}</text>')
    if threshold is not None:
        body.append(f'<line x1="{lx + 500}" x2="{lx + 520}" y1="10" y2="10" stroke="{COLORS["bad"]}" '
                    f'stroke-dasharray="6 4"/><text x="{lx + 526}" y="14">min_sqnr (gate)</text>')
    return _svg(width, height, body, "per-layer SQNR along the network")


def scatter_chart(names: Sequence[str], xs: Sequence[float], ys: Sequence[float], *, bad: Sequence[bool] = (),
                  annotate: int = 3, width: int = 520, height: int = 360) -> str:
    """Isolated (x) against accumulated (y) SQNR per layer, with the diagonal y = x."""
    pts = [(i, x, y) for i, (x, y) in enumerate(zip(xs, ys)) if x is not None and y is not None
           and math.isfinite(x) and math.isfinite(y)]
    vals = [v for _, x, y in pts for v in (x, y)] or [0.0, 1.0]
    lo, hi = min(vals), max(vals)
    f = _Frame(width, height, 0, 1, lo, hi)
    f.xlo, f.xhi = f.ylo, f.yhi  # same scale on both axes so the diagonal is the diagonal
    body = f.axes("isolated SQNR (dB): the layer's own error", "accumulated SQNR (dB)",
                  [(t, f"{t:g}") for t in f.yticks])
    body.append(f'<line x1="{f.x(f.xlo):.1f}" y1="{f.y(f.ylo):.1f}" x2="{f.x(f.xhi):.1f}" y2="{f.y(f.yhi):.1f}" '
                f'stroke="#999" stroke-dasharray="4 3"><title>accumulated = isolated: nothing inherited</title></line>')
    worst = {i for i, _, _ in sorted(pts, key=lambda p: p[1])[:annotate]}
    for i, x, y in pts:
        is_bad = i < len(bad) and bad[i]
        body.append(f'<circle cx="{f.x(x):.1f}" cy="{f.y(y):.1f}" r="{4.5 if is_bad or i in worst else 3}" '
                    f'fill="{COLORS["bad"] if is_bad else COLORS["iso"] if i in worst else COLORS["acc"]}" '
                    f'fill-opacity="0.8"><title>#{i} {escape(names[i])}: isolated {x:.1f} dB, accumulated {y:.1f} dB'
                    f'</title></circle>')
    placed: list[float] = []
    for i, x, y in sorted((p for p in pts if p[0] in worst), key=lambda p: -p[2]):
        ty = f.y(y) + 4
        while any(abs(ty - p) < 12 for p in placed):  # keep labels of nearby points from overlapping
            ty += 12
        placed.append(ty)
        body.append(f'<text x="{f.x(x) + 7:.1f}" y="{ty:.1f}">{escape(names[i])}</text>')
    body.append(f'<text x="{width - f.r - 4}" y="{f.t + 12}" text-anchor="end" fill="#777">below the diagonal: '
                'error inherited from earlier layers</text>')
    return _svg(width, height, body, "accumulated against isolated SQNR per layer")


def _color(t: float) -> str:
    """Sequential colour for t in [0, 1] (pale yellow → dark blue), a viridis-like ramp in 5 stops."""
    stops = [(0.0, (253, 231, 37)), (0.25, (94, 201, 98)), (0.5, (33, 145, 140)), (0.75, (59, 82, 139)),
             (1.0, (68, 1, 84))]
    t = min(max(t, 0.0), 1.0)
    for (t0, c0), (t1, c1) in zip(stops, stops[1:]):
        if t <= t1:
            a = (t - t0) / (t1 - t0)
            return "#%02x%02x%02x" % tuple(round(c0[k] + a * (c1[k] - c0[k])) for k in range(3))
    return "#440154"


def heatmap(rows: Sequence[str], values: Sequence[Sequence[float]], marks: dict[tuple[int, int], str] | None = None,
            *, width: int = 960, row_h: int = 14, levels: int = 24) -> str:
    """Rows of per-channel values (kernel norm / layer median); ``marks[(row, channel)]`` = "dead" | "weak".

    Colour = log10 of the value, clipped to [-2, 1] (a hundredth of the median to ten times it), in
    ``levels`` steps; runs of equal colour are drawn as one rectangle to keep the file small. Dead
    channels are red, weak ones orange, each with a tooltip.
    """
    marks = marks or {}
    label_w = max((len(r) for r in rows), default=10) * 6.2 + 10
    maxc = max((len(v) for v in values), default=1)
    cell = (width - label_w - 20) / maxc
    legend_h = 34
    height = int(len(rows) * row_h + legend_h + 24)
    body = []
    for r, (name, vals) in enumerate(zip(rows, values)):
        y = 4 + r * row_h
        body.append(f'<text x="{label_w - 6:.1f}" y="{y + row_h - 3}" text-anchor="end">{escape(name)}</text>')
        run_start, run_col = 0, None
        cols = []
        for c, v in enumerate(vals):
            t = (math.log10(v) + 2.0) / 3.0 if v > 0 else 0.0
            cols.append(_color(round(t * (levels - 1)) / (levels - 1)))
        for c in range(len(cols) + 1):
            col = cols[c] if c < len(cols) else None
            if col != run_col:
                if run_col is not None:
                    body.append(f'<rect x="{label_w + run_start * cell:.2f}" y="{y}" width="{(c - run_start) * cell:.2f}" '
                                f'height="{row_h - 2}" fill="{run_col}"/>')
                run_start, run_col = c, col
        body.append(f'<rect x="{label_w:.2f}" y="{y}" width="{len(vals) * cell:.2f}" height="{row_h - 2}" fill="none" '
                    f'stroke="#bbb" stroke-width="0.5"><title>{escape(name)}: {len(vals)} channels</title></rect>')
        for c, v in enumerate(vals):
            kind = marks.get((r, c))
            if kind:
                color = COLORS["bad"] if kind == "dead" else "#ff9900"
                w = max(cell, 2.5)
                body.append(f'<rect x="{label_w + c * cell + (cell - w) / 2:.2f}" y="{y - 1}" width="{w:.2f}" '
                            f'height="{row_h}" fill="{color}" stroke="#000" stroke-width="0.4"><title>{escape(name)} '
                            f'channel {c}: {kind} (norm {v:.3g} × median)</title></rect>')
    y0 = len(rows) * row_h + 14
    for k in range(levels):
        body.append(f'<rect x="{label_w + k * 12:.1f}" y="{y0}" width="12" height="10" fill="{_color(k / (levels - 1))}"/>')
    body.append(f'<text x="{label_w}" y="{y0 + 22}">0.01×</text><text x="{label_w + levels * 12:.1f}" y="{y0 + 22}" '
                f'text-anchor="end">10× median norm</text>')
    lx = label_w + levels * 12 + 40
    body.append(f'<rect x="{lx}" y="{y0}" width="10" height="10" fill="{COLORS["bad"]}" stroke="#000" stroke-width="0.4"/>'
                f'<text x="{lx + 14}" y="{y0 + 9}">dead kernel (zero, γ≈0, or zero after quantization)</text>'
                f'<rect x="{lx + 330}" y="{y0}" width="10" height="10" fill="#ff9900" stroke="#000" stroke-width="0.4"/>'
                f'<text x="{lx + 344}" y="{y0 + 9}">weak kernel</text>')
    return _svg(width, height, body, "per-channel depthwise kernel norms")
