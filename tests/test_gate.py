"""Table tests of quantgate.gate.judge on hand-built results (no models)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from quantgate.errors import ExitCode
from quantgate.evaluation.results import (
    EvalResults,
    GoldenRecord,
    GoldenSummary,
    ItemRecord,
    TaskResult,
)
from quantgate.gate import Decision, Verdict, judge
from quantgate.recipe import GateSpec

FACTS = {"backend": "torch", "tokenizer": "abc123", "lm_eval": "0.4.13", "max_input_len": "2048"}


# ---- builders ----------------------------------------------------------------------------------


def acc_pair(n: int, bad: int, good: int, acc: float = 0.6, task: str = "qa", **over) -> tuple[TaskResult, TaskResult]:
    """Accuracy task on both sides with exactly `bad` right->wrong and `good` wrong->right flips."""
    base = np.zeros(n)
    base[: int(acc * n)] = 1
    cand = base.copy()
    cand[np.flatnonzero(base == 1)[:bad]] = 0
    cand[np.flatnonzero(base == 0)[:good]] = 1
    return acc_task(task, base, **over.get("base", {})), acc_task(task, cand, **over.get("cand", {}))


def acc_task(task: str, correct, metrics: dict | None = None, **fields) -> TaskResult:
    items = [ItemRecord(doc_id=i, prompt_hash=f"{task}-{i:05d}", correct=float(v)) for i, v in enumerate(correct)]
    data = {
        "task": task, "version": "1.0", "kind": "accuracy", "config_hash": "cfg1", "num_fewshot": 0,
        "metrics": metrics if metrics is not None else {"acc": float(np.mean(correct)), "acc_stderr": 0.01},
        "higher_is_better": {"acc": True}, "items": items,
    }
    data.update(fields)
    return TaskResult(**data)


def ppl_pair(n: int, rel_change: float, noise: float = 0.002, task: str = "wiki", seed: int = 0) -> tuple[TaskResult, TaskResult]:
    """Perplexity task: the candidate's per-word NLL shifted so word perplexity moves by ~rel_change."""
    rng = np.random.default_rng(seed)
    words = rng.integers(100, 600, n)
    nll = rng.normal(3.0, 0.3, n)
    cand_nll = nll + math.log1p(rel_change) + rng.normal(0, noise, n)
    return ppl_task(task, -words * nll, words), ppl_task(task, -words * cand_nll, words)


def ppl_task(task: str, ll, words, **fields) -> TaskResult:
    nbytes = np.asarray(words) * 5
    items = [
        ItemRecord(doc_id=i, prompt_hash=f"{task}-{i:05d}", loglikelihood=float(a), words=int(w), bytes=int(b))
        for i, (a, w, b) in enumerate(zip(ll, words, nbytes, strict=True))
    ]
    tot = float(np.sum(ll))
    data = {
        "task": task, "version": "2", "kind": "perplexity", "config_hash": "cfgp",
        "metrics": {
            "word_perplexity": math.exp(-tot / float(np.sum(words))),
            "bits_per_byte": -tot / float(np.sum(nbytes)) / math.log(2),
        },
        "higher_is_better": {"word_perplexity": False, "bits_per_byte": False}, "items": items,
    }
    data.update(fields)
    return TaskResult(**data)


def results(side: str, *tasks: TaskResult, facts: dict | None = None, errors: list[str] | None = None) -> EvalResults:
    return EvalResults(
        side=side, tasks={t.task: t for t in tasks},
        comparability=dict(FACTS if facts is None else facts), errors=errors or [],
    )


def sides(*pairs: tuple[TaskResult, TaskResult], **kw) -> tuple[EvalResults, EvalResults]:
    return results("baseline", *(p[0] for p in pairs)), results("candidate", *(p[1] for p in pairs), **kw)


def spec(**metrics) -> GateSpec:
    """spec(qa__acc={'max_abs_drop': 0.02}) -> gate.metrics['qa/acc']."""
    return GateSpec(metrics={k.replace("__", "/"): v for k, v in metrics.items()})


def check(v: Verdict, name: str):
    return next(c for c in v.checks if c.name == name)


