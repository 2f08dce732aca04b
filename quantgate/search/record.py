"""The search's side effects, at the edge: the MLflow parent run (a child per candidate, opened by
the runner's own MLflow sink), each child's search-split verdict as tags, and the confirmed
winner's registration with its lineage. Nothing here decides anything."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from quantgate.rundir import atomic_write_json
from quantgate.sinks.mlflow import MatrixParent

if TYPE_CHECKING:
    from quantgate.recipe import Recipe
    from quantgate.search.model import SearchResult
    from quantgate.search.spec import Candidate

log = logging.getLogger("quantgate")
STATE = "mlflow_parent.json"


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


class SearchParent(MatrixParent):
    """The search's parent MLflow run, opened only when a candidate has something to record; a
    parent left RUNNING by a killed attempt is closed as FAILED when the search resumes."""

    def __init__(self, recipe: Recipe, name: str, key: str, out_dir: Path) -> None:
        super().__init__(recipe, [name])
        self.name, self.key, self.out_dir = name, key, out_dir

    def run_id(self) -> str | None:
        if not self.recipe.tracking.enabled:
            return None
        if self.tracker is None:
            from quantgate.tracking import RunTracker, close_interrupted_run, version_tags

            tags = {"quantgate.search": self.name, "quantgate.search_hash": self.key, **version_tags()}
            self.tracker = RunTracker(self.recipe.tracking, f"search: {self.name}", tags=tags).start()
            state = self.out_dir / STATE
            previous = json.loads(state.read_text()).get("run_id") if state.is_file() else None
            if previous and previous != self.tracker.run_id:
                self.tracker.set_tags({"quantgate.resumed_from": previous})
                close_interrupted_run(self.tracker.uri, previous, self.tracker.run_id)
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(state, {"run_id": self.tracker.run_id})
        return self.tracker.run_id


def register_winner(result: SearchResult, ladder: list[Candidate]) -> None:
    """Register the winner's checkpoint (logged by its child run) only when its held-out
    confirmation is PASS, with the search's lineage; idempotent by a run key of the search."""
    c = result.confirmation
    if c is None or c.decision != "PASS":
        return
    cand = next(x for x in ladder if x.name == c.candidate)
    row = next(r for r in result.rows if r.name == c.candidate)
    recipe = cand.recipe
    if not (recipe.tracking.enabled and cand.promotion.enabled and row.mlflow_run_id):
        log.info("search %s: winner %s confirmed; not registered (tracking or promotion disabled)", result.name, c.candidate)
        return
    from quantgate.tracking import register_checkpoint, resolve_tracking_uri

    tried = ", ".join(f"{r.name}={r.decision}" for r in result.rows)
    reg = register_checkpoint(
        row.mlflow_run_id, "checkpoint", cand.promotion, passed=True, decision="PASS",
        tracking_uri=resolve_tracking_uri(recipe.tracking), run_key=f"search-{result.key}-{Path(row.run_dir).name}",
        tags={
            "quantgate.verdict": "PASS", "quantgate.recipe": recipe.name, "quantgate.format": row.format,
            "quantgate.recipe_hash": recipe.content_hash(), "quantgate.search": result.name, "quantgate.search_hash": result.key,
            "quantgate.search_candidates_tried": tried, "quantgate.search_ladder": ", ".join(result.ladder),
            "quantgate.search_split": json.dumps(result.split, sort_keys=True),
            "quantgate.confirmation": c.reason,
        },
    )
    if reg is not None:
        from dataclasses import asdict

        result.registration = asdict(reg)
        log.info("search %s: registered %s version %s (%s)", result.name, reg.name, reg.version, ", ".join(reg.aliases_set))


def tag_children(result: SearchResult, recipe: Recipe) -> None:
    """Each candidate's MLflow run says what the search made of it (its own name carries its
    all-items verdict)."""
    if not recipe.tracking.enabled:
        return
    from quantgate.tracking import _mlflow_client, resolve_tracking_uri

    client = _mlflow_client(resolve_tracking_uri(recipe.tracking))
    for r in result.rows:
        if not r.mlflow_run_id:
            continue
        try:
            client.set_tag(r.mlflow_run_id, "quantgate.search", result.name)
            client.set_tag(r.mlflow_run_id, "quantgate.search_hash", result.key)
            client.set_tag(r.mlflow_run_id, "quantgate.search_split_verdict", r.decision)
            client.set_tag(r.mlflow_run_id, "quantgate.search_winner", str(r.name == result.winner).lower())
        except Exception as err:  # the search summary holds the record; these tags are a convenience
            log.warning("could not tag candidate run %s: %s", r.mlflow_run_id, _first_line(err))


def close_parent(parent: SearchParent, result: SearchResult, table: str, out_dir: Path) -> None:
    """Summarise the search on its parent run: verdict in the name, tags, the table, the summary files."""
    if parent.tracker is None:  # every candidate was complete on disk: no parent run was needed
        _close_stale_parent(parent)
        return
    result.mlflow_parent_run_id = parent.tracker.run_id
    try:
        t = parent.tracker
        t.set_tags({
            "quantgate.verdict": result.decision, "quantgate.search_winner": result.winner or "none",
            "quantgate.search_candidates_tried": ", ".join(f"{r.name}={r.decision}" for r in result.rows),
            "mlflow.runName": f"search: {result.name} [{result.decision}]",
            "mlflow.note.content": f"**{result.decision}** (exit {result.exit_code}): {result.reason}\n\n```\n{table}\n```",
        })
        t.log_metrics({"search.exit_code": result.exit_code, "search.candidates_run": len(result.rows), "search.seconds": result.seconds})
        t.log_text(table, "search.txt")
        for name in ("search.json", "search.html", "search_scatter.png"):
            if (out_dir / name).is_file():
                t.log_artifact(out_dir / name, "results")
        t.end("FINISHED")
    except Exception as err:
        log.warning("could not close the search's MLflow run: %s", _first_line(err))


def fail_parent(parent: SearchParent, err: BaseException) -> None:
    """The search itself failed after its parent run opened: close that run FAILED with the
    reason, so no run is left RUNNING (best effort: the error the user sees is `err`)."""
    if parent.tracker is None:
        return
    try:
        reason = f"{type(err).__name__}: {_first_line(err)}" if isinstance(err, Exception) else type(err).__name__
        parent.tracker.set_tags({"quantgate.failure": reason})
        parent.tracker.end("FAILED")
    except Exception as close_err:
        log.warning("could not close the search's MLflow run: %s", _first_line(close_err))


def _close_stale_parent(parent: SearchParent) -> None:
    """A killed attempt's parent run, left RUNNING, when no new parent was opened to replace it."""
    state = parent.out_dir / STATE
    if not (parent.recipe.tracking.enabled and state.is_file()):
        return
    try:
        from quantgate.tracking import close_interrupted_run, resolve_tracking_uri

        previous = json.loads(state.read_text()).get("run_id")
        if previous:
            close_interrupted_run(resolve_tracking_uri(parent.recipe.tracking), previous, "none (every candidate was complete on disk)")
    except Exception as err:
        log.warning("could not close the earlier search run: %s", _first_line(err))
