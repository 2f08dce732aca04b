"""The search's summary: search.json, a self-contained search.html (Pareto table, each candidate's
search-split verdict, the winner and its held-out confirmation, a size-vs-quality plot) and the
console table. Pure builders over a SearchResult; the plot helpers are the matrix report's."""

from __future__ import annotations

import html
import json
import logging
import os
from pathlib import Path

from quantgate.report import _signed
from quantgate.reports import plots
from quantgate.rundir import atomic_write_text
from quantgate.search.model import SearchResult

log = logging.getLogger("quantgate")
e = html.escape

SEARCH_JSON, SEARCH_HTML, SEARCH_PNG = "search.json", "search.html", "search_scatter.png"


def _check_names(result: SearchResult) -> list[str]:
    names: list[str] = []
    for r in result.rows:
        for c in r.checks:
            if c["name"] not in names:
                names.append(c["name"])
    return names


def search_table(result: SearchResult) -> str:
    """Console table: one line per candidate tried, cheapest first; then the winner's confirmation."""
    names = _check_names(result)
    head = ["rung", "candidate", "format", "bits~", "ckpt MB", *names, "search split", "pareto"]
    rows = []
    for r in result.rows:
        deltas = {c["name"]: c for c in r.checks}
        rows.append([str(r.rung + 1), r.name, r.format, f"{r.bits_estimate:g}", "-" if r.checkpoint_bytes is None else f"{r.checkpoint_bytes / 1e6:.1f}",
                     *[(_signed(deltas[n]["delta"]) + ("" if deltas[n]["status"] == "pass" else f" ({deltas[n]['status']})")) if n in deltas else "-" for n in names],
                     r.decision, "*" if r.pareto else ""])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=False)]
    fmt = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=False))  # noqa: E731
    lines = [fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows)]
    if result.not_run:
        lines.append(f"not run (a cheaper candidate passed; --full runs them): {', '.join(result.not_run)}")
    if result.confirmation:
        c = result.confirmation
        lines.append(f"winner: {c.candidate}; held-out confirmation: {c.decision} - {c.reason}")
    else:
        lines.append("winner: none (no candidate passed the search split)")
    lines.append(f"search {result.name}: {result.decision} (exit {result.exit_code}) in {result.seconds:.0f} s; summary: {Path(result.out_dir) / SEARCH_HTML}")
    return "\n".join(lines)


def scatter_panels(result: SearchResult) -> list[plots.ScatterPanel]:
    """Checkpoint size vs each gated check's search-split worsening, coloured by the search verdict."""
    panels = []
    for name in _check_names(result):
        pts = []
        for r in result.rows:
            c = next((c for c in r.checks if c["name"] == name), None)
            if c is None or r.checkpoint_bytes is None:
                continue
            pts.append(plots.ScatterPoint(recipe=r.name, decision=r.decision, status=c["status"], mb=r.checkpoint_bytes / 1e6,
                                          y=c["delta"], lo=c["ci_low"], hi=c["ci_high"], margin=c["margin"], same_artifact=False))
        panels.append(plots.ScatterPanel(name, pts))
    return panels


