"""`quantgate gate RUN`: re-judge stored results with other thresholds, without re-evaluating.

RUN is a run directory (runs/NAME-HASH) or an MLflow run id whose `results/` artifacts are
downloaded. The gate is the same pure function the run used.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import yaml

from quantgate.errors import RecipeError
from quantgate.recipe import Recipe, apply_overrides


def _from_mlflow(run_id: str) -> Path:
    from quantgate.recipe import TrackingSpec
    from quantgate.tracking import download_artifacts, resolve_tracking_uri

    uri = resolve_tracking_uri(TrackingSpec())
    dst = Path(tempfile.mkdtemp(prefix="quantgate-regate-"))
    try:
        download_artifacts(f"runs:/{run_id}/results", dst, tracking_uri=uri)
        download_artifacts(f"runs:/{run_id}/recipe.yaml", dst, tracking_uri=uri)
    except Exception as err:
        raise RecipeError(run_id, "", f"not a run directory, and no MLflow run with results at {uri}: {str(err).splitlines()[0]}") from None
    results = dst / "results"
    (dst / "recipe.yaml").replace(results / "recipe.yaml")
    return results


def regate(run: str, overrides: list[str]) -> tuple[Any, str]:
    from quantgate.evaluation.results import EvalResults, GoldenSummary
    from quantgate.gate import judge
    from quantgate.report import verdict_table

    folder = Path(run)
    if not folder.is_dir():
        folder = _from_mlflow(run)
    need = ["recipe.yaml", "baseline_results.json", "candidate_results.json"]
    missing = [n for n in need if not (folder / n).is_file()]
    if missing:
        raise RecipeError(run, "", f"missing {', '.join(missing)}: the run did not reach its evaluation stage")
    data = yaml.safe_load((folder / "recipe.yaml").read_text())
    bad = [o for o in overrides if not o.split("=", 1)[0].startswith("gate.")]
    if bad:
        raise RecipeError("--set", bad[0].split("=", 1)[0], "only gate.* fields can change when re-judging stored results")
    try:
        recipe = Recipe.model_validate(apply_overrides(data, overrides))
    except Exception as err:
        from pydantic import ValidationError

        if isinstance(err, ValidationError):
            from quantgate.recipe import _format_validation_error

            key, msg = _format_validation_error(err)
            raise RecipeError(f"{run} (with --set)", key, msg) from None
        raise
    baseline = EvalResults.load(folder / "baseline_results.json")
    candidate = EvalResults.load(folder / "candidate_results.json")
    golden = GoldenSummary.model_validate_json((folder / "golden.json").read_text()) if (folder / "golden.json").is_file() else None
    verdict = judge(baseline, candidate, golden, recipe.gate)
    return verdict, verdict_table(verdict)
