"""Stage `evaluate`: the candidate checkpoint through the same engine and suite as the baseline.

For a 16-bit recipe there is nothing to evaluate: the candidate IS the baseline artifact, and
the plan says so with `BaselineIsCandidate` instead of pretending to compare two things.
"""

from __future__ import annotations

from typing import Any, ClassVar

from quantgate.artifacts import Checkpoint
from quantgate.evaluation.results import EvalResults
from quantgate.stages import MISSING, RunContext, Stage
from quantgate.stages.baseline import Baseline, evaluate_checkpoint


class EvaluateCandidate(Stage):
    """Evaluate the exported checkpoint (lm-eval tasks + golden prompts along the baseline's outputs)."""

    name: ClassVar[str] = "evaluate"
    needs: ClassVar[tuple[str, ...]] = ("checkpoint", "baseline")
    produces: ClassVar[str] = "candidate"

    def identity(self, recipe: Any) -> Any:
        from quantgate.engines import backend_identity

        return {"evaluation": recipe.evaluation.model_dump(mode="json"), "engine": recipe.engine.model_dump(mode="json"),
                "backend": backend_identity(recipe)}

    def run(self, ctx: RunContext, *, checkpoint: Checkpoint, baseline: Baseline) -> EvalResults:
        return evaluate_checkpoint(checkpoint, ctx.recipe, "candidate", golden_reference=baseline.results.golden, clock=ctx.clock)

    def save(self, ctx: RunContext, value: EvalResults) -> dict[str, Any]:
        value.save(ctx.run_dir / "candidate_results.json")
        return {"file": "candidate_results.json"}

    def load(self, ctx: RunContext) -> Any:
        try:
            return EvalResults.load(ctx.run_dir / "candidate_results.json")
        except (OSError, ValueError):
            return MISSING


class BaselineArtifact(Stage):
    """16-bit recipe: the checkpoint under judgement is the baseline's own export."""

    name: ClassVar[str] = "candidate_is_baseline_artifact"
    needs: ClassVar[tuple[str, ...]] = ("baseline",)
    produces: ClassVar[str] = "checkpoint"
    persistent: ClassVar[bool] = False

    def run(self, ctx: RunContext, *, baseline: Baseline) -> Checkpoint:
        return baseline.checkpoint


class BaselineIsCandidate(Stage):
    """16-bit recipe: the candidate's results are the baseline's (same artifact, not re-evaluated)."""

    name: ClassVar[str] = "candidate_is_baseline_results"
    needs: ClassVar[tuple[str, ...]] = ("baseline",)
    produces: ClassVar[str] = "candidate"
    persistent: ClassVar[bool] = False

    def run(self, ctx: RunContext, *, baseline: Baseline) -> EvalResults:
        return baseline.results.model_copy(update={"side": "candidate"})
