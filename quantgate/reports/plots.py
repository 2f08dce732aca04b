"""The report's plots: pure geometry from typed results, drawn as inline SVG (the HTML) and, where
matplotlib is installed, as PNG images (MLflow's artifact viewer shows those).

Three plots:
* forest: one row per check, the candidate's worsening with its interval against its margin;
* flips: per task, items that went right->wrong and wrong->right (diverging bars);
* scatter (matrix): checkpoint size vs each gated check's worsening, one panel per check.

Every SVG mark carries data-* attributes (check name, status, recipe) so a browser test can count
what rendered.
"""

from __future__ import annotations

import html
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from quantgate.gate import Check, Verdict
from quantgate.report import _num, _pct, _signed, limit_text
from quantgate.reports.rundata import TaskComparison

log = logging.getLogger(__name__)

STATUS_COLOURS = {
    "pass": "#2e7d32", "fail": "#c62828", "inconclusive": "#e08a00", "anomalous": "#7b1fa2",
    "error": "#37474f", "not gated": "#9e9e9e",
}
DECISION_COLOURS = {
    "PASS": "#2e7d32", "REGRESSION": "#c62828", "INCONCLUSIVE": "#e08a00", "ANOMALOUS": "#7b1fa2",
    "ERROR": "#37474f", "BAD_INPUT": "#37474f",
}
GOOD, BAD = "#2e7d32", "#c62828"
FONT = "system-ui,-apple-system,'Segoe UI',Roboto,sans-serif"
MONO = "ui-monospace,'DejaVu Sans Mono',Menlo,monospace"

e = html.escape


def decision_colour(decision: str) -> str:
    return DECISION_COLOURS.get(decision, "#37474f")


# ---- axes ------------------------------------------------------------------------------------------


