"""Honest selection, part 1: each task's items (and the golden prompts) are split by a hash into a
search split, on which candidates are compared, and a held-out confirmation split, on which only
the chosen candidate is judged. The gate is pure, so judging on a split is judging a filtered copy
of the stored per-item records; metrics are rebuilt from the kept records (the gate checks that
records reproduce their metric, so nothing stored is trusted)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Literal

from quantgate import stats
from quantgate.evaluation.results import EvalResults, GoldenOutput, TaskResult

Side = Literal["search", "confirm"]
GOLDEN = "golden"  # the golden prompts are split like a task's items, by their id


def in_search_split(task: str, item_id: int | str, *, fraction: float, seed: int) -> bool:
    """Deterministic: the same (seed, task, item) always lands in the same split, whatever else ran."""
    digest = hashlib.sha256(f"{seed}\x1f{task}\x1f{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def keeper(side: Side, *, fraction: float, seed: int) -> Callable[[str, int | str], bool]:
    want = side == "search"
    return lambda task, item: in_search_split(task, item, fraction=fraction, seed=seed) is want


def _rebuilt_metrics(full: TaskResult, items: list) -> dict[str, float]:
    """The task's metrics over `items` only; a metric the records cannot rebuild is left out (a
    gated one then fails closed in the gate: 'metric missing')."""
    out: dict[str, float] = {}
    if not items:
        return out
    for metric, stored in full.metrics.items():
        if "stderr" in metric:
            continue
        if full.kind == "accuracy":
            if all(it.scores and it.scores.get(metric) is not None for it in items):
                out[metric] = sum(it.scores[metric] for it in items) / len(items)
            elif all(it.correct is not None for it in full.items) and math.isclose(
                    sum(it.correct for it in full.items) / len(full.items), stored, abs_tol=1e-9):
                out[metric] = sum(it.correct for it in items) / len(items)  # `correct` is this (primary) metric
        elif metric in stats.CORPUS_METRICS:
            try:
                out[metric] = stats.corpus_metric([it.loglikelihood for it in items], [it.words for it in items],
                                                  [it.bytes for it in items], [it.tokens for it in items], metric)
            except (TypeError, ValueError):
                continue
    return out


def subset(results: EvalResults, keep: Callable[[str, int | str], bool]) -> EvalResults:
    """A copy of `results` with only the kept items and golden prompts, metrics rebuilt from them."""
    tasks = {}
    for name, tr in results.tasks.items():
        items = [it for it in tr.items if keep(name, it.doc_id)]
        tasks[name] = tr.model_copy(update={"items": items, "metrics": _rebuilt_metrics(tr, items), "seconds": 0.0, "tokens_scored": 0})
    golden: list[GoldenOutput] = [g for g in results.golden if keep(GOLDEN, g.id)]
    return results.model_copy(update={"tasks": tasks, "golden": golden})


def split_sizes(results: EvalResults, keep: Callable[[str, int | str], bool]) -> dict[str, int]:
    sizes = {name: sum(keep(name, it.doc_id) for it in tr.items) for name, tr in results.tasks.items()}
    if results.golden:
        sizes[GOLDEN] = sum(keep(GOLDEN, g.id) for g in results.golden)
    return sizes