def golden(exact=0.9, kl=0.01, top1=0.97, n=10) -> GoldenSummary:
    recs = [
        GoldenRecord(id=str(i), prompt="p", baseline_text="a", candidate_text="a", exact_match=True,
                     first_divergence=None, prefix_agreement=1.0, token_agreement=1.0, mean_kl=kl,
                     top1_agreement=top1, n_tokens=8)
        for i in range(n)
    ]
    return GoldenSummary(records=recs, exact_match_rate=exact, mean_prefix_agreement=1.0,
                         mean_token_agreement=1.0, mean_kl=kl, top1_agreement=top1)


# ---- each verdict class, each direction ------------------------------------------------------

ACC = {"max_abs_drop": 0.02}
PPL = {"max_rel_drop": 0.03}

CASES = [
    # id, pair, limit key, limit, expected check status, expected decision
    ("acc-pass", lambda: acc_pair(2000, 10, 10), "qa/acc", ACC, "pass", Decision.PASS),
    ("acc-regression", lambda: acc_pair(1000, 80, 10), "qa/acc", ACC, "fail", Decision.REGRESSION),
    ("acc-inconclusive-small-n", lambda: acc_pair(60, 1, 0), "qa/acc", ACC, "inconclusive", Decision.INCONCLUSIVE),
    ("acc-inconclusive-over-not-significant", lambda: acc_pair(100, 5, 1), "qa/acc", ACC, "inconclusive", Decision.INCONCLUSIVE),
    ("acc-anomalous", lambda: acc_pair(1000, 5, 90), "qa/acc", ACC, "anomalous", Decision.ANOMALOUS),
    ("acc-rel-only-pass", lambda: acc_pair(4000, 20, 20), "qa/acc", {"max_rel_drop": 0.03}, "pass", Decision.PASS),
    ("ppl-pass", lambda: ppl_pair(200, 0.005), "wiki/word_perplexity", PPL, "pass", Decision.PASS),
    ("ppl-regression", lambda: ppl_pair(200, 0.08), "wiki/word_perplexity", PPL, "fail", Decision.REGRESSION),
    ("ppl-inconclusive", lambda: ppl_pair(40, 0.02, noise=0.05), "wiki/word_perplexity", PPL, "inconclusive", Decision.INCONCLUSIVE),
    ("ppl-anomalous", lambda: ppl_pair(200, -0.10), "wiki/word_perplexity", PPL, "anomalous", Decision.ANOMALOUS),
    ("bpb-abs-regression", lambda: ppl_pair(200, 0.08), "wiki/bits_per_byte", {"max_abs_drop": 0.005}, "fail", Decision.REGRESSION),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_verdict_classes(case):
    _, make, key, limit, status, decision = case
    base, cand = sides(make())
    v = judge(base, cand, None, GateSpec(metrics={key: limit}))
    c = check(v, key)
    assert c.status == status, c.detail
    assert v.decision is decision, v.reason
    assert key in v.reason or decision is Decision.PASS
    assert c.gated and c.kind == "metric" and c.n and c.mdd and c.mdd > 0
    assert c.ci_low <= c.delta <= c.ci_high
    if status == "inconclusive":
        assert c.items_needed and c.items_needed > 0 and "items needed" in c.detail
    if status == "fail":
        assert c.ci_low > 0


def test_direction_accuracy_down_is_worse_perplexity_up_is_worse():
    v = judge(*sides(acc_pair(1000, 80, 10)), None, spec(qa__acc=ACC))
    c = check(v, "qa/acc")
    assert c.higher_is_better is True and c.baseline > c.candidate
    assert c.delta == pytest.approx(c.baseline - c.candidate) and c.delta > 0
    assert (c.flips_bad, c.flips_good) == (80, 10)
    assert c.p_value < 1e-10
    v = judge(*sides(ppl_pair(200, 0.08)), None, spec(wiki__word_perplexity=PPL))
    c = check(v, "wiki/word_perplexity")
    assert c.higher_is_better is False and c.candidate > c.baseline
    assert c.delta == pytest.approx(c.candidate - c.baseline) and c.delta > 0
    assert c.rel_delta == pytest.approx(0.08, abs=0.01)
    assert c.flips_bad > c.flips_good


def test_abs_and_rel_both_required():
    pair = acc_pair(4000, 60, 20)  # drop 0.01 on 0.6 = 1.7 %
    ok_abs = judge(*sides(pair), None, spec(qa__acc={"max_abs_drop": 0.03}))
    assert ok_abs.decision is Decision.PASS
    both = judge(*sides(pair), None, spec(qa__acc={"max_abs_drop": 0.03, "max_rel_drop": 0.01}))
    assert check(both, "qa/acc").status == "fail"
    assert both.decision is Decision.REGRESSION


def test_non_binary_accuracy_uses_bootstrap():
    rng = np.random.default_rng(0)
    base = rng.random(500)
    cand = np.clip(base + rng.normal(0, 0.01, 500), 0, 1)
    v = judge(*sides((acc_task("qa", base), acc_task("qa", cand))), None, spec(qa__acc={"max_abs_drop": 0.02}))
    c = check(v, "qa/acc")
    assert c.method.startswith("paired-bootstrap") and c.status == "pass"


def test_deterministic():
    s = spec(wiki__word_perplexity=PPL, qa__acc=ACC)
    a = judge(*sides(ppl_pair(100, 0.01), acc_pair(500, 10, 5)), None, s)
    b = judge(*sides(ppl_pair(100, 0.01), acc_pair(500, 10, 5)), None, s)
    assert a.to_dict() == b.to_dict()


# ---- fail closed --------------------------------------------------------------------------


def _metric_error(base, cand, s=None) -> tuple[Verdict, str]:
    v = judge(base, cand, None, s or spec(qa__acc=ACC))
    assert v.decision is Decision.ERROR, v.reason
    assert v.exit_code is ExitCode.ERROR
    return v, v.reason


def test_missing_metric_on_candidate():
    b, c = acc_pair(200, 2, 2)
    c = c.model_copy(update={"metrics": {"acc_norm": 0.5}})
    v, reason = _metric_error(*sides((b, c)))
    assert check(v, "qa/acc").status == "error"
    assert "missing from the candidate" in check(v, "qa/acc").detail


def test_nan_metric():
    b, c = acc_pair(200, 2, 2)
    c = c.model_copy(update={"metrics": {"acc": float("nan")}})
    v, _ = _metric_error(*sides((b, c)))
    assert "nan" in check(v, "qa/acc").detail
    json.dumps(v.to_dict(), allow_nan=False)


def test_missing_task_and_missing_items():
    b, c = acc_pair(200, 2, 2)
    base = results("baseline", b)
    cand = results("candidate", acc_task("other", [1, 0]))
    v, _ = _metric_error(base, cand)
    assert check(v, "comparability/tasks").status == "error"
    assert "missing from the candidate" in check(v, "qa/acc").detail
    empty = b.model_copy(update={"items": []})
    v, _ = _metric_error(*sides((empty, empty)))
    assert "no per-item records" in check(v, "qa/acc").detail


def test_item_without_score_and_nonfinite_loglikelihood():
    b, c = acc_pair(50, 0, 0)
    items = list(c.items)
    items[3] = items[3].model_copy(update={"correct": None})
    v, _ = _metric_error(*sides((b, c.model_copy(update={"items": items}))))
    assert "have no 'correct'" in check(v, "qa/acc").detail
    pb, pc = ppl_pair(30, 0.0)
    items = list(pc.items)
    items[0] = items[0].model_copy(update={"loglikelihood": float("-inf")})
    v, _ = _metric_error(*sides((pb, pc.model_copy(update={"items": items}))), spec(wiki__word_perplexity=PPL))
    assert "non-finite" in check(v, "wiki/word_perplexity").detail


def test_items_must_reproduce_the_reported_metric():
    b, c = acc_pair(200, 2, 2)
    c = c.model_copy(update={"metrics": {"acc": c.metrics["acc"] + 0.05}})
    v, _ = _metric_error(*sides((b, c)))
    assert "do not score this metric" in check(v, "qa/acc").detail


def test_errored_task():
    base, cand = sides(acc_pair(200, 2, 2), errors=["qa: CUDA out of memory at batch 3"])
    v, reason = _metric_error(base, cand)
    assert "task errored" in check(v, "qa/acc").detail
    errs = [c for c in v.checks if c.kind == "completeness"]
    assert errs and errs[0].task == "qa" and errs[0].status == "error"
    # An error line naming no known task still blocks.
    base, cand = sides(acc_pair(2000, 10, 10), errors=["golden prompts: engine crashed"])
    v, _ = _metric_error(base, cand)
    assert check(v, "qa/acc").status == "pass"
    assert check(v, "errors/candidate/run#1").task is None


def test_no_margin_and_nothing_gated():
    v, _ = _metric_error(*sides(acc_pair(200, 2, 2)), spec(qa__acc={}))
    assert "no margin" in check(v, "qa/acc").detail
    v = judge(*sides(acc_pair(200, 2, 2)), None, GateSpec())
    assert v.decision is Decision.ERROR and "nothing gated" in v.reason


def test_direction_conflict():
    b, c = acc_pair(200, 2, 2)
    c = c.model_copy(update={"higher_is_better": {"acc": False}})
    v, _ = _metric_error(*sides((b, c)))
    assert "higher_is_better differs" in check(v, "qa/acc").detail


def test_a_declared_direction_that_contradicts_the_metric_is_an_error():
    """A task file calling perplexity higher-is-better would turn a 3 % worsening into a PASS."""
    b, c = ppl_pair(200, 0.03)
    flip = {"higher_is_better": {"word_perplexity": True, "bits_per_byte": False}}
    v, _ = _metric_error(*sides((b.model_copy(update=flip), c.model_copy(update=flip))), spec(wiki__word_perplexity={"max_rel_drop": 0.01}))
    assert "lower-is-better" in check(v, "wiki/word_perplexity").detail


@pytest.mark.parametrize("n,status", [(1, "inconclusive"), (9, "inconclusive"), (40, "pass")])
def test_a_bootstrap_over_a_handful_of_items_decides_nothing(n, status):
    """One perplexity document resamples to a zero-width interval: it must not PASS (or FAIL)."""
    v = judge(*sides(ppl_pair(n, 0.005, noise=0.0005)), None, spec(wiki__word_perplexity={"max_rel_drop": 0.05}))
    c = check(v, "wiki/word_perplexity")
    assert c.status == status, c.detail
    if status == "inconclusive":
        assert "too few for a bootstrap" in c.detail and v.decision is Decision.INCONCLUSIVE


# ---- comparability ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [("version", "1.1"), ("config_hash", "cfg2"), ("num_fewshot", 5)],
)
def test_task_settings_must_match(field, value):
    b, c = acc_pair(200, 2, 2)
    v, _ = _metric_error(*sides((b, c.model_copy(update={field: value}))))
    comp = check(v, "comparability/qa")
    assert comp.status == "error" and field in comp.detail
    assert "not comparable" in check(v, "qa/acc").detail