def nice_ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    """Round tick values covering [lo, hi] (1, 2, 2.5, 5 x 10^k steps)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(count - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], first
    while t <= hi + 1e-9 * step:
        ticks.append(0.0 if abs(t) < step * 1e-9 else round(t, 12))
        t += step
    return ticks


def _tick_label(t: float) -> str:
    return f"{t:.4g}"


# ---- forest plot -----------------------------------------------------------------------------------


@dataclass
class ForestRow:
    """One check on the forest plot. x/lo/hi are in axis units: a share of the check's margin for
    gated checks (0 = no change, 1 = the margin), relative worsening in % for the others."""

    name: str
    status: str  # a check status, or "not gated"
    kind: str
    x: float | None
    lo: float | None
    hi: float | None
    note: str  # numbers shown at the right, in the metric's own units
    detail: str


def _ratio(v: float | None, margin: float) -> float | None:
    if v is None:
        return None
    if margin > 0:
        return v / margin
    return 0.0 if v <= 0 else math.inf  # a zero margin: anything worse is beyond it


def _metric_row(c: Check) -> ForestRow:
    lim = c.limit
    options = []  # (scale, point, lo, hi, text)
    if lim is not None and lim.abs is not None:
        options.append((_ratio(c.delta, lim.abs), _ratio(c.ci_low, lim.abs), _ratio(c.ci_high, lim.abs),
                        f"{_signed(c.delta)} [{_signed(c.ci_low)}, {_signed(c.ci_high)}] vs abs {_num(lim.abs)}"))
    if lim is not None and lim.rel is not None:
        rel = lambda v: None if v is None else f"{100 * v:+.3g}%"  # noqa: E731
        options.append((_ratio(c.rel_delta, lim.rel), _ratio(c.rel_ci_low, lim.rel), _ratio(c.rel_ci_high, lim.rel),
                        f"{rel(c.rel_delta) or '-'} [{rel(c.rel_ci_low) or '-'}, {rel(c.rel_ci_high) or '-'}] vs rel {_pct(lim.rel)}"))
    usable = [o for o in options if o[0] is not None]
    if not usable:
        return ForestRow(c.name, c.status, c.kind, None, None, None, "no estimate", c.detail)
    # The binding margin: the one whose upper bound comes closest to (or furthest past) it.
    x, lo, hi, text = max(usable, key=lambda o: o[2] if o[2] is not None else o[0])
    return ForestRow(c.name, c.status, c.kind, x, lo, hi, text, c.detail)


def _golden_row(c: Check) -> ForestRow:
    lim = c.limit
    ideal = c.baseline if c.baseline is not None else 0.0
    margin = None
    if lim is not None and lim.min is not None:
        margin = ideal - lim.min
    elif lim is not None and lim.max is not None:
        margin = lim.max - ideal
    if c.delta is None or margin is None:
        return ForestRow(c.name, c.status, c.kind, None, None, None, "no value", c.detail)
    note = f"{_num(c.candidate)} vs {limit_text(lim)}"
    return ForestRow(c.name, c.status, c.kind, _ratio(c.delta, margin), None, None, note, c.detail)


def _info_row(c: Check) -> ForestRow:
    if c.kind == "golden":  # an ungated threshold check: its value, no scale to put it on
        return ForestRow(c.name, "not gated", c.kind, None, None, None, f"{c.metric} {_num(c.candidate)} (no threshold set)", c.detail)
    if c.rel_delta is None:
        why = "no relative scale (baseline 0)" if c.delta is not None else "no estimate"
        note = f"{_signed(c.delta)} [{_signed(c.ci_low)}, {_signed(c.ci_high)}]; {why}" if c.delta is not None else why
        return ForestRow(c.name, "not gated", c.kind, None, None, None, note, c.detail)
    pct = lambda v: None if v is None else 100 * v  # noqa: E731
    note = f"{_signed(c.delta)} [{_signed(c.ci_low)}, {_signed(c.ci_high)}]"
    return ForestRow(c.name, "not gated", c.kind, pct(c.rel_delta), pct(c.rel_ci_low), pct(c.rel_ci_high), note, c.detail)


def forest_rows(verdict: Verdict, *, gated: bool = True) -> list[ForestRow]:
    """Rows for the gated metric and golden checks (gated=True) or the informational ones."""
    if gated:
        rows = []
        for c in verdict.checks:
            if c.gated and c.kind == "metric":
                rows.append(_metric_row(c))
            elif c.gated and c.kind == "golden":
                rows.append(_golden_row(c))
        return rows
    return [_info_row(c) for c in verdict.checks if not c.gated and c.kind in ("metric", "golden")]


def _forest_range(rows: list[ForestRow], gated: bool) -> tuple[float, float]:
    vals = [v for r in rows for v in (r.x, r.lo, r.hi) if v is not None and math.isfinite(v)]
    if gated:  # always show 0 and the margin; cap runaway intervals (arrows mark the cut)
        lo = max(min([-0.5, *vals]) - 0.1, -3.0)
        hi = min(max([1.25, *vals]) + 0.1, 4.0)
        return lo, hi
    edge = min(max([1.0, *(abs(v) for v in vals)]) * 1.15, 100.0)
    return -edge, edge


FOREST_W, LABEL_W, PLOT_X0, PLOT_W, ROW_H = 1060, 210, 222, 370, 26


def forest_svg(rows: list[ForestRow], *, gated: bool = True, plot_id: str = "forest") -> str:
    """The forest plot as an inline SVG element."""
    lo_edge, hi_edge = _forest_range(rows, gated)
    top, bottom = 30, 46
    height = top + ROW_H * max(len(rows), 1) + bottom

    def X(v: float) -> float:
        v = min(max(v, lo_edge), hi_edge)
        return PLOT_X0 + (v - lo_edge) / (hi_edge - lo_edge) * PLOT_W

    out = [f'<svg id="{e(plot_id)}" class="forest" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {FOREST_W} {height}" '
           f'width="{FOREST_W}" height="{height}" role="img" font-family="{FONT}" font-size="13">']
    plot_bottom = top + ROW_H * max(len(rows), 1)
    if gated:  # beyond the margin: shaded
        out.append(f'<rect x="{X(1.0):.1f}" y="{top}" width="{PLOT_X0 + PLOT_W - X(1.0):.1f}" height="{plot_bottom - top}" fill="#fdecea"/>')
    for i in range(len(rows)):
        if i % 2:
            out.append(f'<rect x="0" y="{top + i * ROW_H}" width="{FOREST_W}" height="{ROW_H}" fill="#000" fill-opacity="0.03"/>')
    for t in nice_ticks(lo_edge, hi_edge, 9):
        out.append(f'<line x1="{X(t):.1f}" y1="{top}" x2="{X(t):.1f}" y2="{plot_bottom}" stroke="#e3e3e3"/>')
        label = _tick_label(t) + ("" if gated else "%")
        out.append(f'<text x="{X(t):.1f}" y="{plot_bottom + 16}" text-anchor="middle" fill="#555" font-size="11">{e(label)}</text>')
    out.append(f'<line x1="{X(0):.1f}" y1="{top - 6}" x2="{X(0):.1f}" y2="{plot_bottom}" stroke="#444" stroke-width="1.2"/>')
    out.append(f'<text x="{X(0):.1f}" y="{top - 10}" text-anchor="middle" fill="#444" font-size="11">no change</text>')
    if gated:
        out.append(f'<line x1="{X(1):.1f}" y1="{top - 6}" x2="{X(1):.1f}" y2="{plot_bottom}" stroke="{BAD}" stroke-width="1.5" stroke-dasharray="5,3"/>')
        out.append(f'<text x="{X(1):.1f}" y="{top - 10}" text-anchor="middle" fill="{BAD}" font-size="11">margin</text>')
        caption = "worsening as a share of its margin (0 = no change, 1 = margin; right = candidate worse)"
    else:
        caption = "relative worsening, % of the baseline (right = candidate worse)"
    out.append(f'<text x="{PLOT_X0 + PLOT_W / 2:.1f}" y="{plot_bottom + 36}" text-anchor="middle" fill="#555" font-size="12">{e(caption)}</text>')
    out.append(f'<text x="{PLOT_X0 + PLOT_W + 14}" y="{top - 10}" fill="#555" font-size="11">status · worsening [interval] vs limit (metric units)</text>')

    for i, r in enumerate(rows):
        y = top + i * ROW_H + ROW_H / 2
        colour = STATUS_COLOURS.get(r.status, "#37474f")
        word = r.status.upper() if r.status != "not gated" else "info"
        out.append(f'<g class="forest-row" data-check="{e(r.name)}" data-status="{e(r.status)}" '
                   f'data-gated="{"true" if gated else "false"}" data-kind="{e(r.kind)}">')
        out.append(f"<title>{e(r.name)}: {e(r.detail)}</title>")
        name = r.name if len(r.name) <= 30 else r.name[:29] + "…"
        out.append(f'<text x="{LABEL_W}" y="{y + 4:.1f}" text-anchor="end" fill="#222">{e(name)}</text>')
        if r.lo is not None and r.hi is not None:
            x1, x2 = X(r.lo), X(r.hi)
            out.append(f'<line class="ci" x1="{x1:.1f}" y1="{y:.1f}" x2="{x2:.1f}" y2="{y:.1f}" stroke="{colour}" stroke-width="2.5"/>')
            for v, xe in ((r.lo, x1), (r.hi, x2)):
                if v < lo_edge or v > hi_edge:  # cut at the edge: an arrow head says it goes on
                    d = -1 if v < lo_edge else 1
                    out.append(f'<path d="M{xe + d * 7:.1f},{y:.1f} L{xe:.1f},{y - 5:.1f} L{xe:.1f},{y + 5:.1f} Z" fill="{colour}"/>')
                else:
                    out.append(f'<line x1="{xe:.1f}" y1="{y - 5:.1f}" x2="{xe:.1f}" y2="{y + 5:.1f}" stroke="{colour}" stroke-width="2"/>')
        if r.x is not None:
            cx = X(r.x)
            if r.kind == "golden":
                out.append(f'<path class="point" d="M{cx:.1f},{y - 7:.1f} L{cx + 7:.1f},{y:.1f} L{cx:.1f},{y + 7:.1f} L{cx - 7:.1f},{y:.1f} Z" '
                           f'fill="{colour}" stroke="#fff" stroke-width="1"/>')
            else:
                out.append(f'<circle class="point" cx="{cx:.1f}" cy="{y:.1f}" r="5.5" fill="{colour}" stroke="#fff" stroke-width="1"/>')
        else:
            out.append(f'<text x="{PLOT_X0 + 8}" y="{y + 4:.1f}" fill="{colour}" font-style="italic">{e(r.note)}</text>')
        out.append(f'<text x="{PLOT_X0 + PLOT_W + 14}" y="{y + 4:.1f}" fill="{colour}" font-weight="700" font-size="12">{e(word)}</text>')
        if r.x is not None:
            out.append(f'<text x="{PLOT_X0 + PLOT_W + 124}" y="{y + 4:.1f}" fill="#333" font-family="{MONO}" font-size="11.5">{e(r.note)}</text>')
        out.append("</g>")
    out.append("</svg>")
    return "".join(out)


# ---- flips ------------------------------------------------------------------------------------------


FLIPS_W = 900


def flips_svg(tasks: list[TaskComparison]) -> str:
    """Per task: items the candidate lost (red, right) and gained (green, left), one row each."""
    row_h, top, label_w, mid, half = 30, 28, 150, 440, 185
    height = top + row_h * max(len(tasks), 1) + 30
    scale = max([1, *(max(t.worse, t.better) for t in tasks)])
    out = [f'<svg id="flips" class="flips" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {FLIPS_W} {height}" width="{FLIPS_W}" '
           f'height="{height}" role="img" font-family="{FONT}" font-size="13">']
    out.append(f'<text x="{mid - 8}" y="{top - 10}" text-anchor="end" fill="{GOOD}" font-size="12">← candidate better</text>')
    out.append(f'<text x="{mid + 8}" y="{top - 10}" fill="{BAD}" font-size="12">candidate worse →</text>')
    bottom = top + row_h * max(len(tasks), 1)
    out.append(f'<line x1="{mid}" y1="{top - 4}" x2="{mid}" y2="{bottom}" stroke="#444"/>')
    for i, t in enumerate(tasks):
        y = top + i * row_h
        worse_w, better_w = half * t.worse / scale, half * t.better / scale
        bad_word, good_word = t.flip_words
        out.append(f'<g class="flip-row" data-task="{e(t.task)}" data-worse="{t.worse}" data-better="{t.better}">')
        out.append(f"<title>{e(t.task)}: {t.worse} {e(bad_word)}, {t.better} {e(good_word)} of {t.n_paired} paired items</title>")
        out.append(f'<text x="{label_w}" y="{y + 19}" text-anchor="end" fill="#222">{e(t.task)}</text>')
        out.append(f'<text x="{label_w + 8}" y="{y + 19}" fill="#777" font-size="11">n={t.n_paired}</text>')
        out.append(f'<rect x="{mid - better_w:.1f}" y="{y + 6}" width="{better_w:.1f}" height="{row_h - 12}" fill="{GOOD}"/>')
        out.append(f'<rect x="{mid:.1f}" y="{y + 6}" width="{worse_w:.1f}" height="{row_h - 12}" fill="{BAD}"/>')
        out.append(f'<text x="{mid - better_w - 6:.1f}" y="{y + 19}" text-anchor="end" fill="{GOOD}" font-size="12">{t.better}</text>')
        out.append(f'<text x="{mid + worse_w + 6:.1f}" y="{y + 19}" fill="{BAD}" font-size="12">{t.worse} '
                   f'<tspan fill="#777" font-size="11">{e(bad_word)}</tspan></text>')
        out.append("</g>")
    out.append(f'<text x="{mid}" y="{bottom + 20}" text-anchor="middle" fill="#555" font-size="12">'
               "items (accuracy) or documents (perplexity), paired by doc_id and prompt hash</text>")
    out.append("</svg>")
    return "".join(out)


# ---- matrix scatter ------------------------------------------------------------------------------


@dataclass
class ScatterPoint:
    recipe: str
    decision: str
    status: str
    mb: float
    y: float | None  # worsening, metric units
    lo: float | None
    hi: float | None
    margin: float | None  # worsening allowed, metric units
    same_artifact: bool


@dataclass
class ScatterPanel:
    check: str
    points: list[ScatterPoint]


def effective_margin(c: Check) -> float | None:
    """The worsening a check allows, in its own units: min(abs, rel x |baseline|) for metric
    checks (both must hold), the distance from the ideal value to the threshold for golden ones."""
    lim = c.limit
    if lim is None:
        return None
    if c.kind == "golden":
        ideal = c.baseline if c.baseline is not None else 0.0
        if lim.min is not None:
            return ideal - lim.min
        return lim.max - ideal if lim.max is not None else None
    opts = []
    if lim.abs is not None:
        opts.append(lim.abs)
    if lim.rel is not None and c.baseline is not None:
        opts.append(lim.rel * abs(c.baseline))
    return min(opts) if opts else None


PANEL_W, PANEL_H = 470, 300


def scatter_svg(panel: ScatterPanel, index: int) -> str:
    """One panel: checkpoint size (x) vs the check's worsening (y), colour = the run's verdict."""
    left, right, top, bottom = 74, 20, 34, 46
    pw, ph = PANEL_W - left - right, PANEL_H - top - bottom
    pts = panel.points
    # x range: every label fits right of its point (labels ~6.6 px a character)
    xmax = max([p.mb * 1.15 for p in pts] + [p.mb * pw / max(pw - 12 - 6.6 * len(_label(p)), 1) for p in pts] + [1e-9])
    ys = [v for p in pts for v in (p.y, p.lo, p.hi, p.margin) if v is not None and math.isfinite(v)] + [0.0]
    ylo, yhi = min(ys), max(ys)
    pad = (yhi - ylo) * 0.12 or (abs(yhi) * 0.5 or 1.0)
    ylo, yhi = ylo - pad, yhi + pad

    def X(v: float) -> float:
        return left + v / xmax * pw

    def Y(v: float) -> float:
        v = min(max(v, ylo), yhi)
        return top + (yhi - v) / (yhi - ylo) * ph

    out = [f'<svg class="scatter" data-check="{e(panel.check)}" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {PANEL_W} {PANEL_H}" '
           f'width="{PANEL_W}" height="{PANEL_H}" role="img" font-family="{FONT}" font-size="12">']
    out.append(f'<text x="{left}" y="18" font-weight="700" fill="#222">{e(panel.check)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#ccc"/>')
    for t in nice_ticks(ylo, yhi, 5):
        out.append(f'<line x1="{left}" y1="{Y(t):.1f}" x2="{left + pw}" y2="{Y(t):.1f}" stroke="#e6e6e6"/>')
        out.append(f'<text x="{left - 6}" y="{Y(t) + 4:.1f}" text-anchor="end" fill="#555" font-size="11">{e(_tick_label(t))}</text>')
    for t in nice_ticks(0, xmax, 5):
        out.append(f'<text x="{X(t):.1f}" y="{top + ph + 16}" text-anchor="middle" fill="#555" font-size="11">{e(_tick_label(t))}</text>')
    out.append(f'<line x1="{left}" y1="{Y(0):.1f}" x2="{left + pw}" y2="{Y(0):.1f}" stroke="#444"/>')
    margins = {round(p.margin, 12) for p in pts if p.margin is not None and math.isfinite(p.margin)}
    if len(margins) == 1:
        m = margins.pop()
        out.append(f'<line x1="{left}" y1="{Y(m):.1f}" x2="{left + pw}" y2="{Y(m):.1f}" stroke="{BAD}" stroke-dasharray="5,3" stroke-width="1.5"/>')
        out.append(f'<text x="{left + pw - 4}" y="{Y(m) - 5:.1f}" text-anchor="end" fill="{BAD}" font-size="11">margin {e(_num(m))}</text>')
    else:  # margins differ by recipe: a short dash at each point
        for p in pts:
            if p.margin is not None and math.isfinite(p.margin):
                out.append(f'<line x1="{X(p.mb) - 12:.1f}" y1="{Y(p.margin):.1f}" x2="{X(p.mb) + 12:.1f}" y2="{Y(p.margin):.1f}" stroke="{BAD}" stroke-dasharray="3,2"/>')
    out.append(f'<text x="{left + pw / 2}" y="{PANEL_H - 8}" text-anchor="middle" fill="#555">checkpoint size (MB)</text>')
    out.append(f'<text transform="translate(14,{top + ph / 2}) rotate(-90)" text-anchor="middle" fill="#555">worsening (up = worse)</text>')
    placed: list[tuple[float, float, float, float]] = []
    for p in pts:
        colour = decision_colour(p.decision)
        out.append(f'<g class="scatter-point" data-recipe="{e(p.recipe)}" data-decision="{e(p.decision)}" data-status="{e(p.status)}">')
        ytxt = "no value" if p.y is None else _signed(p.y)
        out.append(f"<title>{e(p.recipe)}: {p.mb:.4g} MB, worsening {e(ytxt)} [{e(_signed(p.lo))}, {e(_signed(p.hi))}], "
                   f"check {e(p.status)}, verdict {e(p.decision)}</title>")
        cx = X(p.mb)
        if p.y is None:
            out.append(f'<text x="{cx:.1f}" y="{top + ph - 6}" text-anchor="middle" fill="{colour}" font-size="11">✕ {e(p.recipe)}</text>')
            out.append("</g>")
            continue
        if p.lo is not None and p.hi is not None:
            out.append(f'<line x1="{cx:.1f}" y1="{Y(p.lo):.1f}" x2="{cx:.1f}" y2="{Y(p.hi):.1f}" stroke="{colour}" stroke-width="2"/>')
        cy = Y(p.y)
        fill = "#fff" if p.same_artifact else colour
        out.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="6" fill="{fill}" stroke="{colour}" stroke-width="2"/>')
        label = _label(p)
        width = len(label) * 6.6
        anchor = "end" if cx + 9 + width > left + pw else "start"
        dx = -9 if anchor == "end" else 9
        ly = _free_label_y(placed, cx + dx, cy, width, anchor)
        out.append(f'<text x="{cx + dx:.1f}" y="{ly:.1f}" text-anchor="{anchor}" fill="#222" font-size="11.5">{e(label)}</text>')
        out.append("</g>")
    out.append("</svg>")
    return "".join(out)


def _label(p: ScatterPoint) -> str:
    return p.recipe + (" (= baseline)" if p.same_artifact else "")


def _free_label_y(placed: list[tuple[float, float, float, float]], x: float, cy: float, width: float, anchor: str) -> float:
    """A baseline y for a label near (x, cy) that overlaps no label placed before (greedy)."""
    x0 = x - width if anchor == "end" else x
    for dy in (-7, 17, -21, 31, -35, 45):
        y = cy + dy
        box = (x0, y - 11, x0 + width, y + 2)
        if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
            placed.append(box)
            return y
    return cy - 7


# ---- PNG images (matplotlib, optional) --------------------------------------------------------------


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(width: float, height: float):  # -> matplotlib Figure
    # Figure + Agg canvas, not pyplot: no global state, no GUI backend, safe in threads.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    # temp file + rename: a reader (or MLflow logging) never sees half an image
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", metadata={"Software": None})
    tmp.replace(path)
    return path


def forest_png(rows: list[ForestRow], path: Path, *, gated: bool = True, title: str = "") -> Path:
    lo_edge, hi_edge = _forest_range(rows, gated)
    n = max(len(rows), 1)
    fig = _figure(12.5, 1.3 + 0.38 * n)
    ax = fig.add_axes((0.19, 0.8 / (1.3 + 0.38 * n), 0.42, 0.38 * n / (1.3 + 0.38 * n)))
    ax.set_xlim(lo_edge, hi_edge)
    ax.set_ylim(n - 0.5, -0.5)
    if gated:
        ax.axvspan(1.0, hi_edge, color="#fdecea", zorder=0)
        ax.axvline(1.0, color=BAD, ls="--", lw=1.2)
        ax.text(1.0, -0.7, "margin", color=BAD, ha="center", va="bottom", fontsize=8)
    ax.axvline(0.0, color="#444", lw=1)
    for i, r in enumerate(rows):
        colour = STATUS_COLOURS.get(r.status, "#37474f")
        if r.lo is not None and r.hi is not None:
            ax.plot([max(r.lo, lo_edge), min(r.hi, hi_edge)], [i, i], color=colour, lw=2.5, solid_capstyle="butt")
            for v in (r.lo, r.hi):  # end caps where the interval ends inside the axis
                if lo_edge <= v <= hi_edge:
                    ax.plot([v], [i], marker="|", color=colour, ms=10, mew=2)
        if r.x is None:
            ax.text(lo_edge, i, "  " + r.note, va="center", fontsize=8, color=colour, style="italic")
        if r.x is not None:
            ax.plot([min(max(r.x, lo_edge), hi_edge)], [i], marker="D" if r.kind == "golden" else "o", color=colour, ms=7, mec="white")
        word = r.status.upper() if r.status != "not gated" else "info"
        ax.text(1.02, i, f"{word}  {r.note}", transform=ax.get_yaxis_transform(), va="center", fontsize=7.5, color=colour, family="monospace")
    ax.set_yticks(range(len(rows)), [r.name for r in rows], fontsize=8.5)
    ax.grid(axis="x", color="#e3e3e3")
    ax.set_axisbelow(True)
    ax.set_xlabel("worsening / margin (1 = margin)" if gated else "relative worsening (%)", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10, x=0.02, ha="left")
    return _save(fig, path)


def flips_png(tasks: list[TaskComparison], path: Path, title: str = "") -> Path:
    n = max(len(tasks), 1)
    fig = _figure(8, 1.5 + 0.45 * n)
    ax = fig.add_axes((0.25, 0.7 / (1.5 + 0.45 * n), 0.65, 0.45 * n / (1.5 + 0.45 * n)))
    names = [t.task for t in tasks]
    ax.barh(range(len(tasks)), [-t.better for t in tasks], color=GOOD, label="candidate better (wrong → right)")
    ax.barh(range(len(tasks)), [t.worse for t in tasks], color=BAD, label="candidate worse (right → wrong)")
    for i, t in enumerate(tasks):
        ax.text(t.worse, i, f" {t.worse}", va="center", fontsize=8, color=BAD)
        ax.text(-t.better, i, f"{t.better} ", va="center", ha="right", fontsize=8, color=GOOD)
    scale = max([1, *(max(t.worse, t.better) for t in tasks)]) * 1.3
    ax.set_xlim(-scale, scale)
    ax.set_yticks(range(len(tasks)), names, fontsize=8.5)
    ax.set_ylim(len(tasks) - 0.5, -0.5)
    ax.axvline(0, color="#444", lw=1)
    ax.set_xlabel("items / documents that changed (paired by doc_id and prompt hash)", fontsize=9)
    ax.xaxis.set_major_formatter(lambda v, _pos: f"{abs(v):g}")
    ax.legend(fontsize=7.5, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10, x=0.02, ha="left")
    return _save(fig, path)


def scatter_png(panels: list[ScatterPanel], path: Path, title: str = "") -> Path:
    cols = min(2, max(len(panels), 1))
    rows = math.ceil(max(len(panels), 1) / cols)
    height = 4 * rows + 0.8  # 0.8 in on top for the title and the legend
    fig = _figure(6 * cols, height)
    xmax = max([p.mb for panel in panels for p in panel.points] + [1e-9]) * 1.3  # room for the labels
    for k, panel in enumerate(panels):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.axhline(0, color="#444", lw=1)
        margins = {round(p.margin, 12) for p in panel.points if p.margin is not None and math.isfinite(p.margin)}
        if len(margins) == 1:
            ax.axhline(margins.pop(), color=BAD, ls="--", lw=1.2, label="margin")
        for p in panel.points:
            if p.y is None:
                continue
            colour = decision_colour(p.decision)
            if p.lo is not None and p.hi is not None:
                ax.plot([p.mb, p.mb], [p.lo, p.hi], color=colour, lw=2)
            ax.plot([p.mb], [p.y], "o", ms=8, color=colour, mfc="white" if p.same_artifact else colour, mew=2)
            ax.annotate(p.recipe + (" (= baseline)" if p.same_artifact else ""), (p.mb, p.y), textcoords="offset points", xytext=(6, 6), fontsize=8)
        ax.set_title(panel.check, fontsize=9, loc="left")
        ax.set_xlabel("checkpoint size (MB)", fontsize=8)
        ax.set_ylabel("worsening (up = worse)", fontsize=8)
        ax.set_xlim(0, xmax)
        ax.grid(color="#e6e6e6")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", ls="", color=decision_colour(d), label=d) for d in DECISION_COLOURS if d != "BAD_INPUT"]
    handles += [Line2D([], [], marker="o", ls="", color="#555", mfc="white", mew=2, label="candidate = baseline artifact"),
                Line2D([], [], ls="--", color=BAD, label="margin")]
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False, bbox_to_anchor=(0.5, 1 - 0.4 / height))
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.1 / height, va="top")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.8 / height))
    return _save(fig, path)
