"""Self-contained HTML reports of a run directory and of a matrix of runs.

Pure builders over files: they read a run directory as the pipeline writes it and write
report.html (inline CSS and SVG; no scripts, fonts or anything fetched over the network) plus PNG
copies of the plots for MLflow's artifact viewer (skipped when matplotlib is absent).

    write_run_report(run_dir)              -> run_dir/report.html (+ report_*.png)
    write_matrix_report(run_dirs, out_dir) -> out_dir/matrix_report.html (+ matrix_scatter.png)
    report_images(run_dir)                 -> the PNGs write_run_report wrote

All text from the run (prompts, outputs, check details, recipe values) is HTML-escaped.
"""

from __future__ import annotations

import html
import logging
import math
import os
from pathlib import Path

from quantgate import __version__
from quantgate.evaluation.golden import _split_at_divergence
from quantgate.gate import Check
from quantgate.report import _num, _pct, _signed, ci_text, limit_text
from quantgate.reports import plots
from quantgate.reports.rundata import ReportError, RunData, TaskComparison, load_run
from quantgate.rundir import atomic_write_text

log = logging.getLogger(__name__)

RUN_HTML = "report.html"
RUN_IMAGES = ("report_forest.png", "report_flips.png")
MATRIX_HTML = "matrix_report.html"
MATRIX_IMAGES = ("matrix_scatter.png",)
SAME_ARTIFACT_TEXT = "candidate = baseline artifact, no statistics"

e = html.escape

_CSS = """
:root{--fg:#1d1d1f;--muted:#5f6368;--line:#dadce0;--soft:#f6f7f9}
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;color:var(--fg);margin:0;background:#fff;line-height:1.4}
main{max-width:1120px;margin:0 auto;padding:20px 28px 60px}
h1{font-size:1.6rem;margin:.2rem 0 .6rem}
h2{font-size:1.2rem;margin:2rem 0 .5rem;padding-bottom:.25rem;border-bottom:1px solid var(--line)}
h3{font-size:1rem;margin:1.2rem 0 .4rem}
p.note,.muted{color:var(--muted);font-size:.88rem}
.verdict{display:flex;gap:16px;align-items:center;padding:12px 16px;border-radius:8px;color:#fff;margin:.4rem 0 1rem}
.verdict .word{font-size:1.5rem;font-weight:800;letter-spacing:.03em;white-space:nowrap}
.verdict .reason{font-size:.95rem;word-break:break-word}
.banner{border:2px solid #1565c0;background:#e3f2fd;color:#0d47a1;border-radius:8px;padding:10px 14px;margin:0 0 1rem;font-weight:600}
.banner span{font-weight:400;display:block;margin-top:.2rem;color:#1d1d1f}
.facts{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:4px 18px;margin:0 0 .6rem;font-size:.9rem}
.facts div{padding:3px 0;border-bottom:1px dotted var(--line);overflow-wrap:anywhere}
.facts b{color:var(--muted);font-weight:600;margin-right:.4em}
table{border-collapse:collapse;width:100%;font-size:.88rem;margin:.4rem 0 1rem}
th,td{border:1px solid var(--line);padding:5px 7px;text-align:left;vertical-align:top}
th{background:var(--soft);font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.st{display:inline-block;padding:1px 7px;border-radius:10px;color:#fff;font-size:.78rem;font-weight:700;white-space:nowrap}
.plot{overflow-x:auto;margin:.3rem 0 .6rem}
.plot svg{max-width:none;display:block}
.legend{display:flex;flex-wrap:wrap;gap:14px;font-size:.82rem;color:var(--muted);margin:.2rem 0 .8rem}
.legend i{display:inline-block;width:11px;height:11px;border-radius:50%;margin-right:5px;vertical-align:-1px}
table.checks{font-size:.8rem}
table.checks td.num{white-space:normal}
tr.detail td{font-size:.8rem;color:var(--muted);border-top:none;padding-top:0}
td.lost,td.gained{white-space:normal;font-size:.9rem}
td.lost .muted,td.gained .muted{font-size:.75rem}
.golden td.text>div{max-height:14em;overflow:auto}
.golden td.text{white-space:pre-wrap;font-family:ui-monospace,'DejaVu Sans Mono',Menlo,monospace;font-size:.82rem;width:30%;overflow-wrap:anywhere}
.golden tr.same td.id{border-left:4px solid #2e7d32}
.golden tr.diff td.id{border-left:4px solid #c62828}
.golden td.id{min-width:10em}
table.matrix th code{font-size:.75rem;word-break:break-all}
table.timings{width:auto;min-width:320px}
.golden .metrics{color:var(--muted);font-size:.78rem;margin-top:.3rem}
mark.b{background:#d2e3fc}
mark.c{background:#fad2cf}
.div{color:#c62828;font-weight:800}
.ws{color:#9aa0a6}
details>summary{cursor:pointer;color:#1a73e8;margin:.4rem 0}
.grid{display:flex;flex-wrap:wrap;gap:12px}
.missing{color:var(--muted);font-style:italic}
footer{margin-top:2.5rem;color:var(--muted);font-size:.8rem}
"""


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body><main>{body}"
        f"<footer>Written by quantgate {e(__version__)} from the files of the run directory; "
        "self-contained (no scripts, no network).</footer></main></body></html>\n"
    )


