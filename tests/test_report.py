"""Renderers of a Verdict: terminal table, JUnit XML (parsed back), Markdown, step summary."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from quantgate.gate import Check, Decision, Limit, Verdict, judge
from quantgate.recipe import GateSpec
from quantgate.report import (
    junit_xml,
    limit_text,
    summary_markdown,
    verdict_table,
    write_github_step_summary,
)
from tests.test_gate import ACC, PPL, acc_pair, golden, ppl_pair, sides


@pytest.fixture(scope="module")
def mixed() -> Verdict:
    """A verdict with a failing, an inconclusive, a passing golden and informational checks."""
    pairs = (acc_pair(1000, 80, 10, task="a"), acc_pair(60, 1, 0, task="b"), ppl_pair(50, 0.01))
    spec = GateSpec(metrics={"a/acc": ACC, "b/acc": ACC, "wiki/word_perplexity": PPL},
                    golden={"min_exact_match": 0.5})
    return judge(*sides(*pairs), golden(), spec)


def _hand_verdict() -> Verdict:
    checks = [
        Check(name="t/acc", kind="metric", task="t", metric="acc", higher_is_better=True, baseline=0.6,
              candidate=0.5, delta=0.1, rel_delta=0.1667, limit=Limit(abs=0.02), ci_low=0.05, ci_high=0.15,
              p_value=0.001, flips_bad=12, flips_good=2, n=100, mdd=0.05, status="fail",
              detail='worse <than> "expected" & | piped'),
        Check(name="comparability/facts", kind="comparability", status="error", detail="tokenizer: 'a' vs 'b'"),
        Check(name="x/acc", kind="metric", status="pass", gated=False, detail="not gated"),
    ]
    return Verdict(decision=Decision.ERROR, reason="ERROR: comparability/facts: tokenizer differs", checks=checks,
                   confidence=0.95, power=0.8)


def test_table_lists_every_check_aligned(mixed):
    text = verdict_table(mixed)
    lines = text.splitlines()
    assert lines[0] == f"Decision: {mixed.decision.value} (exit {int(mixed.exit_code)})"
    assert mixed.decision is Decision.REGRESSION
    header = next(i for i, line in enumerate(lines) if line.startswith("check "))
    rows = lines[header + 2: header + 2 + len(mixed.checks)]
    assert {r.split()[0] for r in rows} == {c.name for c in mixed.checks}
    # Fixed width: the 'status' column starts at the same offset on every row.
    col = lines[header].index("status")
    assert all(len(r) > col and r[col - 2: col] == "  " for r in rows)
    assert "FAIL" in text and "INCONCLUSIVE" in text and "(not gated)" in text
    assert "items needed" in text  # details of non-passing checks follow the table


def test_junit_parses_back_with_counts_and_numbers(mixed):
    root = ET.fromstring(junit_xml(mixed, "fp8-gate"))
    suite = root.find("testsuite")
    cases = suite.findall("testcase")
    assert len(cases) == len(mixed.checks)
    failures = [c for c in cases if c.find("failure") is not None]
    errors = [c for c in cases if c.find("error") is not None]
    assert int(suite.get("failures")) == len(failures) == sum(c.status in ("fail", "inconclusive", "anomalous") for c in mixed.checks)
    assert int(suite.get("errors")) == len(errors) == 0
    props = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert props["decision"] == "REGRESSION" and props["exit_code"] == "1"
    fail = next(c for c in cases if c.get("name") == "a/acc").find("failure")
    assert fail.get("type") == "FAIL" and "ci_high:" in fail.text and "flips_bad: 80" in fail.text
    inc = next(c for c in cases if c.get("name") == "b/acc").find("failure")
    assert inc.get("type") == "INCONCLUSIVE" and "items_needed:" in inc.text
    assert next(c for c in cases if c.get("name") == "a/acc").get("classname") == "fp8-gate.metric"


def test_junit_escapes_and_errors():
    v = _hand_verdict()
    root = ET.fromstring(junit_xml(v))
    cases = {c.get("name"): c for c in root.iter("testcase")}
    assert cases["t/acc"].find("failure").get("message") == 'worse <than> "expected" & | piped'
    err = cases["comparability/facts"].find("error")
    assert err is not None and err.get("type") == "ERROR"
    assert root.find("testsuite").get("errors") == "1"
    assert cases["x/acc"].find("system-out") is not None


def test_markdown_summary(mixed):
    md = summary_markdown(mixed, "FP8 gate")
    assert md.startswith("## FP8 gate\n")
    assert "**Decision: REGRESSION (exit 1)**" in md
    gated_rows = [line for line in md.splitlines() if line.startswith("| `")]
    assert len(gated_rows) == len(mixed.checks)  # gated table + the collapsed not-gated table
    assert "<details><summary>Not gated" in md
    head = next(line for line in md.splitlines() if line.startswith("| Check"))
    sep = md.splitlines()[md.splitlines().index(head) + 1]
    assert head.count("|") == sep.count("|") == gated_rows[0].count("|")
    assert "80/10" in md  # flips


def test_markdown_escapes_pipes():
    md = summary_markdown(_hand_verdict())
    row = next(line for line in md.splitlines() if line.startswith("| `t/acc`"))
    assert row.count("|") == 12
    assert "\\| piped" in md


def test_limit_text():
    assert limit_text(Limit(abs=0.02, rel=0.03)) == "abs<0.02, rel<3%"
    assert limit_text(Limit(min=0.9)) == ">=0.9"
    assert limit_text(Limit(max=0.05)) == "<=0.05"
    assert limit_text(None) == "-"


def test_github_step_summary(tmp_path, monkeypatch):
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    assert write_github_step_summary("# x") is None
    target = tmp_path / "summary.md"
    target.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(target))
    assert write_github_step_summary("# one") == target
    write_github_step_summary("# two\n")
    assert target.read_text() == "earlier step\n# one\n# two\n"
