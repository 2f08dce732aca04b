"""What a report needs from a run directory, read into typed objects (reading only, never writing).

A run directory may be incomplete (a run that stopped before the gate has outcome.json but no
verdict.json): every part except the run directory itself is optional, and the report says what
is missing instead of failing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from quantgate.artifacts import CalibrationInfo, Checkpoint
from quantgate.errors import ExitCode, QuantgateError
from quantgate.evaluation.results import EvalResults, GoldenSummary, TaskResult
from quantgate.gate import Verdict

# Keys under which a run may state that its candidate IS the baseline artifact (fp16 recipe).
SAME_ARTIFACT_KEYS = ("candidate_is_baseline", "same_artifact")


class ReportError(QuantgateError):
    """The folder is not a readable run directory."""

    exit_code = ExitCode.BAD_INPUT


@dataclass
class TaskComparison:
    """Baseline vs candidate on one task, from the per-item records."""

    task: str
    kind: str
    n_baseline: int
    n_candidate: int
    n_paired: int
    metrics: list[tuple[str, float | None, float | None, bool | None]]  # name, base, cand, higher is better
    worse: int  # right->wrong (accuracy) or lower loglikelihood (perplexity)
    better: int  # wrong->right or higher loglikelihood
    binary: bool  # per-item scores are 0/1: worse/better are true flips
    seconds: tuple[float, float] = (0.0, 0.0)

    @property
    def flip_words(self) -> tuple[str, str]:
        if self.kind == "perplexity":
            return "docs with lower log-likelihood", "docs with higher log-likelihood"
        if self.binary:
            return "right → wrong", "wrong → right"
        return "items scored lower", "items scored higher"


@dataclass
class RunData:
    run_dir: Path
    name: str
    format: str
    recipe: dict[str, Any] = field(default_factory=dict)
    outcome: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    verdict: Verdict | None = None
    baseline: EvalResults | None = None
    candidate: EvalResults | None = None
    golden: GoldenSummary | None = None
    calibration: CalibrationInfo | None = None
    checkpoint: Checkpoint | None = None
    verdict_extra: dict[str, Any] = field(default_factory=dict)
    fidelity: dict[str, Any] | None = None  # fidelity.json: KL(calibrated in memory || artifact)
    problems: list[str] = field(default_factory=list)  # files present but unreadable

    @property
    def decision(self) -> str:
        if self.verdict is not None:
            return self.verdict.decision.value
        return str(self.outcome.get("decision") or "ERROR")

    @property
    def reason(self) -> str:
        if self.verdict is not None:
            return self.verdict.reason
        return str(self.outcome.get("reason") or "the run stopped before the gate (no verdict.json)")

    @property
    def checkpoint_bytes(self) -> int | None:
        if self.outcome.get("checkpoint_bytes") is not None:
            return int(self.outcome["checkpoint_bytes"])
        return self.checkpoint.size_bytes if self.checkpoint is not None else None

    @property
    def candidate_is_baseline(self) -> bool:
        """True when the candidate is the baseline artifact itself (the fp16 recipe): its
        "statistics" would compare a thing with itself, so the report shows none."""
        for src in (self.verdict_extra, self.outcome, self.manifest):
            for key in SAME_ARTIFACT_KEYS:
                if src.get(key):
                    return True
        from quantgate import formats

        try:
            return not formats.get_format(self.format).quantized
        except Exception:  # an unknown format name: do not guess
            return False

    def tasks(self) -> list[TaskComparison]:
        if self.baseline is None or self.candidate is None:
            return []
        names = sorted(set(self.baseline.tasks) | set(self.candidate.tasks))
        return [compare_task(self.baseline.tasks.get(t), self.candidate.tasks.get(t), t) for t in names]


def compare_task(tb: TaskResult | None, tc: TaskResult | None, task: str) -> TaskComparison:
    """Metrics side by side and flips both ways over the items paired by (doc_id, prompt_hash)."""
    ref = tb or tc
    assert ref is not None
    metric_names = sorted(set(tb.metrics if tb else {}) | set(tc.metrics if tc else {}))
    metrics = []
    for m in metric_names:
        hib = (tb.higher_is_better.get(m) if tb else None)
        if hib is None and tc is not None:
            hib = tc.higher_is_better.get(m)
        metrics.append((m, tb.metrics.get(m) if tb else None, tc.metrics.get(m) if tc else None, hib))
    worse = better = paired = 0
    binary = True
    if tb is not None and tc is not None:
        by_c = {(it.doc_id, it.prompt_hash): it for it in tc.items}
        for ib in tb.items:
            ic = by_c.get((ib.doc_id, ib.prompt_hash))
            if ic is None:
                continue
            if ref.kind == "perplexity":
                a, b = ib.loglikelihood, ic.loglikelihood
            else:
                a, b = ib.correct, ic.correct
            if a is None or b is None:
                continue
            paired += 1
            binary = binary and a in (0.0, 1.0) and b in (0.0, 1.0)
            worse += b < a
            better += b > a
    return TaskComparison(
        task=task, kind=ref.kind, n_baseline=len(tb.items) if tb else 0, n_candidate=len(tc.items) if tc else 0,
        n_paired=paired, metrics=metrics, worse=worse, better=better, binary=binary and ref.kind != "perplexity",
        seconds=(tb.seconds if tb else 0.0, tc.seconds if tc else 0.0),
    )


def _read_json(path: Path, problems: list[str]) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        problems.append(f"{path.name}: unreadable ({err})")
        return None


def _typed(model: Any, data: Any, name: str, problems: list[str]) -> Any:
    if data is None:
        return None
    try:
        return model.model_validate(data)
    except ValidationError as err:
        problems.append(f"{name}: does not match {model.__name__} ({err.error_count()} errors)")
        return None


def load_run(run_dir: Path) -> RunData:
    """Read every report input of `run_dir`; ReportError when it is no run directory at all."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run directory")
    known = ("outcome.json", "verdict.json", "recipe.yaml", "manifest.json")

    def at(name: str) -> Path:
        # A run's MLflow artifacts, downloaded, keep the results under results/ (recipe.yaml at the top).
        return run_dir / name if (run_dir / name).is_file() else run_dir / "results" / name

    if not any(at(n).is_file() for n in known):
        raise ReportError(f"{run_dir}: not a quantgate run directory (none of {', '.join(known)} found)")
    problems: list[str] = []
    recipe: dict[str, Any] = {}
    if at("recipe.yaml").is_file():
        try:
            recipe = yaml.safe_load(at("recipe.yaml").read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as err:
            problems.append(f"recipe.yaml: unreadable ({err})")
    outcome = _read_json(at("outcome.json"), problems) or {}
    manifest = _read_json(at("manifest.json"), problems) or {}
    vdata = _read_json(at("verdict.json"), problems)
    verdict_extra: dict[str, Any] = {}
    if isinstance(vdata, dict):
        # Keys the Verdict model does not hold (exit_code, flags of newer runs) stay readable.
        verdict_extra = {k: v for k, v in vdata.items() if k not in Verdict.model_fields}
        vdata = {k: v for k, v in vdata.items() if k in Verdict.model_fields}
    name = str(recipe.get("name") or outcome.get("recipe") or run_dir.name)
    fmt = str((recipe.get("quantization") or {}).get("format") or outcome.get("format") or "?")
    return RunData(
        run_dir=run_dir, name=name, format=fmt, recipe=recipe, outcome=outcome, manifest=manifest,
        verdict=_typed(Verdict, vdata, "verdict.json", problems),
        baseline=_typed(EvalResults, _read_json(at("baseline_results.json"), problems), "baseline_results.json", problems),
        candidate=_typed(EvalResults, _read_json(at("candidate_results.json"), problems), "candidate_results.json", problems),
        golden=_typed(GoldenSummary, _read_json(at("golden.json"), problems), "golden.json", problems),
        calibration=_typed(CalibrationInfo, _read_json(at("calibration.json"), problems), "calibration.json", problems),
        checkpoint=_typed(Checkpoint, _read_json(at("checkpoint.json"), problems), "checkpoint.json", problems),
        verdict_extra=verdict_extra, fidelity=_read_json(at("fidelity.json"), problems) if at("fidelity.json").is_file() else None,
        problems=problems,
    )