def _badge(status: str, gated: bool = True) -> str:
    key = status if gated else "not gated"
    colour = plots.STATUS_COLOURS.get(key, "#37474f")
    word = status.upper() if gated else f"{status} (not gated)"
    return f'<span class="st" style="background:{colour}">{e(word)}</span>'


def _decision_badge(decision: str) -> str:
    return f'<span class="st decision" style="background:{plots.decision_colour(decision)}">{e(decision)}</span>'


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB"


def _visible_ws(text: str) -> str:
    """Escaped text with newlines and tabs shown (outputs of small models are often only those)."""
    out = e(text)
    return out.replace("\n", '<span class="ws">↵</span>\n').replace("\t", '<span class="ws">⇥</span>\t')


# ---- one run --------------------------------------------------------------------------------------


def _facts(run: RunData) -> str:
    r, o = run.recipe, run.outcome
    model = r.get("model") or {}
    engine = r.get("engine") or {}
    ev = r.get("evaluation") or {}
    gate = r.get("gate") or {}
    facts: list[tuple[str, str]] = [
        ("recipe", f"{run.name}" + (f" ({o['source']})" if o.get("source") else "")),
        ("format", run.format + (f" · {run.checkpoint.quant_algo}" if run.checkpoint and run.checkpoint.quant_algo else "")),
        ("model", f"{model.get('source', '-')} ({model.get('dtype', '?')})"),
        ("checkpoint", _mb(run.checkpoint_bytes) + (" (the baseline's)" if run.candidate_is_baseline else "")),
        ("baseline cache", str(o.get("baseline_cache") or "-")),
        ("engine", f"{engine.get('backend', '?')} on {engine.get('device', '?')}"),
        ("suite", f"{ev.get('suite', '?')}" + (f", limit {ev['limit']}" if ev.get("limit") else "")),
        ("gate", f"one-sided {100 * float(gate.get('confidence', 0)):g}% bounds, power {100 * float(gate.get('power', 0)):g}%" if gate else "-"),
        ("run directory", run.run_dir.name),
    ]
    if o.get("mlflow_run_id"):
        facts.append(("MLflow run", str(o["mlflow_run_id"])))
    if o.get("registered_version"):
        facts.append(("registered version", f"{o['registered_version']}" + (" (promoted)" if o.get("promoted") else " (not promoted)")))
    if o.get("exit_code") is not None:
        facts.append(("exit code", str(o["exit_code"])))
    if o.get("timings"):
        facts.append(("stage time", f"{sum(float(v) for v in o['timings'].values()):.1f} s"))
    versions = dict(o.get("versions") or run.manifest.get("versions") or {})
    side = run.baseline or run.candidate
    if side is not None:
        for k, v in side.comparability.items():
            if "version" in k or k in ("backend", "device_type", "compute_dtype"):
                versions.setdefault(k, v)
    if versions:
        facts.append(("versions", ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))))
    return '<div class="facts">' + "".join(f"<div><b>{e(k)}</b>{e(v)}</div>" for k, v in facts) + "</div>"


def _legend(items: list[tuple[str, str]]) -> str:
    return '<div class="legend">' + "".join(f'<span><i style="background:{c}"></i>{e(w)}</span>' for w, c in items) + "</div>"


def _status_legend() -> str:
    return _legend([(k, v) for k, v in plots.STATUS_COLOURS.items()])