def search_html(result: SearchResult, out_dir: Path) -> str:
    from quantgate.reports.html import _check_table, _decision_badge, _legend, _page

    names = _check_names(result)
    split = result.split
    body = [f"<h1>quantgate search: {e(result.name)}</h1>",
            f'<p>{_decision_badge(result.decision)} exit {result.exit_code}: {e(result.reason)}</p>',
            f'<p class="note">Search key <code>{e(result.key)}</code>; {len(result.rows)} of {len(result.ladder)} candidates run '
            f"({'--full: the whole ladder' if result.full else 'stopped at the first that passed the search split'}) in "
            f"{result.seconds:.0f} s. Each task's items and the golden prompts are split by a hash of (seed {split['seed']}, task, item id): "
            f"{100 * split['fraction']:g} % search split (candidates are compared there), the rest a held-out split on which only the "
            "winner is judged; only that confirmation decides the exit code and promotion.</p>"]
    panels = scatter_panels(result)
    body.append('<h2 id="pareto">Candidates (cheapest first) on the search split</h2>')
    head = ["rung", "candidate", "format", "bits/weight (est.)", "checkpoint", *[f"<code>{e(n)}</code>" for n in names],
            "search split", "run (all items)", "Pareto", "report"]
    rows = []
    for r in result.rows:
        cells = [f'<td class="num">{r.rung + 1}</td>', f"<td><b>{e(r.name)}</b></td>", f"<td>{e(r.format)}</td>",
                 f'<td class="num">{r.bits_estimate:g}</td>',
                 f'<td class="num">{"-" if r.checkpoint_bytes is None else f"{r.checkpoint_bytes / 1e6:.1f} MB"}</td>']
        by = {c["name"]: c for c in r.checks}
        for n in names:
            c = by.get(n)
            if c is None:
                cells.append('<td class="num">-</td>')
                continue
            colour = plots.STATUS_COLOURS.get(c["status"], "#37474f")
            cells.append(f'<td class="num" style="color:{colour};font-weight:600" title="{e(c["status"])}: {e(c["detail"])}">'
                         f'{e(_signed(c["delta"]))} <small>≤{e(_signed(c["ci_high"]))}</small></td>')
        link = os.path.relpath(Path(r.run_dir) / "report.html", out_dir)
        cells += [f"<td>{_decision_badge(r.decision)}</td>", f"<td><small>{e(r.run_decision)}</small></td>",
                  f"<td>{'★' if r.pareto else ''}</td>", f'<td><a href="{e(link)}">report</a></td>']
        rows.append(f'<tr class="candidate-row" data-candidate="{e(r.name)}" data-decision="{e(r.decision)}">' + "".join(cells) + "</tr>"
                    f'<tr class="detail"><td colspan="{len(head)}">{e(r.reason)}</td></tr>')
    body.append('<div class="plot"><table class="matrix"><thead><tr>' + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"
                + "".join(rows) + "</tbody></table></div>")
    body.append('<p class="note">Check columns: worsening on the search split (metric units, up = worse) and its upper bound, coloured '
                "by that check's status. ★ = on the Pareto front (no other candidate is smaller and no worse on every check). "
                "'run (all items)' is the candidate run's own verdict over every item: shown for reference, never used to choose.</p>")
    if result.not_run:
        body.append(f'<p class="note">Not run (a cheaper candidate passed; <code>--full</code> runs them): {e(", ".join(result.not_run))}</p>')
    body.append('<h2 id="confirmation">Winner and held-out confirmation</h2>')
    if result.confirmation:
        c = result.confirmation
        body.append(f"<p><b>{e(c.candidate)}</b>: {_decision_badge(c.decision)} {e(c.reason)}</p>")
        from quantgate.gate import Verdict

        data = dict(c.verdict)
        data.pop("exit_code", None)
        checks = [ch for ch in Verdict.model_validate(data).checks if ch.gated and ch.kind in ("metric", "golden")]
        body.append(_check_table(checks))
    else:
        body.append('<p class="missing">No candidate passed the search split: nothing to confirm, nothing registered.</p>')
    if result.registration:
        reg = result.registration
        body.append(f'<p class="note">Registered as <code>{e(reg["name"])}</code> version {e(str(reg["version"]))} '
                    f'(aliases: {e(", ".join(reg.get("aliases_set", [])))}).</p>')
    body.append('<h2 id="scatter">Size vs quality (search split)</h2>')
    if panels:
        body.append(_legend([(d, plots.decision_colour(d)) for d in ("PASS", "REGRESSION", "INCONCLUSIVE", "ANOMALOUS", "ERROR")]))
        body.append('<div class="grid">' + "".join(plots.scatter_svg(p, i) for i, p in enumerate(panels)) + "</div>")
    else:
        body.append('<p class="missing">No gated checks to plot.</p>')
    return _page(f"quantgate search: {result.name}", "".join(body))


def write_summary(result: SearchResult, out_dir: Path) -> None:
    """search.json, search.html and (with matplotlib) search_scatter.png in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result.out_dir = str(out_dir)
    atomic_write_text(out_dir / SEARCH_JSON, json.dumps(result.to_dict(), indent=2, default=str))
    try:
        panels = scatter_panels(result)
        png = out_dir / SEARCH_PNG
        png.unlink(missing_ok=True)
        if panels and plots.have_matplotlib():
            plots.scatter_png(panels, png, title=f"quantgate search {result.name}: search split")
        atomic_write_text(out_dir / SEARCH_HTML, search_html(result, out_dir))
    except Exception as err:  # a page that cannot be drawn never changes the search's outcome
        log.warning("search HTML summary not written: %s", str(err).splitlines()[0] if str(err) else type(err).__name__)