def test_items_must_match():
    b, c = acc_pair(200, 2, 2)
    items = list(c.items)
    items[5] = items[5].model_copy(update={"prompt_hash": "different"})
    v, _ = _metric_error(*sides((b, c.model_copy(update={"items": items}))))
    assert "different prompt_hash" in check(v, "comparability/qa").detail
    v, _ = _metric_error(*sides((b, c.model_copy(update={"items": c.items[:-1]}))))
    assert "200 vs 199 items" in check(v, "comparability/qa").detail


def test_comparability_facts_list_differing_keys():
    pair = acc_pair(2000, 10, 10)
    facts = dict(FACTS, tokenizer="zzz", extra="1")
    del facts["lm_eval"]
    base, cand = sides(pair, facts=facts)
    v, _ = _metric_error(base, cand)
    detail = check(v, "comparability/facts").detail
    assert "tokenizer: 'abc123' vs 'zzz'" in detail
    assert "extra only in candidate" in detail and "lm_eval only in baseline" in detail
    assert "backend" not in detail


def test_sides_swapped():
    base, cand = sides(acc_pair(200, 2, 2))
    v, _ = _metric_error(cand.model_copy(update={"side": "candidate"}), cand)
    assert check(v, "comparability/sides").status == "error"
    assert base.side == "baseline"