def _check_table(checks: list[Check]) -> str:
    """One row of numbers per check, its detail line under it."""
    head = ["check", "baseline", "candidate", "worsening", "interval", "limit", "p", "flips −/+", "n", "MDD", "status"]
    rows = []
    for c in checks:
        flips = f"{c.flips_bad}/{c.flips_good}" if c.flips_bad is not None else "-"
        worsening = _signed(c.delta) + (f" ({_pct(c.rel_delta)})" if c.rel_delta is not None and c.kind == "metric" else "")
        nums = (_num(c.baseline), _num(c.candidate), worsening, ci_text(c), limit_text(c.limit), _num(c.p_value), flips, _num(c.n), _num(c.mdd))
        detail = c.detail + (f" (~{c.items_needed} items needed)" if c.items_needed else "")
        rows.append(f'<tr class="check" data-check="{e(c.name)}" data-status="{e(c.status)}"><td rowspan="2"><code>{e(c.name)}</code></td>'
                    + "".join(f'<td class="num">{e(x)}</td>' for x in nums) + f"<td>{_badge(c.status, c.gated)}</td></tr>"
                    f'<tr class="detail"><td colspan="{len(head) - 1}">{e(detail)}</td></tr>')
    return ('<table class="checks"><thead><tr>' + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def _gate_section(run: RunData) -> str:
    out = ['<h2 id="checks">Gated checks</h2>']
    if run.candidate_is_baseline:
        out.append(f'<p class="same-artifact"><b>{e(SAME_ARTIFACT_TEXT)}.</b> The candidate is the 16-bit baseline checkpoint '
                   "itself, evaluated once: every difference is zero by construction, so no worsening, interval or flip is shown. "
                   "The gate's checks are listed for the record only.</p>")
        if run.verdict is not None:
            out.append("<details><summary>verdict checks (" + str(len(run.verdict.checks)) + ")</summary>"
                       + _check_table(run.verdict.checks) + "</details>")
        return "".join(out)
    v = run.verdict
    if v is None:
        out.append('<p class="missing">No verdict: the run stopped before the gate (no verdict.json). '
                   f"Outcome: {e(run.reason)}</p>")
        return "".join(out)
    rows = plots.forest_rows(v, gated=True)
    conf = f"{100 * v.confidence:g}%"
    if rows:
        out.append(f'<p class="note">Each row is one gated check. The dot is the candidate\'s worsening (positive = worse), the bar its '
                   f"interval between the one-sided {conf} bounds, both as a share of the check's margin: the check passes when the "
                   "right end stays left of the dashed margin line. Golden checks (◆) are plain thresholds without an interval. "
                   "Numbers on the right are in the metric's own units.</p>")
        out.append('<div class="plot">' + plots.forest_svg(rows, gated=True, plot_id="forest") + "</div>")
        out.append(_status_legend())
    else:
        out.append('<p class="missing">No gated metric or golden check in this verdict.</p>')
    gated = [c for c in v.checks if c.gated and c.kind in ("metric", "golden")]
    if gated:
        out.append(_check_table(gated))
    validity = [c for c in v.checks if c.kind in ("comparability", "completeness")]
    bad = [c for c in validity if c.status != "pass"]
    if validity:
        summary = f"validity checks: {len(validity) - len(bad)} of {len(validity)} pass (comparability of the two sides, completeness)"
        if bad:
            out.append(f"<h3>Validity checks that did not pass ({len(bad)})</h3>" + _check_table(bad))
        out.append(f"<details><summary>{e(summary)}</summary>{_check_table(validity)}</details>")
    info = plots.forest_rows(v, gated=False)
    if info:
        info_checks = [c for c in v.checks if not c.gated and c.kind in ("metric", "golden")]
        out.append(f"<details class=\"info\"><summary>not gated: {len(info)} informational checks</summary>"
                   '<div class="plot">' + plots.forest_svg(info, gated=False, plot_id="forest-info") + "</div>"
                   + _check_table(info_checks) + "</details>")
    return "".join(out)


def _task_table(tasks: list[TaskComparison], same: bool) -> str:
    head = ["task", "kind", "n (base/cand)", "metric", "baseline", "candidate", "change", "lost (worse)", "gained (better)"]
    rows = []
    for t in tasks:
        bad_word, good_word = t.flip_words
        span = max(len(t.metrics), 1)
        for i, (m, b, c, hib) in enumerate(t.metrics or [("-", None, None, None)]):
            cells = []
            if i == 0:
                cells += [f'<td rowspan="{span}"><b>{e(t.task)}</b></td>', f'<td rowspan="{span}">{e(t.kind)}</td>',
                          f'<td class="num" rowspan="{span}">{t.n_baseline}/{t.n_candidate}</td>']
            arrow = "" if hib is None else (" ↑" if hib else " ↓")
            if same:
                change = "same artifact"
            elif b is None or c is None or not (math.isfinite(b) and math.isfinite(c)):
                change = "-"
            else:
                change = _signed(c - b) + (f" ({(c - b) / abs(b):+.2%})" if b else "")
            cells += [f'<td>{e(m)}<span class="muted">{arrow}</span></td>', f'<td class="num">{e(_num(b))}</td>',
                      f'<td class="num">{e(_num(c) if not same else "= baseline")}</td>', f'<td class="num">{e(change)}</td>']
            if i == 0:
                if same:
                    cells += [f'<td rowspan="{span}" colspan="2" class="muted">no statistics</td>']
                else:
                    cells += [f'<td class="num lost" rowspan="{span}" title="{e(bad_word)}">{t.worse}<div class="muted">{e(bad_word)}</div></td>',
                              f'<td class="num gained" rowspan="{span}" title="{e(good_word)}">{t.better}<div class="muted">{e(good_word)}</div></td>']
            rows.append(f'<tr data-task="{e(t.task)}">' + "".join(cells) + "</tr>")
    return ('<table class="tasks"><thead><tr>' + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def _tasks_section(run: RunData) -> str:
    out = ['<h2 id="tasks">Baseline vs candidate, per task</h2>']
    tasks = run.tasks()
    if not tasks:
        missing = [n for n, x in (("baseline_results.json", run.baseline), ("candidate_results.json", run.candidate)) if x is None]
        out.append(f'<p class="missing">Not available ({e(", ".join(missing))} missing).</p>')
        return "".join(out)
    same = run.candidate_is_baseline
    if not same:
        out.append('<p class="note">Flips are counted over the items both sides scored (paired by doc_id and prompt hash): '
                   "an accuracy item that went right → wrong is a loss, wrong → right a gain; for perplexity tasks, documents "
                   "whose log-likelihood went down or up. ↑/↓: higher/lower is better.</p>")
        out.append('<div class="plot">' + plots.flips_svg(tasks) + "</div>")
    out.append(_task_table(tasks, same))
    return "".join(out)


def _golden_section(run: RunData) -> str:
    out = ['<h2 id="golden">Golden prompts</h2>']
    g = run.golden
    if g is None:
        out.append('<p class="missing">No golden comparison in this run (golden.json absent).</p>')
        return "".join(out)
    same = run.candidate_is_baseline
    n_same = sum(r.exact_match for r in g.records)
    if same:
        out.append(f'<p class="note">{e(SAME_ARTIFACT_TEXT)}: the outputs below are the baseline\'s greedy outputs.</p>')
    else:
        out.append(f'<p class="note">{n_same}/{len(g.records)} identical outputs · exact match {g.exact_match_rate:.1%} · '
                   f"prefix agreement {g.mean_prefix_agreement:.1%} · token agreement {g.mean_token_agreement:.1%} · "
                   f"top-1 agreement {g.top1_agreement:.1%} · mean KL(baseline‖candidate) {g.mean_kl:.4g} nats. "
                   '<span class="div">▍</span> marks where the texts part (first differing character); the rest is highlighted. '
                   "↵ is a newline.</p>")
    head = ["prompt", "prompt text", "baseline output"] + ([] if same else ["candidate output"])
    rows = []
    for r in g.records:
        if same:
            b_html, c_html, metrics = _visible_ws(r.baseline_text), "", f"{r.n_tokens} tokens"
        else:
            common, rest_b, rest_c = _split_at_divergence(r.baseline_text, r.candidate_text)
            marker = "" if r.exact_match else f'<span class="div" title="first divergence: token {r.first_divergence}">▍</span>'
            b_html = _visible_ws(common) + marker + (f'<mark class="b">{_visible_ws(rest_b)}</mark>' if rest_b else "")
            c_html = _visible_ws(common) + marker + (f'<mark class="c">{_visible_ws(rest_c)}</mark>' if rest_c else "")
            fd = "identical" if r.first_divergence is None else f"diverges at token {r.first_divergence}"
            metrics = (f"{fd}<br>prefix {r.prefix_agreement:.0%} · tokens {r.token_agreement:.0%}<br>"
                       f"top-1 {r.top1_agreement:.0%} · KL {r.mean_kl:.4g}<br>{r.n_tokens} tokens")
        cls = "same" if r.exact_match else "diff"
        cells = [f'<td class="id"><b>{e(r.id)}</b><div class="metrics">{metrics}</div></td>',
                 f'<td class="text"><div>{e(r.prompt)}</div></td>', f'<td class="text"><div>{b_html}</div></td>']
        if not same:
            cells.append(f'<td class="text"><div>{c_html}</div></td>')
        rows.append(f'<tr class="golden-row {cls}" data-id="{e(r.id)}">' + "".join(cells) + "</tr>")
    out.append('<table class="golden"><thead><tr>' + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"
               + "".join(rows) + "</tbody></table>")
    return "".join(out)


def _fidelity_section(run: RunData) -> str:
    """How much of the candidate's drift the export adds: ModelOpt's own evaluations judge the
    calibrated in-memory model, but the artifact is what ships (fused layers are re-smoothed)."""
    f = run.fidelity
    if not f:
        return ""
    share = f["export_added_kl"] / f["kl_baseline_to_artifact"] if f.get("kl_baseline_to_artifact") else 0.0
    facts = [("KL(calibrated ‖ artifact)", f"{f['kl_calibrated_to_artifact']:.4g}"),
             ("top-1 agreement calibrated vs artifact", f"{f['top1_calibrated_vs_artifact']:.1%}"),
             ("KL(baseline ‖ calibrated in memory)", f"{f['kl_baseline_to_calibrated']:.4g}"),
             ("KL(baseline ‖ exported artifact)", f"{f['kl_baseline_to_artifact']:.4g}"),
             ("drift added by the export", f"{f['export_added_kl']:+.4g} ({share:+.0%} of the artifact's KL)")]
    return ('<h2 id="fidelity">Export fidelity</h2><p class="note">Golden prompts teacher-forced along the baseline\'s outputs, '
            f"{int(f['prompts'])} prompts; a diagnostic, not gated.</p><div class=\"facts\">"
            + "".join(f"<div><b>{e(k)}</b>{e(v)}</div>" for k, v in facts) + "</div>")


def _calibration_section(run: RunData) -> str:
    out = ['<h2 id="calibration">Calibration, checkpoint and timings</h2>']
    c = run.calibration
    if c is not None:
        facts = [("dataset", c.dataset), ("samples × length", f"{c.num_samples} × {c.seq_len} tokens"), ("tokens", str(c.tokens)),
                 ("seed", str(c.seed)), ("seconds", f"{c.seconds:.1f}"), ("data sha256", c.content_sha256[:16] + "…")]
        out.append("<h3>Calibration</h3><div class=\"facts\">" + "".join(f"<div><b>{e(k)}</b>{e(v)}</div>" for k, v in facts) + "</div>")
    elif run.candidate_is_baseline:
        out.append('<p class="note">No calibration: the candidate is the unquantized baseline checkpoint.</p>')
    else:
        out.append('<p class="missing">No calibration.json in this run directory.</p>')
    k = run.checkpoint
    if k is not None:
        facts = [("format", k.format), ("quant_algo", k.quant_algo or "-"), ("dtype", k.dtype), ("size", f"{_mb(k.size_bytes)} ({k.size_bytes} bytes)"),
                 ("export seconds", f"{k.export_seconds:.1f}")]
        out.append("<h3>Checkpoint</h3><div class=\"facts\">" + "".join(f"<div><b>{e(a)}</b>{e(b)}</div>" for a, b in facts) + "</div>")
    timings = run.outcome.get("timings") or {}
    if timings:
        out.append("<h3>Stage timings</h3><table class=\"timings\"><thead><tr><th>stage</th><th>seconds</th></tr></thead><tbody>"
                   + "".join(f'<tr><td>{e(str(s))}</td><td class="num">{float(t):.2f}</td></tr>' for s, t in timings.items())
                   + "</tbody></table>")
    if run.problems:
        out.append("<h3>Unreadable files</h3><ul>" + "".join(f"<li>{e(p)}</li>" for p in run.problems) + "</ul>")
    return "".join(out)


def run_report_html(run: RunData) -> str:
    """The report page of one run (pure: RunData -> HTML)."""
    colour = plots.decision_colour(run.decision)
    exit_txt = f" · exit {run.outcome['exit_code']}" if run.outcome.get("exit_code") is not None else ""
    body = [
        f'<h1>quantgate: {e(run.name)} <span class="muted">({e(run.format)})</span></h1>',
        f'<div class="verdict" id="verdict" data-decision="{e(run.decision)}" style="background:{colour}">'
        f'<div class="word">{e(run.decision)}</div><div class="reason">{e(run.reason)}<span class="muted" style="color:#fff;opacity:.8">{e(exit_txt)}</span></div></div>',
    ]
    if run.candidate_is_baseline:
        body.append(f'<div class="banner" id="same-artifact">{e(SAME_ARTIFACT_TEXT)}'
                    "<span>This recipe's candidate is the baseline checkpoint itself (format "
                    f"{e(run.format)} is not quantized): its results are the baseline's, so it passes by construction and says "
                    "nothing about quantization.</span></div>")
    body += [_facts(run), _gate_section(run), _tasks_section(run), _golden_section(run), _fidelity_section(run), _calibration_section(run)]
    return _page(f"quantgate report: {run.name} ({run.format}) {run.decision}", "".join(body))


def _write_images(run: RunData) -> list[Path]:
    for name in RUN_IMAGES:  # never leave an image of an earlier report beside a new one
        (run.run_dir / name).unlink(missing_ok=True)
    if not plots.have_matplotlib():
        log.info("matplotlib is not installed: the report has SVG plots only, no PNG images")
        return []
    written = []
    title = f"{run.name} ({run.format}): {run.decision}"
    if run.verdict is not None and not run.candidate_is_baseline:
        rows = plots.forest_rows(run.verdict, gated=True)
        if rows:
            written.append(plots.forest_png(rows, run.run_dir / RUN_IMAGES[0], title=title + " · gated checks"))
    tasks = run.tasks()
    if tasks and not run.candidate_is_baseline:
        written.append(plots.flips_png(tasks, run.run_dir / RUN_IMAGES[1], title=title + " · flips per task"))
    return written


def write_run_report(run_dir: Path) -> Path:
    """Write run_dir/report.html and PNG images of its plots; returns the HTML path. Reads the run's
    files only; ReportError (exit code BAD_INPUT) when run_dir is not a run directory."""
    run = load_run(Path(run_dir))
    _write_images(run)
    path = run.run_dir / RUN_HTML
    atomic_write_text(path, run_report_html(run))
    return path


def report_images(run_dir: Path) -> list[Path]:
    """The PNG images that write_run_report wrote into run_dir (for MLflow), in a fixed order."""
    return [p for p in (Path(run_dir) / n for n in RUN_IMAGES) if p.is_file()]


# ---- a matrix of runs --------------------------------------------------------------------------------


def _gated_names(runs: list[RunData]) -> list[str]:
    names: list[str] = []
    for run in runs:
        for c in run.verdict.checks if run.verdict else []:
            if c.gated and c.kind in ("metric", "golden") and c.name not in names:
                names.append(c.name)
    return names


def scatter_panels(runs: list[RunData]) -> list[plots.ScatterPanel]:
    panels = []
    for name in _gated_names(runs):
        pts = []
        for run in runs:
            check = next((c for c in run.verdict.checks if c.name == name), None) if run.verdict else None
            if check is None or run.checkpoint_bytes is None:
                continue
            same = run.candidate_is_baseline
            y = 0.0 if same else check.delta  # the same artifact: zero by construction, no interval
            pts.append(plots.ScatterPoint(
                recipe=run.name, decision=run.decision, status=check.status, mb=run.checkpoint_bytes / 1e6, y=y,
                lo=None if same else check.ci_low, hi=None if same else check.ci_high,
                margin=plots.effective_margin(check), same_artifact=same,
            ))
        panels.append(plots.ScatterPanel(name, pts))
    return panels


def matrix_report_html(runs: list[RunData], out_dir: Path) -> str:
    panels = scatter_panels(runs)
    names = _gated_names(runs)
    base_bytes = next((r.checkpoint_bytes for r in runs if r.candidate_is_baseline and r.checkpoint_bytes), None)
    body = [f"<h1>quantgate matrix: {len(runs)} recipes</h1>"]
    counts = {}
    for r in runs:
        counts[r.decision] = counts.get(r.decision, 0) + 1
    body.append('<p class="note">' + " · ".join(f"{_decision_badge(d)} × {n}" for d, n in counts.items()) + "</p>")
    body.append('<h2 id="scatter">Size vs quality</h2>')
    if panels:
        body.append('<p class="note">One panel per gated check: checkpoint size (x) against the candidate\'s worsening in the metric\'s '
                    "units (y, up = worse) with its interval; the dashed line is the margin. Point colour = the recipe's verdict; "
                    "a hollow point is a candidate that is the baseline artifact itself (zero by construction).</p>")
        body.append(_legend([(d, plots.decision_colour(d)) for d in ("PASS", "REGRESSION", "INCONCLUSIVE", "ANOMALOUS", "ERROR")]))
        body.append('<div class="grid">' + "".join(plots.scatter_svg(p, i) for i, p in enumerate(panels)) + "</div>")
    else:
        body.append('<p class="missing">No gated checks to plot.</p>')
    body.append('<h2 id="recipes">Recipes</h2>')
    head = ["recipe", "format", "checkpoint", "vs baseline", "verdict", *[f"<code>{e(n)}</code>" for n in names], "report"]
    rows = []
    for r in runs:
        link = os.path.relpath(r.run_dir / RUN_HTML, out_dir)
        ratio = f"{r.checkpoint_bytes / base_bytes:.2f}×" if base_bytes and r.checkpoint_bytes else "-"
        cells = [f"<td><b>{e(r.name)}</b></td>", f"<td>{e(r.format)}</td>", f'<td class="num">{e(_mb(r.checkpoint_bytes))}</td>',
                 f'<td class="num">{e(ratio)}</td>', f"<td>{_decision_badge(r.decision)}</td>"]
        for n in names:
            c = next((c for c in r.verdict.checks if c.name == n), None) if r.verdict else None
            if c is None:
                cells.append('<td class="num">-</td>')
            elif r.candidate_is_baseline:
                cells.append('<td class="num muted" title="candidate = baseline artifact">0 (same)</td>')
            else:
                colour = plots.STATUS_COLOURS.get(c.status, "#37474f")
                cells.append(f'<td class="num" style="color:{colour};font-weight:600" title="{e(c.status)}: {e(c.detail)}">{e(_signed(c.delta))}</td>')
        reason = r.reason if len(r.reason) <= 160 else r.reason[:159] + "…"
        if r.candidate_is_baseline:
            reason = f"{SAME_ARTIFACT_TEXT}. {reason}"
        cells.append(f'<td><a href="{e(link)}">report</a></td>')
        rows.append(f'<tr class="recipe-row" data-recipe="{e(r.name)}" data-decision="{e(r.decision)}">' + "".join(cells) + "</tr>"
                    f'<tr class="detail"><td colspan="{len(head)}" title="{e(r.reason)}">{e(reason)}</td></tr>')
    body.append('<div class="plot"><table class="matrix"><thead><tr>' + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"
                + "".join(rows) + "</tbody></table></div>")
    body.append('<p class="note">Check columns: the worsening in metric units, coloured by that check\'s status (hover for the '
                "detail); under each recipe its verdict's reason.</p>")
    return _page(f"quantgate matrix: {len(runs)} recipes", "".join(body))


def write_matrix_report(run_dirs: list[Path], out_dir: Path) -> Path:
    """Write out_dir/matrix_report.html (+ matrix_scatter.png) for the runs; each run gets its own
    report.html first where it has none, so the links work. Returns the HTML path."""
    if not run_dirs:
        raise ReportError("no run directories given for the matrix report")
    runs = [load_run(Path(d)) for d in run_dirs]
    for run in runs:
        if not (run.run_dir / RUN_HTML).is_file():
            write_run_report(run.run_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / MATRIX_IMAGES[0]
    png.unlink(missing_ok=True)
    panels = scatter_panels(runs)
    if panels and plots.have_matplotlib():
        plots.scatter_png(panels, png, title=f"quantgate matrix: {', '.join(r.name for r in runs)}")
    path = out_dir / MATRIX_HTML
    atomic_write_text(path, matrix_report_html(runs, out_dir))
    return path


def matrix_images(out_dir: Path) -> list[Path]:
    """The PNG images that write_matrix_report wrote into out_dir."""
    return [p for p in (Path(out_dir) / n for n in MATRIX_IMAGES) if p.is_file()]
