"""`quantgate search SPEC.yaml`: the cheapest candidate that passes the gate, honestly.

The search, as the list of its steps (`search()` below reads the same way):

1. load the spec and expand its ladder into candidate recipes, cheapest first (promotion off);
2. run candidates one rung at a time through `run_candidates` (one baseline evaluation for all,
   run directories keyed like `quantgate run`, so an interrupted search resumes for free);
3. judge each on the SEARCH split of its paired per-item records with the recipe's own gate;
   stop at the first that passes (cheaper ones all failed, dearer ones cannot win) unless --full;
4. confirm the winner on the HELD-OUT split, never used to choose it: only that verdict decides
   the exit code and promotion;
5. write the summary (search.json, search.html, a plot), then record it at the edges: the MLflow
   parent run's summary, each child's search-split verdict, and the winner's registration (only
   when confirmed PASS).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from quantgate.search.model import CandidateRow, Confirmation, SearchResult
from quantgate.search.spec import Candidate, expand, load_spec, search_key

log = logging.getLogger("quantgate")

__all__ = ["CandidateRow", "Confirmation", "SearchResult", "run_candidates", "search"]


def run_candidates(recipes: Sequence[Any], *, baseline_memo: dict[str, Any], parent: Any = None, fresh: bool = False,
                   executor: Any = None) -> list[Any]:
    """The executor seam: run recipes against one baseline, here one after another (sharing the
    in-memory baseline memo), or through a cluster executor (quantgate/executors/: each candidate
    a task, the baseline shared through the cache). The search needs only the outcomes back."""
    from quantgate.runner import fault_point, run_recipe

    outcomes = []
    for recipe in recipes:
        fault_point(f"candidate:{recipe.name}")  # fault tests: kill the search between candidates
        if executor is None:
            outcomes.append(run_recipe(recipe, str(recipe.name), fresh=fresh, baseline_memo=baseline_memo, parent=parent))
        else:
            from quantgate.executors import Job

            outcomes += executor.run([Job(recipe, str(recipe.name), fresh)], parent=parent)
    return outcomes


def search(spec_path: str | Path, overrides: list[str] | None = None, *, full: bool = False, fresh: bool = False,
           candidates: list[Candidate] | None = None, executor: str = "local") -> SearchResult:
    from quantgate.search.record import SearchParent, fail_parent

    t0 = time.perf_counter()
    spec = load_spec(spec_path)
    ladder = candidates if candidates is not None else expand(spec, spec_path, overrides)
    key = search_key(spec, ladder)
    out_dir = Path(ladder[0].recipe.output_dir) / f"search-{key}"
    log.info("search %s (%s): %d candidates, cheapest first: %s", spec.name, key, len(ladder), ", ".join(c.name for c in ladder))
    parent = SearchParent(ladder[0].recipe, spec.name, key, out_dir)

    try:
        result = _run_ladder(spec, key, ladder, parent, out_dir, full=full, fresh=fresh, executor=executor, t0=t0)
    except BaseException as err:
        fail_parent(parent, err)
        raise
    return result


def _run_ladder(spec: Any, key: str, ladder: list[Candidate], parent: Any, out_dir: Path, *, full: bool, fresh: bool,
                executor: str, t0: float) -> SearchResult:
    from quantgate.executors import get_executor
    from quantgate.search.record import close_parent, register_winner, tag_children
    from quantgate.search.report import search_table, write_summary

    remote = None if executor == "local" else get_executor(executor)
    memo: dict[str, Any] = {}
    rows: list[CandidateRow] = []
    winner: CandidateRow | None = None
    try:
        for cand in ladder:
            outcome = run_candidates([cand.recipe], baseline_memo=memo, parent=parent, fresh=fresh, executor=remote)[0]
            row = judge_candidate(cand, outcome, spec.split.fraction, spec.split.seed)
            rows.append(row)
            log.info("search %s: %s on the search split: %s", spec.name, cand.name, row.reason)
            if winner is None and row.decision == "PASS":
                winner = row
                if not full:
                    break
    finally:
        if remote is not None:
            remote.close()

    confirmation = confirm(winner, ladder, spec.split.fraction, spec.split.seed) if winner else None
    result = SearchResult.build(spec, key, ladder, rows, winner, confirmation, full=full, seconds=time.perf_counter() - t0)
    result.out_dir = str(out_dir)
    result.mlflow_parent_run_id = parent.tracker.run_id if parent.tracker is not None else None

    register_winner(result, ladder)
    write_summary(result, out_dir)
    tag_children(result, ladder[0].recipe)
    close_parent(parent, result, search_table(result), out_dir)
    return result


def judge_candidate(cand: Candidate, outcome: Any, fraction: float, seed: int) -> CandidateRow:
    """The candidate's verdict on the search split (its run's own verdict over all items is kept
    for reference only: it saw the held-out items too)."""
    from quantgate.search.select import judge_run_dir

    row = CandidateRow.from_outcome(cand, outcome)
    if outcome.exit_code in (2, 3):
        # Refused, failed, or its own gate said ERROR (a NaN metric, results that do not reproduce
        # their items, sides not comparable): the split judgment rebuilds metrics from items and
        # would not see those, so the run's own decision and reason stand.
        return row
    try:
        verdict = judge_run_dir(Path(outcome.run_dir), cand.recipe.gate, "search", fraction=fraction, seed=seed)
    except Exception as err:  # stored results unreadable: this candidate is an ERROR, the search goes on
        row.decision, row.exit_code, row.reason = "ERROR", 3, f"search split: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        return row
    row.set_verdict(verdict)
    return row


def confirm(winner: CandidateRow, ladder: list[Candidate], fraction: float, seed: int) -> Confirmation:
    from quantgate.search.select import judge_run_dir

    cand = next(c for c in ladder if c.name == winner.name)
    verdict = judge_run_dir(Path(winner.run_dir), cand.recipe.gate, "confirm", fraction=fraction, seed=seed)
    log.info("search: %s on the held-out confirmation split: %s", winner.name, verdict.reason)
    return Confirmation.from_verdict(winner.name, verdict)
