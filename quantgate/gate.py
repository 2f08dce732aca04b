"""The gate: a pure function from (baseline, candidate, golden summary, gate spec) to a Verdict.

No I/O, no torch, no tracking: everything it needs is in its arguments, so it is unit-tested on
hand-built results and re-runnable on stored ones.

Decision rules (details in docs/gate.md):

* One **metric check** per configured `gate.metrics['task/metric']`, on the paired per-item
  records. Worsening is positive when the candidate is worse (baseline - candidate for
  higher-is-better metrics, candidate - baseline otherwise). With [low, high] the one-sided
  bounds at `gate.confidence`:
  - ANOMALOUS    the candidate is better by more than `gate.anomaly_margin` (relative) and
                 significantly so (high < 0): implausible for quantization, usually a broken run;
  - PASS         high < margin (every configured margin: abs and/or rel): non-inferior;
  - REGRESSION   the point estimate exceeds a margin and the drop is significant (low > 0);
  - INCONCLUSIVE otherwise: the sample cannot resolve the margin (items needed are reported).
* **Golden checks** are plain thresholds on the GoldenSummary (pass / fail).
* **Fail closed on non-finite input**: NaN/inf anywhere in either side's metrics (gated or
  not), per-item records (log-likelihoods, scores), golden log-probs, the golden summary or the
  gate spec -> ERROR, with one check per (side, task) naming the first value (issue 10).
* **Fail closed**: a configured metric missing or NaN on either side, per-item records that are
  missing or do not reproduce the reported metric, a task listed in `errors`, results that are
  not comparable (tasks, versions, config hashes, few-shot, items, `comparability` facts), or
  nothing gated at all -> ERROR.
* Metrics without a configured limit are reported as informational checks (`gated=False`,
  status 'pass', detail starting with 'not gated'); they never change the decision, except that
  a non-finite value is an error whether gated or not.
* `extra_checks` (e.g. `quantgate gate`'s re-computation of stored figures) join the decision.
"""

from __future__ import annotations

import math
import re
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from quantgate import stats
from quantgate.errors import ExitCode
from quantgate.evaluation.results import (
    EvalResults,
    GoldenSummary,
    ItemRecord,
    TaskResult,
    nonfinite_in_golden,
    nonfinite_in_results,
    summarize_locations,
)
from quantgate.recipe import GateSpec, MetricLimit

Status = Literal["pass", "fail", "inconclusive", "anomalous", "error"]
CheckKind = Literal["metric", "golden", "comparability", "completeness"]


class Decision(str, Enum):
    PASS = "PASS"
    REGRESSION = "REGRESSION"
    INCONCLUSIVE = "INCONCLUSIVE"
    ANOMALOUS = "ANOMALOUS"
    ERROR = "ERROR"


# ERROR > REGRESSION > ANOMALOUS > INCONCLUSIVE > PASS. ERROR first: when the comparison itself
# is invalid no other finding can be trusted. REGRESSION next: one check with evidence of a real
# failure blocks release whatever else is true. ANOMALOUS before INCONCLUSIVE: a suspicious
# comparison needs a human, whereas "inconclusive" only needs more items.
_PRECEDENCE: tuple[tuple[Status, Decision], ...] = (
    ("error", Decision.ERROR),
    ("fail", Decision.REGRESSION),
    ("anomalous", Decision.ANOMALOUS),
    ("inconclusive", Decision.INCONCLUSIVE),
)

_EXIT = {
    Decision.PASS: ExitCode.PASS,
    Decision.REGRESSION: ExitCode.REGRESSION,
    Decision.INCONCLUSIVE: ExitCode.INCONCLUSIVE,
    Decision.ANOMALOUS: ExitCode.ANOMALOUS,
    Decision.ERROR: ExitCode.ERROR,
}

# Below this many items a paired bootstrap (perplexity documents, non-binary scores) decides nothing.
MIN_BOOTSTRAP_ITEMS = 10

# Directions of common metrics: used when a TaskResult does not state one, and to refuse one
# that states the opposite.
_KNOWN_DIRECTION = {
    "acc": True, "acc_norm": True, "exact_match": True, "f1": True, "mc1": True, "mc2": True,
    "word_perplexity": False, "byte_perplexity": False, "bits_per_byte": False,
    "token_perplexity": False, "perplexity": False,
}


class Limit(BaseModel):
    """What a check compares against: a maximum worsening (abs, metric units; rel, share of the
    baseline) for metric checks, or a plain minimum / maximum value for golden checks."""

    model_config = ConfigDict(extra="forbid")

    abs: float | None = None
    rel: float | None = None
    min: float | None = None
    max: float | None = None


