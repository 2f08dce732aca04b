"""What a search found, as plain data: written to search.json, shown in the console and the HTML
page, summarised on the MLflow parent run."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from quantgate.gate import Check, Verdict
    from quantgate.search.spec import Candidate, SearchSpec


def _check_summary(c: Check) -> dict[str, Any]:
    from quantgate.reports.plots import effective_margin

    return {"name": c.name, "kind": c.kind, "status": c.status, "delta": c.delta, "ci_low": c.ci_low, "ci_high": c.ci_high,
            "margin": effective_margin(c), "n": c.n, "detail": c.detail}


def gated_checks(verdict: Verdict) -> list[dict[str, Any]]:
    return [_check_summary(c) for c in verdict.checks if c.gated and c.kind in ("metric", "golden")]


@dataclass
class CandidateRow:
    name: str
    format: str
    rung: int
    bits_estimate: float
    overrides: list[str]
    run_dir: str
    checkpoint_bytes: int | None
    decision: str  # on the search split
    exit_code: int
    reason: str
    run_decision: str  # the run's own verdict over ALL items (reference only: not used to select)
    mlflow_run_id: str | None = None
    reused: bool = False
    checks: list[dict[str, Any]] = field(default_factory=list)
    split_items: dict[str, int] = field(default_factory=dict)
    pareto: bool = False
    seconds: float = 0.0

    @classmethod
    def from_outcome(cls, cand: Candidate, outcome: Any) -> CandidateRow:
        return cls(
            name=cand.name, format=outcome.format, rung=cand.index, bits_estimate=round(cand.bits_estimate, 3),
            overrides=cand.overrides, run_dir=str(outcome.run_dir), checkpoint_bytes=outcome.checkpoint_bytes,
            decision=outcome.decision, exit_code=outcome.exit_code, reason=outcome.reason, run_decision=outcome.decision,
            mlflow_run_id=outcome.mlflow_run_id, reused=outcome.reused, seconds=round(sum(outcome.timings.values()), 1),
        )

    def set_verdict(self, verdict: Verdict) -> None:
        self.decision, self.exit_code, self.reason = verdict.decision.value, int(verdict.exit_code), verdict.reason
        self.checks = gated_checks(verdict)
        self.split_items = {c.name: c.n for c in verdict.checks if c.gated and c.n is not None}


@dataclass
class Confirmation:
    candidate: str
    decision: str
    exit_code: int
    reason: str
    checks: list[dict[str, Any]]
    verdict: dict[str, Any]

    @classmethod
    def from_verdict(cls, name: str, verdict: Verdict) -> Confirmation:
        return cls(name, verdict.decision.value, int(verdict.exit_code), verdict.reason, gated_checks(verdict), verdict.to_dict())


def pareto_front(rows: list[CandidateRow]) -> set[str]:
    """Candidates no other candidate beats on size AND on every gated check's worsening (search
    split). Rows without a size or a finite worsening are not on the front."""
    def point(r: CandidateRow) -> tuple[float, ...] | None:
        ws = [c["delta"] for c in sorted(r.checks, key=lambda c: c["name"])]
        if r.checkpoint_bytes is None or not ws or any(w is None or not math.isfinite(w) for w in ws):
            return None
        return (float(r.checkpoint_bytes), *ws)

    pts = {r.name: p for r in rows if (p := point(r)) is not None}
    front = set()
    for name, p in pts.items():
        dominated = any(all(a <= b for a, b in zip(q, p, strict=True)) and q != p for other, q in pts.items() if other != name and len(q) == len(p))
        if not dominated:
            front.add(name)
    return front


@dataclass
class SearchResult:
    name: str
    key: str
    split: dict[str, Any]
    ladder: list[str]
    rows: list[CandidateRow]
    not_run: list[str]
    winner: str | None
    confirmation: Confirmation | None
    decision: str
    exit_code: int
    reason: str
    full: bool
    seconds: float
    registration: dict[str, Any] | None = None
    mlflow_parent_run_id: str | None = None
    out_dir: str = ""

    @classmethod
    def build(cls, spec: SearchSpec, key: str, ladder: list[Candidate], rows: list[CandidateRow], winner: CandidateRow | None,
              confirmation: Confirmation | None, *, full: bool, seconds: float) -> SearchResult:
        from quantgate.search.select import exit_code

        front = pareto_front(rows)
        for r in rows:
            r.pareto = r.name in front
        ran = {r.name for r in rows}
        code = int(exit_code(_verdict_like(confirmation), [r.decision for r in rows]))
        if confirmation is not None:
            decision = confirmation.decision
            cheaper = rows[: next(i for i, r in enumerate(rows) if r.name == winner.name)]
            errored = [r.name for r in cheaper if r.decision == "ERROR"]
            # A cheaper rung that could not be judged might have passed: the winner is then the
            # cheapest that was shown to pass, not the cheapest that would.
            rank = (f"cheapest passing of {len(rows)} tried; cheaper but not judged (ERROR): {', '.join(errored)}"
                    if errored else f"cheapest of {len(rows)} tried")
            reason = f"{winner.name} passed the search split ({rank}) and its held-out confirmation: {confirmation.reason}"
            if confirmation.decision != "PASS":
                reason = f"{winner.name} passed the search split but NOT its held-out confirmation: {confirmation.reason}"
        else:
            from quantgate.errors import ExitCode

            decision = ExitCode(code).name if code != 3 else "ERROR"
            reason = f"no candidate passed the search split ({', '.join(f'{r.name}={r.decision}' for r in rows)})"
        return cls(
            name=spec.name, key=key, split=spec.split.model_dump(), ladder=[c.name for c in ladder], rows=rows,
            not_run=[c.name for c in ladder if c.name not in ran], winner=winner.name if winner else None,
            confirmation=confirmation, decision=decision, exit_code=code, reason=reason, full=full, seconds=round(seconds, 1),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _verdict_like(confirmation: Confirmation | None) -> Any:
    if confirmation is None:
        return None
    from quantgate.gate import Verdict

    data = dict(confirmation.verdict)
    data.pop("exit_code", None)
    return Verdict.model_validate(data)