# ---- golden -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "limits,summary,status",
    [
        ({"min_exact_match": 0.8}, golden(exact=0.9), "pass"),
        ({"min_exact_match": 0.95}, golden(exact=0.9), "fail"),
        ({"max_mean_kl": 0.05}, golden(kl=0.01), "pass"),
        ({"max_mean_kl": 0.005}, golden(kl=0.01), "fail"),
        ({"min_top1_agreement": 0.95}, golden(top1=0.97), "pass"),
        ({"min_top1_agreement": 0.99}, golden(top1=0.97), "fail"),
        ({"max_mean_kl": 0.05}, golden(kl=float("nan")), "error"),
        ({"max_mean_kl": 0.05}, golden(n=0), "error"),
        ({"max_mean_kl": 0.05}, None, "error"),
    ],
)
def test_golden_thresholds(limits, summary, status):
    s = GateSpec(metrics={"qa/acc": ACC}, golden=limits)
    v = judge(*sides(acc_pair(2000, 10, 10)), summary, s)
    gated = [c for c in v.checks if c.kind == "golden" and c.gated]
    assert len(gated) == 1 and gated[0].status == status, gated[0].detail
    expected = {"pass": Decision.PASS, "fail": Decision.REGRESSION, "error": Decision.ERROR}[status]
    assert v.decision is expected