class Check(BaseModel):
    """One line of the verdict. Numbers are None where they do not apply or are not finite."""

    model_config = ConfigDict(extra="forbid")

    name: str
    kind: CheckKind
    task: str | None = None
    metric: str | None = None
    higher_is_better: bool | None = None
    baseline: float | None = None
    candidate: float | None = None
    delta: float | None = Field(None, description="Worsening (positive = worse), metric units")
    rel_delta: float | None = Field(None, description="Worsening relative to |baseline|")
    limit: Limit | None = None
    ci_low: float | None = Field(None, description="One-sided lower bound of the worsening")
    ci_high: float | None = Field(None, description="One-sided upper bound of the worsening")
    rel_ci_low: float | None = None
    rel_ci_high: float | None = None
    p_value: float | None = Field(None, description="Two-sided test of no difference")
    flips_bad: int | None = Field(None, description="Items right->wrong (or worse loglikelihood)")
    flips_good: int | None = Field(None, description="Items wrong->right (or better loglikelihood)")
    n: int | None = None
    mdd: float | None = Field(None, description="Minimum detectable worsening at n and the power")
    items_needed: int | None = Field(None, description="Items to resolve the margin (inconclusive)")
    method: str | None = None
    gated: bool = True
    status: Status
    detail: str = ""

    @model_validator(mode="before")
    @classmethod
    def _finite_or_none(cls, data: Any) -> Any:
        # NaN/inf cannot go to JSON or JUnit; the detail line says what happened instead.
        if isinstance(data, dict):
            return {
                k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in data.items()
            }
        return data


class Verdict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    decision: Decision
    reason: str
    checks: list[Check]
    confidence: float
    power: float

    @property
    def exit_code(self) -> ExitCode:
        return _EXIT[self.decision]

    @property
    def gated_checks(self) -> list[Check]:
        return [c for c in self.checks if c.gated]

    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        data["exit_code"] = int(self.exit_code)
        return data


# ---- formatting helpers (one-line details) ----------------------------------------------------


def _f(x: float | None) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.4g}"


