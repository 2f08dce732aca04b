"""Honest selection, part 2: judge a candidate's stored results on one split with the recipe's own
gate, pick the cheapest candidate that passes on the search split, and let only its verdict on the
held-out split decide.

Why this is honest: the held-out items took no part in choosing the winner, so its confirmation
is one ordinary gate check at the recipe's confidence. With every candidate exactly at a margin,
P(search confirms a winner) = P(some candidate passes on the search split) x P(the winner passes
on fresh items) <= 1 x alpha. Picking the best of N on the same items has no such bound: each
try is another chance at a lucky sample (tests/test_search.py simulates both).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from quantgate.errors import ExitCode
from quantgate.evaluation.results import EvalResults
from quantgate.gate import Decision, Verdict
from quantgate.recipe import GateSpec
from quantgate.search.split import Side, keeper, subset


def first_passing(passed: Sequence[bool] | np.ndarray) -> int | np.ndarray:
    """The selection rule: index of the first (cheapest) candidate that passed on the search split,
    -1 if none. Works on a list (one search) or on an array of shape (..., N) (a simulation)."""
    arr = np.asarray(passed, dtype=bool)
    idx = np.where(arr.any(axis=-1), arr.argmax(axis=-1), -1)
    return int(idx) if idx.ndim == 0 else idx


def judge_split(baseline: EvalResults, candidate: EvalResults, gate: GateSpec, side: Side, *, fraction: float, seed: int) -> Verdict:
    """The recipe's gate on one split of the paired records (golden figures recomputed from the
    split's stored outputs)."""
    from quantgate.evaluation.golden import compare_golden
    from quantgate.gate import judge

    keep = keeper(side, fraction=fraction, seed=seed)
    base, cand = subset(baseline, keep), subset(candidate, keep)
    golden = compare_golden(base.golden, cand.golden) if base.golden and cand.golden else None
    return judge(base, cand, golden, gate)


def judge_run_dir(run_dir: Path, gate: GateSpec, side: Side, *, fraction: float, seed: int) -> Verdict:
    """judge_split on a run directory's stored results (one line, exit 3, if they are unreadable)."""
    from quantgate.regate import _load

    base = _load(run_dir / "baseline_results.json", EvalResults)
    cand = _load(run_dir / "candidate_results.json", EvalResults)
    return judge_split(base, cand, gate, side, fraction=fraction, seed=seed)


def no_winner_code(decisions: Sequence[str]) -> ExitCode:
    """Exit code of a search where no candidate passed its search split: INCONCLUSIVE if any
    candidate could still be resolved by more items, else REGRESSION if one failed with evidence,
    else ANOMALOUS, else ERROR (nothing could be judged)."""
    for d, code in (("INCONCLUSIVE", ExitCode.INCONCLUSIVE), ("REGRESSION", ExitCode.REGRESSION), ("ANOMALOUS", ExitCode.ANOMALOUS)):
        if d in decisions:
            return code
    return ExitCode.ERROR


def exit_code(confirmation: Verdict | None, search_decisions: Sequence[str]) -> ExitCode:
    """Only the held-out confirmation decides: its own code; no winner: no_winner_code."""
    if confirmation is not None:
        return confirmation.exit_code
    return no_winner_code(search_decisions)


PASS = Decision.PASS.value
