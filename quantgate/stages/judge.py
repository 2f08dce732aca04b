"""Stages `golden`, `fidelity` and `gate`: compare the two sides and decide.

The gate itself is the pure function `quantgate.gate.judge`; these stages only feed it and keep
its output in the run directory. Changing the recipe's gate thresholds changes only the `gate`
stage's key, so a re-run re-judges stored results without calibrating or evaluating again.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel

from quantgate.evaluation.results import EvalResults, GoldenOutput, GoldenSummary
from quantgate.gate import Check, Decision, Verdict
from quantgate.rundir import atomic_write_json, atomic_write_text
from quantgate.stages import MISSING, RunContext, Stage
from quantgate.stages.baseline import Baseline


class GoldenDiff(Stage):
    """Golden prompts: exact match, first divergence, token agreement, KL and top-1 vs the baseline."""

    name: ClassVar[str] = "golden"
    needs: ClassVar[tuple[str, ...]] = ("baseline", "candidate")
    produces: ClassVar[str] = "golden"

    def identity(self, recipe: Any) -> Any:
        return {"code": gate_code_hash()}  # a summary stored by older KL code is recomputed, not reused

    def run(self, ctx: RunContext, *, baseline: Baseline, candidate: EvalResults) -> GoldenSummary | None:
        from quantgate.evaluation.golden import compare_golden

        if not (baseline.results.golden and candidate.golden):
            return None
        return compare_golden(baseline.results.golden, candidate.golden)

    def save(self, ctx: RunContext, value: GoldenSummary | None) -> dict[str, Any]:
        from quantgate.evaluation.golden import golden_diff_html, golden_diff_markdown

        if value is None:
            atomic_write_text(ctx.run_dir / "golden.json", "null")
            return {"file": "golden.json", "prompts": 0}
        atomic_write_text(ctx.run_dir / "golden.json", value.model_dump_json(indent=2))
        atomic_write_text(ctx.run_dir / "golden_diff.md", golden_diff_markdown(value))
        atomic_write_text(ctx.run_dir / "golden_diff.html", golden_diff_html(value))
        return {"file": "golden.json", "prompts": len(value.records)}

    def load(self, ctx: RunContext) -> Any:
        try:
            text = (ctx.run_dir / "golden.json").read_text()
            return None if text.strip() == "null" else GoldenSummary.model_validate_json(text)
        except (OSError, ValueError):
            return MISSING


class ExportFidelity(BaseModel):
    """How much of the candidate's drift from the baseline the export adds (a diagnostic)."""

    prompts: int
    kl_calibrated_to_artifact: float  # KL(in-memory calibrated || exported artifact)
    top1_calibrated_vs_artifact: float
    kl_baseline_to_calibrated: float
    kl_baseline_to_artifact: float
    export_added_kl: float  # kl_baseline_to_artifact - kl_baseline_to_calibrated


def export_fidelity(baseline: list[GoldenOutput], probe: list[GoldenOutput], artifact: list[GoldenOutput]) -> ExportFidelity:
    from quantgate.evaluation.golden import compare_golden

    to_probe = compare_golden(baseline, probe)
    to_artifact = compare_golden(baseline, artifact)
    probe_vs_artifact = compare_golden(probe, artifact)  # all three are teacher-forced on the baseline's outputs
    return ExportFidelity(
        prompts=len(probe),
        kl_calibrated_to_artifact=probe_vs_artifact.mean_kl, top1_calibrated_vs_artifact=probe_vs_artifact.top1_agreement,
        kl_baseline_to_calibrated=to_probe.mean_kl, kl_baseline_to_artifact=to_artifact.mean_kl,
        export_added_kl=to_artifact.mean_kl - to_probe.mean_kl,
    )


class MeasureExportFidelity(Stage):
    """KL(calibrated in-memory model || exported artifact) on the golden prompts; not gated."""

    name: ClassVar[str] = "fidelity"
    needs: ClassVar[tuple[str, ...]] = ("baseline", "probe", "candidate")
    produces: ClassVar[str] = "fidelity"

    def run(self, ctx: RunContext, *, baseline: Baseline, probe: list[GoldenOutput], candidate: EvalResults) -> ExportFidelity | None:
        if not (probe and candidate.golden and baseline.results.golden):
            return None
        return export_fidelity(baseline.results.golden, probe, candidate.golden)

    def save(self, ctx: RunContext, value: ExportFidelity | None) -> dict[str, Any]:
        atomic_write_json(ctx.run_dir / "fidelity.json", value.model_dump() if value else None)
        return {"file": "fidelity.json"}

    def load(self, ctx: RunContext) -> Any:
        import json

        try:
            data = json.loads((ctx.run_dir / "fidelity.json").read_text())
        except (OSError, ValueError):
            return MISSING
        return ExportFidelity.model_validate(data) if data else None


@functools.cache  # the code does not change within a process; every stage key asks
def gate_code_hash() -> str:
    """sha256 (12 hex) of the modules that turn results into a verdict (the gate recomputes the
    golden figures, so golden.py is one of them)."""
    import hashlib

    from quantgate import gate, stats
    from quantgate.evaluation import golden

    h = hashlib.sha256()
    for mod in (gate, stats, golden):
        h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()[:12]


class Judge(Stage):
    """The gate: a pure function from both sides' results and the golden diff to a verdict."""

    name: ClassVar[str] = "gate"
    needs: ClassVar[tuple[str, ...]] = ("baseline", "candidate", "golden")
    produces: ClassVar[str] = "verdict"

    def __init__(self, candidate_is_baseline: bool = False) -> None:
        self.candidate_is_baseline = candidate_is_baseline

    def identity(self, recipe: Any) -> Any:
        # The gate's code is part of its identity: a verdict stored by an older gate (one that,
        # say, passed a case now caught) is judged again, not reused by a resumed run.
        return {"gate": recipe.gate.model_dump(mode="json"), "candidate_is_baseline": self.candidate_is_baseline,
                "gate_code": gate_code_hash()}

    def run(self, ctx: RunContext, *, baseline: Baseline, candidate: EvalResults, golden: GoldenSummary | None) -> Verdict:
        from quantgate.gate import judge

        verdict = judge(baseline.results, candidate, golden, ctx.recipe.gate)
        if self.candidate_is_baseline and verdict.decision != Decision.ERROR:
            # Comparing an artifact with itself gives zero deltas by construction (at a small n
            # the intervals alone could even read INCONCLUSIVE): say so instead of showing
            # statistics. Errors found above (non-finite values, missing tasks) still decide.
            verdict = Verdict(
                decision=Decision.PASS, confidence=verdict.confidence, power=verdict.power,
                reason="PASS: the candidate is the baseline artifact itself (16-bit export, no quantization); nothing was compared",
                checks=[Check(name="identity/candidate_is_baseline", kind="completeness", status="pass",
                              detail="candidate = baseline artifact; no statistics computed")],
            )
        return verdict

    def save(self, ctx: RunContext, value: Verdict) -> dict[str, Any]:
        atomic_write_json(ctx.run_dir / "verdict.json", value.to_dict())
        return {"file": "verdict.json", "decision": value.decision.value}

    def load(self, ctx: RunContext) -> Any:
        import json

        try:
            data = json.loads((ctx.run_dir / "verdict.json").read_text())
            data.pop("exit_code", None)
            return Verdict.model_validate(data)
        except (OSError, ValueError):
            return MISSING