def _pct(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "n/a" if x is None else str(x)
    return f"{100 * x:.3g}%"


def _limit_text(lim: MetricLimit) -> str:
    parts = []
    if lim.max_abs_drop is not None:
        parts.append(f"abs {_f(lim.max_abs_drop)}")
    if lim.max_rel_drop is not None:
        parts.append(f"rel {_pct(lim.max_rel_drop)}")
    return " and ".join(parts)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# ---- completeness and comparability --------------------------------------------------------


def _error_task(line: str, tasks: set[str]) -> str | None:
    """Which task an `errors` line is about: the longest task name it mentions as a word."""
    hits = [t for t in tasks if re.search(rf"(?<![\w.-]){re.escape(t)}(?![\w-])", line)]
    return max(hits, key=len) if hits else None


def _completeness_checks(base: EvalResults, cand: EvalResults) -> tuple[list[Check], dict[str, str]]:
    """One 'error' check per line in either side's `errors`; returns task -> first error line."""
    tasks = set(base.tasks) | set(cand.tasks)
    checks: list[Check] = []
    errored: dict[str, str] = {}
    for side in (base, cand):
        for i, line in enumerate(side.errors):
            task = _error_task(line, tasks)
            if task is not None:
                errored.setdefault(task, f"{side.side}: {_one_line(line)}")
            checks.append(Check(
                name=f"errors/{side.side}/{task or 'run'}#{i + 1}", kind="completeness", task=task,
                status="error", detail=f"{side.side} reported an error: {_one_line(line)}",
            ))
    return checks, errored


def _item_key_problem(tb: TaskResult, tc: TaskResult) -> str | None:
    for side, tr in (("baseline", tb), ("candidate", tc)):
        ids = [it.doc_id for it in tr.items]
        if len(ids) != len(set(ids)):
            return f"duplicate doc_id in the {side}'s items"
    kb = {it.doc_id: it.prompt_hash for it in tb.items}
    kc = {it.doc_id: it.prompt_hash for it in tc.items}
    if kb == kc:
        return None
    only_b, only_c = set(kb) - set(kc), set(kc) - set(kb)
    differ = [d for d in set(kb) & set(kc) if kb[d] != kc[d]]
    parts = [f"{len(tb.items)} vs {len(tc.items)} items"]
    if only_b:
        parts.append(f"{len(only_b)} only in baseline (doc_id {sorted(only_b)[:3]})")
    if only_c:
        parts.append(f"{len(only_c)} only in candidate (doc_id {sorted(only_c)[:3]})")
    if differ:
        parts.append(f"{len(differ)} with different prompt_hash (doc_id {sorted(differ)[:3]})")
    return "items differ: " + ", ".join(parts)


def _comparability_checks(base: EvalResults, cand: EvalResults) -> tuple[list[Check], set[str]]:
    """Checks that the two sides measured the same thing; returns the tasks that are not comparable."""
    checks: list[Check] = []
    bad: set[str] = set()

    sides_ok = base.side == "baseline" and cand.side == "candidate"
    checks.append(Check(
        name="comparability/sides", kind="comparability",
        status="pass" if sides_ok else "error",
        detail="baseline and candidate results in their places" if sides_ok
        else f"got side={base.side!r} as baseline and side={cand.side!r} as candidate",
    ))

    only_b, only_c = sorted(set(base.tasks) - set(cand.tasks)), sorted(set(cand.tasks) - set(base.tasks))
    bad.update(only_b, only_c)
    tasks_detail = []
    if only_b:
        tasks_detail.append(f"only in baseline: {', '.join(only_b)}")
    if only_c:
        tasks_detail.append(f"only in candidate: {', '.join(only_c)}")
    checks.append(Check(
        name="comparability/tasks", kind="comparability",
        status="error" if tasks_detail else "pass",
        detail="; ".join(tasks_detail) or f"same {len(base.tasks)} tasks on both sides",
    ))

    fb, fc = base.comparability, cand.comparability
    facts = []
    for key in sorted(set(fb) | set(fc)):
        if key not in fb:
            facts.append(f"{key} only in candidate")
        elif key not in fc:
            facts.append(f"{key} only in baseline")
        elif fb[key] != fc[key]:
            facts.append(f"{key}: {fb[key]!r} vs {fc[key]!r}")
    checks.append(Check(
        name="comparability/facts", kind="comparability",
        status="error" if facts else "pass",
        detail=("facts differ: " + "; ".join(facts)) if facts else f"{len(fb)} facts identical",
    ))

    for task in sorted(set(base.tasks) & set(cand.tasks)):
        tb, tc = base.tasks[task], cand.tasks[task]
        problems = [
            f"{what}: {getattr(tb, what)!r} vs {getattr(tc, what)!r}"
            for what in ("kind", "version", "config_hash", "num_fewshot")
            if getattr(tb, what) != getattr(tc, what)
        ]
        items = _item_key_problem(tb, tc)
        if items:
            problems.append(items)
        if problems:
            bad.add(task)
        checks.append(Check(
            name=f"comparability/{task}", kind="comparability", task=task, n=len(tb.items),
            status="error" if problems else "pass",
            detail="; ".join(problems) or f"same version, config, few-shot and {len(tb.items)} items",
        ))
    return checks, bad


# ---- per-item estimates ---------------------------------------------------------------------


def _direction(tb: TaskResult, tc: TaskResult, metric: str) -> bool:
    hb, hc = tb.higher_is_better.get(metric), tc.higher_is_better.get(metric)
    if hb is not None and hc is not None and hb != hc:
        raise ValueError(f"higher_is_better differs between sides ({hb} vs {hc})")
    known = _KNOWN_DIRECTION.get(metric)
    declared = hb if hb is not None else hc
    if known is not None and declared is not None and declared != known:
        # A task file saying perplexity is higher-is-better would turn every worsening into an improvement.
        raise ValueError(f"the task declares higher_is_better={declared} for {metric}, which is "
                         f"{'higher' if known else 'lower'}-is-better; fix the task's metric_list")
    for h in (hb, hc, known):
        if h is not None:
            return h
    raise ValueError("direction unknown: the results give no higher_is_better for it")


def _paired_items(tb: TaskResult, tc: TaskResult) -> tuple[list[ItemRecord], list[ItemRecord]]:
    by_c = {it.doc_id: it for it in tc.items}
    ib = sorted(tb.items, key=lambda it: it.doc_id)
    return ib, [by_c[it.doc_id] for it in ib]


def _field(items: list[ItemRecord], name: str, side: str) -> list[float]:
    vals = [getattr(it, name) for it in items]
    missing = sum(v is None for v in vals)
    if missing:
        raise ValueError(f"{missing} of {len(vals)} {side} items have no '{name}'")
    return vals


def _scores(items: list[ItemRecord], metric: str, side: str) -> list[float]:
    """Per-item values of an accuracy metric: `scores[metric]` where every item records it (a
    per-metric dict, if the results carry one), else `correct` (the task's primary metric)."""
    per_metric = [getattr(it, "scores", None) for it in items]
    if all(isinstance(d, dict) and d.get(metric) is not None for d in per_metric):
        return [float(d[metric]) for d in per_metric]  # type: ignore[index]
    return _field(items, "correct", side)


def _estimate(tb: TaskResult, tc: TaskResult, metric: str, hib: bool, spec: GateSpec) -> stats.PairedEstimate:
    """Paired estimate of one metric from the per-item records; ValueError when it cannot be made."""
    if not tb.items or not tc.items:
        raise ValueError("no per-item records to pair")
    ib, ic = _paired_items(tb, tc)
    kw = {"confidence": spec.confidence, "power": spec.power}
    if tb.kind == "accuracy":
        vb, vc = _scores(ib, metric, "baseline"), _scores(ic, metric, "candidate")
        if stats.is_binary(vb) and stats.is_binary(vc):
            est = stats.paired_binary(vb, vc, higher_is_better=hib, **kw)
        else:
            est = stats.paired_bootstrap_mean(
                vb, vc, higher_is_better=hib, samples=spec.bootstrap_samples, seed=spec.seed, **kw
            )
        # The items must reproduce the reported metric, or they score something else (e.g. acc
        # items gated as acc_norm) or were mis-accounted: then nothing paired can be said.
        tol = min(1e-4, 0.25 / len(ib))
        for side, got, rep in (("baseline", est.baseline, tb.metrics[metric]), ("candidate", est.candidate, tc.metrics[metric])):
            if abs(got - rep) > tol:
                raise ValueError(
                    f"{side} per-item scores average {got:.6g}, not the reported {metric} {rep:.6g}: "
                    "the items do not score this metric"
                )
        return est
    if metric not in stats.CORPUS_METRICS:
        raise ValueError(f"cannot rebuild {metric!r} from per-document loglikelihoods "
                         f"(known: {', '.join(stats.CORPUS_METRICS)})")
    need = {"word_perplexity": "words", "byte_perplexity": "bytes", "bits_per_byte": "bytes"}.get(metric, "tokens")
    lb, lc = _field(ib, "loglikelihood", "baseline"), _field(ic, "loglikelihood", "candidate")
    db, dc = _field(ib, need, "baseline"), _field(ic, need, "candidate")
    est = stats.paired_corpus(
        lb, lc, metric, higher_is_better=hib, samples=spec.bootstrap_samples, seed=spec.seed,
        **{f"base_{need}": db, f"cand_{need}": dc}, **kw,
    )
    for side, got, rep in (("baseline", est.baseline, tb.metrics[metric]), ("candidate", est.candidate, tc.metrics[metric])):
        if not math.isclose(got, rep, rel_tol=1e-3, abs_tol=1e-9):
            raise ValueError(f"{side} per-document records give {metric} {got:.6g}, not the reported {rep:.6g}")
    return est


def _numbers(est: stats.PairedEstimate) -> dict[str, Any]:
    return {
        "baseline": est.baseline, "candidate": est.candidate, "delta": est.worsening,
        "rel_delta": est.rel_worsening, "ci_low": est.low, "ci_high": est.high,
        "rel_ci_low": est.rel_low, "rel_ci_high": est.rel_high, "p_value": est.p_value,
        "flips_bad": est.flips_bad, "flips_good": est.flips_good, "n": est.n, "mdd": est.mdd,
        "method": est.method,
    }


def _decide_metric(est: stats.PairedEstimate, lim: MetricLimit, spec: GateSpec) -> tuple[Status, str, int | None]:
    conf = f"{100 * spec.confidence:g}%"
    if est.method.startswith("paired-bootstrap") and est.n < MIN_BOOTSTRAP_ITEMS:
        # Resampling a handful of items gives an interval of (near) zero width: no evidence either way.
        return "inconclusive", (
            f"{est.n} item(s): too few for a bootstrap interval (at least {MIN_BOOTSTRAP_ITEMS}); "
            f"worsening {_f(est.worsening)} ({_pct(est.rel_worsening)}) not judged; raise evaluation.limit"
        ), MIN_BOOTSTRAP_ITEMS
    passes: list[bool] = []
    over: list[bool] = []
    ucb_txt: list[str] = []
    if lim.max_abs_drop is not None:
        passes.append(est.high < lim.max_abs_drop)
        over.append(est.worsening > lim.max_abs_drop)
        ucb_txt.append(f"upper bound {_f(est.high)} vs abs {_f(lim.max_abs_drop)}")
    if lim.max_rel_drop is not None:
        passes.append(est.rel_high < lim.max_rel_drop)
        over.append(est.rel_worsening > lim.max_rel_drop)
        ucb_txt.append(f"upper bound {_pct(est.rel_high)} vs rel {_pct(lim.max_rel_drop)}")
    bounds = "; ".join(ucb_txt)
    point = f"worsening {_f(est.worsening)} ({_pct(est.rel_worsening)}) [{_f(est.low)}, {_f(est.high)}] at {conf}"

    # Implausibly better: beyond the anomaly margin AND significantly better (so noise on a small
    # sample does not raise false alarms).
    if -est.rel_worsening > spec.anomaly_margin and est.high < 0:
        return "anomalous", (
            f"candidate better by {_pct(-est.rel_worsening)} (> anomaly margin {_pct(spec.anomaly_margin)}), "
            f"significantly ({point}): quantization should not improve a model this much; check the comparison"
        ), None
    if all(passes):
        return "pass", f"non-inferior: {point}; {bounds}", None
    if any(over) and est.low > 0:
        return "fail", f"regression: {point}; over the limit ({_limit_text(lim)}) and significant (one-sided lower bound > 0; two-sided p={_f(est.p_value)})", None

    # Inconclusive: how many items would resolve it at the recipe's power, if the observed drop is true.
    margins = []
    if lim.max_abs_drop is not None:
        margins.append(lim.max_abs_drop)
    if lim.max_rel_drop is not None:
        margins.append(lim.max_rel_drop * abs(est.baseline))
    needed = stats.items_to_resolve(est, min(margins), spec.power)
    need_txt = (f"~{needed} items needed for {100 * spec.power:g}% power at the observed drop (have {est.n})"
                if needed else "the observed drop sits on the margin: no sample size resolves it")
    why = "over the limit but not significant" if any(over) else "upper bound not below the limit"
    return "inconclusive", f"{why}: {point}; {bounds}; {need_txt}", needed


def _metric_check(
    key: str, lim: MetricLimit, base: EvalResults, cand: EvalResults,
    spec: GateSpec, errored: dict[str, str], bad: set[str], gated: bool = True,
) -> Check:
    task, _, metric = key.partition("/")
    head: dict[str, Any] = {"name": key, "kind": "metric", "task": task, "metric": metric, "gated": gated}
    if gated:
        head["limit"] = Limit(abs=lim.max_abs_drop, rel=lim.max_rel_drop)

    def err(msg: str, nonfinite: bool = False, **more: Any) -> Check:
        # Informational checks never fail (they only say why no numbers are shown), except on a
        # NaN/inf value: that is a broken model or run, never "PASS (not gated)".
        if gated or nonfinite:
            return Check(**head, **more, status="error", detail=msg)
        return Check(**head, **more, status="pass", detail=f"not gated; {msg}")

    if gated and lim.max_abs_drop is None and lim.max_rel_drop is None:
        return err("no margin configured: set max_abs_drop and/or max_rel_drop")
    for side in (base, cand):
        if task not in side.tasks:
            return err(f"task {task!r} missing from the {side.side} results")
    if task in errored:
        return err(f"task errored ({errored[task]})")
    if task in bad:
        return err("results not comparable (see comparability checks)")
    tb, tc = base.tasks[task], cand.tasks[task]
    for side, tr in (("baseline", tb), ("candidate", tc)):
        if metric not in tr.metrics:
            return err(f"metric {metric!r} missing from the {side} results (has: {', '.join(sorted(tr.metrics)) or 'none'})")
    vb, vc = tb.metrics[metric], tc.metrics[metric]
    shown = {"baseline": vb, "candidate": vc}
    for side, v in (("baseline", vb), ("candidate", vc)):
        if not math.isfinite(v):
            return err(f"{side} {task}/{metric} is {v}: non-finite", nonfinite=True, **shown)
    try:
        hib = _direction(tb, tc, metric)
        head["higher_is_better"] = hib
        est = _estimate(tb, tc, metric, hib, spec)
    except (ValueError, ArithmeticError, RuntimeError) as exc:  # fail closed, never crash the run
        return err(_one_line(str(exc)) or type(exc).__name__, **shown)
    core = {"worsening": est.worsening, "low": est.low, "high": est.high, "baseline": est.baseline, "candidate": est.candidate}
    broken = [k for k, v in core.items() if not math.isfinite(v)]
    if broken:
        return err(f"the paired estimate is not finite ({', '.join(f'{k}={core[k]}' for k in broken)})", nonfinite=True, **shown)
    if not gated:
        return Check(
            **head, **_numbers(est), status="pass",
            detail=f"not gated: worsening {_f(est.worsening)} [{_f(est.low)}, {_f(est.high)}] at {100 * spec.confidence:g}%",
        )
    status, detail, needed = _decide_metric(est, lim, spec)
    return Check(**head, **_numbers(est), items_needed=needed, status=status, detail=detail)


# ---- golden thresholds ---------------------------------------------------------------------

# (check name, GoldenSummary field, GoldenLimits field, higher is better, ideal value)
_GOLDEN = (
    ("exact_match", "exact_match_rate", "min_exact_match", True, 1.0),
    ("mean_kl", "mean_kl", "max_mean_kl", False, 0.0),
    ("top1_agreement", "top1_agreement", "min_top1_agreement", True, 1.0),
)


def _golden_checks(golden: GoldenSummary | None, spec: GateSpec) -> list[Check]:
    checks: list[Check] = []
    for name, field, limit_field, hib, ideal in _GOLDEN:
        threshold = getattr(spec.golden, limit_field)
        gated = threshold is not None
        if not gated and golden is None:
            continue
        head: dict[str, Any] = {
            "name": f"golden/{name}", "kind": "golden", "metric": name, "higher_is_better": hib,
            "baseline": ideal, "gated": gated, "method": "threshold",
        }
        if gated:
            head["limit"] = Limit(min=threshold) if hib else Limit(max=threshold)
        if golden is None:
            checks.append(Check(**head, status="error", detail=f"gate.golden.{limit_field} is set but there is no golden summary"))
            continue
        n = len(golden.records)
        value = float(getattr(golden, field))
        head.update(n=n, candidate=value, delta=(ideal - value) if hib else (value - ideal))
        if gated and n == 0:
            checks.append(Check(**head, status="error", detail="golden summary has no records"))
        elif not math.isfinite(value):
            checks.append(Check(**head, status="error", detail=f"golden {field} is {value}: non-finite"))
        elif not gated:
            checks.append(Check(**head, status="pass", detail=f"not gated: {field} {_f(value)} over {n} prompts"))
        else:
            ok = value >= threshold if hib else value <= threshold
            op = (">=" if ok else "<") if hib else ("<=" if ok else ">")
            checks.append(Check(
                **head, status="pass" if ok else "fail",
                detail=f"{field} {_f(value)} {op} {'min' if hib else 'max'} {_f(threshold)} over {n} prompts",
            ))
    return checks


# ---- non-finite inputs -------------------------------------------------------------------------


def _spec_numbers(spec: GateSpec) -> dict[str, float | None]:
    nums: dict[str, float | None] = {
        "gate.confidence": spec.confidence, "gate.power": spec.power, "gate.anomaly_margin": spec.anomaly_margin,
    }
    for key, lim in spec.metrics.items():
        nums[f"gate.metrics.{key}.max_abs_drop"] = lim.max_abs_drop
        nums[f"gate.metrics.{key}.max_rel_drop"] = lim.max_rel_drop
    for name in ("min_exact_match", "max_mean_kl", "min_top1_agreement"):
        nums[f"gate.golden.{name}"] = getattr(spec.golden, name)
    return nums


def finite_checks(baseline: EvalResults, candidate: EvalResults, golden: GoldenSummary | None, spec: GateSpec) -> list[Check]:
    """One 'error' check per (side, task) whose metrics or per-item records hold NaN/inf, one for
    a non-finite golden summary and one for a non-finite limit; a single 'pass' check otherwise.
    A NaN model must end in ERROR whatever the gate configures (issue 10)."""
    checks: list[Check] = []
    for res in (baseline, candidate):
        for task, where in nonfinite_in_results(res).items():
            checks.append(Check(
                name=f"finite/{res.side}/{task}", kind="completeness", task=None if task == "golden" else task,
                status="error", detail=f"{res.side} {task}: non-finite values: {summarize_locations(where)}",
            ))
    if golden is not None and (where := nonfinite_in_golden(golden)):
        checks.append(Check(name="finite/golden", kind="completeness", status="error",
                            detail=f"golden summary: non-finite values: {summarize_locations(where)}"))
    bad_spec = [f"{k} = {v}" for k, v in _spec_numbers(spec).items() if isinstance(v, float) and not math.isfinite(v)]
    if bad_spec:
        checks.append(Check(name="finite/gate", kind="completeness", status="error",
                            detail=f"non-finite gate settings: {summarize_locations(bad_spec)}"))
    if not checks:
        checks.append(Check(name="finite", kind="completeness", status="pass",
                            detail="every metric, per-item record, golden score and limit is finite"))
    return checks


# ---- stored figures vs their records (`quantgate gate`, issue 10) ------------------------------

_GOLDEN_AGGREGATES = ("exact_match_rate", "mean_prefix_agreement", "mean_token_agreement", "mean_kl", "top1_agreement")
_GOLDEN_RECORD_FLOATS = ("prefix_agreement", "token_agreement", "mean_kl", "top1_agreement")
_GOLDEN_RECORD_EXACT = ("exact_match", "first_divergence", "n_tokens", "baseline_text", "candidate_text")


def _close(a: float, b: float, rel: float = 1e-6, abs_tol: float = 1e-9) -> bool:
    # Float tolerance only: the stored figures are repr-exact JSON of the same sums.
    return math.isfinite(a) and math.isfinite(b) and math.isclose(a, b, rel_tol=rel, abs_tol=abs_tol)


def recheck_golden(
    stored: GoldenSummary | None, baseline: EvalResults, candidate: EvalResults,
) -> tuple[GoldenSummary | None, list[Check]]:
    """Recompute every golden figure instead of trusting a stored summary: per-prompt records
    from both sides' stored outputs (teacher-forced top-k log-probs), aggregates from records.
    Returns the recomputed summary (what the gate should judge) and one check: 'error' when the
    stored summary or records disagree with the recomputation beyond float tolerance."""
    from quantgate.evaluation.golden import compare_golden, summary_from_records

    checks: list[Check] = []
    fresh: GoldenSummary | None = None
    if baseline.golden and candidate.golden:
        try:
            fresh = compare_golden(baseline.golden, candidate.golden)
        except (ValueError, ArithmeticError) as exc:
            checks.append(Check(name="golden/recompute", kind="completeness", status="error",
                                detail=f"cannot recompute golden figures from the stored outputs: {_one_line(str(exc))}"))
    if stored is None:
        return fresh, checks
    problems: list[str] = []
    from_records = summary_from_records(stored.records)
    for f in _GOLDEN_AGGREGATES:
        got, want = getattr(stored, f), getattr(from_records, f)
        if not _close(got, want):
            problems.append(f"summary {f} is {_f(got)} but its {len(stored.records)} records give {_f(want)}")
    if fresh is not None:
        by_id = {r.id: r for r in fresh.records}
        ids, fresh_ids = [r.id for r in stored.records], set(by_id)
        if set(ids) != fresh_ids or len(ids) != len(fresh_ids):
            problems.append(f"stored records cover prompts {sorted(set(ids))[:5]}, the outputs {sorted(fresh_ids)[:5]}")
        for r in stored.records:
            ref = by_id.get(r.id)
            if ref is None:
                continue
            for f in _GOLDEN_RECORD_FLOATS:
                if not _close(getattr(r, f), getattr(ref, f)):
                    problems.append(f"prompt {r.id!r} {f} is stored as {_f(getattr(r, f))} but its outputs give {_f(getattr(ref, f))}")
            for f in _GOLDEN_RECORD_EXACT:
                if getattr(r, f) != getattr(ref, f):
                    problems.append(f"prompt {r.id!r} {f} is stored as {getattr(r, f)!r} but its outputs give {getattr(ref, f)!r}")
            if r.n_positions is not None and r.n_positions != ref.n_positions:
                problems.append(f"prompt {r.id!r} n_positions is stored as {r.n_positions} but its outputs give {ref.n_positions}")
    source = "the stored outputs of both sides" if fresh is not None else "its per-prompt records"
    if problems:
        checks.append(Check(
            name="golden/recomputed", kind="completeness", status="error", n=len(stored.records),
            detail=f"stored golden figures disagree with {source}: {summarize_locations(problems)}",
        ))
    else:
        checks.append(Check(name="golden/recomputed", kind="completeness", status="pass", n=len(stored.records),
                            detail=f"every golden figure recomputed from {source} matches"))
    return (fresh if fresh is not None else from_records), checks


def _recompute_metric(tr: TaskResult, metric: str) -> tuple[float, float] | None:
    """(value rebuilt from the per-item records, relative tolerance), or None where the records
    cannot rebuild that metric."""
    if not tr.items:
        return None
    if tr.kind == "accuracy":
        per = [it.scores.get(metric) if it.scores else None for it in tr.items]
        if any(v is None for v in per):
            return None
        return sum(per) / len(per), 1e-6  # type: ignore[arg-type]
    if metric not in stats.CORPUS_METRICS:
        return None
    ll = [it.loglikelihood for it in tr.items]
    if any(v is None for v in ll):
        return None

    def col(name: str) -> list[int] | None:
        vals = [getattr(it, name) for it in tr.items]
        return None if any(v is None for v in vals) else vals

    try:
        return stats.corpus_metric(ll, col("words"), col("bytes"), col("tokens"), metric), 1e-3
    except ValueError:
        return None


def recheck_results(results: EvalResults) -> list[Check]:
    """Every stored metric that its per-item records can rebuild (means of per-item scores,
    corpus perplexities from per-document log-likelihoods) must match them: 'error' check per
    mismatch, one 'pass' check otherwise."""
    checks: list[Check] = []
    n_ok = 0
    for task, tr in sorted(results.tasks.items()):
        for metric, stored in sorted(tr.metrics.items()):
            if "stderr" in metric:
                continue
            got = _recompute_metric(tr, metric)
            if got is None:
                continue
            value, rel = got
            if _close(stored, value, rel=rel):
                n_ok += 1
                continue
            checks.append(Check(
                name=f"recomputed/{results.side}/{task}/{metric}", kind="completeness", task=task, metric=metric,
                n=len(tr.items), status="error",
                detail=f"{results.side} {task}/{metric} is stored as {_f(stored)} but its {len(tr.items)} per-item records give {_f(value)}",
            ))
    if not checks:
        checks.append(Check(name=f"recomputed/{results.side}", kind="completeness", status="pass",
                            detail=f"{n_ok} stored metrics match their per-item records"))
    return checks


# ---- the verdict ---------------------------------------------------------------------------


def _reason(decision: Decision, checks: list[Check], status: Status | None) -> str:
    if status is None:
        gated = [c for c in checks if c.gated and c.kind in ("metric", "golden")]
        return f"PASS: all {len(gated)} gated checks pass ({', '.join(c.name for c in gated)})"
    hits = [c for c in checks if c.status == status]
    names = ", ".join(c.name for c in hits)
    if len(hits) == 1:
        return _one_line(f"{decision.value}: {names}: {hits[0].detail}")
    return _one_line(f"{decision.value}: {len(hits)} checks ({names}); first: {hits[0].detail}")


def judge(
    baseline: EvalResults, candidate: EvalResults, golden: GoldenSummary | None, spec: GateSpec,
    *, extra_checks: list[Check] | None = None,
) -> Verdict:
    """Compare the candidate with the baseline under the recipe's gate; never raises on bad data
    (a problem becomes an 'error' check and the decision ERROR). `extra_checks` are findings made
    outside (e.g. stored figures that do not match their records) and count like any other."""
    checks: list[Check] = []
    errors, errored = _completeness_checks(baseline, candidate)
    comparable, bad = _comparability_checks(baseline, candidate)
    checks += comparable + errors + finite_checks(baseline, candidate, golden, spec) + list(extra_checks or [])

    gated_keys = sorted(spec.metrics)
    for key in gated_keys:
        checks.append(_metric_check(key, spec.metrics[key], baseline, candidate, spec, errored, bad))
    checks += _golden_checks(golden, spec)

    # Informational: every other metric of the tasks both sides have (stderr columns skipped).
    for task in sorted(set(baseline.tasks) & set(candidate.tasks)):
        names = set(baseline.tasks[task].metrics) | set(candidate.tasks[task].metrics)
        for metric in sorted(names):
            key = f"{task}/{metric}"
            if key in spec.metrics or "stderr" in metric:
                continue
            checks.append(_metric_check(key, MetricLimit(), baseline, candidate, spec, errored, bad, gated=False))

    # Fail closed: a gate that checks nothing must not promote anything.
    if not any(c.gated and c.kind in ("metric", "golden") for c in checks):
        checks.append(Check(
            name="completeness/gate", kind="completeness", status="error",
            detail="nothing gated: configure gate.metrics ('task/metric' limits) or gate.golden",
        ))

    decision, deciding = Decision.PASS, None
    for status, dec in _PRECEDENCE:
        if any(c.status == status for c in checks):
            decision, deciding = dec, status
            break
    return Verdict(
        decision=decision, reason=_reason(decision, checks, deciding), checks=checks,
        confidence=spec.confidence, power=spec.power,
    )
