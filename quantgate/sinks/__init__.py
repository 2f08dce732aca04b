"""Sinks record a run; no stage calls them. The runner tells each sink when the run starts, when
each stage is done, and when the run is done or failed:

    files     run-directory files: verdict text, JUnit, Markdown, per-item JSONL, HTML report
    mlflow    the MLflow run: params, metrics, tags, artifacts, the checkpoint, a description
    registry  the Model Registry: a version per run, `candidate` always, the alias only on PASS

A sink that finished for a run directory with the same result key (and its own settings, e.g. the
tracking URI) is not run again: re-running a complete run uploads nothing; changing only the
tracking URI re-logs without recomputing anything.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from quantgate.recipe import Recipe
    from quantgate.runner import Run
    from quantgate.stages import Stage


class Sink:
    name = "sink"

    def key(self, run: Run, result_key: str) -> str:
        """Done-marker for this sink: the run's result key plus this sink's own settings."""
        return result_key

    def run_start(self, run: Run) -> None:
        """Before any stage runs (check what can fail early)."""

    def stage_done(self, run: Run, stage: Stage, value: Any) -> None:
        """After each stage, with its artifact."""

    def run_done(self, run: Run) -> None:
        """After the last stage; run.outcome holds the verdict."""

    def reuse(self, run: Run) -> None:
        """This sink already recorded this result: fill what it adds to run.outcome, do nothing else."""

    def run_failed(self, run: Run) -> None:
        """A stage or a sink raised; run.outcome holds the one-line reason."""


def settings_key(result_key: str, *settings: Any) -> str:
    blob = json.dumps([result_key, *settings], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def public_recipe_yaml(recipe: Recipe) -> str:
    """The resolved recipe as written to disk and shown to people: credentials removed."""
    from quantgate.recipe import recipe_to_yaml
    from quantgate.tracking import redact_uri

    public = recipe.model_copy(deep=True)
    public.tracking.uri = redact_uri(public.tracking.uri)
    return recipe_to_yaml(public)


def default_sinks(recipe: Recipe, parent: Any = None) -> list[Sink]:
    from quantgate.sinks.files import FilesSink

    sinks: list[Sink] = [FilesSink()]
    if recipe.tracking.enabled:
        from quantgate.sinks.mlflow import MlflowSink
        from quantgate.sinks.registry import RegistrySink

        tracking = MlflowSink(parent)
        sinks.append(tracking)
        if recipe.promotion.enabled:
            sinks.append(RegistrySink())
    return sinks
