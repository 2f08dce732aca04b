"""Renderers of a Verdict for people and CI: a terminal table, JUnit XML and Markdown.

All renderers are pure (Verdict -> str) except `write_github_step_summary`, which appends to the
file GitHub Actions names in $GITHUB_STEP_SUMMARY.
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from pathlib import Path

from quantgate.gate import Check, Limit, Verdict

_STATUS_WORD = {
    "pass": "PASS", "fail": "FAIL", "inconclusive": "INCONCLUSIVE", "anomalous": "ANOMALOUS", "error": "ERROR",
}


# ---- cell formatting --------------------------------------------------------------------------


def _num(x: float | None) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.4g}"


def _signed(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:+.4g}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.3g}%"


def limit_text(limit: Limit | None) -> str:
    """'abs<=0.02, rel<=2%' for drop limits; '>=0.9' / '<=0.05' for golden thresholds."""
    if limit is None:
        return "-"
    parts = []
    if limit.abs is not None:
        parts.append(f"abs<{_num(limit.abs)}")
    if limit.rel is not None:
        parts.append(f"rel<{_pct(limit.rel)}")
    if limit.min is not None:
        parts.append(f">={_num(limit.min)}")
    if limit.max is not None:
        parts.append(f"<={_num(limit.max)}")
    return ", ".join(parts) or "-"


def ci_text(check: Check) -> str:
    if check.ci_low is None and check.ci_high is None:
        return "-"
    return f"[{_signed(check.ci_low)}, {_signed(check.ci_high)}]"


def status_text(check: Check) -> str:
    word = _STATUS_WORD[check.status]
    return word if check.gated else f"{word} (not gated)"


def _worsening(check: Check) -> str:
    if check.delta is None:
        return "-"
    rel = f" ({_pct(check.rel_delta)})" if check.rel_delta is not None and check.kind == "metric" else ""
    return _signed(check.delta) + rel


def _row(check: Check) -> list[str]:
    return [check.name, _num(check.baseline), _num(check.candidate), _worsening(check),
            ci_text(check), limit_text(check.limit), status_text(check)]


_HEADER = ["check", "baseline", "candidate", "worsening", "CI (worsening)", "limit", "status"]


def _headline(verdict: Verdict) -> str:
    return f"Decision: {verdict.decision.value} (exit {int(verdict.exit_code)})"


def _ordered(verdict: Verdict) -> list[Check]:
    # Metric and golden checks first (what the gate is about), then comparability/completeness.
    order = {"metric": 0, "golden": 1, "completeness": 2, "comparability": 3}
    return sorted(verdict.checks, key=lambda c: (not c.gated, order[c.kind]))


# ---- terminal table ---------------------------------------------------------------------------


def verdict_table(verdict: Verdict) -> str:
    """Fixed-width text table (one row per check) with the decision, reason and the details of
    every check that did not pass."""
    rows = [_HEADER] + [_row(c) for c in _ordered(verdict)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_HEADER))]
    numeric = {1, 2, 3}

    def fmt(r: list[str]) -> str:
        cells = [r[i].rjust(widths[i]) if i in numeric else r[i].ljust(widths[i]) for i in range(len(r))]
        return "  ".join(cells).rstrip()

    lines = [_headline(verdict), verdict.reason, "", fmt(rows[0]), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in rows[1:]]
    conf = f"{100 * verdict.confidence:g}%"
    lines += ["", f"CI: one-sided {conf} bounds of the worsening (positive = candidate worse)."]
    problems = [c for c in verdict.checks if c.status != "pass"]
    if problems:
        lines.append("")
        lines += [f"{_STATUS_WORD[c.status]:<12} {c.name}: {c.detail}" for c in problems]
    return "\n".join(lines) + "\n"


# ---- JUnit XML ------------------------------------------------------------------------------


def _numbers_text(check: Check) -> str:
    """Every number of a check, one 'key: value' per line (body of JUnit failures)."""
    keys = ["baseline", "candidate", "delta", "rel_delta", "ci_low", "ci_high", "rel_ci_low", "rel_ci_high",
            "p_value", "flips_bad", "flips_good", "n", "mdd", "items_needed", "method"]
    lines = [f"{k}: {getattr(check, k)}" for k in keys if getattr(check, k) is not None]
    lines.append(f"limit: {limit_text(check.limit)}")
    lines.append(f"detail: {check.detail}")
    return "\n".join(lines)


def junit_xml(verdict: Verdict, suite_name: str = "quantgate") -> str:
    """JUnit XML: one testcase per check. 'fail', 'inconclusive' and 'anomalous' are <failure>s
    (only PASS promotes, so CI should show them red); 'error' is an <error>."""
    cases = _ordered(verdict)
    failures = sum(c.status in ("fail", "inconclusive", "anomalous") for c in cases)
    errors = sum(c.status == "error" for c in cases)
    root = ET.Element("testsuites", name=suite_name, tests=str(len(cases)),
                      failures=str(failures), errors=str(errors))
    suite = ET.SubElement(root, "testsuite", name=suite_name, tests=str(len(cases)),
                          failures=str(failures), errors=str(errors), skipped="0")
    props = ET.SubElement(suite, "properties")
    for key, value in (("decision", verdict.decision.value), ("exit_code", str(int(verdict.exit_code))),
                       ("reason", verdict.reason), ("confidence", str(verdict.confidence)),
                       ("power", str(verdict.power))):
        ET.SubElement(props, "property", name=key, value=value)
    for check in cases:
        case = ET.SubElement(suite, "testcase", name=check.name, classname=f"{suite_name}.{check.kind}")
        body = _numbers_text(check)
        if check.status == "error":
            el = ET.SubElement(case, "error", message=check.detail, type="ERROR")
            el.text = body
        elif check.status != "pass":
            el = ET.SubElement(case, "failure", message=check.detail, type=_STATUS_WORD[check.status])
            el.text = body
        else:
            out = ET.SubElement(case, "system-out")
            out.text = body
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


# ---- Markdown -------------------------------------------------------------------------------


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def summary_markdown(verdict: Verdict, title: str = "quantgate") -> str:
    """Markdown summary (GitHub step summary, PR comment): decision, gated table, problems,
    informational checks in a collapsed section."""
    conf = f"{100 * verdict.confidence:g}%"
    lines = [f"## {_md(title)}", "", f"**{_headline(verdict)}** - {_md(verdict.reason)}", ""]
    head = ["Check", "Baseline", "Candidate", "Worsening", f"CI ({conf} one-sided)", "Limit",
            "p", "Flips -/+", "n", "MDD", "Status"]

    def table(checks: list[Check]) -> list[str]:
        out = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * 9 + ["---"]) + "|"]
        for c in checks:
            flips = f"{c.flips_bad}/{c.flips_good}" if c.flips_bad is not None else "-"
            cells = [f"`{c.name}`", _num(c.baseline), _num(c.candidate), _worsening(c), ci_text(c),
                     limit_text(c.limit), _num(c.p_value), flips, _num(c.n), _num(c.mdd), status_text(c)]
            out.append("| " + " | ".join(_md(x) for x in cells) + " |")
        return out

    gated = [c for c in _ordered(verdict) if c.gated]
    info = [c for c in _ordered(verdict) if not c.gated]
    lines += table(gated)
    problems = [c for c in verdict.checks if c.status != "pass"]
    if problems:
        lines += ["", "**Checks that did not pass**", ""]
        lines += [f"- **{_STATUS_WORD[c.status]}** `{c.name}`: {_md(c.detail)}" for c in problems]
    if info:
        lines += ["", f"<details><summary>Not gated ({len(info)})</summary>", ""]
        lines += table(info)
        lines += ["", "</details>"]
    lines += ["", f"_Worsening is positive when the candidate is worse; CI bounds are one-sided at {conf}; "
              f"MDD = minimum detectable worsening at {100 * verdict.power:g}% power. Flips -/+ = items "
              "right->wrong / wrong->right._"]
    return "\n".join(lines) + "\n"


def write_github_step_summary(md: str) -> Path | None:
    """Append `md` to $GITHUB_STEP_SUMMARY when running in GitHub Actions; returns the file or None."""
    target = os.environ.get("GITHUB_STEP_SUMMARY")
    if not target:
        return None
    path = Path(target)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(md if md.endswith("\n") else md + "\n")
    return path
