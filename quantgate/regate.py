"""`quantgate gate RUN`: re-judge stored results with other thresholds, without re-evaluating.

RUN is a run directory (runs/NAME-HASH) or an MLflow run id whose `results/` artifacts are
downloaded. The gate is the same pure function the run used.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import yaml

from quantgate.errors import RecipeError, StageError
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
    from quantgate.gate import judge, recheck_golden, recheck_results
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
    baseline = _load(folder / "baseline_results.json", EvalResults)
    candidate = _load(folder / "candidate_results.json", EvalResults)
    golden_file = folder / "golden.json"
    # "null": the run had no golden prompts (the golden stage writes that, not a summary)
    has_golden = golden_file.is_file() and golden_file.read_text(encoding="utf-8").strip() != "null"
    stored_golden = _load(golden_file, GoldenSummary) if has_golden else None
    # Trust no stored figure: golden figures are recomputed from the per-prompt outputs and
    # records, and stored metrics must match their per-item records (issue 10).
    golden, golden_checks = recheck_golden(stored_golden, baseline, candidate)
    extra = golden_checks + recheck_results(baseline) + recheck_results(candidate)
    verdict = judge(baseline, candidate, golden, recipe.gate, extra_checks=extra)
    return verdict, verdict_table(verdict)


def _load(path: Path, model: Any) -> Any:
    """A stored artifact, or one line saying which file is unreadable (exit 3)."""
    from pydantic import ValidationError

    try:
        return model.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, ValidationError) as err:
        first = str(err).splitlines()
        detail = f"{first[0]}: {first[1].strip()}" if len(first) > 1 else (first[0] if first else type(err).__name__)
        raise StageError("gate", f"{path}: not a readable {model.__name__} ({detail})") from None