def test_golden_only_gate_and_informational_golden():
    v = judge(*sides(acc_pair(200, 2, 2)), golden(), GateSpec(golden={"min_exact_match": 0.5}))
    assert v.decision is Decision.PASS
    info = [c for c in v.checks if c.kind == "golden" and not c.gated]
    assert {c.name for c in info} == {"golden/mean_kl", "golden/top1_agreement"}
    assert all(c.status == "pass" and c.detail.startswith("not gated") for c in info)


# ---- precedence, informational checks, outputs ------------------------------------------------


def test_precedence():
    # REGRESSION beats ANOMALOUS and INCONCLUSIVE.
    pairs = (acc_pair(1000, 80, 10, task="a"), acc_pair(1000, 5, 90, task="b"), acc_pair(60, 1, 0, task="c"))
    s = spec(a__acc=ACC, b__acc=ACC, c__acc=ACC)
    assert judge(*sides(*pairs), None, s).decision is Decision.REGRESSION
    # ANOMALOUS beats INCONCLUSIVE.
    assert judge(*sides(*pairs[1:]), None, spec(b__acc=ACC, c__acc=ACC)).decision is Decision.ANOMALOUS
    # ERROR beats everything.
    v = judge(*sides(*pairs, errors=["c: crashed"]), None, s)
    assert v.decision is Decision.ERROR and "c: crashed" in v.reason


def test_ungated_metrics_are_informational():
    v = judge(*sides(acc_pair(2000, 10, 10), ppl_pair(100, 0.2)), None, spec(qa__acc=ACC))
    assert v.decision is Decision.PASS
    info = {c.name: c for c in v.checks if not c.gated}
    assert set(info) == {"wiki/word_perplexity", "wiki/bits_per_byte"}  # acc_stderr skipped
    assert all(c.status == "pass" and c.detail.startswith("not gated") for c in info.values())
    assert info["wiki/word_perplexity"].ci_low > 0  # numbers are still there


def test_exit_codes_and_json():
    cases = {
        Decision.PASS: (acc_pair(2000, 10, 10), 0),
        Decision.REGRESSION: (acc_pair(1000, 80, 10), 1),
        Decision.INCONCLUSIVE: (acc_pair(60, 1, 0), 4),
        Decision.ANOMALOUS: (acc_pair(1000, 5, 90), 5),
    }
    for decision, (pair, code) in cases.items():
        v = judge(*sides(pair), None, spec(qa__acc=ACC))
        assert v.decision is decision and int(v.exit_code) == code
        d = json.loads(json.dumps(v.to_dict(), allow_nan=False))
        assert d["decision"] == decision.value and d["exit_code"] == code
        assert Verdict.model_validate({k: x for k, x in d.items() if k != "exit_code"}) == v
    assert "\n" not in v.reason


def test_per_metric_item_scores_are_used_when_present():
    # Results may carry per-item scores for every metric (e.g. acc and acc_norm); the gate then
    # pairs the gated metric's own scores, else falls back to `correct` (the primary metric).
    from types import SimpleNamespace

    from quantgate.gate import _scores

    items = [SimpleNamespace(correct=1.0, scores={"acc": 1.0, "acc_norm": 0.0}),
             SimpleNamespace(correct=0.0, scores={"acc": 0.0, "acc_norm": 1.0})]
    assert _scores(items, "acc_norm", "baseline") == [0.0, 1.0]
    assert _scores(items, "acc", "baseline") == [1.0, 0.0]
    assert _scores(items, "f1", "baseline") == [1.0, 0.0]  # not recorded per item: falls back
    if "scores" in ItemRecord.model_fields:
        b, c = acc_pair(2000, 10, 10)
        for t in (b, c):
            for it in t.items:
                it.scores = {"acc": it.correct, "acc_norm": 1.0 - it.correct}
            t.metrics["acc_norm"] = float(np.mean([1.0 - it.correct for it in t.items]))
        v = judge(*sides((b, c)), None, spec(qa__acc_norm={"max_abs_drop": 0.02}))
        assert check(v, "qa/acc_norm").status == "pass"
